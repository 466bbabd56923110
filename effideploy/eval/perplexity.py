"""Perplexity over consecutive windows, as the CFSP/Wanda reference evaluates WikiText-2; the one implementation
``effideploy eval ppl``, the bench and the benchmark scripts share.

PPL = exp(mean over windows of the mean next-token cross-entropy inside the window); every window is scored
independently (no context carried across windows) through any runtime's ``score_windows``. Under token
compression a window is split in half: the first half is the context (prefilled, then compressed), the second half
is teacher-forced after it (``score_continuations``), and only the second half is scored (``scope="second_half"``).
The per-token NLL and argmax predictions are kept: loyalty compares the predictions with the dense model's. On
request (``top_k``, ``support``: whole windows only) each window's ``TokenScores`` with its top-k and support
log-probabilities are kept too (``distributions``; the bench's distribution fidelity, ``bench/fidelity.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from effideploy import progress


@dataclass
class PerplexityResult:
    nll: list[list[float]]  # per window: the NLL of every scored token
    predictions: list[list[int]]  # per window: the argmax prediction at every scored position
    seqlen: int
    scope: str = "full"  # "full": tokens 1..L-1 of each window; "second_half": tokens L/2..L-1
    seconds: float = 0.0
    distributions: list | None = None  # per window the TokenScores with top-k / support log-probs, when asked

    @property
    def n_windows(self) -> int:
        return len(self.nll)

    @property
    def mean_nll(self) -> float:
        return mean_window_nll(self.nll)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.nll else float("nan")

    def perplexity_from(self, start: int) -> float:
        """The perplexity of the tokens from scored position ``start`` of each window on."""
        return math.exp(mean_window_nll(self.nll, start)) if self.nll else float("nan")

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "windows": self.n_windows,
                "seqlen": self.seqlen, "seconds": self.seconds}


def mean_window_nll(nll: list[list[float]], start: int = 0) -> float:
    """Mean over windows of each window's mean NLL (from scored position ``start`` on)."""
    if not nll:
        return float("nan")
    means = [sum(row[start:]) / len(row[start:]) for row in nll]
    return sum(means) / len(means)


def second_half_start(seqlen: int) -> int:
    """Index, in a full window's scored positions (tokens 1..L-1), of the first token a compressed scoring scores."""
    return seqlen // 2 - 1


@torch.no_grad()
def window_perplexity(runtime, windows, *, compressed: bool = False, description: str = "Perplexity",
                      top_k: int = 0, support: list | None = None) -> PerplexityResult:
    """Perplexity of ``windows`` ([n, L] ids) through a runtime (see the module docstring for ``compressed``);
    ``top_k`` / ``support`` (per window [L-1, m] ids) as in ``Runtime.score_windows``, kept in ``distributions``."""
    start = time.perf_counter()
    rows = windows.tolist() if hasattr(windows, "tolist") else [list(w) for w in windows]
    half = len(rows[0]) // 2 if rows else 0
    asked = not compressed and (top_k or support is not None)
    nll, predictions, distributions = [], [], []
    for index, window in enumerate(progress.track(rows, description)):
        if compressed:
            scores = runtime.score_continuations([(window[:half], window[half:])])[0]
        elif asked:  # only then: runtimes written before these arguments still score plain windows
            scores = runtime.score_windows([window], top_k=top_k,
                                           support=None if support is None else [support[index]])[0]
            distributions.append(scores)
        else:
            scores = runtime.score_windows([window])[0]
        nll.append([float(x) for x in scores.nll])
        predictions.append([int(x) for x in scores.argmax])
    return PerplexityResult(nll=nll, predictions=predictions, seqlen=len(rows[0]) if rows else 0,
                            scope="second_half" if compressed else "full", seconds=time.perf_counter() - start,
                            distributions=distributions if asked else None)


def perplexity(model, windows, **kwargs) -> PerplexityResult:
    """Perplexity of a runtime, or of a loaded transformers causal LM (run through the PyTorch runtime)."""
    if not hasattr(model, "score_windows"):
        from effideploy.runtimes.pytorch import TorchRuntime

        model = TorchRuntime(model=model)
    return window_perplexity(model, windows, **kwargs)
