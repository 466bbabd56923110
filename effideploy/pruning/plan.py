"""The outcome of pruning decisions, before any tensor is rewritten: which channels each block keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from effideploy.pruning.calibration import BlockStats, CalibrationStats
from effideploy.pruning.config import PruneConfig


@dataclass
class BlockPlan:
    index: int
    full_width: int
    kept: torch.Tensor  # sorted int64 channel indices
    importance: float | None = None
    compensation: str = "none"  # none | bias | lstsq, applied when the block is rewritten
    stats: BlockStats | None = field(default=None, repr=False)  # what compensation reads
    damp: float = 0.01
    attention: bool = True  # False: the attention sublayer is removed (a no-op in the checkpoint)
    dropped: bool = False  # True: the whole block is removed (the checkpoint renumbers the blocks after it)

    @property
    def width(self) -> int:
        return int(self.kept.numel())

    @property
    def adds_bias(self) -> bool:
        return self.compensation in ("bias", "lstsq")


@dataclass
class PrunePlan:
    config: PruneConfig
    blocks: list[BlockPlan]
    stats: CalibrationStats | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [block.width for block in self.blocks]

    @property
    def full_widths(self) -> list[int]:
        return [block.full_width for block in self.blocks]

    @property
    def kept_blocks(self) -> list[BlockPlan]:
        return [block for block in self.blocks if not block.dropped]

    @property
    def dropped_blocks(self) -> list[int]:
        return [block.index for block in self.blocks if block.dropped]

    @property
    def no_op_attention(self) -> list[int]:
        """Original indices of kept blocks whose attention is removed."""
        return [block.index for block in self.blocks if not block.dropped and not block.attention]

    @property
    def removes_sublayers(self) -> bool:
        return bool(self.dropped_blocks or self.no_op_attention)

    @property
    def ffn_sparsity(self) -> float:
        """The fraction of FFN channels actually removed (the requested one up to rounding and alignment)."""
        return 1.0 - sum(self.widths) / sum(self.full_widths)

    @property
    def has_bias(self) -> bool:
        return any(block.adds_bias for block in self.blocks)
