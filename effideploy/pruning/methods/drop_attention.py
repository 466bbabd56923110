"""Drop-attention: make the attention of the k blocks with the smallest attention angular distance (input of the
block vs the residual stream after attention) a no-op; their FFNs stay whole. Removes those blocks' KV cache and
their share of prefill attention, which FFN pruning never touches (Puzzle / nemotron-nas ``attention.no_op``).

Never the first kept block's attention (vLLM mishandles that layout, see ``effideploy.pruning.depth``). Nothing is
compensated: the attention output depends on other tokens, so no per-token refit of the remaining weights stands in.
"""

from __future__ import annotations

from effideploy.pruning.calibration import CalibrationStats
from effideploy.pruning.methods.drop_blocks import DropBlocks


class DropAttention(DropBlocks):
    name = "drop-attention"
    part = "attention"

    def importance(self, stats: CalibrationStats) -> list[float]:
        return [block.attention_angular for block in stats.blocks]
