"""One forward pass over the calibration windows, block by block, collecting what every method needs.

For block i with input X_i and output Y_i (per token, hidden size h) and the FFN's intermediate activation
A_i = act(X W_gate^T) * (X W_up^T) (the input of down_proj, width n_i):

- angular distance: d_i = mean over tokens of arccos(clamp(cos(x, y), -1, 1)) / pi, in [0, 1] (CFSP's coarse
  importance; the clamp fixes the reference's NaN when a cosine rounds above 1);
- per channel j: sum_t A_tj^2 (activation norm, Wanda/CFSP) and sum_t A_tj (mean, FLAP's bias and fluctuation);
- per sublayer (depth and attention pruning, ``effideploy.pruning.depth``), with H_i = X_i + attn(X_i) the residual
  stream between attention and FFN: the angular distances of attention alone (X vs H) and of the FFN alone (H vs Y),
  and the relative energy of each residual update per token, sum_t |H - X|^2 / |Y|^2 (and |Y - H|^2, |Y - X|^2).
  Removing a sublayer (or the block) changes the block's output by exactly its update, so its mean is the
  block-local relative loss of dropping it (ShortGPT's rule looks at the same block-local quantity, by angle).
  Per token, not summed energies over sum |Y|^2: a few tokens with massive activations (SmolLM2 grows some to
  hundreds of times the typical norm from block 11 on) would otherwise decide everything.

The reference runs each block twice over the calibration set (once with hooks, once more to propagate); one pass
gives the same numbers. The activations are updated in place, so memory is one buffer of n x seqlen x h plus one
block, whatever the depth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from effideploy import progress
from effideploy.models.layerwise import LayerwiseModel
from effideploy.quantization.hessians import HessianRecorder, spool_path


@dataclass
class BlockStats:
    index: int
    width: int
    n_tokens: int = 0
    angular_sum: float = 0.0
    act_sq_sum: torch.Tensor = field(default=None, repr=False)  # float64 [n]
    act_sum: torch.Tensor = field(default=None, repr=False)  # float64 [n]
    n_samples: int = 0  # windows seen (the reference's normaliser)
    seconds: float = 0.0
    gram_sum: torch.Tensor | None = field(default=None, repr=False)  # float64 [n, n]: sum_t A_t A_t^T (optional)
    gram_path: str | None = None  # where gram_sum was spooled (streaming: memory stays one block)
    gram_count: int = 0  # tokens in gram_sum (every gram_stride-th token)
    # sublayer sums (see the module docstring); zero in statistics saved before they existed
    attention_angular_sum: float = 0.0
    ffn_angular_sum: float = 0.0
    attention_energy: float = 0.0  # sum_t |H - X|^2 / |Y|^2
    ffn_energy: float = 0.0  # sum_t |Y - H|^2 / |Y|^2
    block_energy: float = 0.0  # sum_t |Y - X|^2 / |Y|^2
    output_energy: float = 0.0  # sum_t |Y|^2

    @property
    def angular(self) -> float:
        """Mean angular distance between the block's input and output, in [0, 1]."""
        return self.angular_sum / max(self.n_tokens, 1)

    @property
    def attention_angular(self) -> float:
        return self.attention_angular_sum / max(self.n_tokens, 1)

    @property
    def ffn_angular(self) -> float:
        return self.ffn_angular_sum / max(self.n_tokens, 1)

    def drop_loss(self, part: str) -> float:
        """Mean relative change of the block's output per token when ``part`` (attention | ffn | block) is removed."""
        energy = {"attention": self.attention_energy, "ffn": self.ffn_energy, "block": self.block_energy}[part]
        return energy / max(self.n_tokens, 1)

    @property
    def act_sq_mean(self) -> torch.Tensor:
        return self.act_sq_sum / max(self.n_tokens, 1)

    @property
    def act_mean(self) -> torch.Tensor:
        return self.act_sum / max(self.n_tokens, 1)

    @property
    def has_gram(self) -> bool:
        return self.gram_sum is not None or self.gram_path is not None

    @property
    def gram(self) -> torch.Tensor:
        """E[A A^T] over calibration tokens (least-squares compensation needs it), float64 [n, n]."""
        total = self.gram_sum
        if total is None and self.gram_path is not None:
            from safetensors.torch import load_file

            total = load_file(self.gram_path)["gram_sum"]
        if total is None:
            raise ValueError(f"block {self.index}: calibration collected no second moments (gram)")
        return total.double() / max(self.gram_tokens, 1)

    @property
    def gram_tokens(self) -> int:
        return self.gram_count or self.n_tokens

    @property
    def act_var(self) -> torch.Tensor:
        """Per-channel variance of the intermediate activation over calibration tokens (FLAP's fluctuation)."""
        return (self.act_sq_mean - self.act_mean.pow(2)).clamp_min(0.0)


@dataclass
class CalibrationStats:
    blocks: list[BlockStats]
    n_windows: int
    seqlen: int
    seconds: float

    @property
    def angular(self) -> list[float]:
        return [block.angular for block in self.blocks]


def angular_distance(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per-token arccos(cos(x, y)) / pi for [..., h] tensors, NaN-free (cosine clamped to [-1, 1])."""
    x = inputs.float()
    y = outputs.float()
    dot = (x * y).sum(-1)
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    cosine = (dot / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-1.0, 1.0)
    return torch.arccos(cosine) / math.pi


def record_sublayers(stats: BlockStats, block_in: torch.Tensor, middle: torch.Tensor, block_out: torch.Tensor) -> None:
    scale = block_out.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)

    def energy(tensor: torch.Tensor) -> float:
        return float((tensor.pow(2).sum(-1) / scale).sum(dtype=torch.float64))

    stats.attention_angular_sum += float(angular_distance(block_in, middle).sum(dtype=torch.float64))
    stats.ffn_angular_sum += float(angular_distance(middle, block_out).sum(dtype=torch.float64))
    stats.attention_energy += energy(middle - block_in)
    stats.ffn_energy += energy(block_out - middle)
    stats.block_energy += energy(block_out - block_in)
    stats.output_energy += float(block_out.pow(2).sum(dtype=torch.float64))


# Second moments of an n-wide activation need many more tokens than n: with fewer, the least-squares refit
# fits the calibration noise (SmolLM2 at 50% with 8 x 256 tokens: perplexity in the thousands).
GRAM_TOKENS_PER_CHANNEL = 20


def effective_gram_stride(stride: int, tokens: int, width: int) -> int:
    """Subsample for the second moments only while at least GRAM_TOKENS_PER_CHANNEL x width tokens remain."""
    return max(1, min(stride, tokens // (GRAM_TOKENS_PER_CHANNEL * width)))


@torch.no_grad()
def collect_stats(
    model: LayerwiseModel, windows: torch.Tensor, batch_size: int = 8, compute_dtype: str = "float32",
    gram: bool = False,
    gram_dir: str | None = None,
    gram_stride: int = 1,
    device: torch.device | str = "cpu",
    activations_on_device: bool = True,
    hessians_dir: str | None = None,
) -> CalibrationStats:
    """``compute_dtype="bfloat16"`` runs the blocks' matrix products under bfloat16 autocast (the residual stream
    and every statistic stay float32): about 1.6x faster on CPUs with native bf16, at a small cost in accuracy.

    ``gram`` also accumulates the second moments sum_t A_t A_t^T of every block's FFN activation (least-squares
    compensation needs them; an n x n product per batch, the cost of about half an FFN). With ``gram_dir`` each
    block's matrix is written there as soon as the block is done, so memory does not grow with depth.
    ``hessians_dir``: also the second moments of every Linear's input (GPTQ at export, ``prune --keep-stats``),
    spooled there block by block (``effideploy.quantization.hessians``).
    ``gram_stride`` k uses every k-th token for the second moments only (their product costs as much as half the
    block's forward at k = 1; an n x n estimate needs far fewer than 131k tokens).

    ``device``: where each block, its batch and its statistics live (``effideploy.device``); the activations of
    all windows stay there too unless ``activations_on_device`` is False (``effideploy.memory_plan`` decides), when
    they stay in host memory and each batch is moved in and out."""
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be float32 or bfloat16, not {compute_dtype!r}")
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16")
    store = device if activations_on_device else torch.device("cpu")
    start = time.perf_counter()
    n_windows = windows.shape[0]
    gram_stride = effective_gram_stride(gram_stride, windows.numel(), model.config.intermediate_size)
    batches = [slice(i, min(i + batch_size, n_windows)) for i in range(0, n_windows, batch_size)]
    hidden = torch.cat([model.embed(windows[part]) for part in batches]).to(store)
    contexts: dict[int, dict] = {}
    blocks = []
    for index in progress.track(range(model.num_layers), "Calibrating blocks"):
        block_start = time.perf_counter()
        layer = model.block(index, device)
        width = layer.mlp.down_proj.in_features
        stats = BlockStats(
            index=index,
            width=width,
            act_sq_sum=torch.zeros(width, dtype=torch.float64, device=device),
            act_sum=torch.zeros(width, dtype=torch.float64, device=device),
            gram_sum=torch.zeros(width, width, dtype=torch.float64, device=device) if gram else None,
        )

        def record(_module, args, stats=stats):
            # float32 sums over one batch (thousands of tokens: relative error ~1e-6), float64 across batches;
            # a float64 reduction over the batch would cost as much as a fifth of the block's forward.
            activation = args[0].reshape(-1, args[0].shape[-1]).float()
            stats.act_sq_sum += (activation * activation).sum(0).double()
            stats.act_sum += activation.sum(0).double()
            if stats.gram_sum is not None:
                sample = activation[::gram_stride]
                stats.gram_sum += (sample.T @ sample).double()
                stats.gram_count += sample.shape[0]

        middle = []  # H = X + attn(X), the input of the FFN's norm

        def record_middle(_module, args):
            middle.append(args[0].float())

        handle = layer.mlp.down_proj.register_forward_pre_hook(record)
        recorder = HessianRecorder(layer) if hessians_dir is not None else None
        middle_handle = layer.post_attention_layernorm.register_forward_pre_hook(record_middle)
        try:
            for part in batches:
                block_in = hidden[part].to(device)
                size = block_in.shape[0]
                if size not in contexts:
                    contexts[size] = model.context(block_in)
                with autocast:
                    block_out = layer(block_in, **contexts[size]).float()
                stats.angular_sum += float(angular_distance(block_in, block_out).sum(dtype=torch.float64))
                record_sublayers(stats, block_in, middle.pop(), block_out)
                stats.n_tokens += block_in.shape[0] * block_in.shape[1]
                stats.n_samples += size
                hidden[part] = block_out.to(store)
        finally:
            handle.remove()
            middle_handle.remove()
            if recorder is not None:
                recorder.remove()
        stats.act_sq_sum, stats.act_sum = stats.act_sq_sum.cpu(), stats.act_sum.cpu()
        if stats.gram_sum is not None:
            stats.gram_sum = stats.gram_sum.cpu()
        if recorder is not None:
            recorder.save(spool_path(hessians_dir, index))
        if stats.gram_sum is not None and gram_dir is not None:
            from pathlib import Path

            from safetensors.torch import save_file

            path = Path(gram_dir) / f"gram-{index:05d}.safetensors"
            save_file({"gram_sum": stats.gram_sum}, str(path))
            stats.gram_sum, stats.gram_path = None, str(path)
        stats.seconds = time.perf_counter() - block_start
        blocks.append(stats)
        del layer
    return CalibrationStats(
        blocks=blocks, n_windows=n_windows, seqlen=windows.shape[1], seconds=time.perf_counter() - start
    )


SUBLAYER_SUMS = ("attention_angular_sum", "ffn_angular_sum", "attention_energy", "ffn_energy", "block_energy",
                 "output_energy")


def save_stats(stats: CalibrationStats, path) -> None:
    """Calibration statistics as safetensors (no pickle), so several methods or sparsities can share one pass."""
    import json

    from safetensors.torch import save_file

    tensors = {}
    blocks = []
    for block in stats.blocks:
        tensors[f"act_sq_sum.{block.index}"] = block.act_sq_sum
        tensors[f"act_sum.{block.index}"] = block.act_sum
        if block.has_gram:
            tensors[f"gram_sum.{block.index}"] = block.gram * block.gram_tokens
        blocks.append({"index": block.index, "width": block.width, "n_tokens": block.n_tokens,
                       "angular_sum": block.angular_sum, "n_samples": block.n_samples, "seconds": block.seconds,
                       "gram_count": block.gram_count,
                       **{name: getattr(block, name) for name in SUBLAYER_SUMS}})
    meta = {"n_windows": stats.n_windows, "seqlen": stats.seqlen, "seconds": stats.seconds, "blocks": blocks}
    save_file(tensors, str(path), metadata={"effideploy_stats": json.dumps(meta)})


def load_stats(path) -> CalibrationStats:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["effideploy_stats"])
        names = set(handle.keys())
        blocks = [
            BlockStats(act_sq_sum=handle.get_tensor(f"act_sq_sum.{b['index']}"),
                       act_sum=handle.get_tensor(f"act_sum.{b['index']}"),
                       gram_sum=handle.get_tensor(f"gram_sum.{b['index']}") if f"gram_sum.{b['index']}" in names else None,
                       **b)
            for b in meta["blocks"]
        ]
    return CalibrationStats(blocks=blocks, n_windows=meta["n_windows"], seqlen=meta["seqlen"], seconds=meta["seconds"])
