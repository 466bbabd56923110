"""Recovery fine-tuning: LoRA with per-block ranks, trained, merged and written as the same checkpoint format.

``recover_checkpoint`` reads a checkpoint (a pruned one, or any supported model), attaches LoRA adapters through
peft with the ranks from ``effideploy.recovery.ranks``, trains them on text (optionally distilling from a dense
teacher), merges them into the weights and writes a checkpoint with the same tensor names, config, remote code
and tokenizer, plus a ``recovery`` section in ``effideploy.json``. Nothing is written until training is over,
and the output folder appears atomically.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import effideploy
from effideploy import progress
from effideploy.checkpoint.writer import PROVENANCE_FILE, PROVENANCE_FORMAT, ShardWriter, copy_remote_code, copy_tokenizer
from effideploy.data.text import TextSpec, load_text, resolve_text, sample_windows, tokenize_text
from effideploy.errors import EffideployError
from effideploy.safe_files import copy_json_without_foreign_code
from effideploy.io import atomic_output_dir, check_output_dir, scratch_dir, write_json
from effideploy.models.build import build_config, load_model
from effideploy.models.resolve import ModelSource, resolve_model
from effideploy.models.weights import SafetensorsWeights
from effideploy.recovery.config import DEFAULT_MEAN_RANK, RecoveryConfig, RecoveryWarning
from effideploy.recovery.ranks import block_ranks, budget_for_mean_rank, rank_cost

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
class TrainLog:
    loss: list[float] = field(default_factory=list)  # the training objective, one value per optimizer step
    cross_entropy: list[float] = field(default_factory=list)
    steps: int = 0  # optimizer updates contained in the adapters kept
    seconds: float = 0.0
    stopped: str | None = None  # why training stopped early


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
    for layer in model.model.layers:
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


# ---------------------------------------------------------------- training


def _autocast(config: RecoveryConfig):
    if config.compute_dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_loss(model, batch: torch.Tensor, teacher, config: RecoveryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective and the plain next-token cross-entropy (for the record) on one micro-batch."""
    with _autocast(config):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    if teacher is None:
        return cross_entropy, cross_entropy.detach()
    with torch.no_grad(), _autocast(config):
        target = teacher(input_ids=batch, use_cache=False).logits[:, :-1].float()
    t = config.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.flatten(0, 1) / t, -1), F.log_softmax(target.flatten(0, 1) / t, -1),
                  log_target=True, reduction="batchmean") * (t * t)
    weight = config.distill_weight
    return (1.0 - weight) * cross_entropy + weight * kl, cross_entropy.detach()


def lr_factor(step: int, config: RecoveryConfig) -> float:
    warmup = int(config.warmup * config.steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress_ = (step - warmup) / max(1, config.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress_))


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def train_lora(peft_model, windows: torch.Tensor, config: RecoveryConfig, teacher=None) -> TrainLog:
    """AdamW on the adapters over ``windows`` ([steps * grad_accum * batch, seqlen] token ids).

    A non-finite loss or gradient stops training with the adapters that produced the last finite loss
    (``log.steps`` counts the updates they contain; the update computed from that loss is discarded).
    """
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    last_good = [p.detach().clone() for p in params]
    batches = windows.view(-1, config.grad_accum, config.batch_size, windows.shape[-1])
    if config.gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    log = TrainLog()
    start = time.perf_counter()
    with progress.Bar("Recovery fine-tuning", total=len(batches)) as bar:
        for step, micro_batches in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            loss_sum = ce_sum = 0.0
            for batch in micro_batches:
                loss, cross_entropy = training_loss(peft_model, batch, teacher, config)
                if not torch.isfinite(loss):
                    log.stopped = f"non-finite loss at step {step + 1}"
                    break
                (loss / config.grad_accum).backward()
                loss_sum += loss.item() / config.grad_accum
                ce_sum += cross_entropy.item() / config.grad_accum
            if log.stopped is not None:
                # These adapters gave the bad loss: go back to the ones the previous step measured.
                _copy(params, last_good)
                log.steps = max(0, step - 1)
                break
            _copy(last_good, params)
            log.loss.append(loss_sum)
            log.cross_entropy.append(ce_sum)
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
            if not torch.isfinite(norm):
                log.stopped = f"non-finite gradient at step {step + 1}"
                break
            optimizer.step()
            schedule.step()
            log.steps = step + 1
            bar.advance(status=f"loss {loss_sum:.3f}")
    log.seconds = time.perf_counter() - start
    peft_model.eval()
    return log


# ---------------------------------------------------------------- checkpoint


def load_checkpoint_tokenizer(source: ModelSource):
    """The checkpoint's tokenizer. Passing the config keeps AutoTokenizer from resolving the checkpoint's
    ``auto_map`` itself, which asks on the terminal whether to run its remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, config=build_config(source.config_dict),
                                             trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is the user's checkpoint
        raise EffideployError(f"cannot load a tokenizer from {source.path}: {str(exc).splitlines()[0]}") from None


def training_windows(source: ModelSource, text: TextSpec, config: RecoveryConfig) -> torch.Tensor:
    from effideploy.models.resolve import check_seqlen

    check_seqlen(source.config_dict, config.seqlen, "--seqlen")
    with progress.status(f"Tokenizing {Path(text.path).name}"):
        ids = tokenize_text(load_checkpoint_tokenizer(source), load_text(text))
    if ids.numel() < config.seqlen + 1:
        raise EffideployError(f"training text has {ids.numel()} tokens, fewer than one window of --seqlen "
                              f"{config.seqlen} (+1); give more text or a smaller --seqlen")
    # The same sampler as calibration; with one seed, a longer run starts with the windows of a shorter one.
    return sample_windows(ids, config.windows, config.seqlen, config.seed)


def load_teacher(source: ModelSource, student: nn.Module) -> nn.Module:
    teacher = load_model(source)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise EffideployError(f"teacher {source.spec!r} has a vocabulary of {teacher.config.vocab_size} tokens, the "
                              f"model {student.config.vocab_size}; distillation needs the same tokenizer")
    return teacher.requires_grad_(False)


def write_weights(model: nn.Module, source: ModelSource, folder: Path) -> None:
    """The merged weights under the source's tensor names and dtype, one shard for the outer tensors and one per
    block (the layout ``prune`` writes)."""
    weights = SafetensorsWeights(source.path)
    names, dtype = weights.names(), weights.dtype()
    state = model.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise RuntimeError(f"the recovered model lacks tensors of the source checkpoint: {missing[:3]}")
    n_blocks = len(model.model.layers)
    groups = [[name for name in names if not name.startswith("model.layers.")]]
    groups += [[name for name in names if name.startswith(f"model.layers.{i}.")] for i in range(n_blocks)]
    writer = ShardWriter(folder, n_shards=len(groups))
    for group in groups:
        # clone: tied tensors share storage, which safetensors refuses within one file
        writer.add({name: state[name].detach().to(dtype).clone() for name in group})
    writer.finish()


def copy_model_files(source: ModelSource, folder: Path) -> None:
    copy_json_without_foreign_code(source.path / "config.json", folder / "config.json")
    if source.is_pruned_checkpoint:
        copy_remote_code(folder)  # effideploy's own code, never the input's (which could be anything)
    copy_tokenizer(source.path, folder)


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
                  "source": {"model": source.spec, "path": str(source.path), "origin": source.origin,
                             "model_type": source.model_type}}
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
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    teacher_source = None if config.teacher is None else resolve_model(config.teacher)
    inputs = (source.path,) if teacher_source is None else (source.path, teacher_source.path)
    target = check_output_dir(output, overwrite=overwrite, inputs=inputs)
    text = resolve_text(config.data, "calibration", config.data_dir)
    windows = training_windows(source, text, config)
    with progress.status(f"Loading {source.spec}"):
        model = load_model(source)
    teacher = None
    if teacher_source is not None:
        with progress.status(f"Loading the teacher {teacher_source.spec}"):
            teacher = load_teacher(teacher_source, model)
    plan = plan_ranks(model, source.provenance(), config)
    peft_model = attach_lora(model, plan.ranks, config)
    log = train_lora(peft_model, windows, config, teacher)
    if log.stopped:
        _notice(f"{log.stopped}: training stopped; kept the adapters after {log.steps} updates, the last that "
                "gave a finite loss")
    del teacher
    merged = merge_lora(peft_model)
    recovery = recovery_record(plan, log, config, text, teacher_source)
    with atomic_output_dir(target, overwrite=overwrite) as staging:
        with progress.status(f"Writing {target.name}"):
            write_weights(merged, source, staging)
            copy_model_files(source, staging)
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
