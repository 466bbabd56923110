"""The search's report folder: report.md (the verdict first), search.json, reproduce.sh, the final bench's own
report under bench/; and the recommended artifact linked as ``recommended`` in the search's output folder (only
when that link is effideploy's to make: ``workspace.plan_link``)."""

from __future__ import annotations

import math
from pathlib import Path

from effideploy.io import atomic_output_dir, write_json
from effideploy.search.levers import FAMILY_TEXT

# 2: a recipe is {lever: value} for every lever (ffn_sparsity, depth, quantize, kv), no longer three fixed fields
SEARCH_SCHEMA_VERSION = 2


def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_search_report(result, output: Path) -> Path:
    """``output``: the report folder, ``report/`` inside the search's output folder (where the link goes)."""
    from effideploy.bench.report import write_report
    from effideploy.search.recommend import reproduce_script
    from effideploy.search.workspace import apply_link, plan_link

    output = Path(output).expanduser()
    # Decided first so that the report says what the folder will hold; applied last, inside the staging block,
    # so that a link that cannot be made discards the report instead of contradicting it.
    result.link = plan_link(output.parent, result.artifact)
    with atomic_output_dir(output, overwrite=True) as staging:
        write_json(staging / "search.json", {"schema_version": SEARCH_SCHEMA_VERSION, **result.to_dict()})
        (staging / "report.md").write_text(markdown(result))
        if result.reproduce:
            (staging / "reproduce.sh").write_text(reproduce_script(result.reproduce))
        write_report(result.bench_report, staging / "bench", overwrite=True)
        if result.serve is not None:
            from effideploy.bench.serve_report import write_serve_report

            write_serve_report(result.serve, staging / "serve", overwrite=True)
        apply_link(output.parent, result.link)
    return output.resolve()


def _link_text(link: dict | None) -> str:
    if not link:
        return "not linked"
    if link["linked"]:
        return f"linked as `{link['path']}`"
    return f"not linked: {link['reason']}"


def verdict_lines(result) -> list[str]:
    records = {r.label: r for r in result.records}
    policy = result.policy
    if result.recommended:
        r = records[result.recommended]
        m = r.measured
        which = (f"the fastest recipe that passes policy `{policy['name']}`" if result.serve is None else
                 f"of the recipes that pass policy `{policy['name']}`, the one carrying the most load under it")
        lines = [f"**Verdict: ship `{r.label}`**, {which} on {result.config['runtime']}: decode "
                 f"{_f(m['decode_speedup'])}x and TTFT {_f(m['ttft_speedup'])}x "
                 f"over the dense model on the same runtime (measured, interleaved), WikiText-2 perplexity "
                 f"{_f(m.get('perplexity'))} ({_pct(m.get('perplexity_increase'))}), KL to dense "
                 f"{_f(m.get('kl_divergence'), 4)} nats, loyalty {_f(m.get('loyalty'), 3)}, OP {_f(m.get('op'), 3)}, "
                 f"size {_pct(-(m.get('size_reduction') or 0))}.",
                 f"Artifact: `{result.artifact}` ({_link_text(result.link)}); rebuild it with `reproduce.sh`:",
                 "", "```"] + result.reproduce + ["```"]
        if result.serve is not None:
            lines[1:1] = [_under_load(result.serve, r.label)]
    else:
        b = result.binding or {}
        lines = [f"**Verdict: no recipe passes policy `{policy['name']}`** on {result.config['runtime']}."]
        if "serve" in b:
            slo = result.serve["slo"]
            lines.append(f"Under load ({slo['kind']} {slo['target_level']:g}, the runtime's own server): every recipe "
                         f"that passed the thresholds misses the [serve] objectives: {'; '.join(b['serve']) or 'none served'}.")
        elif b:
            detail = ", ".join(f"{n} (measured {_f(b['values'].get(n), 3)}, limit {b['limits'][n]:g}; fails "
                               f"{b['failing_counts'][n]} of the benched)" for n in b["thresholds"])
            lines.append(f"Binding threshold(s): {detail}. Closest candidate: `{b['closest']}`.")
    return lines


def _under_load(serve: dict, label: str) -> str:
    slo, summaries = serve["slo"], serve["summaries"]
    mine, dense = summaries[label], summaries["dense"]
    best = mine.get("max_load_meeting_slo")
    return (f"Under load (its {serve['runtime']} server, GuideLLM, {slo['kind']} {slo['target_level']:g}) it meets every "
            f"[serve] objective: goodput {_f(mine.get('goodput_at_target'))} req/s against dense's "
            f"{_f(dense.get('goodput_at_target'))} (ratio {_f(mine.get('goodput_ratio'))}), highest {slo['kind']} meeting "
            f"the SLO {'none' if best is None else f'{best:g}'}; it carries the most load of the recipes that pass.")


def markdown(result) -> str:
    config, records = result.config, result.records
    out = [f"# effideploy tune: {config['model']} on {config['runtime']}, policy {result.policy['name']}", ""]
    out += verdict_lines(result)
    comparisons = result.comparisons
    if comparisons:
        out += ["", "## Against the alternatives", ""]
        for family, label in FAMILY_TEXT.items():
            c = comparisons.get(family) or {}
            if not c.get("best"):
                out.append(f"- {label}: no benched recipe of this kind passes the policy.")
                continue
            line = (f"- {label}: best passing `{c['best']}`, decode {_f(c['decode_speedup'])}x, perplexity "
                    f"{_pct(c.get('perplexity_increase'))}")
            if "recommended_over_best" in c:
                ratio = c["recommended_over_best"]
                line += (f"; the recommended recipe decodes {_f(ratio)}x as fast" if c["best"] != result.recommended
                         else "; it is the recommended recipe")
                if c["best"] != result.recommended and ratio < 1.05:
                    line += f" (the levers it adds to {family} add little at this policy)"
            out.append(line + ".")
    out += ["", "## Recipes tried", "",
            "Predicted (screen): PyTorch on held-out WikiText-2 windows (fake-quantized weights for quantized "
            "recipes), a prediction of what the artifact will do. Predicted (speed): the cost model. Measured: the "
            "final bench on the shipped artifact (or the cost model's timing run, marked c). Front: on the "
            "Pareto front of screened quality (dense PPL / PPL) against decode speedup (d), TTFT speedup (t), "
            "memory (m).", ""]
    rows = []
    for r in sorted(records, key=lambda r: -(r.predicted.decode_speedup or 0)):
        s, m = r.screen, r.measured or {}
        mark = "" if m.get("run") != "calibration" else " (c)"
        verdict = ("pass" if r.failed == [] else "FAIL: " + ", ".join(r.failed)) if r.failed is not None else \
            ("screened out: " + ", ".join(r.screen_failed) if r.screen_failed else
             "export failed its parity check (search.json: export_error)" if r.export_error else "not benched")
        if r.serve_failed is not None:
            verdict += "; under load: " + ("pass" if not r.serve_failed else "FAIL " + ", ".join(r.serve_failed))
        rows.append([f"`{r.label}`", r.recipe.family, _f(s.perplexity if s else None) + f" ({_pct(s.perplexity_increase if s else None)})",
                     _f(s.kl if s else None, 4), _f(m.get("kl_divergence"), 4), _f(s.top1_agreement if s else None, 3),
                     _f(s.top_k_agreement if s else None, 3), _f(r.predicted.decode_speedup),
                     _f(m.get("decode_speedup")) + mark, _f(r.predicted.ttft_speedup),
                     _f(m.get("ttft_speedup")) + mark, _f(r.predicted.peak_memory_mb, 0),
                     "".join(k[0] for k, v in r.on_front.items() if v) or "-", verdict])
    out.append(_table(["recipe", "levers", "PPL pred. (screen)", "KL pred. (screen)", "KL meas.", "top-1 pred. (screen)",
                       "top-5 pred. (screen)", "decode pred.", "decode meas.",
                       "TTFT pred.", "TTFT meas.", "peak MiB pred.", "front", "policy"], rows))
    out += ["", "## Cost model", ""]
    cost = result.cost_model
    decode, ttft = cost["decode"], cost["ttft"]
    out.append(f"Fitted on {', '.join(cost['fitted_on'])} (timed on {config['runtime']}). TPOT = {decode['intercept'] * 1e3:.2f} ms + "
               + " + ".join(f"{c * 1e12:.3g} ms/GB x {n}" for n, c in decode["coefficients"].items())
               + f" ({_residual(decode)}); TTFT = {ttft['intercept'] * 1e3:.1f} ms + "
               + " + ".join(f"{c * 1e12:.3g} ms/TFLOP x {n}" for n, c in ttft["coefficients"].items())
               + f" ({_residual(ttft)}).")
    held = [c for c in result.cost_check if not c["fitted_on"]]
    if result.cost_check:
        out += ["", _table(["recipe", "fitted on it", "decode predicted", "decode measured", "error", "TTFT predicted",
                            "TTFT measured", "error"],
                           [[c["label"], "yes" if c["fitted_on"] else "no", _f(c["decode_predicted"]), _f(c["decode_measured"]),
                             _pct(c["decode_predicted"] / c["decode_measured"] - 1), _f(c["ttft_predicted"]),
                             _f(c["ttft_measured"]), _pct(c["ttft_predicted"] / c["ttft_measured"] - 1)]
                            for c in result.cost_check])]
    if held:
        errors = [abs(c["decode_predicted"] / c["decode_measured"] - 1) for c in held]
        out += ["", f"On the {len(held)} benched recipe(s) the model was not fitted on, the predicted decode speedup is "
                f"off by {sum(errors) / len(errors) * 100:.0f}% on average (at most {max(errors) * 100:.0f}%)."]
    if result.serve is not None:
        from effideploy.search.serve_stage import markdown as serve_markdown

        out += [""] + serve_markdown(result.serve, result.recommended)
    if result.lm_eval:
        out += ["", "## lm-evaluation-harness", ""]
        for label, tasks in result.lm_eval.items():
            out.append(f"- {label}: " + "; ".join(f"{t}: " + ", ".join(f"{k} {_f(v, 4)}" for k, v in m.items())
                                                 for t, m in tasks.items()))
    out += ["", "## Cost of this run", "", ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
            + ". The final bench's full report is in `bench/report.md`."]
    if result.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(out) + "\n"


def _residual(fit: dict) -> str:
    """An exact fit (no more distinct points than coefficients) has no residual worth printing."""
    pinned = (f"; {', '.join(fit['pinned'])} held at 0 ms (the data pulled its slope below zero)"
              if fit.get("pinned") else "")
    if fit.get("residual_pct") is None:
        return (f"exact fit: {fit.get('points', 0)} points, no more distinct than its free coefficients, so only the "
                f"recipes it was not fitted on (below) test it{pinned}")
    return f"RMS residual {_f(fit['residual_pct'], 1)}% over {fit['points']} points{pinned}"
