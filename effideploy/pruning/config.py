"""What to prune and how: one frozen dataclass, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from effideploy.errors import EffideployError, OptionError

COMPENSATIONS = ("none", "bias", "lstsq")


@dataclass(frozen=True)
class PruneConfig:
    """Options of ``effideploy prune``; every method reads the fields it needs.

    sparsity: mean fraction of FFN intermediate channels removed over all blocks (CFSP's definition).
    align: every block keeps a multiple of ``align`` channels (kernels, tensor parallelism) and at least ``align``.
    a, b, c: CFSP's hyper-parameters: ``a`` the temperature of the block budget, ``b`` and ``c`` the exponents of
        the activation norm inside and outside the weight terms of the channel score.
    compensation: what replaces the removed channels' contribution (see ``effideploy.pruning.compensation``):
        ``bias`` (FLAP's mean bias), ``lstsq`` (least-squares refit of down_proj and a bias from the activations'
        second moments; CFSP's default here) or ``none``. ``None`` means the method's default.
    damp: ridge term of the least-squares solve, relative to the mean diagonal of the second moments.
    gram_stride: lstsq estimates the second moments from every k-th calibration token (their cost drops k-fold).
    keep_stats: also collect every Linear's input second moments in the calibration pass and keep them in the
        checkpoint (``calibration/hessians.safetensors``), so ``export --quantize ... --quant-method gptq`` reuses
        them instead of running the model over calibration text again.
    count: ``drop-blocks`` / ``drop-attention``: how many blocks / attention sublayers to remove.
    target_params / target_speedup: the size target of ``drop-blocks``, ``drop-attention`` and ``cfsp-joint``, as the
        fraction of all parameters removed or as the ideal decode speedup (matmul weights read per token, dense /
        pruned); see ``effideploy.pruning.depth``. ``sparsity`` is ignored by these methods.
    calib_dtype / device / max_memory_gb: where calibration runs and in what precision, and the host memory it may
        use; the memory plan (``effideploy.memory_plan``) is checked against it before any work.
    """

    method: str = "cfsp"
    sparsity: float = 0.5
    align: int = 1
    a: float = 1.0
    b: float = 1.0
    c: float = 1.0
    compensation: str | None = None  # None: the method's default
    damp: float = 1e-3
    gram_stride: int = 4
    calib_samples: int = 128
    calib_seqlen: int = 1024
    seed: int = 0
    batch_size: int = 8
    calib_dtype: str = "auto"  # effideploy.device.compute_dtype: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N (effideploy.device)
    max_memory_gb: float | None = None  # host memory calibration may use (default: MemAvailable)
    keep_stats: bool = False
    count: int | None = None
    target_params: float | None = None
    target_speedup: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sparsity", "a", "b", "c", "damp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(name, f"must be a finite number, got {value!r}")
        if not 0.0 < self.sparsity < 1.0:
            raise OptionError("sparsity", f"must be in (0, 1), got {self.sparsity}")
        if self.align < 1:
            raise OptionError("align", f"must be a positive integer, got {self.align}")
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise EffideployError(
                f"calibration needs at least 1 window of 2 tokens, got {self.calib_samples} x {self.calib_seqlen}"
            )
        if self.batch_size < 1:
            raise OptionError("batch_size", f"must be positive, got {self.batch_size}")
        if self.calib_dtype not in ("auto", "float32", "bfloat16"):
            raise OptionError("calib_dtype", f"must be auto, float32 or bfloat16, got {self.calib_dtype!r}")
        from effideploy.device import check_spec

        check_spec(self.device)
        if self.max_memory_gb is not None and (isinstance(self.max_memory_gb, bool) or not isinstance(
                self.max_memory_gb, (int, float)) or not math.isfinite(self.max_memory_gb) or self.max_memory_gb <= 0):
            raise OptionError("max_memory_gb", f"must be a positive number of GB, got {self.max_memory_gb!r}",
                              flag="--max-memory")
        if self.gram_stride < 1:
            raise OptionError("gram_stride", f"must be a positive integer, got {self.gram_stride}")
        if self.damp <= 0:
            raise OptionError("damp", f"must be positive, got {self.damp}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1):
            raise OptionError("count", f"must be a positive integer, got {self.count!r}")
        if self.target_params is not None and not (isinstance(self.target_params, (int, float))
                                                   and 0.0 < self.target_params < 1.0):
            raise OptionError("target_params", f"must be a fraction in (0, 1), got {self.target_params!r}")
        if self.target_speedup is not None and not (isinstance(self.target_speedup, (int, float))
                                                    and math.isfinite(self.target_speedup) and self.target_speedup > 1.0):
            raise OptionError("target_speedup", f"must be a number above 1, got {self.target_speedup!r}")
        if sum(value is not None for value in (self.count, self.target_params, self.target_speedup)) > 1:
            raise OptionError("count", "cannot be combined with --target-params or --target-speedup: give one size target",
                              flag="--count")
        if self.compensation is not None and self.compensation not in COMPENSATIONS:
            raise OptionError("compensation", f"must be one of {COMPENSATIONS}, got {self.compensation!r}")

    def to_dict(self) -> dict:
        return asdict(self)
