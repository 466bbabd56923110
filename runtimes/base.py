"""The interface every runtime adapter implements, and the records it returns.

Modelled on lm-evaluation-harness's ``LM``: a small set of calls that every backend implements the same way, so
the bench and the evaluators never ask which backend they have.

=============================  ===============================================================================
``generate``                   greedy generation one prompt at a time (batch 1), with per-step timings
``generate_batch``             greedy generation of several prompts together (throughput); ``can_batch`` says
                               whether the runtime, with its current token compression, does it
``score_windows``              next-token scores of whole sequences (``loglikelihood_rolling``); on request
                               (``top_k``, ``support``) the top-k log-probabilities of every scored position and
                               the log-probabilities of given ids there (distribution fidelity, bench/fidelity.py)
``score_continuations``        scores of continuation tokens after a context (``loglikelihood``); consecutive
                               requests with the same context are prefilled once, and token compression, when
                               attached, compresses the context's prefill
``compress``                   attach token compression (a ``CompressionSpec``) for the calls that follow
``kv_record``                  what the last prefill left in the KV cache under compression (bench accounting)
``describe`` / ``close``       settings for the report; free the model
=============================  ===============================================================================

Class-level declarations say what a runtime supports (``Capabilities``) and what it needs from an export
(``export_options``), and refuse token compression it cannot run (``check_compression``), so the callers hold no
runtime-specific branches. Adding a runtime is one module implementing this class, registered in
``runtimes/__init__.py`` (see docs/architecture.md).

All generation is greedy (deployment sign-off compares tokens, not samples). Timings are wall-clock seconds
measured inside the adapter around the runtime's own calls: ``prefill_seconds[i]`` is the time to the first
generated token of prompt i (TTFT), ``decode_seconds[i]`` the time of each later token (TPOT samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from effideploy.errors import EffideployError


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (the prompt excluded)
    prefill_seconds: list[float]  # per prompt (for a batch: the batch's prefill, repeated)
    decode_seconds: list[list[float]]  # per prompt, one entry per generated token after the first
    total_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean_decode_seconds(self) -> float:
        samples = [s for seq in self.decode_seconds for s in seq]
        return sum(samples) / len(samples) if samples else float("nan")


@dataclass
class TokenScores:
    """Next-token scores of one sequence: entry t is the NLL of the scored token t and the argmax prediction made
    for its position (for ``score_windows``: tokens 1..L-1 of the window)."""

    nll: torch.Tensor  # float32
    argmax: torch.Tensor  # int64
    # On request only (``score_windows(..., top_k=k, support=...)``), per scored position:
    top_ids: torch.Tensor | None = None  # [n, k] int64, the k most probable next tokens, most probable first
    top_logprobs: torch.Tensor | None = None  # [n, k] float32, their log-probabilities (log_softmax of the logits)
    support_logprobs: torch.Tensor | None = None  # [n, m] float32, log-probabilities of the ``support`` ids


@dataclass(frozen=True)
class Capabilities:
    """What a runtime runs. ``compression_kinds``: the token-compression kinds (``CompressionMethod.kind``: "kv",
    "llm", "vision", "kv-dtype") it can attach; ``batching``: ``generate_batch`` exists; ``weight_formats``: the
    weight storage it serves; ``exporter``: the exporter whose folder it opens (None: it reads checkpoints);
    ``server``: it has an OpenAI-compatible server that the serving bench starts (``bench/serve_servers.py``)."""

    compression_kinds: frozenset[str] = frozenset()
    batching: bool = True
    weight_formats: tuple[str, ...] = ("float32",)
    exporter: str | None = None
    server: bool = False


ContinuationRequest = tuple[list[int], list[int]]  # (context, continuation) token ids


class Runtime:
    name: ClassVar[str] = "base"
    capabilities: ClassVar[Capabilities] = Capabilities()

    # ------------------------------------------------------------------------------------------ declarations

    @classmethod
    def check_compression(cls, spec, **export_facts):
        """The parsed spec, or a one-line EffideployError when this runtime cannot run it. ``export_facts`` are
        properties of the artifact that decide it (e.g. ``attention_outputs`` of an ONNX graph)."""
        from effideploy.compression import build_method, parse_spec

        spec = parse_spec(spec)
        kind = build_method(spec).kind
        if kind not in cls.capabilities.compression_kinds:
            raise EffideployError(f"token compression {spec} is not available on the {cls.name} runtime "
                                  f"(it runs: {', '.join(sorted(cls.capabilities.compression_kinds)) or 'none'})")
        return spec

    @classmethod
    def export_options(cls, compression) -> dict:
        """Options the exporter needs so that this runtime can run ``compression`` (a spec or None)."""
        return {}

    @classmethod
    def check_here(cls, *, scheme: str | None = None, compression=None) -> None:
        """A one-line EffideployError when this machine's build of the runtime has no kernel for weights ``scheme``
        (one of ``capabilities.weight_formats``) or for the token compression ``compression`` (a spec that
        ``check_compression`` accepted): the declarations say what the runtime serves anywhere, this what it serves
        here (an export for another machine is not judged by it). Runtimes whose kernels do not vary by machine
        accept everything they declare."""

    @classmethod
    def context_options(cls, tokens: int) -> dict:
        """Open options for a run whose sequences need up to ``tokens`` positions (adapters that size a cache up
        front say so here)."""
        return {}

    @classmethod
    def preload(cls) -> None:
        """Import what opening a model will import (the memory probe's baseline is taken after this)."""

    # ------------------------------------------------------------------------------------------ the calls

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        raise EffideployError(f"the {self.name} runtime has no batched generation")

    @property
    def can_batch(self) -> bool:
        """Whether ``generate_batch`` runs with the current settings (compression included)."""
        return self.capabilities.batching

    def score_windows(self, sequences: list[list[int]], *, top_k: int = 0,
                      support: list[torch.Tensor] | None = None) -> list[TokenScores]:
        """Per sequence, the NLL and argmax of tokens 1..L-1. ``top_k`` > 0 adds each position's ``top_ids`` /
        ``top_logprobs``; ``support`` (per sequence an [L-1, m] id tensor) adds ``support_logprobs``, the
        log-probabilities of those ids at each position. Both default off: plain scoring computes neither."""
        raise NotImplementedError

    def score_continuations(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        raise NotImplementedError

    def compress(self, spec) -> None:
        """Attach token compression (a spec string or CompressionSpec; None detaches) for the calls that follow."""
        if spec is not None:
            raise EffideployError(f"the {self.name} runtime takes no token compression")

    def kv_record(self) -> dict | None:
        """After a compressed generate: prompt tokens, mean KV entries kept per layer (and bytes when known)."""
        return None

    def describe(self) -> dict:
        """Runtime name, version and settings, recorded in bench reports."""
        return {"runtime": self.name}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scores_from_logits(logits: torch.Tensor, ids: torch.Tensor, *, top_k: int = 0,
                       support: torch.Tensor | None = None) -> TokenScores:
    """[L, V] logits and [L] ids of one sequence -> its TokenScores (tokens 1..L-1)."""
    return scores_of(logits[:-1], ids[1:], top_k=top_k, support=support)


def scores_of(logits: torch.Tensor, targets: torch.Tensor, *, top_k: int = 0,
              support: torch.Tensor | None = None) -> TokenScores:
    """[n, V] logits predicting the [n] ``targets`` -> TokenScores; ``top_k`` / ``support`` ([n, m] ids) as in
    ``Runtime.score_windows``, read off the same full-vocabulary log_softmax (a top-k and a gather: no second
    forward)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -log_probs.gather(-1, targets[:, None].to(log_probs.device)).squeeze(-1)
    scores = TokenScores(nll=nll.cpu(), argmax=logits.argmax(-1).cpu())  # no-op on the CPU; GPU results come home
    if top_k:
        top = log_probs.topk(min(int(top_k), log_probs.shape[-1]), dim=-1)
        scores.top_ids, scores.top_logprobs = top.indices.cpu(), top.values.cpu()
    if support is not None:
        check_support(support, len(targets))
        scores.support_logprobs = log_probs.gather(-1, support.to(log_probs.device, torch.int64)).cpu()
    return scores


def check_support(support: torch.Tensor, positions: int) -> None:
    if support.dim() != 2 or support.shape[0] != positions:
        raise EffideployError(f"support ids must be [{positions}, m] for a sequence with {positions} scored "
                              f"positions, got {list(support.shape)}")


def support_of(support: list[torch.Tensor] | None, index: int) -> torch.Tensor | None:
    """The support ids of sequence ``index`` (None when none were given)."""
    return None if support is None else support[index]


def check_requests(requests: list[ContinuationRequest]) -> None:
    for index, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise EffideployError(f"request {index}: scoring needs a non-empty context and continuation")


def by_context(requests: list[ContinuationRequest], *, row_budget: int):
    """Consecutive requests sharing a context, split where the batch would pass ``row_budget`` padded positions."""
    group: list[ContinuationRequest] = []
    for request in requests:
        widest = max([len(c) + len(t) for c, t in group + [request]])
        if group and (request[0] != group[0][0] or widest * (len(group) + 1) > row_budget):
            yield group
            group = []
        group.append(request)
    if group:
        yield group


def check_prompts(prompts: list[list[int]], max_new_tokens: int, *, context: int, context_name: str,
                  vocab_size: int | None = None) -> None:
    """The one-line refusals every generating adapter shares: no new tokens, an empty prompt, a prompt that does not
    fit the engine's context with its new tokens, ids outside the vocabulary."""
    if max_new_tokens < 1:
        raise EffideployError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise EffideployError(f"prompt {index} is empty")
        if len(prompt) + max_new_tokens > context:
            raise EffideployError(f"prompt {index} ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds "
                                  f"{context_name} {context}; open the runtime with a larger {context_name}")
        if vocab_size is not None and (max(prompt) >= vocab_size or min(prompt) < 0):
            raise EffideployError(f"prompt {index} has token ids outside the vocabulary (0..{vocab_size - 1})")
