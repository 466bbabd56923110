"""Drop-blocks (ShortGPT, Men et al. 2024): remove the k blocks whose output is closest in angle to their input.

k comes from ``--count`` or from a size target (``--target-params`` / ``--target-speedup``); the remaining blocks
keep their full FFNs. Nothing is compensated: a removed block has nothing left to refit (the least-squares refit of
the blocks after it would need their statistics under the removal, which the single dense pass does not have).
"""

from __future__ import annotations

from effideploy.pruning.calibration import BlockStats, CalibrationStats
from effideploy.pruning.depth import ModelShape, Structure, ranked_removal, require_sublayer_stats
from effideploy.pruning.methods.base import FFNWeights, PruningMethod


class DropBlocks(PruningMethod):
    structural = True  # removes sublayers; a block whose FFN keeps its full width gets no compensation
    name = "drop-blocks"
    part = "block"

    def score(self, weights: FFNWeights, stats: BlockStats | None):
        return weights.down.norm(dim=0)  # unused: every kept block keeps its full width

    def importance(self, stats: CalibrationStats) -> list[float]:
        return [block.angular for block in stats.blocks]

    def structure(self, scores, stats: CalibrationStats | None, shape: ModelShape, weights) -> Structure:
        stats = require_sublayer_stats(stats, self.name)
        return ranked_removal(self.config, shape, self.importance(stats), part=self.part, method=self.name)
