"""Depth and attention pruning: which whole blocks and attention sublayers to remove, beside FFN width.

Everything here reads the sublayer statistics the single calibration pass collects (``calibration.BlockStats``):
for block i with input X, H = X + attn(X) and output Y = H + ffn(H),

- angular distances of the block (X vs Y), of attention alone (X vs H) and of the FFN alone (H vs Y): ShortGPT's
  "block influence" ranks blocks by the same angle, and ``drop-blocks`` / ``drop-attention`` remove the smallest;
- the block-local loss of dropping a part, |update|^2 / |Y|^2 per token averaged over calibration tokens: removing
  the attention, the FFN or the block changes the block's output by exactly that update (what happens downstream is
  not measured: the pass is one forward of the dense model).

The joint allocation (``cfsp-joint``) spends a parameter budget greedily on whatever costs the least loss per
parameter saved: one more step of FFN sparsity (1/64, spread over the kept blocks by CFSP's own budgets and channel
scores; its loss is the diagonal estimate sum_j E[A_j^2] |W_down[:, j]|^2 of the channels it removes, before
compensation, scaled per block so that all channels together cost the FFN's drop loss), the attention of a block, or a whole block (its loss minus what narrowing it already cost, for
everything left in it). The loss estimates share
one unit (relative change of the block output), so they compare across the three kinds.

Layout rule (vLLM): ``DeciModel`` carries the residual in a separate tensor that the first attention creates; a
block whose attention is a no-op but whose FFN is not, and that comes first (no kept block before it), feeds its
FFN norm a residual of None. Both allocations avoid that layout; the vLLM exporter refuses it
(:func:`first_block_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from effideploy.errors import EffideployError, OptionError
from effideploy.pruning.calibration import CalibrationStats


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of one model by part, what the size targets are computed from."""

    hidden: int
    attention: int  # q, k, v, o projections of one block (+ biases)
    full_widths: tuple[int, ...]
    total: int  # every parameter of the dense model
    matmul: int  # weights multiplied per generated token (bench.metrics.matmul_parameters)

    @property
    def channel(self) -> int:
        """gate row + up row + down column."""
        return 3 * self.hidden

    @classmethod
    def of(cls, config) -> ModelShape:
        from effideploy.models.build import count_parameters, ffn_widths

        counts = count_parameters(config)
        return cls(hidden=config.hidden_size, attention=counts["attention"] // config.num_hidden_layers,
                   full_widths=tuple(ffn_widths(config)), total=counts["total"],
                   matmul=counts["attention"] + counts["ffn"] + (counts["lm_head"] or counts["embedding"]))


@dataclass
class Structure:
    """A method's decision for every block: its FFN width, whether its attention stays, whether it stays at all."""

    widths: list[int]
    dropped: set[int] = field(default_factory=set)
    no_attention: set[int] = field(default_factory=set)


def first_block_problem(dropped, no_attention, n_blocks: int) -> int | None:
    """The (original) index of a first kept block with no attention, which vLLM mishandles; None when fine."""
    kept = [i for i in range(n_blocks) if i not in dropped]
    return kept[0] if kept and kept[0] in no_attention else None


def removed_parameters(shape: ModelShape, structure: Structure) -> tuple[int, int]:
    """(parameters, matmul parameters) removed by ``structure``; norms count with their sublayer."""
    total = matmul = 0
    h = shape.hidden
    for i, full in enumerate(shape.full_widths):
        if i in structure.dropped:
            total += shape.attention + h + shape.channel * full + h
            matmul += shape.attention + shape.channel * full
            continue
        if i in structure.no_attention:
            total += shape.attention + h
            matmul += shape.attention
        narrowed = shape.channel * (full - structure.widths[i])
        total += narrowed
        matmul += narrowed
    return total, matmul


def target_reached(shape: ModelShape, config, structure: Structure) -> bool:
    total, matmul = removed_parameters(shape, structure)
    if config.target_params is not None:
        return total >= config.target_params * shape.total
    return shape.matmul / max(shape.matmul - matmul, 1) >= config.target_speedup


def require_sublayer_stats(stats: CalibrationStats | None, method: str) -> CalibrationStats:
    if stats is None or not any(block.output_energy for block in stats.blocks):
        raise EffideployError(f"{method} needs the sublayer statistics of a calibration pass (statistics saved "
                              "before effideploy measured them lack them: calibrate again)")
    return stats


def ranked_removal(config, shape: ModelShape, importance: list[float], *, part: str, method: str) -> Structure:
    """ShortGPT's rule: remove the ``count`` least important (smallest angular distance) blocks or attention
    sublayers, or as many as a size target needs; never a layout vLLM mishandles (the first block's attention)."""
    if config.count is None and config.target_params is None and config.target_speedup is None:
        # not an OptionError: no one option is wrong, and "--count drop-blocks needs ..." reads as nonsense
        raise EffideployError(f"{method} needs how much to remove: give --count, --target-params or --target-speedup")
    n_blocks = len(shape.full_widths)
    what = "blocks" if part == "block" else "attention sublayers"
    structure = Structure(widths=list(shape.full_widths))
    order = sorted(range(n_blocks), key=lambda i: (importance[i], i))
    chosen = structure.dropped if part == "block" else structure.no_attention
    for index in order:
        if config.count is not None and len(chosen) >= config.count:
            break
        if config.count is None and target_reached(shape, config, structure):
            break
        chosen.add(index)
        if first_block_problem(structure.dropped, structure.no_attention, n_blocks) is not None or \
                len(structure.dropped) == n_blocks:
            chosen.discard(index)
    if config.count is not None and len(chosen) < config.count:
        raise OptionError("count", f"{config.count} is more than the {len(chosen)} {what} {method} can remove from "
                                   f"{n_blocks} blocks")
    if config.count is None and not target_reached(shape, config, structure):
        removed = removed_parameters(shape, structure)[0] / shape.total
        flag = "target_params" if config.target_params is not None else "target_speedup"
        raise OptionError(flag, f"cannot be reached by {method}: the {len(chosen)} {what} it can remove hold "
                                f"{removed:.3f} of the parameters")
    return structure


def joint_structure(config, shape: ModelShape, scores: list[torch.Tensor], stats: CalibrationStats,
                    down_columns: list[torch.Tensor]) -> Structure:
    """Greedy allocation of a size target over FFN width, attention sublayers and blocks, by estimated loss per
    parameter saved (module docstring). The width lever is CFSP itself: one step raises the FFN sparsity of the
    kept blocks by 1/64 with CFSP's per-block budgets and channel scores, and costs the diagonal loss of the channels
    it removes. ``down_columns[i]`` = |W_down[:, j]|^2 of block i's channels."""
    from effideploy.pruning.allocation import cfsp_block_weights, proportional_widths

    if config.target_params is None and config.target_speedup is None:
        raise EffideployError("cfsp-joint needs a size target: give --target-params or --target-speedup")
    n_blocks = len(shape.full_widths)
    full = list(shape.full_widths)
    block_weights = cfsp_block_weights(stats.angular, config.a)
    # loss of removing each block's channels in CFSP's order (lowest score first), cumulative
    removed_loss = []
    for i, block in enumerate(stats.blocks):
        order = torch.sort(scores[i], stable=True).indices  # the engine keeps the highest scores
        loss = block.act_sq_sum.double() * down_columns[i].double()
        # The diagonal terms ignore how channels cancel, so their sum exceeds the FFN's whole output energy (on
        # SmolLM2 by far, which made blocks look cheaper than channels); scaled so that removing every channel
        # costs what removing the FFN does, channel, attention and block losses share one unit.
        loss = loss * (block.drop_loss("ffn") / max(float(loss.sum()), 1e-30))
        removed_loss.append(torch.cat([torch.zeros(1, dtype=torch.float64), loss[order].cumsum(0)]))
    attention_loss = [block.drop_loss("attention") for block in stats.blocks]
    block_loss = [block.drop_loss("block") for block in stats.blocks]
    step, max_level = 1.0 / 64, 63

    def widths_at(level: int, dropped: set[int]) -> list[int]:
        kept = [i for i in range(n_blocks) if i not in dropped]
        widths = list(full)
        if level:
            narrowed = proportional_widths([block_weights[i] for i in kept], [full[i] for i in kept], level * step,
                                           config.align)
            for i, width in zip(kept, narrowed):
                widths[i] = width
        for i in dropped:
            widths[i] = 0
        return widths

    def paid(i: int, width: int) -> float:
        return float(removed_loss[i][full[i] - width])

    level = 0
    structure = Structure(widths=list(full))
    while not target_reached(shape, config, structure):
        options = []
        kept = [i for i in range(n_blocks) if i not in structure.dropped]
        if level < max_level:
            widths = widths_at(level + 1, structure.dropped)
            saved = shape.channel * sum(structure.widths[i] - widths[i] for i in kept)
            if saved > 0:
                cost = sum(max(paid(i, widths[i]) - paid(i, structure.widths[i]), 0.0) for i in kept)
                options.append((cost / saved, "ffn", None))
        for i in kept:
            if i not in structure.no_attention and \
                    first_block_problem(structure.dropped, structure.no_attention | {i}, n_blocks) is None:
                options.append((attention_loss[i] / shape.attention, "attention", i))
            if len(kept) > 1 and first_block_problem(structure.dropped | {i}, structure.no_attention, n_blocks) is None:
                left = shape.channel * structure.widths[i] + 2 * shape.hidden
                left += 0 if i in structure.no_attention else shape.attention
                spent = paid(i, structure.widths[i]) + (attention_loss[i] if i in structure.no_attention else 0.0)
                options.append((max(block_loss[i] - spent, 0.0) / left, "block", i))
        if not options:
            flag = "target_params" if config.target_params is not None else "target_speedup"
            raise OptionError(flag, "cannot be reached: nothing is left to remove")
        _, kind, i = min(options, key=lambda option: (option[0], option[1], -1 if option[2] is None else option[2]))
        if kind == "ffn":
            level += 1
        elif kind == "attention":
            structure.no_attention.add(i)
        else:
            structure.dropped.add(i)
            structure.no_attention.discard(i)
        structure.widths = widths_at(level, structure.dropped)
    for i in structure.dropped:
        structure.widths[i] = full[i]  # unused: the engine writes nothing for a dropped block
    return structure
