"""PyTorch (transformers, eager) runtime: explicit ``prefill`` and ``decode_one_token`` steps over a KV cache,
gpt-fast style, so each step is timed on its own. Token compression attaches as forward hooks
(``effideploy.compression.hooks``) for the duration of each call."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from effideploy.errors import EffideployError
from effideploy.runtimes.base import (Capabilities, ContinuationRequest, Generation, Runtime, TokenScores,
                                      check_requests, scores_from_logits, scores_of, support_of)


def prefill(model, input_ids: torch.Tensor, cache: DynamicCache, **inputs) -> torch.Tensor:
    """Run the prompt; returns the logits of its last position [B, V]."""
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **inputs)
    return out.logits[:, -1]


def decode_one_token(model, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def _synchronize(tensor: torch.Tensor) -> None:
    """CUDA kernels run asynchronously: a step's time is only its own once its result is there."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, **prefill_inputs) -> tuple[list[list[int]], float, list[float]]:
    """Greedy generation of a [B, L] batch over a fresh cache: (tokens per row, prefill seconds, decode seconds
    per step). ``prefill_inputs`` go to the prefill only (a LLaVA's ``pixel_values``)."""
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    next_tokens = prefill(model, input_ids, cache, **prefill_inputs).argmax(-1, keepdim=True)
    _synchronize(next_tokens)
    prefill_seconds = time.perf_counter() - start
    generated, steps = [next_tokens], []
    for _ in range(max_new_tokens - 1):
        start = time.perf_counter()
        next_tokens = decode_one_token(model, next_tokens, cache).argmax(-1, keepdim=True)
        _synchronize(next_tokens)
        steps.append(time.perf_counter() - start)
        generated.append(next_tokens)
    return torch.cat(generated, dim=1).tolist(), prefill_seconds, steps


@torch.no_grad()
def continuation_scores(model, cache: DynamicCache, last_logits: torch.Tensor, continuation: list[int]) -> TokenScores:
    """Scores of ``continuation`` after a context already prefilled into ``cache`` (``last_logits`` [V]: the
    context's last position), teacher-forced in one forward; the cache grows by len(continuation) - 1."""
    target = torch.tensor(continuation, device=last_logits.device)
    logits = [last_logits[None]]
    if len(continuation) > 1:
        logits.append(model(input_ids=target[None, :-1], past_key_values=cache, use_cache=True).logits[0])
    return scores_of(torch.cat(logits), target)


class TorchRuntime(Runtime):
    name = "torch"
    capabilities = Capabilities(compression_kinds=frozenset({"kv", "llm", "vision", "kv-dtype"}), batching=True,
                                weight_formats=("float32", "bfloat16", "float16"), exporter=None)

    def __init__(self, path=None, *, model=None, dtype: torch.dtype = torch.float32, threads: int | None = None,
                 allow_pickle: bool = False, device: str | torch.device | None = None) -> None:
        """``device``: auto | cpu | cuda | cuda:N (``effideploy.device``); None keeps a given ``model`` where it
        is and opens a path on ``auto`` (CUDA when available)."""
        from effideploy.device import resolve_device

        if threads:
            torch.set_num_threads(threads)
        if model is None:
            from effideploy.models.build import load_model
            from effideploy.models.resolve import resolve_model

            model = load_model(resolve_model(path, allow_pickle=allow_pickle), dtype=dtype)
        if device is not None or path is not None:
            model = model.to(resolve_device(device))
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        self.path = path
        self.hooks = None  # TorchHooks while token compression is attached

    @classmethod
    def preload(cls) -> None:
        import effideploy.models.build  # noqa: F401 - the modeling code every model load imports

    def compress(self, spec) -> None:
        """A spec (string or CompressionSpec), None to detach, or a ready ``TorchHooks`` (whose ``records`` the
        caller reads)."""
        from effideploy.compression.hooks import TorchHooks

        if spec is None or isinstance(spec, TorchHooks):
            self.hooks = spec
            return
        self.hooks = TorchHooks(self.check_compression(spec))

    def _session(self, prompt_length: int):
        return self.hooks(self.model, prompt_length) if self.hooks is not None else nullcontext()

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)

    @property
    def can_batch(self) -> bool:
        return self.hooks is None  # the hooks track one sequence's positions

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation, one prompt at a time (bs1 latency)."""
        tokens, prefill_times, decode_times = [], [], []
        start_all = time.perf_counter()
        for prompt in prompts:
            with self._session(len(prompt)):
                out, first, steps = greedy(self.model, self._ids([prompt]), max_new_tokens)
            tokens += out
            prefill_times.append(first)
            decode_times.append(steps)
        return Generation(tokens=tokens, prefill_seconds=prefill_times, decode_seconds=decode_times,
                          total_seconds=time.perf_counter() - start_all)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation of equal-length prompts as one batch (throughput)."""
        if not self.can_batch:
            raise EffideployError("the torch runtime's token-compression hooks apply to generate() only")
        if len({len(p) for p in prompts}) != 1:
            raise EffideployError("generate_batch needs prompts of equal length")
        start_all = time.perf_counter()
        out, first, steps = greedy(self.model, self._ids(prompts), max_new_tokens)
        return Generation(tokens=out, prefill_seconds=[first] * len(prompts), decode_seconds=[steps] * len(prompts),
                          total_seconds=time.perf_counter() - start_all)

    @torch.no_grad()
    def score_windows(self, sequences: list[list[int]], *, top_k: int = 0,
                      support: list[torch.Tensor] | None = None) -> list[TokenScores]:
        """Top-k and support log-probabilities (on request) from the full logits of every position."""
        if self.hooks is not None:
            raise EffideployError("a compressed model scores continuations after a compressed prefill "
                                  "(score_continuations), not whole windows in one forward")
        results = []
        for index, sequence in enumerate(sequences):
            ids = self._ids([sequence])
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
            results.append(scores_from_logits(logits, ids[0], top_k=top_k, support=support_of(support, index)))
        return results

    @torch.no_grad()
    def score_continuations(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        """Each distinct context is prefilled once (under compression when attached); the cache is cropped back
        to the context after each continuation, so k choices of an item cost one context forward, not k."""
        check_requests(requests)
        if self.hooks is not None:  # compression evicts at each prefill: a compressed context is prefilled per request
            from effideploy.compression.hooks import score_continuation

            return [score_continuation(self.model, self.hooks, context, continuation) for context, continuation in requests]
        results, context, cache, last = [], None, None, None
        for request_context, continuation in requests:
            if request_context != context:
                context, cache = request_context, DynamicCache(config=self.model.config)
                last = prefill(self.model, self._ids([context]), cache)[0]
            results.append(continuation_scores(self.model, cache, last, continuation))
            if len(continuation) > 1:
                cache.crop(-(len(continuation) - 1))  # back to the context alone
        return results

    def kv_record(self) -> dict | None:
        if self.hooks is None or not self.hooks.records:
            return None
        record = self.hooks.records[-1]
        return {"kv_bytes": record.get("kv_bytes"), "full_kv_bytes": record.get("full_kv_bytes"),
                "prompt_tokens": record.get("prompt_tokens"),
                "kept_mean": sum(record["kept_per_layer"]) / len(record["kept_per_layer"])}

    def describe(self) -> dict:
        import transformers

        return {"runtime": self.name, "engine": f"transformers {transformers.__version__} (eager, sdpa)",
                "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(self.device),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}
