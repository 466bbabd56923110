"""``effideploy bench --serve``: dense and candidates each behind the runtime's own server, under a swept load.

For each model in turn (never two servers at once: they would share the cores and the numbers would measure the
contention): start its server on loopback (bench/serve_servers.py), drive it with GuideLLM through every load level
of the policy's ``[serve]`` table (bench/serve_load.py), record, stop it. With ``endpoints`` the servers are the
user's (any OpenAI-compatible URL: a vLLM deployment on a cluster, say) and nothing is started. Then the SLO
analysis: which load levels meet the SLO, the highest one, goodput at the target load, candidate against dense,
and the sign-off checks (bench/serve_policy.py says what each objective means). With ``[serve] repeats`` every
model is swept that many times, the order reversed each round, and the sweeps combined per level (:func:`combine`):
each sweep's goodput stays beside the combined figure, so a ratio to dense comes with its spread.
"""

from __future__ import annotations

import datetime
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from effideploy import progress
from effideploy.bench.serve_load import LATENCIES, P99_OF, run_load
from effideploy.bench.serve_policy import ServeSLO
from effideploy.errors import EffideployError

DEFAULT_MAX_MODEL_LEN = 2048


@dataclass
class ServedModel:
    label: str
    kind: str  # "dense" | "candidate"
    spec: str  # what the user named: a checkpoint, an export or a URL
    export: str | None = None  # the export the bench served (None for an endpoint)
    url: str | None = None
    served_model: str | None = None
    levels: list[dict] = field(default_factory=list)  # per load level; with repeats, the sweeps combined
    seconds: float = 0.0
    sweeps: list[list[dict]] = field(default_factory=list)  # each sweep's own levels (only with repeats > 1)


def tokenizer_folder(spec: str) -> str:
    """A local folder with the model's tokenizer for the load's prompts: the checkpoint, or an export's
    source checkpoint (a GGUF export keeps no tokenizer files)."""
    from effideploy.exporters.manifest import read_export_manifest
    from effideploy.models.resolve import resolve_model

    path = Path(spec).expanduser()
    manifest = read_export_manifest(path) if path.is_dir() else None
    if manifest is not None:
        if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
            return str(path)
        return str(Path(manifest["source"]["path"]))
    return str(resolve_model(spec).path)


def meets(level: dict, slo: ServeSLO) -> tuple[bool, list[str]]:
    """Whether one load level meets the SLO, and the objectives it misses (the binding ones)."""
    missed = []
    for name, limit in slo.objectives().items():
        value = level[P99_OF[name]]["p99"]
        if value is None or value > limit:
            missed.append(name)
    total = level["requests"]["successful"] + level["requests"]["failed"]
    if total == 0 or level["requests"]["failed"] / total > slo.max_failed_rate:
        missed.append("max_failed_rate")
    return not missed, missed


def _median(values: list):
    return None if not values or any(v is None for v in values) else statistics.median(values)


def combine(sweeps: list[list[dict]]) -> list[dict]:
    """One record per load level from several sweeps of it. Latency percentiles: the median over the sweeps (one
    sweep's p99 is its slowest request's; the median keeps one straggling sweep from deciding, and a sweep without a
    successful request leaves the figure undefined); throughputs and goodput: the mean; request counts: the sum.
    ``sweeps`` on each record keeps every sweep's goodput, throughput and p99s, the spread the report shows."""
    if len(sweeps) == 1:
        return sweeps[0]
    combined = []
    for records in zip(*sweeps, strict=True):
        first = records[0]
        level = {"load": first["load"], "kind": first["kind"],
                 "requests": {key: sum(r["requests"][key] for r in records) for key in first["requests"]},
                 "duration_s": sum(r.get("duration_s") or 0.0 for r in records)}
        for key in ("requests_per_second", "output_tokens_per_second", "goodput"):
            values = [r[key] for r in records if r[key] is not None]
            level[key] = statistics.fmean(values) if values else None
        for name in LATENCIES:
            level[name] = {stat: _median([r[name][stat] for r in records]) for stat in first[name]}
        level["sweeps"] = [{"goodput": r["goodput"], "requests_per_second": r["requests_per_second"],
                            **{f"{name}_p99": r[name]["p99"] for name in LATENCIES}} for r in records]
        combined.append(level)
    return combined


def told_apart(a: list, b: list) -> bool | None:
    """Whether two models' per-sweep figures do not overlap (None: fewer than two sweeps each, nothing to tell)."""
    a, b = [v or 0.0 for v in a], [v or 0.0 for v in b]
    if len(a) < 2 or len(b) < 2:
        return None
    return min(a) > max(b) or max(a) < min(b)


def analyse(model: ServedModel, slo: ServeSLO) -> dict:
    for level in model.levels:
        level["meets_slo"], level["missed"] = meets(level, slo)
    passing = [level["load"] for level in model.levels if level["meets_slo"]]
    target = next((level for level in model.levels if level["load"] == slo.target_level), None)
    return {"max_load_meeting_slo": max(passing) if passing else None,
            "target": target, "goodput_at_target": None if target is None else target["goodput"],
            "goodput_sweeps": [] if target is None else [s["goodput"] for s in target.get("sweeps", [target])]}


# objective -> (the ratio in a summary, the figure it divides, why it passes when dense's figure is nothing)
RATIO_CHECKS = {"min_goodput_ratio": ("goodput_ratio", "goodput_at_target", "dense has no goodput at the target"),
                "min_load_ratio": ("load_ratio", "max_load_meeting_slo", "dense meets the SLO at no load")}


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def sign_off(policy, models: list[ServedModel], summaries: dict[str, dict]) -> dict:
    """One check per candidate and objective at the target load, the ratios to dense, each verdict, the overall."""
    slo: ServeSLO = policy.serve
    dense = summaries[models[0].label]
    checks = []
    for model in models[1:]:
        summary = summaries[model.label]
        target = summary["target"] or {}
        values = {name: (target.get(P99_OF[name]) or {}).get("p99") for name in slo.objectives()}
        limits = dict(slo.objectives())
        total = (target.get("requests") or {}).get("successful", 0) + (target.get("requests") or {}).get("failed", 0)
        values["max_failed_rate"] = (target["requests"]["failed"] / total) if total else None
        limits["max_failed_rate"] = slo.max_failed_rate
        for ratio, figure, _ in RATIO_CHECKS.values():
            summary[ratio] = _ratio(summary[figure], dense[figure])
        sweeps, dense_sweeps = summary.get("goodput_sweeps") or [], dense.get("goodput_sweeps") or []
        summary["goodput_told_apart"] = told_apart(sweeps, dense_sweeps)
        if len(sweeps) > 1 and len(dense_sweeps) > 1:  # the ratio's range over the sweeps: worst against best
            mine, theirs = [v or 0.0 for v in sweeps], [v or 0.0 for v in dense_sweeps]
            summary["goodput_ratio_range"] = [_ratio(min(mine), max(theirs)), _ratio(max(mine), min(theirs))]
        beyond_dense = {}  # a ratio whose dense side is nothing: the candidate carries what dense cannot
        for name, (ratio, figure, why) in RATIO_CHECKS.items():
            if getattr(slo, name) is not None:
                values[name], limits[name] = summary[ratio], getattr(slo, name)
                if not dense[figure] and (summary[figure] or 0) > 0:
                    beyond_dense[name] = why
        for name, limit in limits.items():
            value = values[name]
            ok = name in beyond_dense or (value is not None and (value >= limit if name.startswith("min_") else value <= limit))
            check = {"candidate": model.label, "objective": name, "limit": limit, "value": value,
                     "load": slo.target_level, "passed": ok}
            if name in beyond_dense:  # the ratio is infinite: passed, and the report says why it has no number
                check["note"] = beyond_dense[name]
            elif name == "min_goodput_ratio" and summary.get("goodput_ratio_range"):
                check["range"] = summary["goodput_ratio_range"]
            checks.append(check)
    verdict: dict[str, bool] = {}
    for check in checks:
        verdict[check["candidate"]] = verdict.get(check["candidate"], True) and check["passed"]
    passed = bool(verdict) and (all(verdict.values()) if policy.require == "all" else any(verdict.values()))
    return {"name": policy.name, "require": policy.require, "path": policy.path, "slo": slo.to_dict(),
            "checks": checks, "candidates": verdict, "passed": passed,
            "binding": [f"{c['candidate']}: {c['objective']}" for c in checks if not c["passed"]]}


def run_serve(runtime: str, models: list[ServedModel], slo: ServeSLO, *, tokenizer: str, work: Path,
              endpoints: bool = False, max_model_len: int = DEFAULT_MAX_MODEL_LEN, prompts: str = "wikitext",
              data_dir: str | None = None, seed: int = 0) -> dict:
    """Serve (or reach) every model in turn and load it; the report's ``serve`` section without the policy.
    ``prompts``: ``wikitext`` (WikiText-2 test windows from ``data_dir``, the same file for every model) or
    ``synthetic`` (GuideLLM's text); bench/serve_prompts.py."""
    from effideploy.bench.serve_prompts import check_source, synthetic_prompts, write_wikitext_prompts
    from effideploy.bench.serve_servers import endpoint, serving

    started = time.perf_counter()
    if check_source(prompts) == "wikitext":
        with progress.status("Writing WikiText-2 test prompts for the load"):
            prompt_set = write_wikitext_prompts(work, tokenizer, slo, data_dir=data_dir, seed=seed)
    else:
        prompt_set = synthetic_prompts(slo)
    sweeps = {model.label: [] for model in models}
    for sweep in range(slo.repeats):
        # every other round in reverse (dense, A, B, B, A, dense): a drift of the machine meets every model alike
        for model in models if sweep % 2 == 0 else models[::-1]:
            tick = time.perf_counter()
            name = model.label if sweep == 0 else f"{model.label}.sweep{sweep + 1}"  # its files in raw/
            of = f", sweep {sweep + 1} of {slo.repeats}" if slo.repeats > 1 else ""
            with progress.status(f"Serving {model.label} and loading it with GuideLLM ({slo.kind} "
                                 f"{', '.join(f'{v:g}' for v in slo.levels)}{of})"):
                if endpoints:
                    server = endpoint(model.spec)
                    model.url, model.served_model = server.url, server.model
                    sweeps[model.label].append(run_load(server, slo, tokenizer, work, name, prompt_set))
                else:
                    context = min(max_model_len, positions(Path(model.export)) or max_model_len)
                    with serving(runtime, Path(model.export), model.label, work, max_model_len=context,
                                 log_name=name) as server:
                        model.url, model.served_model = server.url, server.model
                        sweeps[model.label].append(run_load(server, slo, tokenizer, work, name, prompt_set))
            model.seconds += time.perf_counter() - tick
    for model in models:
        model.levels = combine(sweeps[model.label])
        model.sweeps = sweeps[model.label] if slo.repeats > 1 else []
    summaries = {model.label: analyse(model, slo) for model in models}
    return {"runtime": None if endpoints else runtime, "endpoints": endpoints, "slo": slo.to_dict(),
            "tokenizer": tokenizer, "prompts": prompt_set, "models": [vars(model) for model in models],
            "summaries": summaries,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": time.perf_counter() - started}


def prepare_served(runtime: str, dense: str, candidates, quantize, export_root: str) -> list[ServedModel]:
    """Dense and candidates as exports for ``runtime`` (export-or-reuse, as the in-process bench)."""
    from effideploy.bench.artifacts import candidate_label, prepare_model
    from effideploy.bench.config import DENSE_LABEL, BenchConfig, expanded_candidates
    from effideploy.runtimes import RUNTIMES, require_server

    require_server(runtime)
    config = BenchConfig(runtime=runtime, dense=dense, candidates=tuple(candidates), quantize=tuple(quantize),
                         export_root=export_root)
    runtime_class = RUNTIMES.get(runtime)
    taken = {DENSE_LABEL}
    prepared = [(DENSE_LABEL, "dense", dense, prepare_model(config, runtime_class, DENSE_LABEL, "dense", dense))]
    for spec in expanded_candidates(config):
        if spec.compression:
            raise EffideployError("--serve benches checkpoints and exports; token compression is not served")
        label = candidate_label(spec, taken)
        prepared.append((label, "candidate", spec.model or dense,
                         prepare_model(config, runtime_class, label, "checkpoint", spec.model or dense, None,
                                       spec.quantize, spec.export_options)))
    return [ServedModel(label, kind, spec, export=str(result.artifact)) for label, kind, spec, result in prepared]


def positions(export: Path) -> int | None:
    """The model's position limit (vLLM refuses a --max-model-len above it): from the export's config.json or its
    source checkpoint's (a GGUF export keeps none)."""
    from effideploy.exporters.manifest import read_export_manifest
    from effideploy.models.resolve import read_config_dict

    manifest = read_export_manifest(export) or {}
    for folder in (export, Path((manifest.get("source") or {}).get("path", ""))):
        if (folder / "config.json").is_file():
            return read_config_dict(folder).get("max_position_embeddings")
    return None


def work_folder(output: Path) -> Path:
    """Server logs and GuideLLM's raw reports while the run lasts (kept on failure: the errors name them)."""
    parent = Path(output).expanduser().resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".serve-work-", dir=parent))


def discard(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
