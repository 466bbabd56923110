"""What a pruning method decides: a score per FFN channel (higher = keep) and a width per block.

The engine calls ``score`` once per block, then ``widths`` once with every block's scores, and keeps the
``widths[i]`` best-scored channels of block i. Methods see the block's FFN weights and the calibration
statistics of that block (see ``effideploy.pruning.calibration``), never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from effideploy.pruning.allocation import integer_widths, uniform_widths
from effideploy.pruning.calibration import BlockStats, CalibrationStats
from effideploy.pruning.config import PruneConfig


@dataclass
class FFNWeights:
    """One block's FFN in float32: gate and up are [n, h], down is [h, n]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class PruningMethod:
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    default_compensation: ClassVar[str] = "none"

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    @property
    def compensation(self) -> str:
        return self.config.compensation or self.default_compensation

    def score(self, weights: FFNWeights, stats: BlockStats | None) -> torch.Tensor:
        raise NotImplementedError

    def widths(self, scores: list[torch.Tensor], stats: CalibrationStats | None) -> list[int]:
        """Default: the same fraction kept in every block."""
        return uniform_widths([len(s) for s in scores], self.config.sparsity, self.config.align)

    def structure(self, scores: list[torch.Tensor], stats: CalibrationStats | None, shape, weights) -> "Structure":
        """Widths and removed sublayers (``effideploy.pruning.depth``); by default widths alone. ``weights`` is a
        sequence of every block's FFNWeights (read lazily by the methods that need them)."""
        from effideploy.pruning.depth import Structure

        return Structure(widths=self.widths(scores, stats))

    def block_importance(self, stats: CalibrationStats | None) -> list[float] | None:
        """The coarse importance recorded in provenance (recovery sizes LoRA ranks from it)."""
        return stats.angular if stats is not None else None


def activation_norm(stats: BlockStats) -> torch.Tensor:
    """||A_j||_2 over calibration tokens, normalised per token (float32 [n])."""
    return stats.act_sq_mean.sqrt().float()


def standardised(scores: torch.Tensor) -> torch.Tensor:
    return (scores - scores.mean()) / scores.std()


def global_threshold_widths(scores: list[torch.Tensor], sparsity: float, align: int) -> list[int]:
    """Widths from one threshold over every block's standardised scores (Wanda-sp and FLAP in the reference).

    The reference keeps scores above ``sorted_desc[int(N * (1 - sparsity))]`` over all N channels; the per-block
    counts are then rounded to ``align`` keeping the total.
    """
    standard = [standardised(s) for s in scores]
    flat = torch.cat(standard)
    threshold = torch.sort(flat, descending=True).values[int(flat.numel() * (1 - sparsity))]
    counts = [int((s > threshold).sum()) for s in standard]
    full = [len(s) for s in scores]
    return integer_widths([float(c) for c in counts], full, sum(counts), align)
