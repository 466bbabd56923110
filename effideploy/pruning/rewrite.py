"""Physical rewrite of FFN shapes: gate/up rows and down columns of removed channels are dropped (not masked)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from effideploy.checkpoint.remote.modeling_decilm import DeciLMForCausalLM
from effideploy.models.build import layer_config
from effideploy.pruning.compensation import least_squares, mean_bias
from effideploy.pruning.plan import BlockPlan, PrunePlan


def rewrite_block(tensors: dict[str, torch.Tensor], block: BlockPlan, with_bias: bool,
                  device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Rewrite one block's tensors (names relative to the block or absolute; FFN names end in
    ``mlp.{gate,up,down}_proj.{weight,bias}``) and apply the block's compensation. Non-FFN tensors pass through.
    ``with_bias`` adds zero gate/up biases and a down bias where the source had none, because Llama's
    ``mlp_bias`` is one flag for all three projections. ``device``: where the lstsq solve runs (the result comes
    back to the tensors' device)."""
    kept = block.kept
    names = {suffix: next((n for n in tensors if n.endswith(suffix)), None)
             for suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
    if None in names.values():
        raise ValueError(f"block {block.index}: no FFN weights among {sorted(tensors)}")
    prefix = names["mlp.down_proj.weight"][: -len("down_proj.weight")]
    down = tensors[names["mlp.down_proj.weight"]]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
            out[name] = tensor.index_select(0, kept).contiguous()
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = down.index_select(1, kept).contiguous()
        else:
            out[name] = tensor
    added = None
    if block.compensation == "bias":
        added = mean_bias(down.float(), block.stats.act_mean, kept)
    elif block.compensation == "lstsq":
        new_down, added = least_squares(down.float(), block.stats.gram, block.stats.act_mean, kept, block.damp,
                                      device=device)
        out[names["mlp.down_proj.weight"]] = new_down.to(down.dtype).contiguous()
    if with_bias:
        for projection in ("gate_proj", "up_proj"):
            out.setdefault(f"{prefix}{projection}.bias", torch.zeros(block.width, dtype=down.dtype))
        down_bias = out.get(f"{prefix}down_proj.bias", torch.zeros(down.shape[0], dtype=down.dtype)).float()
        if added is not None:
            down_bias = down_bias + added.float()
        out[f"{prefix}down_proj.bias"] = down_bias.to(down.dtype)
    elif added is not None:
        raise ValueError(f"block {block.index}: {block.compensation} compensation needs a down_proj bias")
    return out


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Rewrite a loaded LlamaForCausalLM in place into the pruned DeciLM model the checkpoint describes."""
    from effideploy.checkpoint.config import pruned_config

    config = pruned_config(model.config, plan.widths, mlp_bias=plan.has_bias or model.config.mlp_bias)
    for layer, block in zip(model.model.layers, plan.blocks):
        mlp = layer.mlp
        state = rewrite_block(
            {f"mlp.{name}": tensor for name, tensor in mlp.state_dict().items()}, block, with_bias=config.mlp_bias
        )
        dtype = mlp.down_proj.weight.dtype
        new_mlp = LlamaMLP(layer_config(config, block.index)).to(dtype)
        new_mlp.load_state_dict({name[len("mlp."):]: tensor for name, tensor in state.items()})
        layer.mlp = new_mlp
    model.config = config
    # DeciLMForCausalLM only differs from LlamaForCausalLM in how it builds the FFNs, which is done: switching the
    # class makes save_pretrained and isinstance checks describe the model as it now is.
    model.__class__ = DeciLMForCausalLM
    return model
