"""Recovery fine-tuning: LoRA with per-block ranks, trained, merged and written as the same checkpoint format.

``recover_checkpoint`` reads a checkpoint (a pruned one, or any supported model), attaches LoRA adapters through
peft with the ranks from ``effideploy.recovery.ranks``, trains them on text (optionally distilling from a dense
teacher), merges them into the weights and writes a checkpoint with the same tensor names, config, remote code
and tokenizer, plus a ``recovery`` section in ``effideploy.json``. Nothing is written until training is over,
and the output folder appears atomically. The training loop is ``effideploy.recovery.train``; the checkpoint layout
is ``effideploy.checkpoint.writer``'s, the one ``prune`` writes.
"""

from __future__ import annotations

import datetime
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import effideploy
from effideploy import progress
from effideploy.checkpoint.writer import PROVENANCE_FILE, PROVENANCE_FORMAT, copy_checkpoint_files, source_record, write_state_dict
from effideploy.data.text import TextSpec, resolve_text
from effideploy.errors import EffideployError
from effideploy.io import atomic_output_dir, check_output_dir, scratch_dir, write_json
from effideploy.models.build import load_model
from effideploy.models.resolve import ModelSource, resolve_model
from effideploy.models.weights import SafetensorsWeights
from effideploy.recovery.config import DEFAULT_MEAN_RANK, RecoveryConfig, RecoveryWarning
from effideploy.recovery.ranks import block_ranks, budget_for_mean_rank, rank_cost
from effideploy.recovery.train import TrainLog, load_teacher, train_lora, training_windows

RANK_RULE = ("r_i = clamp(lam * sigmoid(a * z_i), 1, cap_i), z_i = block importance standardised over blocks, "
             "lam such that sum_i r_i * c_i = budget, c_i = sum over the block's LoRA modules of (in + out); "
             "rounded down, then single ranks added by largest shortfall while they fit")
UNIFORM_RULE = "the same procedure with equal weights: one rank everywhere, up to one rank of rounding"


@dataclass
class RankPlan:
    ranks: list[int]
    weights: list[float]
    costs: list[int]
    budget: int
    rule: str  # "importance" | "uniform"
    importance: list[float] | None
    fallback: str | None = None  # why importance ranks were asked for but uniform ranks are used

    @property
    def parameters(self) -> int:
        return sum(r * c for r, c in zip(self.ranks, self.costs))


@dataclass
class RecoveryResult:
    output: Path
    plan: RankPlan
    log: TrainLog
    record: dict


def _require_peft():
    try:
        import peft
    except ModuleNotFoundError:
        raise EffideployError("recovery needs peft: pip install 'effideploy[recover]'") from None
    return peft


def _notice(message: str) -> None:
    warnings.warn(message, RecoveryWarning, stacklevel=3)


# ---------------------------------------------------------------- ranks


def block_shapes(model: nn.Module, targets: tuple[str, ...]) -> list[dict[str, tuple[int, int]]]:
    """(in, out) of every LoRA target in every decoder block, read from the model as it is (pruned widths)."""
    shapes = []
    for index, layer in enumerate(model.model.layers):
        if getattr(layer.self_attn, "is_no_op", False) or getattr(layer.mlp, "is_no_op", False):
            from effideploy.errors import EffideployError

            raise EffideployError(f"block {index} has a removed (no-op) sublayer: LoRA recovery of depth/attention-"
                                  "pruned checkpoints is not supported yet")
        modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
        shapes.append({name: (modules[name].in_features, modules[name].out_features) for name in targets})
    return shapes


def recorded_importance(provenance: dict | None, n_blocks: int) -> tuple[list[float] | None, str | None]:
    """Block importances from effideploy.json, or None and the reason they cannot be used."""
    if provenance is None:
        return None, "no effideploy.json (not a checkpoint made by effideploy, or a dense model)"
    blocks = provenance.get("blocks") or []
    values = [block.get("importance") for block in blocks]
    if len(values) != n_blocks:
        return None, f"effideploy.json describes {len(values)} blocks, the model has {n_blocks}"
    if any(value is None or not math.isfinite(value) for value in values):
        return None, f"effideploy.json records no block importance (method {provenance.get('method')!r})"
    return [float(value) for value in values], None


def plan_ranks(model: nn.Module, provenance: dict | None, config: RecoveryConfig) -> RankPlan:
    shapes = block_shapes(model, config.targets)
    costs = [rank_cost(block) for block in shapes]
    budget = config.budget or budget_for_mean_rank(config.mean_rank or DEFAULT_MEAN_RANK, costs)
    importance, reason = recorded_importance(provenance, len(shapes))
    fallback = None
    if not config.uniform and importance is None:
        fallback = f"{reason}: using uniform LoRA ranks"
        _notice(fallback)
    ranks, weights = block_ranks(importance, shapes, budget, uniform=config.uniform,
                                 temperature=config.importance_temperature)
    rule = "uniform" if config.uniform or importance is None else "importance"
    return RankPlan(ranks=ranks, weights=weights, costs=costs, budget=budget, rule=rule, importance=importance,
                    fallback=fallback)


# ---------------------------------------------------------------- adapters


def attach_lora(model: nn.Module, ranks: list[int], config: RecoveryConfig):
    """Wrap ``model`` in a peft model with rank ``ranks[i]`` (alpha = lora_scale * rank) on block i's targets."""
    peft = _require_peft()
    modules = "|".join(config.targets)
    # peft matches a pattern key k as re.match(rf"(.*\.)?({k})$", module name): anchoring on "layers.{i}." keeps
    # block 1 from matching block 11.
    keys = [rf"layers\.{i}\.(self_attn|mlp)\.({modules})" for i in range(len(ranks))]
    lora_config = peft.LoraConfig(
        r=ranks[0], lora_alpha=config.lora_scale * ranks[0], lora_dropout=config.lora_dropout,
        target_modules=list(config.targets), bias="none", task_type="CAUSAL_LM",
        rank_pattern=dict(zip(keys, ranks)),
        alpha_pattern={key: config.lora_scale * rank for key, rank in zip(keys, ranks)},
    )
    torch.manual_seed(config.seed)  # LoRA A is randomly initialised
    return peft.get_peft_model(model, lora_config)


def lora_ranks(peft_model) -> list[dict[str, int]]:
    """The rank of every adapter, per block, as peft built it."""
    ranks: list[dict[str, int]] = []
    for name, module in peft_model.named_modules():
        match = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", name)
        if match and hasattr(module, "lora_A") and "default" in module.lora_A:
            index = int(match.group(1))
            while len(ranks) <= index:
                ranks.append({})
            ranks[index][match.group(2)] = module.lora_A["default"].out_features
    return ranks


def merge_lora(peft_model) -> nn.Module:
    """Fold every adapter into its base weight (W + scale * B A) and return the plain model."""
    model = peft_model.merge_and_unload()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    return model.eval()


# ---------------------------------------------------------------- checkpoint


def write_weights(model: nn.Module, source: ModelSource, folder: Path) -> None:
    """The merged weights under the source's tensor names and dtype, one shard for the outer tensors and one per
    block (the layout ``prune`` writes)."""
    weights = SafetensorsWeights(source.path)
    write_state_dict(folder, model.state_dict(), weights.names(), len(model.model.layers), weights.dtype())


def recovery_record(plan: RankPlan, log: TrainLog, config: RecoveryConfig, text: TextSpec,
                    teacher: ModelSource | None) -> dict:
    tokens_per_step = config.batch_size * config.grad_accum * config.seqlen
    return {
        "method": "lora",
        "merged": True,
        "rule": plan.rule,
        "rule_detail": RANK_RULE if plan.rule == "importance" else UNIFORM_RULE,
        "fallback": plan.fallback,
        "importance_temperature": config.importance_temperature,
        "targets": list(config.targets),
        "budget": {"parameters": plan.budget, "mean_rank": config.mean_rank if config.budget is None else None,
                   "trainable_parameters": plan.parameters},
        "lora_scale": config.lora_scale,
        "lora_dropout": config.lora_dropout,
        "blocks": [
            {"index": i, "rank": rank, "alpha": config.lora_scale * rank, "weight": weight,
             "importance": None if plan.importance is None else plan.importance[i],
             "trainable_parameters": rank * cost}
            for i, (rank, weight, cost) in enumerate(zip(plan.ranks, plan.weights, plan.costs))
        ],
        "training": {
            "steps_requested": config.steps,
            "steps": log.steps,  # updates contained in the merged weights
            "steps_run": len(log.loss),
            "tokens": log.steps * tokens_per_step,
            "seconds": log.seconds,
            "batch_size": config.batch_size, "grad_accum": config.grad_accum, "seqlen": config.seqlen,
            "lr": config.lr, "schedule": f"linear warmup ({config.warmup:.0%} of steps), cosine decay to 0",
            "optimizer": "AdamW (weight decay 0)", "max_grad_norm": config.max_grad_norm,
            "gradient_checkpointing": config.gradient_checkpointing, "compute_dtype": config.compute_dtype,
            "seed": config.seed,
            "data": {"text": text.name, "path": text.path, "split": text.split},
            "teacher": None if teacher is None else {
                "model": teacher.spec, "path": str(teacher.path), "distill_weight": config.distill_weight,
                "temperature": config.distill_temperature},
        },
        "stopped": log.stopped,
        "loss_curve": [round(value, 5) for value in log.loss],
        "cross_entropy_curve": [round(value, 5) for value in log.cross_entropy] if teacher is not None else None,
        "config": config.to_dict(),
    }


def provenance_with_recovery(source: ModelSource, recovery: dict, input_label: str | None = None) -> dict:
    record = source.provenance()
    if record is None:
        record = {"format": PROVENANCE_FORMAT, "effideploy_version": effideploy.__version__,
                  "source": source_record(source)}
    elif "recovery" in record:
        recovery = {**recovery, "previous": record["recovery"]}  # recovered twice: keep the earlier run
    recovery["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    recovery["input"] = input_label or str(source.path)
    return {**record, "recovery": recovery}


def recover_checkpoint(source: ModelSource | str | Path, output: str | Path, config: RecoveryConfig, *,
                       overwrite: bool = False, input_label: str | None = None) -> RecoveryResult:
    """Train importance-adaptive (or uniform) LoRA on ``source``, merge it and write the result to ``output``.

    ``input_label`` replaces the input path in the record (for an input that is not kept, see prune_and_recover).
    """
    _require_peft()
    import dataclasses

    from effideploy.device import compute_dtype, resolve_device

    device = resolve_device(config.device)  # a missing CUDA device is refused before any work
    config = dataclasses.replace(config, compute_dtype=compute_dtype(device, config.compute_dtype))  # as recorded
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    teacher_source = None if config.teacher is None else resolve_model(config.teacher)
    inputs = (source.path,) if teacher_source is None else (source.path, teacher_source.path)
    target = check_output_dir(output, overwrite=overwrite, inputs=inputs)
    text = resolve_text(config.data, "calibration", config.data_dir)
    windows = training_windows(source, text, config)
    with progress.status(f"Loading {source.spec}"):
        model = load_model(source).to(device)
    teacher = None
    if teacher_source is not None:
        with progress.status(f"Loading the teacher {teacher_source.spec}"):
            teacher = load_teacher(teacher_source, model).to(device)
    plan = plan_ranks(model, source.provenance(), config)
    peft_model = attach_lora(model, plan.ranks, config)
    log = train_lora(peft_model, windows, config, teacher)
    if log.stopped:
        _notice(f"{log.stopped}: training stopped; kept the adapters after {log.steps} updates, the last that "
                "gave a finite loss")
    del teacher
    merged = merge_lora(peft_model).to("cpu")  # written from host memory
    recovery = recovery_record(plan, log, config, text, teacher_source)
    with atomic_output_dir(target, overwrite=overwrite) as staging:
        with progress.status(f"Writing {target.name}"):
            write_weights(merged, source, staging)
            copy_checkpoint_files(source.path, staging, remote_code=source.is_pruned_checkpoint)
            write_json(staging / PROVENANCE_FILE, provenance_with_recovery(source, recovery, input_label))
    return RecoveryResult(output=target, plan=plan, log=log, record=recovery)


def prune_and_recover(source: ModelSource, prune_config, output: str | Path, config: RecoveryConfig, *,
                      calibration: TextSpec | None, overwrite: bool = False):
    """``prune --recover``: prune into a temporary folder beside ``output``, recover from it into ``output``.

    Only the recovered checkpoint is kept; its effideploy.json holds the pruning provenance and the recovery.
    Returns (prune plan, recovery result).
    """

    from effideploy.pruning import prune_checkpoint

    _require_peft()
    # Everything recover_checkpoint would refuse is refused here, before the pruning time is spent.
    inputs = (source.path,) if config.teacher is None else (source.path, resolve_model(config.teacher).path)
    target = check_output_dir(output, overwrite=overwrite, inputs=inputs)
    resolve_text(config.data, "calibration", config.data_dir)
    with scratch_dir(target, "pruned") as scratch:
        pruned, plan = prune_checkpoint(source, prune_config, Path(scratch) / "pruned", calibration=calibration)
        result = recover_checkpoint(pruned, target, config, overwrite=overwrite,
                                    input_label=f"pruned from {source.spec} in the same run (not kept)")
    return plan, result


__all__ = ["RankPlan", "RecoveryResult", "TrainLog", "attach_lora", "lora_ranks",
           "merge_lora", "plan_ranks", "prune_and_recover", "recover_checkpoint", "train_lora"]
