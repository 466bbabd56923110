"""The load generator: GuideLLM (the vLLM project's load-testing tool), run as its own CLI on a scenario file.

One ``guidellm run`` per server sweeps every load level (one sub-benchmark each), bounded per level by
``max_requests`` and ``max_seconds``, against loopback or the user's endpoint. Prompts are WikiText-2 test windows
of ``prompt_tokens`` tokens of the model's own tokenizer (a local folder: nothing is downloaded), a file in the run's
folder that GuideLLM reads as a data set, or GuideLLM's synthetic text of exactly ``prompt_tokens`` tokens where the
user asks (bench/serve_prompts.py); GuideLLM sends ``ignore_eos`` so every request generates ``output_tokens``. The SLO objectives are
passed to GuideLLM (``metrics.slo``), so goodput and attainment are its own numbers.

It runs as a child process in its own process group, killed with the bench (timeout, failure, Ctrl-C): GuideLLM
starts worker processes and an event loop of its own, which must not outlive or share the bench's. The metrics kept
per level are GuideLLM's: TTFT, ITL (GuideLLM's name for vLLM's TPOT: per output token after the first), GuideLLM's
TPOT (which includes the first token), end-to-end latency (mean, p50, p90, p99 over successful requests), request
and output-token throughput (requests / tokens per second over the level), failed requests, SLO attainment and
goodput.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from effideploy.bench.serve_policy import OBJECTIVES, ServeSLO
from effideploy.bench.serve_servers import Server, stop
from effideploy.errors import EffideployError

GUIDELLM_VERSION = "0.8.1"
LATENCIES = {"ttft_ms": "time_to_first_token_ms", "itl_ms": "inter_token_latency_ms",
             "tpot_ms": "time_per_output_token_ms", "e2el_ms": "request_latency"}
STARTUP_S = 120.0  # GuideLLM's imports, tokenizer and data set-up before the first request (slow on 2 cores)


def guidellm_unavailable() -> str | None:
    import importlib.metadata as md

    try:
        version = md.version("guidellm")
    except md.PackageNotFoundError:
        return f"guidellm is not installed (pip install guidellm=={GUIDELLM_VERSION}; scripts/setup.sh does)"
    del version  # another version is tried: its report is read by key and a missing key is a one-line error
    return None


def scenario(server: Server, slo: ServeSLO, tokenizer: str, output: Path, prompts: dict | None = None) -> dict:
    """GuideLLM's scenario (``guidellm run -c FILE``): one sub-benchmark per load level, on ``prompts``
    (bench/serve_prompts.py: the WikiText-2 file in the run's folder, or synthetic text when None)."""
    from effideploy.bench.serve_prompts import guidellm_data, synthetic_prompts

    profile = ({"kind": "constant", "rate": [slo.levels[0]]} if slo.kind == "rate" else
               {"kind": "concurrent", "streams": [int(slo.levels[0])]})
    key = "profile.rate" if slo.kind == "rate" else "profile.streams"
    goodput = {"ttft_ms": slo.ttft_p99_ms, "tpot_ms": slo.tpot_p99_ms, "e2el_ms": slo.e2el_p99_ms}
    return {
        "spec": {
            # /v1/completions: the tiny and pruned models have no chat template; llama_cpp.server has no /health
            "backend": {"kind": "openai_http", "target": server.url, "model": server.model,
                        "request_format": "/v1/completions", "api_routes": {"/health": "v1/models"}},
            "profile": profile,
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
            "data": [guidellm_data(prompts or synthetic_prompts(slo), output.parent, slo)],
            "constraints": [{"kind": "max_requests", "count": slo.max_requests},
                            {"kind": "max_duration", "seconds": slo.max_seconds}],
            "outputs": [{"kind": "json", "path": str(output)}],
            "metrics": {"kind": "generative", "slo": {k: v for k, v in goodput.items() if v is not None}},
        },
        "benchmarks": [{key: int(v) if slo.kind == "concurrency" else v} for v in slo.levels],
    }


def run_load(server: Server, slo: ServeSLO, tokenizer: str, folder: Path, label: str,
             prompts: dict | None = None) -> list[dict]:
    """Drive ``server`` through every load level of ``slo``; GuideLLM's raw JSON is kept as guidellm-LABEL.json.
    ``prompts`` as :func:`scenario` takes them (their file already in ``folder``)."""
    reason = guidellm_unavailable()
    if reason:
        raise EffideployError(f"bench --serve needs GuideLLM: {reason}")
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"guidellm-{label}.json"
    config = folder / f"guidellm-{label}-scenario.json"
    config.write_text(json.dumps(scenario(server, slo, tokenizer, raw, prompts), indent=1))
    log = folder / f"guidellm-{label}.log"
    executable = shutil.which("guidellm", path=str(Path(sys.executable).parent)) or shutil.which("guidellm")
    command = [executable, "run", "-c", str(config), "--disable-console-interactive"]
    # every level is bounded by max_seconds; the slack covers GuideLLM's start and each level's drain
    timeout = STARTUP_S + len(slo.levels) * (slo.max_seconds + 60.0)
    # GuideLLM reads a prompts file through `datasets`, whose cache goes into the run's folder (removed after the run),
    # never into the user's home
    cache = folder / ".datasets-cache"
    env = {**os.environ, "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING", "HF_DATASETS_CACHE": str(cache)}
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EffideployError(f"GuideLLM did not finish within {timeout:.0f} s against {server.url} (log: {log})") from None
    finally:
        stop(process)
        shutil.rmtree(cache, ignore_errors=True)
    if process.returncode != 0 or not raw.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise EffideployError(f"GuideLLM failed against {server.url} (exit {process.returncode}): "
                              f"{lines[-1] if lines else 'no output'} (log: {log})")
    return levels_from(json.loads(raw.read_text()), slo)


def _summary(distribution: dict | None, scale: float = 1.0) -> dict:
    stats = (distribution or {}).get("successful") or {}
    if not stats or not stats.get("count"):
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    pct = stats.get("percentiles") or {}
    return {"mean": stats["mean"] * scale, "p50": pct.get("p50", stats.get("median", 0)) * scale,
            "p90": pct["p90"] * scale, "p99": pct["p99"] * scale}


def _rate(distribution: dict | None) -> float | None:
    total = (distribution or {}).get("total") or {}
    return total.get("mean")


def levels_from(report: dict, slo: ServeSLO) -> list[dict]:
    """One record per load level from GuideLLM's JSON report, in the sweep's order."""
    levels = []
    for benchmark, level in zip(report.get("benchmarks", []), slo.levels):
        metrics = benchmark["metrics"]
        totals = metrics["request_totals"]
        record = {"load": level, "kind": slo.kind,
                  "requests": {"successful": totals["successful"], "failed": totals["errored"],
                               "incomplete": totals["incomplete"], "total": totals["total"]},
                  "requests_per_second": _rate(metrics.get("requests_per_second")),
                  "output_tokens_per_second": _rate(metrics.get("output_tokens_per_second")),
                  "goodput": _rate(metrics.get("request_goodput")),
                  "slo_attainment": metrics.get("slo_attainment"),
                  "duration_s": benchmark.get("duration")}
        for name, key in LATENCIES.items():
            record[name] = _summary(metrics.get(key), 1000.0 if key == "request_latency" else 1.0)
        levels.append(record)
    if len(levels) != len(slo.levels):
        raise EffideployError(f"GuideLLM reported {len(levels)} load level(s), {len(slo.levels)} were asked for")
    return levels


P99_OF = {"ttft_p99_ms": "ttft_ms", "tpot_p99_ms": "itl_ms", "e2el_p99_ms": "e2el_ms"}
assert set(P99_OF) == set(OBJECTIVES)
