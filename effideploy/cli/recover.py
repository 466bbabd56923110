"""``effideploy recover``: LoRA recovery fine-tuning of a pruned checkpoint, merged into a new checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer

from effideploy.cli.app import DEFAULT_PRUNED, app, check_output_against_inputs, default_of, echo, set_threads
from effideploy.recovery.config import RecoveryConfig


def report_recovery(result) -> None:
    """The summary line(s) both ``recover`` and ``prune --recover`` print."""
    record, log = result.record, result.log
    ranks = result.plan.ranks
    echo(f"[bold green]recovered[/] -> {result.output}")
    echo(f"  LoRA {record['rule']} ranks {min(ranks)}..{max(ranks)} on {', '.join(record['targets'])}: "
         f"{record['budget']['trainable_parameters']:,} trainable parameters (budget {record['budget']['parameters']:,})")
    if log.loss:
        echo(f"  {log.steps} steps, {record['training']['tokens']:,} tokens, {log.seconds:.1f} s; "
             f"loss {log.loss[0]:.3f} -> {log.loss[-1]:.3f}")
    if log.stopped:
        echo(f"  [yellow]stopped early[/]: {log.stopped}; the adapters from the last finite loss were merged")


def run_with_warnings(function, *args, **kwargs):
    """Call ``function``, printing its recovery warnings as ``warning: ...`` lines instead of Python's format."""
    from effideploy.recovery.config import RecoveryWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecoveryWarning)
        try:
            return function(*args, **kwargs)
        finally:
            for item in caught:
                if issubclass(item.category, RecoveryWarning):
                    echo(f"[yellow]warning[/]: {item.message}")


@app.command()
def recover(
    checkpoint: str = typer.Argument(DEFAULT_PRUNED, help="Pruned checkpoint folder (or any supported model)."),
    output: Path = typer.Option(..., help="Output checkpoint folder (never the input)."),
    budget: Optional[int] = typer.Option(None, help="Trainable LoRA parameters in all (default: --mean-rank 8)."),
    mean_rank: Optional[float] = typer.Option(None, help="Budget as the mean rank uniform LoRA would get."),
    uniform: bool = typer.Option(default_of(RecoveryConfig, "uniform"), help="The same rank in every block instead of importance-guided ranks."),
    steps: int = typer.Option(default_of(RecoveryConfig, "steps"), help="Optimizer steps."),
    lr: float = typer.Option(default_of(RecoveryConfig, "lr"), help="Peak learning rate (linear warmup, cosine decay)."),
    batch_size: int = typer.Option(default_of(RecoveryConfig, "batch_size"), help="Windows per micro-batch."),
    seqlen: int = typer.Option(default_of(RecoveryConfig, "seqlen"), help="Tokens per window."),
    grad_accum: int = typer.Option(default_of(RecoveryConfig, "grad_accum"), help="Micro-batches per optimizer step."),
    data: str = typer.Option(default_of(RecoveryConfig, "data"), help="'wikitext2' (validation split) or a local .txt/.jsonl file."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/ (else $EFFIDEPLOY_DATA_DIR)."),
    teacher: Optional[str] = typer.Option(None, help="Distil from this model (e.g. 'llama', the dense model)."),
    distill_weight: float = typer.Option(default_of(RecoveryConfig, "distill_weight"), help="Weight of the KL term against cross-entropy, in [0, 1]."),
    dtype: str = typer.Option(default_of(RecoveryConfig, "compute_dtype"), help="auto | float32 | bfloat16 (autocast for forward/backward; auto: bfloat16 on CUDA, float32 on the CPU)."),
    device: str = typer.Option(default_of(RecoveryConfig, "device"), help="auto | cpu | cuda | cuda:N: where the model trains (auto: CUDA when available)."),
    gradient_checkpointing: bool = typer.Option(default_of(RecoveryConfig, "gradient_checkpointing"), help="Recompute activations in backward to save memory."),
    seed: int = typer.Option(default_of(RecoveryConfig, "seed"), help="Seed of the window sampling and LoRA initialisation."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
) -> None:
    """Recover accuracy with LoRA whose per-block rank follows the block importance, merged into the weights."""
    from effideploy.recovery import RecoveryConfig, recover_checkpoint

    set_threads(threads)
    config = RecoveryConfig(budget=budget, mean_rank=mean_rank, uniform=uniform, steps=steps, lr=lr,
                            batch_size=batch_size, seqlen=seqlen, grad_accum=grad_accum, data=data,
                            data_dir=str(data_dir) if data_dir else None, teacher=teacher,
                            distill_weight=distill_weight, compute_dtype=dtype, device=device,
                            gradient_checkpointing=gradient_checkpointing, seed=seed)
    check_output_against_inputs(output, overwrite, checkpoint, data, data_dir, teacher)
    report_recovery(run_with_warnings(recover_checkpoint, checkpoint, output, config, overwrite=overwrite))
