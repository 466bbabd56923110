"""The report's PNG plots: the Pareto fronts, measured vs ideal speedups, latency distributions, throughput."""

from __future__ import annotations

import math
from pathlib import Path

from effideploy.bench import metrics
from effideploy.bench.results import BenchReport

QUALITY_NAMES = {"op": "OP", "perplexity_ratio": "PPL dense/cand"}


def write_plots(report: BenchReport, folder: Path) -> list[str]:
    """pareto.png, speedup.png (measured vs ideal), latency.png and throughput.png (when measured); none when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.notes.append("plots skipped: matplotlib is not installed (pip install effideploy[bench])")
        return []
    written = _pareto_plot(report, folder, plt)
    written += _speedup_plot(report, folder, plt)
    written += _latency_plots(report, folder, plt)
    return written


def _pareto_plot(report: BenchReport, folder: Path, plt) -> list[str]:
    fronts = report.pareto
    axes_names = [a for a in fronts["op"] if any(not math.isnan(p.speedup) for p in fronts["op"][a][1:])]
    if not axes_names:
        return []
    fig, grid = plt.subplots(len(fronts), len(axes_names), figsize=(5 * len(axes_names), 4 * len(fronts)), squeeze=False)
    for row, quality in zip(grid, fronts):
        for ax, axis in zip(row, axes_names):
            points = [p for p in fronts[quality][axis] if not (math.isnan(p.speedup) or math.isnan(p.quality))]
            front = sorted((p for p in points if p.non_dominated), key=lambda p: p.speedup)
            ax.plot([p.speedup for p in front], [p.quality for p in front], "*-", color="tab:green", ms=12,
                    label="non-dominated")
            others = [p for p in points if not p.non_dominated]
            ax.plot([p.speedup for p in others], [p.quality for p in others], "o", color="tab:gray", label="dominated")
            for p in points:
                ax.annotate(p.model, (p.speedup, p.quality), textcoords="offset points", xytext=(5, 5), fontsize=8)
            ax.axvline(1.0, color="k", lw=0.5, ls=":")
            ax.axhline(1.0, color="k", lw=0.5, ls=":")
            ax.set_xlabel(axis.replace("_", " ") + " (x dense)")
            ax.set_ylabel(f"{QUALITY_NAMES[quality]} (1 = dense)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{report.config['dense']} on {report.runtime.get('runtime')}: quality vs speedup")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    plt.close(fig)
    return ["pareto.png"]


def _latency_plots(report: BenchReport, folder: Path, plt) -> list[str]:
    models = report.models
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "end-to-end latency")):
        ax.boxplot([[s * 1000 for s in getattr(m.latency, key)] for m in models], whis=(1, 99))
        ax.set_xticks(range(1, len(models) + 1), [m.label for m in models], rotation=20, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"{title} (whiskers p1..p99)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(folder / "latency.png", dpi=110)
    plt.close(fig)
    written = ["latency.png"]
    sizes = sorted({b for m in models for b in m.throughput}, key=int)
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in models:
            batches = [b for b in sizes if b in m.throughput]
            if batches:
                ax.plot([int(b) for b in batches], [metrics.percentile(m.throughput[b], 50) for b in batches], "o-",
                        label=m.label)
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


def _speedup_plot(report: BenchReport, folder: Path, plt) -> list[str]:
    """speedup.png: each candidate's measured speedups beside what the removed FLOPs and weight bytes predict."""
    comparisons = [r for r in report.comparisons if r.ideal or not math.isnan(r.decode_speedup)]
    if not comparisons:
        return []
    colors = {"TTFT": "tab:blue", "prefill": "tab:blue", "decode": "tab:orange", "throughput": "tab:green"}
    width = 0.8 / len(SPEEDUP_BARS)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(comparisons) + 2), 4.2))
    for index, (label, where, key, hatch) in enumerate(SPEEDUP_BARS):
        values = [(r.ideal or {}).get(key) if where == "ideal" else getattr(r, key) for r in comparisons]
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
    ax.set_xticks(range(len(comparisons)), [r.candidate for r in comparisons])
    ax.set_ylabel("speedup over dense (x)")
    config, runtime = report.config, report.runtime
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
