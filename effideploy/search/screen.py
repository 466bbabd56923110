"""The cheap quality screen: every recipe in PyTorch on a few held-out windows, against the dense model.

Per recipe: perplexity, the mean KL divergence KL(dense || candidate) of the next-token distributions, top-1
agreement (the next-token part of loyalty) and top-k agreement (mean overlap of the two top-k sets). Weight
quantization is applied as fake quantization by the runtime's own weight scheme
(``effideploy.quantization.schemes.apply_scheme``: MatMulNBits blocks on ONNX Runtime, compressed-tensors W8A8 with
per-token int8 activations or W4A16 groups on vLLM, llama.cpp's GGUF types), so no export is needed to screen a
quantized recipe. A KV-budget recipe is scored the way the bench scores
token compression: the first half of each window prefilled and compressed, the second half teacher-forced; the
runtime gives the NLL and argmax of those tokens, not full distributions, so its KL and top-k are not screened.
The dense log-probabilities are kept in fp16 (windows x tokens x vocab x 2 bytes: 4 x 511 x 49152 x 2 = 200 MB on
SmolLM2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from effideploy import progress

TOP_K = 5


@dataclass
class ScreenResult:
    perplexity: float
    perplexity_dense: float
    kl: float | None  # mean over scored positions, nats
    top1_agreement: float
    top_k_agreement: float | None
    scope: str = "full"  # or "second_half" (KV budget)
    seconds: float = 0.0

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.perplexity_dense - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}


class Screener:
    """Holds the dense model's next-token distributions on ``windows`` ([n, L] ids) and screens candidates."""

    def __init__(self, dense_model, windows: torch.Tensor, top_k: int = TOP_K) -> None:
        self.windows, self.top_k = windows, top_k
        self.dense_log_probs, self.dense_nll = [], []
        for window in progress.track(windows.tolist(), "Screen: dense distributions"):
            log_probs, nll = self._log_probs(dense_model, window)
            self.dense_log_probs.append(log_probs.half())
            self.dense_nll.append(nll)
        self.dense_perplexity = _perplexity(self.dense_nll)
        self.dense_second_half = _perplexity([n[self._half() - 1:] for n in self.dense_nll])

    def _half(self) -> int:
        return self.windows.shape[1] // 2

    @staticmethod
    def _log_probs(model, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([window])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        return log_probs, -log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)

    @torch.no_grad()
    def screen(self, model, compression: str | None = None, label: str = "candidate") -> ScreenResult:
        tick = time.perf_counter()
        if compression is not None:
            return self._screen_compressed(model, compression, label, tick)
        nll, kl, top1, topk = [], [], [], []
        for window, dense in progress.track(list(zip(self.windows.tolist(), self.dense_log_probs)), f"Screen {label}"):
            log_probs, window_nll = self._log_probs(model, window)
            dense = dense.float()
            nll.append(window_nll)
            kl.append((dense.exp() * (dense - log_probs)).sum(-1).mean().item())
            top1.append((dense.argmax(-1) == log_probs.argmax(-1)).float().mean().item())
            dense_top, cand_top = dense.topk(self.top_k, -1).indices, log_probs.topk(self.top_k, -1).indices
            overlap = (dense_top[:, :, None] == cand_top[:, None, :]).any(-1).float().sum(-1) / self.top_k
            topk.append(overlap.mean().item())
        return ScreenResult(perplexity=_perplexity(nll), perplexity_dense=self.dense_perplexity, kl=_mean(kl),
                            top1_agreement=_mean(top1), top_k_agreement=_mean(topk),
                            seconds=time.perf_counter() - tick)

    def _screen_compressed(self, model, compression: str, label: str, tick: float) -> ScreenResult:
        from effideploy.runtimes.pytorch import TorchRuntime

        runtime = TorchRuntime(model=model)
        runtime.compress(compression)
        half, nll, agree, total = self._half(), [], 0, 0
        for window, dense in progress.track(list(zip(self.windows.tolist(), self.dense_log_probs)), f"Screen {label}"):
            scores = runtime.score_continuations([(window[:half], window[half:])])[0]
            nll.append(scores.nll.float())
            dense_argmax = dense[half - 1:].float().argmax(-1)
            agree += int((dense_argmax == scores.argmax).sum())
            total += len(dense_argmax)
        return ScreenResult(perplexity=_perplexity(nll), perplexity_dense=self.dense_second_half, kl=None,
                            top1_agreement=agree / total, top_k_agreement=None, scope="second_half",
                            seconds=time.perf_counter() - tick)


def _perplexity(nll) -> float:
    return math.exp(sum(float(n.mean()) for n in nll) / len(nll))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
