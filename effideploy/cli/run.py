"""``effideploy run``: the whole pipeline on one command (prune at several sparsities from one calibration pass,
export when the runtime needs it, bench against the dense model, report, optional policy gate)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from effideploy.bench.config import QUICK_BENCH, QUICK_PRUNE, RUN_BENCH, BenchConfig
from effideploy.cli.app import app, check_option_text, default_of, echo, set_threads
from effideploy.errors import EffideployError
from effideploy.pruning.config import PruneConfig
from effideploy.runtimes import RUNTIMES


def parse_sparsities(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise EffideployError(f"--sparsities must be comma-separated numbers, got {text!r}") from None


@app.command("run")
def run(
    model: str = typer.Option(default_of(BenchConfig, "dense"), help="Dense model (default: the embedded SmolLM2-135M)."),
    sparsities: str = typer.Option("0.2,0.5", help="FFN sparsities to prune at (comma-separated)."),
    method: str = typer.Option(default_of(PruneConfig, "method"), help="Pruning method (as for prune --method)."),
    runtime: str = typer.Option(default_of(BenchConfig, "runtime"), help=" | ".join(RUNTIMES.names())),
    output: Path = typer.Option(Path("out/run"), help="Folder for the checkpoints, exports and report/."),
    policy: Optional[Path] = typer.Option(None, help="Policy TOML file, or default (the packaged policy): exit 1 when it fails."),
    quick: bool = typer.Option(False, help=f"A smoke run: {QUICK_PRUNE['calib_samples']}x{QUICK_PRUNE['calib_seqlen']} calibration, {QUICK_BENCH['ppl_windows']} perplexity windows, {QUICK_BENCH['mc_limit']} examples per task, fewer repeats."),
    calib_samples: Optional[int] = typer.Option(None, help=f"Calibration windows (default {default_of(PruneConfig, 'calib_samples')}; --quick {QUICK_PRUNE['calib_samples']})."),
    calib_seqlen: Optional[int] = typer.Option(None, help=f"Tokens per calibration window (default {default_of(PruneConfig, 'calib_seqlen')}; --quick {QUICK_PRUNE['calib_seqlen']})."),
    quantize: Optional[List[str]] = typer.Option(None, "--quantize", help="Also bench the dense model and every pruned checkpoint exported with these weight schemes (as for bench --quantize; repeatable)."),
    token_compression: Optional[List[str]] = typer.Option(None, "--token-compression", help="Also bench dense + this compression (repeatable)."),
    repeats: Optional[int] = typer.Option(None, help=f"Timed latency repeats (default {default_of(BenchConfig, 'repeats')}; --quick {QUICK_BENCH['repeats']})."),
    ppl_windows: Optional[int] = typer.Option(None, help=f"Perplexity windows of {default_of(BenchConfig, 'ppl_seqlen')} tokens (default {default_of(BenchConfig, 'ppl_windows')}; --quick {QUICK_BENCH['ppl_windows']}; 40 for the reference figure)."),
    mc_limit: Optional[int] = typer.Option(None, help=f"Multiple-choice examples per task (default {RUN_BENCH['mc_limit']}; --quick {QUICK_BENCH['mc_limit']}; 0 skips)."),
    memory: bool = typer.Option(default_of(BenchConfig, "memory"), "--memory/--no-memory", help="Measure peak memory (one extra process per model)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option(default_of(PruneConfig, "device"), help="auto | cpu | cuda | cuda:N: calibration and the runtime (auto: CUDA when available)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/ and bigbench/."),
    overwrite: bool = typer.Option(False, help="Prune again (checkpoints with the same source and options are otherwise reused)."),
) -> None:
    """Prune -> export -> bench -> report, with defaults that finish on a laptop CPU."""
    from effideploy.bench.pipeline import run_pipeline
    from effideploy.bench.policy import load_policy
    from effideploy.cli.bench import finish

    for spec in token_compression or []:
        check_option_text(spec, "--token-compression")
    loaded_policy = load_policy(policy) if policy is not None else None
    from effideploy.io import check_output_dir

    # report/ is replaced by every run: it must never hold or sit above an input, nor be a folder of the user's.
    inputs = [p for p in (model, policy, data_dir) if p is not None and Path(str(p)).expanduser().exists()]
    check_output_dir(output / "report", overwrite=True, inputs=inputs)
    set_threads(threads)
    prune_options = dict(QUICK_PRUNE) if quick else {}
    for key, value in {"calib_samples": calib_samples, "calib_seqlen": calib_seqlen,
                       "device": None if device == "auto" else device}.items():
        if value is not None:
            prune_options[key] = value
    bench_options = dict(QUICK_BENCH if quick else RUN_BENCH)
    for key, value in {"repeats": repeats, "ppl_windows": ppl_windows, "mc_limit": mc_limit}.items():
        if value is not None:
            bench_options[key] = value
    bench_options.update(memory=memory, threads=threads, device=None if device == "auto" else device, data_dir=str(data_dir) if data_dir else None)
    result, report = run_pipeline(model=model, sparsities=parse_sparsities(sparsities), method=method, runtime=runtime,
                                   output=output, prune_options=prune_options, bench_options=bench_options,
                                   token_compression=tuple(token_compression or ()),
                                   quantize=tuple(quantize or ()), overwrite=overwrite)
    run_seconds = result.pipeline
    echo("pipeline: " + ", ".join(f"{k} {v:.0f} s" for k, v in run_seconds["seconds"].items())
         + f" (total {run_seconds['total_seconds']:.0f} s)")
    finish(result, report, policy, loaded_policy, overwrite=True)  # each run replaces its report
