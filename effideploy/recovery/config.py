"""What to train during recovery and how: one frozen dataclass, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from effideploy.errors import EffideployError, OptionError

class RecoveryWarning(UserWarning):
    """Recovery went on in a degraded way (uniform ranks for want of importance, stopped on a non-finite loss)."""


LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_MEAN_RANK = 8


@dataclass(frozen=True)
class RecoveryConfig:
    """Options of ``effideploy recover`` (and ``prune --recover``).

    budget / mean_rank: the trainable-parameter budget, either as a count of LoRA parameters or as the mean rank
        it would buy if every block had the same rank (budget = mean_rank * sum of per-block costs). At most one
        may be given; neither means ``mean_rank=8``. The same budget is used with and without ``uniform``, so the
        two are comparable.
    uniform: the same rank in every block (up to one rank of rounding) instead of ranks from block importance.
    importance_temperature: ``a`` in the rank weight sigmoid(a * z_i) (see ``effideploy.recovery.ranks``).
    lora_scale: alpha / rank, the same in every block, so a block's update is not damped for having more rank.
    teacher / distill_weight / distill_temperature: with a teacher (a model spec, e.g. ``llama``), the loss is
        (1 - w) * cross-entropy + w * T^2 * KL(teacher || student) on logits softened by T.
    warmup: fraction of the steps with a linearly rising learning rate; a cosine decay to zero follows.
    max_grad_norm: gradient clipping (0 disables it).
    compute_dtype: ``bfloat16`` runs forward and backward under CPU autocast; adapters, optimizer state and the
        merge stay float32.
    """

    budget: int | None = None
    mean_rank: float | None = None
    uniform: bool = False
    importance_temperature: float = 1.0
    targets: tuple[str, ...] = LINEAR_TARGETS
    lora_scale: float = 2.0
    lora_dropout: float = 0.0
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 4
    seqlen: int = 256
    grad_accum: int = 1
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    data: str = "wikitext2"
    data_dir: str | None = None
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    gradient_checkpointing: bool = True
    compute_dtype: str = "auto"  # effideploy.device.compute_dtype: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N: where the model trains
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget is not None and self.mean_rank is not None:
            raise EffideployError("give either --budget or --mean-rank, not both")
        if self.budget is not None and self.budget < 1:
            raise OptionError("budget", f"must be a positive number of parameters, got {self.budget}")
        if self.mean_rank is not None and not (math.isfinite(self.mean_rank) and self.mean_rank >= 1):
            raise OptionError("mean_rank", f"must be at least 1, got {self.mean_rank}")
        unknown = sorted(set(self.targets) - set(LINEAR_TARGETS))
        if not self.targets or unknown:
            raise EffideployError(f"LoRA targets must be among {', '.join(LINEAR_TARGETS)}; got {list(self.targets)}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            if value < 1:
                raise EffideployError(f"{name} must be a positive integer, got {value}")
        if self.seqlen < 2:
            raise OptionError("seqlen", f"must be at least 2 tokens, got {self.seqlen}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError("lr", f"must be a positive number, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise EffideployError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise EffideployError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_scale <= 0 or self.importance_temperature < 0 or self.max_grad_norm < 0:
            raise EffideployError("lora_scale must be positive; importance_temperature and max_grad_norm non-negative")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise OptionError("distill_weight", f"must be in [0, 1], got {self.distill_weight}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise OptionError("compute_dtype", f"must be auto, float32 or bfloat16, got {self.compute_dtype!r}",
                              flag="--dtype")
        from effideploy.device import check_spec

        check_spec(self.device)
        if self.distill_temperature <= 0:
            raise EffideployError(f"the distillation temperature must be positive, got {self.distill_temperature}")

    @property
    def rule(self) -> str:
        return "uniform" if self.uniform else "importance"

    @property
    def windows(self) -> int:
        """Training windows drawn in all: one per sequence of every micro-batch of every step."""
        return self.steps * self.batch_size * self.grad_accum

    @property
    def tokens(self) -> int:
        return self.windows * self.seqlen

    def to_dict(self) -> dict:
        values = asdict(self)
        values["targets"] = list(self.targets)
        return values
