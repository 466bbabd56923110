"""CFSP joint: one size target shared between narrowing FFNs (CFSP's channel score), no-op attention and dropped
blocks, each chosen by its estimated loss per parameter saved (``effideploy.pruning.depth.joint_structure``).

Compensation: the least-squares refit (default) applies to every narrowed FFN of a kept block, from the dense
model's statistics; it does not see what was removed upstream of the block (one dense pass), and removed attention
or blocks are not compensated.
"""

from __future__ import annotations

from effideploy.errors import OptionError
from effideploy.pruning.calibration import CalibrationStats
from effideploy.pruning.depth import ModelShape, Structure, joint_structure, require_sublayer_stats
from effideploy.pruning.methods.cfsp import CFSP


class CFSPJoint(CFSP):
    structural = True  # removes sublayers; a block whose FFN keeps its full width gets no compensation
    name = "cfsp-joint"

    def __init__(self, config) -> None:
        super().__init__(config)
        if config.target_params is None and config.target_speedup is None:  # refused before the calibration pass
            raise OptionError("target_params", "or --target-speedup is needed: cfsp-joint needs a size target")

    def structure(self, scores, stats: CalibrationStats | None, shape: ModelShape, weights) -> Structure:
        stats = require_sublayer_stats(stats, self.name)
        columns = [ffn.down.pow(2).sum(0) for ffn in weights]
        return joint_structure(self.config, shape, scores, stats, columns)
