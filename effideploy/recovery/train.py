"""The recovery training loop: AdamW on the LoRA adapters over windows of text, optionally distilling from a dense
teacher, with a guard that keeps the last adapters that gave a finite loss."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effideploy import progress
from effideploy.data.text import TextSpec, load_text, sample_windows, tokenize_text
from effideploy.errors import EffideployError
from effideploy.models.build import load_model, load_tokenizer
from effideploy.models.resolve import ModelSource
from effideploy.recovery.config import RecoveryConfig


@dataclass
class TrainLog:
    loss: list[float] = field(default_factory=list)  # the training objective, one value per optimizer step
    cross_entropy: list[float] = field(default_factory=list)
    steps: int = 0  # optimizer updates contained in the adapters kept
    seconds: float = 0.0
    stopped: str | None = None  # why training stopped early


def _autocast(config: RecoveryConfig, device_type: str = "cpu"):
    if config.compute_dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_loss(model, batch: torch.Tensor, teacher, config: RecoveryConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective and the plain next-token cross-entropy (for the record) on one micro-batch."""
    with _autocast(config, batch.device.type):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    if teacher is None:
        return cross_entropy, cross_entropy.detach()
    with torch.no_grad(), _autocast(config, batch.device.type):
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
    windows = windows.to(params[0].device)  # token ids: small; the model already sits on its device
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


# ---------------------------------------------------------------- inputs


def training_windows(source: ModelSource, text: TextSpec, config: RecoveryConfig) -> torch.Tensor:
    from effideploy.models.resolve import check_seqlen

    check_seqlen(source.config_dict, config.seqlen, "--seqlen")
    with progress.status(f"Tokenizing {Path(text.path).name}"):
        ids = tokenize_text(load_tokenizer(source), load_text(text))
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
