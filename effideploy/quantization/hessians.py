"""Second moments of every Linear's input, H = E[x x^T], collected in the pruning's calibration pass and kept in
the pruned checkpoint (``prune --keep-stats``), so GPTQ at export time does not run the model over the
calibration text again.

Four inputs per block feed seven Linears: the attention input (q/k/v_proj), the attention output (o_proj), the
FFN input (gate/up_proj) and the FFN activation (down_proj). They are measured on the dense model, as every
statistic of the one-pass pruning is; down_proj's is then restricted to the channels the block keeps (exact: a
kept channel's activation does not depend on the removed ones). Inputs of later blocks do change once earlier
FFNs are narrowed; GPTQ's objective is measured on the dense model's activations (what "one pass" costs).

File: ``calibration/hessians.safetensors`` in the checkpoint (a sub-folder, so no weight loader mistakes it for a
shard), float32 means ``model.layers.{i}.{input}``, metadata: tokens and windows behind them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILE = "calibration/hessians.safetensors"
# Which input each Linear of a LLaMA block reads (q/k/v share one, gate/up share one).
INPUT_OF = {
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "o_in",
    "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "down_in",
}
HOOKED = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
          "down_in": "mlp.down_proj"}
# Every k-th token enters the second moments: 131k calibration tokens / 4 still leave > 20 per column of the
# widest input (down_proj), and the n x n products cost a quarter.
TOKEN_STRIDE = 4


class HessianRecorder:
    """Forward pre-hooks on one block's four input-reading Linears, accumulating sum_t x_t x_t^T in float64."""

    def __init__(self, layer: torch.nn.Module, stride: int = TOKEN_STRIDE) -> None:
        self.stride = stride
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._handles = [layer.get_submodule(path).register_forward_pre_hook(self._hook(name))
                         for name, path in HOOKED.items()]

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[:: self.stride].float()
            product = (x.T @ x).double()
            self.sums[name] = product if name not in self.sums else self.sums[name] + product
            if name == "attn_in":
                self.tokens += x.shape[0]
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def save(self, path: Path) -> None:
        """The block's means, spooled (one block in memory, whatever the depth)."""
        from safetensors.torch import save_file

        means = {name: (total / max(self.tokens, 1)).float().cpu().contiguous() for name, total in self.sums.items()}
        save_file(means, str(path), metadata={"tokens": str(self.tokens)})


def spool_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"hessians-{index:05d}.safetensors"


def write_checkpoint_hessians(checkpoint: Path, spool: str | Path, kept: list[torch.Tensor], windows: int) -> Path:
    """``checkpoint/FILE`` from the spooled per-block means, down_proj's restricted to each block's kept channels."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors, tokens = {}, None
    for index, channels in enumerate(kept):
        with safe_open(str(spool_path(spool, index)), framework="pt") as handle:
            tokens = int(handle.metadata()["tokens"])
            for name in handle.keys():
                value = handle.get_tensor(name)
                if name == "down_in":
                    value = value.index_select(0, channels).index_select(1, channels)
                tensors[f"model.layers.{index}.{name}"] = value.contiguous()
    target = Path(checkpoint) / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tokens_per_block": tokens, "windows": windows, "token_stride": TOKEN_STRIDE,
            "measured_on": "dense model, the pruning's calibration pass"}
    save_file(tensors, str(target), metadata={"effideploy_hessians": json.dumps(meta)})
    return target


class CheckpointHessians:
    """Read side: H for a Linear by its module name (``model.layers.3.mlp.up_proj``), None when not kept."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as handle:
            self.meta = json.loads(handle.metadata().get("effideploy_hessians", "{}"))
            self.names = set(handle.keys())

    @classmethod
    def of(cls, checkpoint: Path) -> "CheckpointHessians | None":
        path = Path(checkpoint) / FILE
        return cls(path) if path.is_file() else None

    def for_module(self, module_name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        prefix, _, local = module_name.partition(".layers.")
        index, _, path = local.partition(".")
        name = f"model.layers.{index}.{INPUT_OF.get(path, '?')}"
        if name not in self.names:
            return None
        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)
