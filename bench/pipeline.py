"""``effideploy run``: prune at several sparsities from one calibration pass, export when the runtime needs it,
bench every checkpoint against the dense model and write the report.

Layout under ``output``: ``<method>-<sparsity>/`` (checkpoints), ``exports/`` (onnx/vllm artifacts, dense
included) and ``report/``. A checkpoint that already exists with the same source and pruning options is reused,
so a second run only re-measures (and replaces ``report/``); ``overwrite`` prunes again.
"""

from __future__ import annotations

import time
from pathlib import Path

from effideploy import progress
from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.runner import run_bench
from effideploy.errors import EffideployError


def checkpoint_folder(output: Path, method: str, sparsity: float) -> Path:
    return output / f"{method}-{sparsity:g}"


def _reusable(folder: Path, source, config) -> bool:
    from effideploy.checkpoint.writer import read_provenance

    from effideploy.pruning.engine import pruning_code_fingerprint

    record = read_provenance(folder)
    return (bool(record) and record.get("config") == config.to_dict() and record["source"]["path"] == str(source.path)
            and record.get("code") == pruning_code_fingerprint())  # pruned by this very code


def run_pipeline(*, model: str = "llama", sparsities: tuple[float, ...] = (0.2, 0.5), method: str = "cfsp",
                 runtime: str = "torch", output: str | Path = "out/run", prune_options: dict | None = None,
                 bench_options: dict | None = None, token_compression: tuple[str, ...] = (),
                 quantize: tuple[str, ...] = (), overwrite: bool = False) -> tuple[dict, Path]:
    """Returns the BenchReport and the report folder to write it to (the caller applies the policy and writes)."""
    from effideploy.checkpoint.writer import read_provenance
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, calibrate_source, prune_checkpoint
    from effideploy.pruning.engine import make_method
    from effideploy.runtimes import RUNTIMES

    started = time.perf_counter()
    RUNTIMES.target(runtime)
    if not sparsities:
        raise EffideployError("give at least one --sparsities value")
    output = Path(output).expanduser()
    prune_options = dict(prune_options or {})
    data_dir = (bench_options or {}).get("data_dir")
    configs = {s: PruneConfig(method=method, sparsity=s, **prune_options) for s in sparsities}  # validates each
    make_method(next(iter(configs.values())))  # an unknown method fails now
    source = resolve_model(model)
    text = resolve_text("wikitext2", "calibration", data_dir)
    report = output / "report"  # replaced by every run (atomically); the checkpoints are what is reused
    todo = []
    for sparsity, config in configs.items():
        folder = checkpoint_folder(output, method, sparsity)
        if folder.exists() and not overwrite:
            if not _reusable(folder, source, config):
                raise EffideployError(f"{folder} exists with other pruning options or from other pruning code; "
                                      "pass --overwrite to prune again")
            progress.console.print(f"reusing {folder} (same source and options)", highlight=False)
            continue
        todo.append((sparsity, config, folder))

    seconds = {}
    if todo:
        stats = None
        if make_method(todo[0][1]).needs_calibration:
            tick = time.perf_counter()
            stats = calibrate_source(source, todo[0][1], text)  # one pass shared by every sparsity
            seconds["calibration"] = time.perf_counter() - tick
        for sparsity, config, folder in todo:
            tick = time.perf_counter()
            prune_checkpoint(source, config, folder, calibration=text, overwrite=overwrite, stats=stats)
            seconds[f"prune {sparsity:g}"] = time.perf_counter() - tick
    candidates = [CandidateSpec(model=str(checkpoint_folder(output, method, s))) for s in sparsities]
    candidates += [CandidateSpec(compression=spec) for spec in token_compression]
    bench_config = BenchConfig(runtime=runtime, dense=model, candidates=tuple(candidates), quantize=tuple(quantize),
                               export_root=str(output / "exports"), **(bench_options or {}))
    tick = time.perf_counter()
    report_data = run_bench(bench_config)
    exported = sum(m.export.seconds for m in report_data.models if m.export is not None)
    if any(m.export is not None for m in report_data.models):  # exports made (or reused): reported apart
        seconds["export"] = exported
    seconds["bench"] = time.perf_counter() - tick - exported
    report_data.pipeline = {
        "model": model, "method": method, "sparsities": list(sparsities), "prune_options": prune_options,
        "checkpoints": {f"{s:g}": str(checkpoint_folder(output, method, s)) for s in sparsities},
        "provenance": {f"{s:g}": (read_provenance(checkpoint_folder(output, method, s)) or {}).get("sparsity")
                       for s in sparsities},
        "reused": [f"{s:g}" for s in sparsities if s not in {t[0] for t in todo}],
        "seconds": seconds,
        "total_seconds": time.perf_counter() - started,
    }
    return report_data, report
