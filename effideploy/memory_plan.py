"""The memory a calibration pass will need, from config.json's shapes alone, before anything is loaded.

Calibration holds (see ``effideploy.pruning.calibration``):

- one decoder block, as float32 compute weights (plus, under bfloat16 autocast, the bf16 copies autocast caches),
  and the largest stored tensor while it is read from safetensors;
- the residual stream of every calibration window, float32 [n, seqlen, hidden] (twice while the windows are
  embedded, with the float32 embedding table);
- one batch's intermediates: q/k/v, the attention scores [b, heads, L, L] (twice: scores and softmax), the FFN's
  gate / up / product [b, L, ffn] and a few [b, L, hidden] tensors;
- the statistics: two float64 vectors per block, and with lstsq compensation the float64 second-moment matrix
  [ffn, ffn] plus its float32 per-batch product (spooled to disk when the block is done).

The prune's two other passes run on the host and can set its peak (measured on Llama-2-7B's shapes: the write did):

- scoring: each block's three FFN matrices in float32 and the score's temporaries, about seven [ffn, hidden] float32
  matrices, plus the stored matrix being read;
- writing: the outer tensors (embeddings, head) and their serialised copy, then per block its stored tensors, the
  pruned copy and its serialised copy (three stored blocks at most) and down_proj in float32 for the compensation;
  with lstsq, the float64 second moments and the solve's operands (~24 (hidden x ffn + ffn^2) bytes; on a CUDA
  device the solve runs there and the host holds the second moments only).

On a CUDA device the block, the batch and the statistics live on the device. The activations stay on the device
when block + batch + statistics + activations fit in 90% of its free memory (``torch.cuda.mem_get_info``), else
they are spilled to host memory and each batch is moved in and out (PCIe traffic of 2 x activations per block).
The host then holds the activations, the stored tensor being read and the embedding phase. A plan whose host peak
exceeds the limit (``--max-memory``, default MemAvailable from /proc/meminfo), or whose device part does not fit
even with the activations spilled, is refused with one line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from effideploy.errors import EffideployError

GB = 1e9
# RSS of a Python process with torch, transformers and effideploy's pruning imported (0.47 GB measured), rounded up.
HOST_BASELINE = 0.6 * GB
# CUDA context and the allocator's slack on the device, and the CUDA libraries' host memory.
DEVICE_BASELINE = 0.6 * GB
CUDA_HOST_EXTRA = 0.5 * GB
# Fraction of a device's free memory a plan may use (fragmentation, cuBLAS workspaces).
DEVICE_HEADROOM = 0.9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# The largest file a POSIX file system can address (off_t is signed 64-bit). Weights larger than this exist in no
# file, and the plan's float arithmetic would overflow on the config's numbers long before (10^200 is a valid
# JSON integer).
MAX_FILE_BYTES = 2**63 - 1


@dataclass(frozen=True)
class Shapes:
    """What the plan needs from config.json."""

    hidden: int
    ffn: int  # the widest block's FFN width
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    stored_bytes: int = 4  # bytes per weight element on disk (bf16 checkpoints: 2)
    tied: bool = False  # the head shares the embedding table

    @classmethod
    def from_config(cls, config: dict) -> "Shapes":
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            widths = [int(block["ffn"]["intermediate_size"]) for block in config.get("block_configs") or []]
            ffn = max(widths) if widths else int(config["intermediate_size"])
            dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
            return cls(hidden=hidden, ffn=ffn, layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                       stored_bytes=DTYPE_BYTES.get(dtype, 4), tied=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise EffideployError(f"config.json lacks the shapes the memory plan needs ({exc})") from None

    def __post_init__(self) -> None:
        if min(self.hidden, self.ffn, self.layers, self.heads, self.kv_heads, self.head_dim, self.vocab) < 1:
            raise EffideployError("config.json's shapes must be positive integers for the memory plan")
        if self.weight_bytes > MAX_FILE_BYTES:
            raise EffideployError(
                f"config.json describes more than 2^63 bytes of weights, more than any file can hold "
                f"({_digits(self.layers)} layers, hidden {_digits(self.hidden)}, FFN {_digits(self.ffn)}, vocabulary "
                f"{_digits(self.vocab)}); its sizes are wrong")

    @property
    def weight_bytes(self) -> int:
        """Bytes of stored weights the shapes describe (every block at the widest FFN: an upper bound)."""
        return self.stored_bytes * (self.layers * self.block_parameters + self.outer_parameters)

    @property
    def block_parameters(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def outer_parameters(self) -> int:
        """Embedding table, head (unless tied) and final norm."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest single tensor read from disk (the embedding table, or an FFN matrix)."""
        return max(self.vocab * self.hidden, self.hidden * self.ffn)


def _digits(value: int) -> str:
    """An integer for a message, however large (str() of a 5000-digit int raises)."""
    return str(value) if value < 10**12 else f"~2^{value.bit_length() - 1}"


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    dtype: str
    block: int  # bytes: one block's compute weights (+ autocast copies)
    read_buffer: int  # the stored tensor being read
    embedding: int  # the embedding phase's table (stored + float32)
    activations: int  # float32 residual stream of all windows
    batch: int  # one batch's intermediates
    statistics: int
    scoring: int  # the scoring pass (host)
    writing: int  # the rewrite and write pass (host)
    activations_on_device: bool
    host_peak: int
    device_peak: int  # 0 on the CPU
    host_limit: int | None
    device_free: int | None
    spool_disk: int  # second moments spooled to disk over the whole pass

    @property
    def fits(self) -> bool:
        host_ok = self.host_limit is None or self.host_peak <= self.host_limit
        device_ok = self.device_free is None or self.device_peak <= DEVICE_HEADROOM * self.device_free
        return host_ok and device_ok

    def describe(self) -> str:
        gb = lambda value: f"{value / GB:.2f} GB"  # noqa: E731
        limit = f" of {gb(self.host_limit)} allowed" if self.host_limit is not None else ""
        lines = [f"memory plan ({self.device}, {self.dtype} compute): host peak ~{gb(self.host_peak)}{limit}"
                 + (f", device peak ~{gb(self.device_peak)} of {gb(self.device_free)} free"
                    if self.device_free is not None else "")]
        where = "device" if self.activations_on_device else "host"
        if self.device_free is not None:
            where += (" (they fit beside one block)" if self.activations_on_device
                      else " (spilled: they do not fit beside one block on the device)")
        lines.append(f"  one block {gb(self.block)}, activations {gb(self.activations)} on {where}, batch "
                     f"intermediates {gb(self.batch)}, statistics {gb(self.statistics)}, embedding phase "
                     f"{gb(self.embedding)}; then scoring {gb(self.scoring)}, writing {gb(self.writing)}"
                     + (f"; second moments spooled to disk {gb(self.spool_disk)}" if self.spool_disk else ""))
        return "\n".join(lines)

    def check(self) -> None:
        """One line naming what does not fit, before any work."""
        gb = lambda value: f"{value / GB:.1f} GB"  # noqa: E731
        if self.host_limit is not None and self.host_peak > self.host_limit:
            raise EffideployError(
                f"calibration needs ~{gb(self.host_peak)} of host memory ({self.device}: one block {gb(self.block)}, "
                f"activations {gb(self.activations)}, statistics {gb(self.statistics)}) but {gb(self.host_limit)} "
                "is allowed (--max-memory, else MemAvailable); use fewer --calib-samples, a shorter --calib-seqlen, "
                "a smaller --batch-size or --device cuda")
        if self.device_free is not None and self.device_peak > DEVICE_HEADROOM * self.device_free:
            raise EffideployError(
                f"calibration needs ~{gb(self.device_peak)} on {self.device} (one block {gb(self.block)}, batch "
                f"{gb(self.batch)}, statistics {gb(self.statistics)}) but {gb(self.device_free)} is free; use a "
                "smaller --batch-size, a shorter --calib-seqlen or --device cpu")


def plan_calibration(shapes: Shapes, *, windows: int, seqlen: int, batch_size: int, gram: bool, device: str = "cpu",
                     dtype: str = "float32", host_limit: int | None = None,
                     device_free: int | None = None) -> MemoryPlan:
    """The arithmetic of the module docstring. ``device_free`` None means a CPU run (everything on the host)."""
    h, f = shapes.hidden, shapes.ffn
    block = 4 * shapes.block_parameters + (2 * shapes.block_parameters if dtype == "bfloat16" else 0)
    read_buffer = shapes.stored_bytes * shapes.largest_tensor
    embedding = (4 + shapes.stored_bytes) * shapes.vocab * h
    activations = 4 * windows * seqlen * h
    b = min(batch_size, windows)
    tokens = b * seqlen
    qkv = (shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim
    batch = 4 * tokens * (6 * h + qkv + 4 * f) + 4 * b * seqlen * seqlen * (2 * shapes.heads + 1)
    statistics = 16 * f + (20 * f * f if gram else 0)
    spool = 8 * f * f * shapes.layers if gram else 0
    embed_phase = embedding + 2 * activations
    stored = shapes.stored_bytes
    scoring = 28 * h * f + stored * h * f
    solve = 24 * (h * f + f * f) if gram else 0
    writing = max(2 * stored * shapes.outer_parameters, 3 * stored * shapes.block_parameters + 4 * h * f)
    common = dict(device=device, dtype=dtype, block=block, read_buffer=read_buffer, embedding=embedding,
                  activations=activations, batch=batch, statistics=statistics, scoring=scoring, host_limit=host_limit,
                  spool_disk=spool)
    if device_free is None:
        writing += solve
        calibration = block + read_buffer + activations + batch + statistics
        host_peak = HOST_BASELINE + max(embed_phase, calibration, scoring, writing)
        return MemoryPlan(**common, writing=writing, activations_on_device=False, host_peak=int(host_peak),
                          device_peak=0, device_free=None)
    writing += 8 * f * f if gram else 0  # the second moments read back; the solve runs on the device
    fixed = DEVICE_BASELINE + block + batch + statistics
    on_device = fixed + activations <= DEVICE_HEADROOM * device_free
    device_peak = max(fixed + (activations if on_device else 0), DEVICE_BASELINE + solve)
    host_side = read_buffer + (0 if on_device else activations)
    host_peak = HOST_BASELINE + CUDA_HOST_EXTRA + max(embed_phase, host_side, scoring, writing)
    return MemoryPlan(**common, writing=writing, activations_on_device=on_device, host_peak=int(host_peak),
                      device_peak=int(device_peak), device_free=device_free)
