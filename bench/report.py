"""The report folder: ``report.json`` (every number, versioned), ``report.md`` (tables a person reads) and PNG plots.

Schema of report.json (``schema_version`` 1): ``created``, ``config`` (BenchConfig), ``runtime`` (the adapter's
describe()), ``runtime_options``, ``environment`` (versions, CPU/GPU, threads, load average at start and end),
``data``, ``models`` (per model: ``parameters``, ``size``, ``memory``, ``latency`` with raw ``ttft_s``/``tpot_s``/
``e2e_s`` samples and a ``summary``, ``throughput`` tokens/s samples per batch size, ``perplexity`` with per-window
mean NLL, ``tasks`` with per-example choices), ``comparisons`` (per candidate: every ratio, OP/OG/OL/OE, the ideal
ratios, the policy metrics), ``pareto`` (per quality, OP and the perplexity ratio, and per speedup: the points and
whether each is non-dominated), ``policy`` (when given), ``notes``, ``phase_seconds`` (wall time per bench phase),
``seconds``, ``plots``; per model also ``export`` (path, reused, seconds) when the bench exported it; from
``effideploy run`` also ``pipeline`` (method, sparsities, prune options, checkpoints, seconds per step, total).
Added keys do not change the version; renamed or removed ones do.
"""

from __future__ import annotations

import math
from pathlib import Path

from effideploy.bench import metrics
from effideploy.io import atomic_output_dir, write_json

REPORT_SCHEMA_VERSION = 1
QUALITY_NAMES = {"op": "OP", "perplexity_ratio": "PPL dense/cand"}


def write_report(payload: dict, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the report folder atomically (nothing is left behind if anything fails)."""
    payload = {"schema_version": REPORT_SCHEMA_VERSION, **payload}
    for model in payload["models"]:
        if model.get("latency"):
            model["latency"]["summary"] = {key: metrics.summarize(model["latency"][key]) for key in ("ttft_s", "tpot_s", "e2e_s")}
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        payload["plots"] = write_plots(payload, staging)
        write_json(staging / "report.json", payload)
        (staging / "report.md").write_text(markdown(payload))
    return Path(output).expanduser().resolve()


# ------------------------------------------------------------------------------------------------- markdown

def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _ms(seconds) -> str:
    return _f(None if seconds is None else seconds * 1000, 1)


def _mb(n_bytes) -> str:
    return _f(None if n_bytes is None else n_bytes / 1024**2, 1)


def _stderr(task: dict) -> float:
    p, n = task["accuracy"], task["n"]
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def _accuracy(task: dict) -> str:
    return f"{task['accuracy']:.3f} ± {_stderr(task):.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _removed(ratio) -> float | None:
    """Share of the work removed, from an ideal speedup dense / candidate: 1 - 1 / ratio."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) or ratio <= 0:
        return None
    return 1.0 - 1.0 / ratio


def _pct(share) -> str:
    return "n/a" if share is None else f"{share * 100:.1f}%"


def _verdict_line(record: dict) -> str:
    ideal = record.get("ideal") or {}
    parts = [f"decode {_f(record.get('decode_speedup'))}x (ideal {_f(ideal.get('decode_speedup_flops'))}x)",
             f"TTFT {_f(record.get('ttft_speedup'))}x (ideal {_f(ideal.get('prefill_speedup_flops'))}x)"]
    removed = _removed(ideal.get("decode_speedup_flops")), _removed(ideal.get("decode_speedup_weight_bytes"))
    if None not in removed:
        parts.append(f"{removed[0] * 100:.1f}% of decode FLOPs and {removed[1] * 100:.1f}% of weight bytes per token removed")
    if record.get("size_reduction") is not None:
        parts.append(f"{_f(record['size_reduction'] * 100, 1)}% fewer parameters")
    if record.get("perplexity_increase") is not None:
        parts.append(f"perplexity {record['perplexity_increase'] * 100:+.1f}%")
    parts.append(f"OP {_f(record.get('op'), 3)}, OL {_f(record.get('loyalty'), 3)}")
    slower = record.get("decode_speedup") is not None and round(record["decode_speedup"], 2) < 1  # as printed
    return f"- **{record['candidate']}**: " + ", ".join(parts) + (" — **slower than dense**" if slower else "")


def markdown(payload: dict) -> str:
    config, models, comparisons = payload["config"], payload["models"], payload["comparisons"]
    env, runtime = payload["environment"], payload["runtime"]
    out = [f"# effideploy bench: {config['dense']} vs {len(comparisons)} candidate(s) on {runtime.get('runtime')}", ""]
    out.append(f"{payload['created']} · {runtime.get('engine', runtime.get('runtime'))} · {env['cpu']} "
               f"({env['cpu_count']} cores, {env['torch_threads']} torch threads) · GPU: {', '.join(env['gpu']) or 'none'} · "
               f"load average {env.get('load_average_start')} at start, {env.get('load_average_end')} at end · "
               f"{payload['seconds']:.0f} s")
    if payload.get("pipeline"):
        run = payload["pipeline"]
        options = run["prune_options"]
        out += ["", f"Pipeline (`effideploy run`): {run['method']} at FFN sparsity {', '.join(map(str, run['sparsities']))} "
                f"from one calibration pass ({options.get('calib_samples', 128)} x {options.get('calib_seqlen', 1024)} "
                f"tokens of WikiText-2 validation); " + ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
                + (f"; reused checkpoints: {', '.join(run['reused'])}" if run["reused"] else "")
                + (f"; {run['total_seconds']:.0f} s in all" if run.get("total_seconds") is not None else "") + "."]
    out += ["", "## Verdict", ""] + [_verdict_line(r) for r in comparisons]
    if payload.get("policy"):
        policy = payload["policy"]
        out.append("")
        out.append(f"Policy **{policy['name']}** ({policy['require']} candidates must pass): "
                   f"**{'PASS' if policy['passed'] else 'FAIL'}**")

    out += ["", f"## Latency (greedy, batch 1, {config['prompts']} prompt(s) of {config['prompt_tokens']} tokens, "
            f"{config['new_tokens']} new tokens, {config['repeats']} interleaved repeats, ms)", ""]
    rows = []
    for m in models:
        s = m["latency"]["summary"]
        rows.append([m["label"], *[_ms(s[k][p]) for k in ("ttft_s", "tpot_s", "e2e_s") for p in ("p50", "p90", "p99")],
                     f"{s['ttft_s']['n']}/{s['tpot_s']['n']}"])
    out.append(_table(["model", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "e2e p50", "p90", "p99",
                       "n (TTFT/TPOT)"], rows))
    sizes = sorted({b for m in models for b in m.get("throughput", {})}, key=int)
    if sizes:
        out += ["", "## Throughput (generated tokens/s, median of repeats)", ""]
        out.append(_table(["model"] + [f"batch {b}" for b in sizes],
                          [[m["label"]] + [_f(metrics.percentile(m["throughput"][b], 50), 1) if b in m.get("throughput", {})
                                           else "n/a" for b in sizes] for m in models]))

    out += ["", "## Measured against ideal", "",
            "Ideal ratios count only the work removed: FLOPs of the matmuls (attention, FFN and the vocab x hidden "
            "output head; prefill adds QK^T/AV over the prompt, decode over the cache) and weight bytes read per "
            f"decoded token, for a {config['prompt_tokens']}-token prompt and {config['new_tokens']} new tokens. "
            "Measured ratios are dense median / candidate median. The removed shares are 1 - 1/ideal ratio.", ""]
    rows = []
    for r in comparisons:
        ideal = r.get("ideal") or {}
        rows.append([r["candidate"], _pct(_removed(ideal.get("prefill_speedup_flops"))),
                     _pct(_removed(ideal.get("decode_speedup_flops"))),
                     _pct(_removed(ideal.get("decode_speedup_weight_bytes"))),
                     _f(r.get("decode_speedup")), _f(ideal.get("decode_speedup_flops")),
                     _f(ideal.get("decode_speedup_weight_bytes")), _f(r.get("ttft_speedup")),
                     _f(ideal.get("prefill_speedup_flops")), _f(r.get("e2e_speedup")), _f(r.get("throughput_speedup")),
                     _f(r.get("size_ratio")), _f(r.get("weight_bytes_ratio"))])
    out.append(_table(["candidate", "prefill FLOPs removed", "decode FLOPs removed", "weight bytes/token removed",
                       "decode (measured)", "decode (ideal, FLOPs)", "decode (ideal, bytes)",
                       "TTFT (measured)", "prefill (ideal, FLOPs)", "e2e", "throughput (largest batch)",
                       "parameters dense/cand", "weights on disk dense/cand"], rows))

    out += ["", "## Memory and size", ""]
    rows = []
    for m in models:
        p, mem, size = m.get("parameters") or {}, m.get("memory") or {}, m["size"]
        rows.append([m["label"], _f(p["counts"]["total"] / 1e6, 2) if p else "n/a",
                     _mb(size.get("checkpoint_weights_bytes")), _mb(size.get("artifact_bytes")),
                     _f(mem.get("peak_rss_mb"), 0), _f(mem.get("model_rss_mb"), 0), _f(mem.get("gpu_peak_allocated_mb"), 0)])
    out.append(_table(["model", "parameters (M)", "weights on disk (MB)", "artifact (MB)", "peak RSS (MB)",
                       "model RSS (MB)", "GPU peak (MB)"], rows))
    out += ["", "Peak RSS: a fresh process per model opens it on the runtime and generates once; the peak is the larger "
            "of the process's own high-water mark (VmHWM) and its process tree's RSS sampled every 20 ms. "
            "Model RSS is that peak minus the process's RSS after importing the runtime, before loading the model."]

    tasks = list(next((m.get("tasks") for m in models if m.get("tasks")), {}) or {})
    out += ["", "## Accuracy", ""]
    header = ["model", "WikiText-2 PPL"] + tasks + (["mean accuracy"] if tasks else [])
    rows = []
    for m in models:
        ppl = m.get("perplexity")
        row = [m["label"], "n/a" if not ppl else _f(ppl["perplexity"], 2) + (" (2nd halves)" if ppl["scope"] == "second_half" else "")]
        accs = [m["tasks"][t]["accuracy"] for t in tasks if t in m.get("tasks", {})]
        row += [_accuracy(m["tasks"][t]) if t in m.get("tasks", {}) else "n/a" for t in tasks]
        if tasks:
            row.append(_f(sum(accs) / len(accs), 3) if accs else "n/a")
        rows.append(row)
    dense_tasks = models[0].get("tasks", {})
    if tasks:
        chance = [dense_tasks[t]["chance"] for t in tasks]
        rows.append(["*chance*", ""] + [_f(c, 3) for c in chance] + [_f(sum(chance) / len(chance), 3)])
    out.append(_table(header, rows))
    data = payload["data"]
    out += ["", f"Perplexity over the first {data['ppl_windows']} windows of {config['ppl_seqlen']} tokens of "
            f"WikiText-2 test; multiple choice on up to {config['mc_limit']} examples per task (seeded subset, seed "
            f"{config['seed']}): " + ", ".join(f"{t['name']} ({min(t['examples'], config['mc_limit'] or t['examples'])}"
                                               f" of {t['examples']})" for t in data["tasks"])
            + ". ± is the standard error sqrt(p (1 - p) / n) of an accuracy."]
    at_chance = [t for t in tasks if abs(dense_tasks[t]["accuracy"] - dense_tasks[t]["chance"]) <= 2 * _stderr(dense_tasks[t])]
    if at_chance:
        out.append(f"The dense model is within two standard errors of chance on {', '.join(at_chance)}: there the "
                   "accuracy ratios in OP and OG measure sampling noise more than the candidate (read perplexity and OL).")

    out += ["", "## EffiVLM-Bench metrics", "",
            "OP = sqrt(mean of squared score ratios to dense) over the tasks and WikiText-2 (score 1/PPL); OG = std/mean x "
            "100 of those ratios; OL = share of predictions identical to dense (next-token argmax over the perplexity "
            "windows and chosen options, pooled); OE = TTFT and decode speedups.", ""]
    out.append(_table(["candidate", "OP", "OG (%)", "OL", "OL tokens", "OL choices", "OE TTFT", "OE decode",
                       "greedy tokens = dense"],
                      [[r["candidate"], _f(r.get("op"), 3), _f(r.get("og"), 1), _f(r.get("loyalty"), 3),
                        _f(r.get("loyalty_tokens"), 3), _f(r.get("loyalty_choices"), 3), _f(r.get("ttft_speedup")),
                        _f(r.get("decode_speedup")), _f(r.get("generation_match"), 3)] for r in comparisons]))

    out += ["", "## Pareto front (quality against speedup; * = non-dominated)", ""]
    fronts = payload["pareto"]
    rows = []
    for index, model in enumerate(p["model"] for p in fronts["op"]["decode_speedup"]):
        row = [model]
        for quality, by_axis in fronts.items():
            row.append(_f(by_axis["decode_speedup"][index]["quality"], 3))
            row += [_f(by_axis[axis][index]["speedup"]) + (" *" if by_axis[axis][index]["non_dominated"] else "")
                    for axis in by_axis]
        rows.append(row)
    header = ["model"]
    for quality, by_axis in fronts.items():
        header += [QUALITY_NAMES[quality]] + [f"{axis.split('_')[0]} ({quality.split('_')[0]} front)" for axis in by_axis]
    out.append(_table(header, rows))

    if payload.get("policy"):
        policy = payload["policy"]
        out += ["", f"## Policy: {policy['name']} ({policy.get('path') or 'inline'})", ""]
        out.append(_table(["candidate", "threshold", "limit", "value", "result"],
                          [[c["candidate"], c["threshold"], _f(c["limit"], 3), _f(c["value"], 3),
                            "pass" if c["passed"] else "**FAIL**"] for c in policy["checks"]]))
        out += ["", "Candidates: " + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in policy["candidates"].items())
                + f"; overall **{'PASS' if policy['passed'] else 'FAIL'}** (require {policy['require']})."]

    out += ["", "## How this was measured", "",
            f"- Runtime: {runtime} with options {payload.get('runtime_options')}.",
            "- Warm-up first; then the timed repeats run round-robin over the models with the order rotated each "
            "round, so load from other processes falls on all models alike. TTFT is the prefill of one prompt; TPOT "
            "each later token; end-to-end the sum per request. Speedups compare medians.",
            f"- The machine's load average was {env.get('load_average_start')} at start and "
            f"{env.get('load_average_end')} at the end (on {env['cpu_count']} cores): above the core count, other "
            "processes competed for the CPU and absolute timings are inflated and noisy; the interleaved ratios are "
            "the numbers to read.",
            "- Percentiles interpolate linearly between samples; with few samples p99 is close to the maximum."]
    if payload.get("phase_seconds"):
        out.append("- Wall time of the bench by phase: "
                   + ", ".join(f"{k} {v:.0f} s" for k, v in payload["phase_seconds"].items()) + ".")
    out += [f"- {note}" for note in payload.get("notes", [])]
    if payload.get("plots"):
        out += ["", "## Plots", ""] + [f"![{name}]({name})" for name in payload["plots"]]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    out += ["", "## Environment", "", f"effideploy {env['effideploy']}, Python {env['python']}, {env['platform']}; "
            f"{versions}; {env['memory_gb']} GB RAM.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- plots

def write_plots(payload: dict, folder: Path) -> list[str]:
    """pareto.png, speedup.png (measured vs ideal), latency.png and throughput.png (when measured); none when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        payload.setdefault("notes", []).append("plots skipped: matplotlib is not installed (pip install effideploy[bench])")
        return []
    written = []
    fronts = payload["pareto"]
    axes_names = [a for a in fronts["op"] if any(not math.isnan(p["speedup"]) for p in fronts["op"][a][1:])]
    if axes_names:
        fig, grid = plt.subplots(len(fronts), len(axes_names), figsize=(5 * len(axes_names), 4 * len(fronts)), squeeze=False)
        for row, quality in zip(grid, fronts):
            for ax, axis in zip(row, axes_names):
                points = [p for p in fronts[quality][axis] if not (math.isnan(p["speedup"]) or math.isnan(p["quality"]))]
                front = sorted((p for p in points if p["non_dominated"]), key=lambda p: p["speedup"])
                ax.plot([p["speedup"] for p in front], [p["quality"] for p in front], "*-", color="tab:green", ms=12,
                        label="non-dominated")
                others = [p for p in points if not p["non_dominated"]]
                ax.plot([p["speedup"] for p in others], [p["quality"] for p in others], "o", color="tab:gray",
                        label="dominated")
                for p in points:
                    ax.annotate(p["model"], (p["speedup"], p["quality"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
                ax.axvline(1.0, color="k", lw=0.5, ls=":")
                ax.axhline(1.0, color="k", lw=0.5, ls=":")
                ax.set_xlabel(axis.replace("_", " ") + " (x dense)")
                ax.set_ylabel(f"{QUALITY_NAMES[quality]} (1 = dense)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{payload['config']['dense']} on {payload['runtime'].get('runtime')}: quality vs speedup")
        fig.tight_layout()
        fig.savefig(folder / "pareto.png", dpi=110)
        plt.close(fig)
        written.append("pareto.png")

    written += _speedup_plot(payload, folder, plt)

    models = payload["models"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "end-to-end latency")):
        data = [[s * 1000 for s in m["latency"][key]] for m in models]
        ax.boxplot(data, whis=(1, 99))
        ax.set_xticks(range(1, len(models) + 1), [m["label"] for m in models], rotation=20, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{title} (whiskers p1..p99)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    written.append("latency.png")

    sizes = sorted({b for m in models for b in m.get("throughput", {})}, key=int)
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in models:
            bs = [b for b in sizes if b in m.get("throughput", {})]
            if bs:
                ax.plot([int(b) for b in bs], [metrics.percentile(m["throughput"][b], 50) for b in bs], "o-", label=m["label"])
        ax.set_xlabel("batch size")
        ax.set_ylabel("generated tokens / s")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "throughput.png", dpi=110)
        plt.close(fig)
        written.append("throughput.png")
    return written


SPEEDUP_BARS = (  # (label, where, key, hatch): measured bars solid, ideal ones hatched beside them
    ("TTFT measured", "record", "ttft_speedup", None),
    ("prefill ideal (FLOPs)", "ideal", "prefill_speedup_flops", "//"),
    ("decode measured", "record", "decode_speedup", None),
    ("decode ideal (FLOPs)", "ideal", "decode_speedup_flops", "//"),
    ("decode ideal (weight bytes)", "ideal", "decode_speedup_weight_bytes", ".."),
    ("throughput measured", "record", "throughput_speedup", None),
)


def _speedup_plot(payload: dict, folder: Path, plt) -> list[str]:
    """speedup.png: each candidate's measured speedups beside what the removed FLOPs and weight bytes predict."""
    comparisons = [r for r in payload["comparisons"] if r.get("ideal") or r.get("decode_speedup") is not None]
    if not comparisons:
        return []
    colors = {"TTFT": "tab:blue", "prefill": "tab:blue", "decode": "tab:orange", "throughput": "tab:green"}
    width = 0.8 / len(SPEEDUP_BARS)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(comparisons) + 2), 4.2))
    for index, (label, where, key, hatch) in enumerate(SPEEDUP_BARS):
        values = [((r.get("ideal") or {}) if where == "ideal" else r).get(key) for r in comparisons]
        values = [float("nan") if v is None else v for v in values]
        xs = [i + (index - (len(SPEEDUP_BARS) - 1) / 2) * width for i in range(len(comparisons))]
        color = colors[label.split()[0]]
        bars = ax.bar(xs, values, width, label=label, color=color if hatch is None else "white", edgecolor=color,
                      hatch=hatch, alpha=1.0 if hatch is None else 0.9)
        for bar, value in zip(bars, values):
            if not math.isnan(value):
                ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(comparisons)), [r["candidate"] for r in comparisons])
    ax.set_ylabel("speedup over dense (x)")
    config, runtime = payload["config"], payload["runtime"]
    ax.set_title(f"{config['dense']} on {runtime.get('runtime')} ({runtime.get('threads', 'default')} threads): "
                 f"measured vs ideal, {config['prompt_tokens']}-token prompts", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    heights = [b.get_height() for b in ax.patches if not math.isnan(b.get_height())]
    ax.set_ylim(0, max(heights + [1.0]) * 1.3)  # room for the legend above the bars
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=110)
    plt.close(fig)
    return ["speedup.png"]

