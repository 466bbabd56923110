"""``effideploy prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from effideploy.cli.app import DEFAULT_PRUNED, app, check_output_against_inputs, default_of, echo, set_threads
from effideploy.errors import EffideployError
from effideploy.pruning.config import PruneConfig
from effideploy.pruning.methods import METHODS
from effideploy.recovery.config import RecoveryConfig


@app.command()
def prune(
    model: str = typer.Option("llama", help="Hub id, local HF folder, .gguf file, or 'llama' (embedded SmolLM2-135M)."),
    sparsity: float = typer.Option(default_of(PruneConfig, "sparsity"), help="Mean fraction of FFN channels removed, in (0, 1)."),
    method: str = typer.Option(default_of(PruneConfig, "method"), help=" | ".join(METHODS.names())),
    output: Path = typer.Option(Path(DEFAULT_PRUNED), help="Output checkpoint folder."),
    count: Optional[int] = typer.Option(None, help="drop-blocks / drop-attention: how many blocks / attention sublayers to remove."),
    target_params: Optional[float] = typer.Option(
        None, help="drop-blocks / drop-attention / cfsp-joint: fraction of all parameters to remove (instead of --sparsity)."),
    target_speedup: Optional[float] = typer.Option(
        None, help="drop-blocks / drop-attention / cfsp-joint: ideal decode speedup (matmul weights read per token) to reach."),
    calib: str = typer.Option("wikitext2", help="'wikitext2' or a local .txt/.jsonl file."),
    calib_samples: int = typer.Option(default_of(PruneConfig, "calib_samples"), help="Calibration windows."),
    calib_seqlen: int = typer.Option(default_of(PruneConfig, "calib_seqlen"), help="Tokens per calibration window."),
    seed: int = typer.Option(default_of(PruneConfig, "seed"), help="Seed of the calibration window sampling."),
    align: int = typer.Option(default_of(PruneConfig, "align"), help="Round every block's kept width to a multiple of this."),
    runtime: Optional[str] = typer.Option(None, help="Align the kept widths to what this runtime's kernels need for "
                                          "--quantize (onnx: its block; llamacpp: 32 for q8_0, 256 for k-quants; vllm "
                                          "w4a16: 64), combined with --align."),
    quantize: Optional[str] = typer.Option(None, help="With --runtime: the weight scheme the checkpoint will be "
                                           "exported with (int8 / int4 or the runtime's own name, e.g. q4_k_m)."),
    a: float = typer.Option(default_of(PruneConfig, "a"), help="CFSP: temperature of the per-block budget."),
    b: float = typer.Option(default_of(PruneConfig, "b"), help="CFSP: activation exponent inside the weight term."),
    c: float = typer.Option(default_of(PruneConfig, "c"), help="CFSP: activation exponent outside the weight terms."),
    compensation: Optional[str] = typer.Option(
        None, help="none | bias | lstsq (default: the method's own: cfsp lstsq, flap bias, others none)."),
    damp: float = typer.Option(default_of(PruneConfig, "damp"), help="lstsq: ridge term relative to the mean activation second moment."),
    gram_stride: int = typer.Option(default_of(PruneConfig, "gram_stride"), help="lstsq: second moments from every k-th calibration token (k-fold cheaper)."),
    batch_size: int = typer.Option(default_of(PruneConfig, "batch_size"), help="Calibration windows per forward."),
    calib_dtype: str = typer.Option(default_of(PruneConfig, "calib_dtype"), help="auto | float32 | bfloat16 (autocast; auto: bfloat16 on CUDA, float32 on the CPU)."),
    device: str = typer.Option(default_of(PruneConfig, "device"), help="auto | cpu | cuda | cuda:N (auto: CUDA when available)."),
    max_memory: Optional[float] = typer.Option(default_of(PruneConfig, "max_memory_gb"), help="GB of host memory calibration may use (default: MemAvailable); a memory plan over it is refused before any work."),
    keep_stats: bool = typer.Option(default_of(PruneConfig, "keep_stats"), help="Keep every Linear's input second moments from the calibration pass in the checkpoint, for `export --quantize ... --quant-method gptq` without a second pass."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/ (else $EFFIDEPLOY_DATA_DIR)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, help="Allow pickled (.bin) weights, which can run code when loaded."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    recover: bool = typer.Option(False, help="Then LoRA recovery fine-tuning (see `effideploy recover`); only the "
                                 "recovered checkpoint is written.", rich_help_panel="Recovery"),
    recover_steps: int = typer.Option(default_of(RecoveryConfig, "steps"), help="Recovery: optimizer steps.", rich_help_panel="Recovery"),
    recover_mean_rank: Optional[float] = typer.Option(
        None, help="Recovery: LoRA budget as the mean rank uniform LoRA would get (default 8).",
        rich_help_panel="Recovery"),
    recover_uniform: bool = typer.Option(False, help="Recovery: the same rank in every block instead of "
                                         "importance-guided ranks.", rich_help_panel="Recovery"),
    recover_teacher: Optional[str] = typer.Option(
        None, help="Recovery: distil from this model (e.g. the --model value, the dense model).",
        rich_help_panel="Recovery"),
    recover_data: Optional[str] = typer.Option(None, help="Recovery: training text (default: the --calib source).",
                                               rich_help_panel="Recovery"),
    recover_lr: float = typer.Option(default_of(RecoveryConfig, "lr"), help="Recovery: peak learning rate.", rich_help_panel="Recovery"),
    recover_batch_size: int = typer.Option(default_of(RecoveryConfig, "batch_size"), help="Recovery: windows per step.", rich_help_panel="Recovery"),
    recover_seqlen: int = typer.Option(default_of(RecoveryConfig, "seqlen"), help="Recovery: tokens per window.", rich_help_panel="Recovery"),
) -> None:
    """Prune FFN channels and write a physically smaller checkpoint (with --recover: recovered by LoRA first)."""
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import prune_checkpoint

    set_threads(threads)
    check_size_options(method, count=count, target_params=target_params, target_speedup=target_speedup)
    align = runtime_align(align, runtime, quantize)
    config = PruneConfig(method=method, sparsity=sparsity, align=align, a=a, b=b, c=c, compensation=compensation, damp=damp,
                         gram_stride=gram_stride,
                         calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed, batch_size=batch_size,
                         calib_dtype=calib_dtype, keep_stats=keep_stats, count=count, target_params=target_params,
                         target_speedup=target_speedup, device=device, max_memory_gb=max_memory)
    if recover and getattr(METHODS.get(method), "structural", False):
        from effideploy.errors import OptionError

        raise OptionError("recover", f"is not supported yet with {method} (LoRA recovery of checkpoints with removed "
                                     "blocks or attention)")
    recovery = None
    if recover:  # validated before any work starts
        from effideploy.recovery import RecoveryConfig

        recovery = RecoveryConfig(mean_rank=recover_mean_rank, uniform=recover_uniform, steps=recover_steps,
                                  lr=recover_lr, batch_size=recover_batch_size, seqlen=recover_seqlen,
                                  data=recover_data or calib, data_dir=str(data_dir) if data_dir else None,
                                  teacher=recover_teacher, seed=seed, device=device)
    check_output_against_inputs(output, overwrite, model, calib, data_dir, recover_data, recover_teacher)
    # the text first: naming it is cheap, while resolving a .gguf or pickled model converts it
    text = resolve_text(calib, "calibration", str(data_dir) if data_dir else None)
    source = resolve_model(model, allow_pickle=allow_pickle)
    if recovery is None:
        target, plan = prune_checkpoint(source, config, output, calibration=text, overwrite=overwrite)
    else:
        # Pruned into a temporary folder beside the output, recovered into the output: an interrupted run
        # leaves neither a half-written output nor a pruned-only one.
        from effideploy.cli.recover import run_with_warnings
        from effideploy.recovery import prune_and_recover

        plan, recovered = run_with_warnings(prune_and_recover, source, config, output, recovery, calibration=text,
                                            overwrite=overwrite)
        target = recovered.output
    from effideploy.checkpoint.writer import read_provenance

    record = read_provenance(target)
    widths = [block.width for block in plan.kept_blocks]
    echo(f"[bold green]pruned[/] {source.spec} with {method} -> {target}")
    echo(f"  FFN sparsity {record['sparsity']['ffn_actual']:.3f} (asked {sparsity}), parameters removed "
          f"{record['sparsity']['parameters_removed']:.3f}; widths {min(widths)}..{max(widths)} "
          f"(full {max(plan.full_widths)}); {record['seconds']['total']:.1f} s")
    if plan.removes_sublayers:
        echo(f"  removed blocks {plan.dropped_blocks or 'none'}, no-op attention {plan.no_op_attention or 'none'} "
             "(original block indices; see effideploy.json 'structure')")
    if recovery is not None:
        from effideploy.cli.recover import report_recovery

        report_recovery(recovered)


SIZE_FLAGS = {"count": "--count", "target_params": "--target-params", "target_speedup": "--target-speedup"}


def size_options(method: str) -> tuple[str, ...]:
    """The size options ``method`` reads: the ranked removals (drop-blocks and its subclass drop-attention) a count
    or a size target, the other structural method (cfsp-joint) a size target, the width methods none (they remove
    FFN channels by --sparsity)."""
    from effideploy.pruning.methods.drop_blocks import DropBlocks

    cls = METHODS.get(method)  # an unknown method fails here, naming the known ones
    if not getattr(cls, "structural", False):
        return ()
    return tuple(SIZE_FLAGS) if issubclass(cls, DropBlocks) else ("target_params", "target_speedup")


def check_size_options(method: str, **given) -> None:
    """Before any work: a size option the method would ignore (``--method cfsp --count 1`` pruned by --sparsity),
    several at once, or none where the method needs one, each refused in one line naming the real flags."""
    accepted = size_options(method)
    named = [name for name, value in given.items() if value is not None]
    for name in named:
        if name not in accepted:
            users = [other for other in METHODS.names() if name in size_options(other)]
            raise EffideployError(f"{SIZE_FLAGS[name]} does not apply to --method {method}"
                                  + (" (it prunes FFN channels by --sparsity)" if not accepted else "")
                                  + f"; {SIZE_FLAGS[name]} is for {', '.join(users)}")
    flags = ", ".join(SIZE_FLAGS[name] for name in accepted[:-1]) + f" or {SIZE_FLAGS[accepted[-1]]}" \
        if accepted else ""
    if len(named) > 1:
        raise EffideployError(f"{' and '.join(SIZE_FLAGS[name] for name in named)} were given together; {method} "
                              f"takes one of {flags}")
    if accepted and not named:
        need = "how much to remove" if "count" in accepted else "a size target"
        raise EffideployError(f"{method} needs {need}: give {flags}")


def runtime_align(align: int, runtime: str | None, quantize: str | None) -> int:
    """``--align`` combined with what ``--runtime``'s scheme ``--quantize`` stores without a fallback (its
    ``ffn_multiple``): kernels want whole blocks, and a width that is not leaves llama.cpp's down projections in F16."""
    import math

    from effideploy.errors import OptionError

    if runtime is None:
        if quantize is not None:
            raise OptionError("quantize", "needs --runtime: the width a scheme needs depends on the runtime's kernels")
        return align
    from effideploy.quantization.schemes import declaration

    scheme = declaration(runtime).resolve(quantize)
    if isinstance(align, int) and align >= 1:
        return math.lcm(align, scheme.ffn_multiple)
    return align  # PruneConfig refuses it with its own message
