"""Tensor-parallel re-alignment of FFN widths (used by the vLLM export; no I/O here).

vLLM splits every FFN evenly over the tensor-parallel ranks, so each width must be a multiple of
``tensor_parallel_size * align``. ``plan_widths`` refuses widths that are not (naming the blocks) or, with
``realign=True``, rounds them down. Checkpoints do not store channel scores, so the channels dropped are those with
the smallest down_proj column L2 norm (their output's scale for unit activations), a weight-only proxy for the
pruning score: ``realign_block_tensors`` rewrites one block that way, and ``realigned_config`` /
``realigned_provenance`` describe the result.
"""

from __future__ import annotations

import json

import torch

from effideploy.errors import EffideployError

CRITERION = "smallest down_proj column L2 norm dropped"


def plan_widths(config, widths: list[int], tensor_parallel_size: int, multiple: int, realign: bool = False) -> list[int]:
    """The FFN widths to export: ``widths`` when each is a multiple of ``multiple``; else rounded down when
    ``realign``, else a one-line refusal listing every offending block. Head counts that tensor parallelism cannot
    split are refused either way (no rewrite fixes them)."""
    tp = tensor_parallel_size
    problems = []
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over {tp} ranks")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"{kv_heads} KV heads neither divide nor are divisible by {tp}")
    offending = [(i, width) for i, width in enumerate(widths) if width % multiple]
    need = f"multiples of {multiple}" + (f" (tensor parallel size {tp} x align {multiple // tp})" if multiple != tp else "")
    if offending and not realign:
        listed = ", ".join(f"{i} ({width})" for i, width in offending)
        problems.append(
            f"FFN widths must be {need} for vLLM; blocks {listed} are not: pass --realign to drop their "
            f"weakest channels (smallest down_proj column norm), or prune with --align {multiple}"
        )
    too_narrow = [(i, width) for i, width in offending if width < multiple]
    if realign and too_narrow:
        listed = ", ".join(f"{i} ({width})" for i, width in too_narrow)
        problems.append(f"blocks {listed} have fewer than {multiple} FFN channels and cannot be re-aligned")
    if problems:
        raise EffideployError(f"cannot export for tensor parallel size {tp}: " + "; ".join(problems))
    return [width - width % multiple for width in widths]


def changed_blocks(widths: list[int], new_widths: list[int]) -> list[dict]:
    """``{"index", "before", "after"}`` for every block whose width changes."""
    return [{"index": i, "before": old, "after": new} for i, (old, new) in enumerate(zip(widths, new_widths)) if old != new]


def kept_channels(down_proj: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` channels (ascending) with the largest down_proj column L2 norms; ties keep the lower index."""
    norms = down_proj.float().norm(dim=0)
    return torch.sort(norms, descending=True, stable=True).indices[:width].sort().values


def realign_block_tensors(tensors: dict[str, torch.Tensor], index: int, before: int, after: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s FFN tensors (``model.layers.{index}.mlp.*``, taken from ``tensors``) narrowed from
    ``before`` to ``after`` channels, dropping those with the smallest down_proj column norm. Returns only the
    rewritten FFN tensors, under the same names."""
    from effideploy.pruning.plan import BlockPlan
    from effideploy.pruning.rewrite import rewrite_block

    prefix = f"model.layers.{index}.mlp."
    mlp = {key: value for key, value in tensors.items() if key.startswith(prefix)}
    if prefix + "down_proj.weight" not in mlp:
        raise EffideployError(f"block {index}: {prefix}down_proj.weight is missing")
    plan = BlockPlan(index=index, full_width=before, kept=kept_channels(mlp[prefix + "down_proj.weight"], after))
    return rewrite_block(mlp, plan, with_bias=False)


def realigned_config(config_dict: dict, widths: list[int]) -> dict:
    """A copy of ``config_dict`` with the FFN widths ``widths``."""
    config_dict = json.loads(json.dumps(config_dict))
    if config_dict.get("model_type") == "nemotron-nas":
        for block, width in zip(config_dict["block_configs"], widths):
            block["ffn"]["intermediate_size"] = int(width)
            block["ffn"].pop("ffn_mult", None)
    elif len(set(widths)) != 1:
        raise EffideployError("a dense model re-aligns to one width for all blocks")  # unreachable: equal widths round equally
    config_dict["intermediate_size"] = int(max(widths))
    return config_dict


def realigned_provenance(provenance: dict, config_dict: dict, realigned: list[dict], multiple: int) -> dict:
    """A copy of the checkpoint's provenance updated for the re-aligned widths (``config_dict`` is the re-aligned
    config): kept widths, sparsity, parameter counts and an ``export_realign`` section."""
    from effideploy.models.build import build_config, count_parameters

    provenance = json.loads(json.dumps(provenance))
    changed = {block["index"]: block["after"] for block in realigned}
    for block in provenance.get("blocks", []):
        if block.get("index") in changed:
            block["kept_width"] = changed[block["index"]]
    blocks = provenance.get("blocks", [])
    if blocks and all("full_width" in b and "kept_width" in b for b in blocks):
        provenance.setdefault("sparsity", {})["ffn_actual"] = 1.0 - sum(b["kept_width"] for b in blocks) / sum(b["full_width"] for b in blocks)
    after = count_parameters(build_config(config_dict))
    if "parameters" in provenance:
        before = provenance["parameters"].get("before", {})
        provenance["parameters"]["after"] = after
        if before.get("total"):
            provenance["sparsity"]["parameters_removed"] = 1.0 - after["total"] / before["total"]
    provenance["export_realign"] = {
        "multiple": multiple, "criterion": f"{CRITERION} (no channel scores stored)", "blocks": realigned,
    }
    return provenance
