"""Next-token distribution fidelity of a candidate to the dense model, measured on the target runtime's artifact.

Both models score the same perplexity windows on the same runtime. The dense model returns, per scored position,
its ``KL_SUPPORT`` most probable next tokens and their log-probabilities (``Runtime.score_windows(top_k=...)``);
the candidate returns its own top-``TOP_K`` and its log-probabilities of dense's ids (``support=``). From these:

- **KL(dense || candidate)**, estimated on dense's top-m support (m = ``KL_SUPPORT``) plus one tail bucket holding
  the remaining mass of each distribution: with S dense's top-m ids, p and q the two distributions,
  KL_m = sum_{i in S} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail), p_tail = 1 - p(S), q_tail = 1 - q(S).
  It is the exact KL of the two distributions coarsened to m + 1 outcomes, so KL_m <= KL (coarsening never adds
  divergence), it grows towards KL as m grows and equals it at m = vocabulary size (empty tail). The mass outside
  dense's top-m is compared as one lump: what the candidate moves around inside it is not seen. m = 20 is what
  vLLM returns by default (``max_logprobs``); the runtimes with full logits could give more at no cost.
- **top-k agreement** (k = ``TOP_K``): the overlap of the two top-k sets over k, as ``effideploy.search.screen``
  defines it;
- **top-1 agreement**: dense's argmax equals the candidate's (loyalty's token part, ``Comparison.loyalty_tokens``).

Each is the mean over scored positions; its standard error takes the window as the unit (positions of one window
share their context), as loyalty's does (``metrics.share_stderr`` for shares, the SE of window means for KL).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

TOP_K = 5  # the top-k agreement's k (effideploy.search.screen.TOP_K is the same 5)
KL_SUPPORT = 20  # dense's top-m ids the KL is estimated on (vLLM's default max_logprobs)


@dataclass
class Fidelity:
    """One candidate against dense on the same windows of one runtime (see the module docstring)."""

    kl: float
    kl_stderr: float | None
    top_k_agreement: float
    top_k_agreement_stderr: float | None
    top1_agreement: float
    k: int  # top-k agreement's k
    kl_support: int  # m: dense's top-m ids of the KL estimate
    windows: int
    positions: int
    source: str = ""  # which model outputs and text: "onnx runtime artifact, WikiText-2 test windows 1..8 (8 x 1024)"

    def to_dict(self) -> dict:
        return asdict(self)


def kl_topk(dense_logprobs: torch.Tensor, candidate_logprobs: torch.Tensor) -> torch.Tensor:
    """Per position KL_m: ``dense_logprobs`` [n, m] dense's log-probabilities of its top-m ids, and
    ``candidate_logprobs`` [n, m] the candidate's log-probabilities of the same ids. Float64, [n] nats."""
    p_log, q_log = dense_logprobs.double(), candidate_logprobs.double()
    p = p_log.exp()
    inside = (p * (p_log - q_log)).sum(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q_log.exp().sum(-1)).clamp_min(0.0)
    # 0 log(0 / q) = 0; a dense tail against an empty candidate tail is bounded by the float resolution of 1 - q(S).
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.clamp_min(1e-16).log()),
                       torch.zeros_like(p_tail))
    return inside + tail


def topk_overlap(dense_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """Per position share of dense's top-k ids [n, k] among the candidate's [n, k] (screen.py's top-k agreement)."""
    k = dense_ids.shape[-1]
    return (dense_ids[:, :, None] == candidate_ids[:, None, :]).any(-1).double().sum(-1) / k


def kl_exact(dense_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """Per position full-vocabulary KL(dense || candidate) from [n, V] logits (the reference the estimator is
    tested against)."""
    p_log = torch.log_softmax(dense_logits.double(), -1)
    q_log = torch.log_softmax(candidate_logits.double(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def measure(dense_windows: list, candidate_windows: list, *, k: int = TOP_K, source: str = "") -> Fidelity:
    """``dense_windows`` / ``candidate_windows``: per window the runtime's ``TokenScores`` (dense's with
    ``top_ids`` / ``top_logprobs`` of its top-m, the candidate's with its own top-k ``top_ids`` and the
    ``support_logprobs`` of dense's ``top_ids``). Ids are most probable first, so dense's top-k are its first k."""
    kl, overlap, top1 = [], [], []
    for dense, candidate in zip(dense_windows, candidate_windows, strict=True):
        kl.append(kl_topk(dense.top_logprobs, candidate.support_logprobs))
        overlap.append(topk_overlap(dense.top_ids[:, :k], candidate.top_ids[:, :k]))
        top1.append((dense.top_ids[:, 0] == candidate.top_ids[:, 0]).double())
    return Fidelity(kl=_pooled(kl), kl_stderr=_window_stderr(kl), top_k_agreement=_pooled(overlap),
                    top_k_agreement_stderr=_window_stderr(overlap), top1_agreement=_pooled(top1), k=k,
                    kl_support=int(dense_windows[0].top_ids.shape[-1]) if dense_windows else KL_SUPPORT,
                    windows=len(kl), positions=sum(len(x) for x in kl), source=source)


def _pooled(rows: list[torch.Tensor]) -> float:
    total = sum(len(r) for r in rows)
    return float(sum(float(r.sum()) for r in rows) / total) if total else float("nan")


def _window_stderr(rows: list[torch.Tensor]) -> float | None:
    """SE of the pooled mean with the window as the unit (the ratio estimator's, as ``metrics.share_stderr``)."""
    from effideploy.bench import metrics

    if len(rows) < 2:
        return None  # one window: no spread to estimate
    return metrics.share_stderr([(float(r.sum()), len(r)) for r in rows])


def text_label(runtime: str, windows: int, seqlen: int) -> str:
    """Where the numbers come from, for the report."""
    span = "window 1" if windows == 1 else f"windows 1..{windows}"
    return f"{runtime} runtime artifact, WikiText-2 test {span} ({windows} x {seqlen} tokens, the perplexity windows)"

