"""``tune --serve``: the shortlist's final judgement under load, on the runtime's own server.

The offline final bench (batch 1, one process) keeps the recipes that pass the policy's thresholds; with ``--serve``
dense and each of those recipes are then served in turn by the runtime's own OpenAI-compatible server and driven by
GuideLLM through the policy's ``[serve]`` load levels (``effideploy.bench.serve``, the same code as ``bench
--serve``), and only the recipes that also meet the ``[serve]`` objectives at the target load stay. Among those the
recommendation is the one that carries the most load: the highest goodput (requests per second meeting every SLO)
at the target load, then the highest load level meeting the SLO, then the offline decode speedup. That order is the
sign-off question a serving deployment asks ("at the load we expect, which recipe holds our latency objectives
best"); batch-1 decode speed alone favours weight-only quantization, which helps a loaded server less than FLOPs and
KV removed do.

A recipe with a KV budget (token compression) runs in-process only: no server applies it, so it is not served and
cannot be recommended under ``--serve`` (said in the notes).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from effideploy.errors import EffideployError

def check_serve(runtime: str, policy, policy_path) -> None:
    """Refuse (one line, before any work) a ``--serve`` the search could not carry out."""
    from effideploy.runtimes import require_server

    require_server(runtime)
    if policy.serve is None:
        raise EffideployError(f"policy {policy_path} has no [serve] table: --serve judges the shortlist at its load "
                              "and objectives (see docs/serve.md)")
    from effideploy.bench.serve_load import guidellm_unavailable

    reason = guidellm_unavailable()
    if reason:
        raise EffideployError(f"--serve drives the servers with GuideLLM, which is unavailable: {reason}")


def rank_key(summary: dict, decode_speedup) -> tuple:
    """Most load carried first: goodput at the target load, the highest load meeting the SLO, decode speedup."""
    return (summary.get("goodput_at_target") or 0.0, summary.get("max_load_meeting_slo") or 0.0,
            decode_speedup or 0.0)


def missed(verdict: dict, label: str) -> list[str]:
    """The [serve] objectives ``label`` misses in ``bench.serve.sign_off``'s verdict."""
    return [c["objective"] for c in verdict["checks"] if c["candidate"] == label and not c["passed"]]


def choose(passing: list, section: dict):
    """The recommended record among ``passing`` (offline-passing records) given the serving ``section`` (with its
    ``policy`` verdict), or None; each record's serving verdict is set on it (``serve_failed``)."""
    verdict = section["policy"]
    served = []
    for record in passing:
        if record.label not in verdict["candidates"]:
            record.serve_failed = ["not served (token compression runs in-process only)"]
            continue
        record.serve_failed = missed(verdict, record.label)
        if not record.serve_failed:
            served.append(record)
    if not served:
        return None
    return max(served, key=lambda r: rank_key(section["summaries"][r.label], r.measured.get("decode_speedup")))


def serve_shortlist(config, policy, passing: list, models: dict, tokenizer_dir: str) -> dict:
    """Serve dense and every offline-passing record (``models``: the final bench's ModelResults by label) under the
    policy's load; the serving section with its ``policy`` verdict (``bench.serve.sign_off``)."""
    from effideploy.bench.serve import ServedModel, discard, run_serve, sign_off

    served = [ServedModel("dense", "dense", config.model, export=str(models["dense"].artifact))]
    served += [ServedModel(r.label, "candidate", r.checkpoint, export=str(models[r.label].artifact))
               for r in passing if r.recipe.compression is None]
    # inside the search's own output folder (bench --serve's work_folder puts it beside its report): tune writes
    # nowhere else
    work = Path(tempfile.mkdtemp(prefix=".serve-work-", dir=Path(config.output).expanduser()))
    section = run_serve(config.runtime, served, policy.serve, tokenizer=tokenizer_dir, work=work,
                        prompts=config.serve_prompts, data_dir=config.data_dir)
    section["policy"] = sign_off(policy, served, section["summaries"])  # no candidate served: nothing passes
    discard(work)
    return section


def markdown(section: dict | None, recommended: str | None) -> list[str]:
    """The search report's "Under load" section."""
    from effideploy.bench.serve_load import P99_OF

    if not section:
        return []
    slo = section["slo"]
    objectives = ", ".join(f"{k} {v:g}" for k, v in slo.items() if k.endswith("_ms") and v is not None) or "none"
    lines = ["## Under load (the runtime's own server, GuideLLM)", "",
             f"Dense and every recipe that passed the thresholds above, each behind {section['runtime']}'s server on "
             f"127.0.0.1 in turn, {slo['kind']} {', '.join(f'{v:g}' for v in slo['levels'])}, "
             f"{slo['prompt_tokens']}-token prompts, {slo['output_tokens']} output tokens, at most "
             f"{slo['max_requests']} requests and {slo['max_seconds']:g} s per level; objectives (p99): {objectives}; "
             f"judged at {slo['kind']} {slo['target_level']:g}. Ranked by goodput at that load. Full report: "
             "`serve/report.md`.", "",
             "| model | highest load meeting the SLO | goodput at target (req/s) | p99 TTFT (ms) | p99 TPOT (ms) | "
             "goodput ratio | serving verdict |", "|---|---|---|---|---|---|---|"]
    verdict = section["policy"]
    for model in section["models"]:
        label = model["label"]
        summary = section["summaries"][label]
        target = summary.get("target") or {}
        ttft = (target.get(P99_OF["ttft_p99_ms"]) or {}).get("p99")
        tpot = (target.get(P99_OF["tpot_p99_ms"]) or {}).get("p99")
        if label == "dense":
            state = "baseline"
        else:
            misses = missed(verdict, label)
            state = ("**recommended**" if label == recommended else "pass") if not misses else "FAIL: " + ", ".join(misses)
        best = summary.get("max_load_meeting_slo")
        goodput = _f(summary.get("goodput_at_target"))
        if len(summary.get("goodput_sweeps") or []) > 1:
            goodput += " (" + ", ".join(_f(v) for v in summary["goodput_sweeps"]) + ")"
        lines.append(f"| `{label}` | {'none' if best is None else f'{best:g}'} | {goodput} | "
                     f"{_f(ttft, 0)} | {_f(tpot, 1)} | {_f(summary.get('goodput_ratio'))} | {state} |")
    return lines + ["", *_ranking_note(section, recommended)]


def _ranking_note(section: dict, recommended: str | None) -> list[str]:
    """Whether the recommendation's goodput lead over the other recipes meeting the SLO is beyond the sweeps'
    spread: goodput at an SLO's edge moves with a few requests, so one sweep ranks close recipes by noise."""
    from effideploy.bench.serve import told_apart

    if recommended is None:
        return []
    verdict, summaries = section["policy"], section["summaries"]
    others = [label for label in verdict["candidates"] if label != recommended and not missed(verdict, label)]
    if not others:
        return []
    repeats = section["slo"].get("repeats", 1)
    if repeats == 1:
        return [f"One sweep per model: `{recommended}` leads {', '.join(f'`{o}`' for o in others)} on one run's "
                "goodput; set `[serve] repeats` to see whether the lead exceeds the run-to-run spread.", ""]
    close = [o for o in others if not told_apart(summaries[recommended]["goodput_sweeps"], summaries[o]["goodput_sweeps"])]
    if not close:
        return [f"`{recommended}`'s goodput at the target is above every other passing recipe's in each of "
                f"{repeats} sweeps.", ""]
    return [f"Not told apart by {repeats} sweeps: `{recommended}`'s per-sweep goodput overlaps "
            f"{', '.join(f'`{o}`' for o in close)}'s; the recommendation among them is the higher mean, not a "
            "measured difference.", ""]


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
