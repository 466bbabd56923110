"""The ``bench --serve`` report folder: report.json (``schema_version`` 1, ``kind`` "serve"), report.md with dense
and candidates side by side per load level, latency_vs_load.png (p99 TTFT, p99 ITL and goodput against load, every
model on the same axes, each sweep's goodput range drawn; when matplotlib is there) and raw/ (GuideLLM's own JSON report per model, its scenario, and
the server logs), written atomically like the bench report."""

from __future__ import annotations

import shutil
from pathlib import Path

from effideploy.io import atomic_output_dir, write_json

SERVE_SCHEMA_VERSION = 1


def _f(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(section: dict) -> str:
    slo = section["slo"]
    policy = section.get("policy")
    kind = "concurrency" if slo["kind"] == "concurrency" else "request rate (req/s)"
    lines = ["# Serving under load", ""]
    if policy is not None:
        lines += [f"**Policy {policy['name']} {'passed' if policy['passed'] else 'FAILED'}**"
                  + ("" if policy["passed"] else f" (binding: {'; '.join(policy['binding'])})")
                  + f", judged at {kind} {slo['target_level']:g}.", ""]
    where = "user endpoints" if section["endpoints"] else f"{section['runtime']}'s own server on 127.0.0.1"
    objectives = ", ".join(f"{k} <= {slo[k]:g}" for k in ("ttft_p99_ms", "tpot_p99_ms", "e2el_p99_ms") if slo[k])
    prompts = section.get("prompts") or {"source": "synthetic"}
    if prompts["source"] == "wikitext":
        described = (f"{prompts['count']} WikiText-2 test windows of {slo['prompt_tokens']} tokens (seed "
                     f"{prompts['seed']}; {prompts['tokens_min']}-{prompts['tokens_max']} tokens re-tokenized; "
                     f"[{prompts['file']}]({prompts['file']}))")
    else:
        described = f"GuideLLM's synthetic prompts of {slo['prompt_tokens']} tokens"
    lines += [f"Load generator: GuideLLM, {described}, {slo['output_tokens']} "
              f"output tokens, {kind} {', '.join(f'{v:g}' for v in slo['levels'])}, at most {slo['max_requests']} "
              f"requests and {slo['max_seconds']:g} s per level; servers: {where}. SLO: {objectives or 'none'}, "
              f"failed requests <= {slo['max_failed_rate']:.0%}. TPOT here is GuideLLM's inter-token latency (ITL: per "
              "output token after the first, vLLM's TPOT); goodput is requests/s meeting every objective.", ""]
    repeats = slo.get("repeats", 1)
    if repeats > 1:
        lines += [f"Each model was swept {repeats} times, the order reversed every other round. Per level the "
                  "latency percentiles are the median over the sweeps, throughputs and goodput the mean, request "
                  "counts the sum; each sweep's goodput at the target is listed, and a goodput ratio to dense comes "
                  "with its range over the sweeps (worst against best). Two models whose per-sweep goodputs overlap "
                  "are not told apart by this run.", ""]
    lines += ["## Highest load meeting the SLO", ""]
    summaries = section["summaries"]
    dense = section["models"][0]["label"]
    rows = []
    for model in section["models"]:
        s = summaries[model["label"]]
        ratio = "" if model["label"] == dense else _f(s.get("goodput_ratio"), 2)
        if ratio and s.get("goodput_ratio_range"):
            low, high = s["goodput_ratio_range"]
            ratio += f" ({_f(low, 2)}-{_f(high, 2)}{'' if s.get('goodput_told_apart') else ', overlaps dense'})"
        row = [model["label"], _f(s["max_load_meeting_slo"], 2), _f(s["goodput_at_target"], 2), ratio,
               "" if model["label"] == dense else _f(s.get("load_ratio"), 2)]
        rows.append(row if repeats == 1 else row[:3] + [", ".join(_f(v, 2) for v in s.get("goodput_sweeps") or [])]
                    + row[3:])
    header = ["model", f"highest {slo['kind']} meeting the SLO", f"goodput at {slo['target_level']:g} (req/s)",
              "goodput ratio to dense", "load ratio to dense"]
    if repeats > 1:
        header.insert(3, "goodput per sweep")
    lines += _table(header, rows) + ["", "## Per load level", ""]
    rows = []
    for level_index, load in enumerate(slo["levels"]):
        for model in section["models"]:
            level = model["levels"][level_index]
            r = level["requests"]
            rows.append([f"{load:g}", model["label"], *(_f(level["ttft_ms"][p]) for p in ("mean", "p50", "p90", "p99")),
                         *(_f(level["itl_ms"][p], 2) for p in ("mean", "p50", "p90", "p99")),
                         *(_f(level["e2el_ms"][p]) for p in ("mean", "p50", "p99")),
                         _f(level["requests_per_second"], 2), _f(level["output_tokens_per_second"]),
                         _f(level["goodput"], 2), f"{r['failed']}/{r['successful'] + r['failed']}",
                         "yes" if level["meets_slo"] else "no: " + ", ".join(level["missed"])])
    lines += _table([slo["kind"], "model", "TTFT mean", "p50", "p90", "p99", "ITL mean", "p50", "p90", "p99",
                     "E2E mean", "p50", "p99", "req/s", "out tok/s", "goodput", "failed", "meets SLO"], rows)
    lines += ["", "Latencies in ms over successful requests."]
    if policy is not None:
        lines += ["", "## Sign-off checks", ""]
        lines += _table(["candidate", "objective", "limit", "value", "result"],
                        [[c["candidate"], c["objective"], f"{c['limit']:g}", c.get("note") or _f(c["value"], 3)
                          + (f" (sweeps: {_f(c['range'][0], 3)}-{_f(c['range'][1], 3)})" if c.get("range") else ""),
                          "pass" if c["passed"] else "**FAIL**"] for c in policy["checks"]])
    if section.get("plots"):
        lines += ["", *(f"![{name}]({name})" for name in section["plots"])]
    return "\n".join(lines) + "\n"


def plot(section: dict, folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("ttft_ms", "p99 TTFT (ms)", "ttft_p99_ms"), ("itl_ms", "p99 ITL / TPOT (ms)", "tpot_p99_ms"),
              ("goodput", "goodput (req/s)", None)]
    for ax, (key, title, objective) in zip(axes, panels):
        for model in section["models"]:
            loads = [level["load"] for level in model["levels"]]
            values = [level[key] if key == "goodput" else level[key]["p99"] for level in model["levels"]]
            line, = ax.plot(loads, [float("nan") if v is None else v for v in values], marker="o",
                            label=model["label"])
            if key == "goodput" and model["levels"] and model["levels"][0].get("sweeps"):  # the sweeps' range
                spread = [[s["goodput"] or 0.0 for s in level["sweeps"]] for level in model["levels"]]
                ax.vlines(loads, [min(v) for v in spread], [max(v) for v in spread], color=line.get_color())
        if objective and section["slo"].get(objective):
            ax.axhline(section["slo"][objective], color="red", linestyle="--", label="SLO")
        ax.set_xlabel(section["slo"]["kind"])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "latency_vs_load.png", dpi=100)
    plt.close(fig)
    return ["latency_vs_load.png"]


def write_serve_report(section: dict, output: str | Path, work: Path | None = None, *, overwrite: bool = False) -> Path:
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        section["plots"] = plot(section, staging)
        if work is not None and Path(work).is_dir():
            shutil.copytree(work, staging / "raw")
        write_json(staging / "report.json", {"schema_version": SERVE_SCHEMA_VERSION, "kind": "serve", **section})
        (staging / "report.md").write_text(markdown(section))
    return Path(output).expanduser().resolve()
