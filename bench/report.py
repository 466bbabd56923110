"""The report folder: ``report.json`` (every number, versioned), ``report.md`` (tables a person reads) and PNG plots.

Schema of report.json (``schema_version`` 1): ``created``, ``config`` (BenchConfig), ``runtime`` (the adapter's
describe()), ``runtime_options``, ``environment`` (versions, CPU/GPU, threads, load average at start and end),
``data``, ``models`` (per model: ``parameters``, ``size``, ``memory``, ``latency`` with raw ``ttft_s``/``tpot_s``/
``e2e_s`` samples and a ``summary``, ``throughput`` tokens/s samples per batch size, ``perplexity`` with per-window
mean NLL, ``tasks`` with per-example choices), ``comparisons`` (per candidate: every ratio, OP/OG/OL/OE, the ideal
ratios, the policy metrics), ``pareto`` (per quality, OP and the perplexity ratio, and per speedup: the points and
whether each is non-dominated), ``policy`` (when given), ``notes``, ``phase_seconds`` (wall time per bench phase),
``seconds``, ``plots``; per model also ``export`` (path, reused, seconds) when the bench exported it, and ``chat``
(the greedy chat responses: ids, texts, stop tokens, dense's log-likelihoods) with ``--chat-prompts``; from
``effideploy run`` also ``pipeline`` (method, sparsities, prune options, checkpoints, seconds per step, total).
Uncertainty (docs/accuracy.md): per comparison ``task_accuracy`` (per task: ``n``, dense / candidate accuracy with
their SEs, ``drop`` with its paired SE, McNemar's ``dense_only`` / ``candidate_only``, ``within_noise``,
``competent``), ``suite_accuracy`` (the same over the competent tasks, what ``accuracy_drop`` is),
``accuracy_drop_stderr``, ``accuracy_drop_within_noise``, ``loyalty*_stderr`` and ``loyalty_units``; a policy
check of a metric with an SE also has ``stderr``, ``within_noise``, ``near_limit`` and ``scope``.
Next-token fidelity (bench/fidelity.py): per comparison ``kl_divergence``, ``top_k_agreement`` (measured on the
runtime's artifacts) with ``*_stderr``, ``top1_agreement``, ``fidelity_top_k``, ``fidelity_positions``,
``fidelity_source`` (the artifact and text), and from tune ``kl_divergence_predicted`` /
``top_k_agreement_predicted`` (its screen); per candidate model ``fidelity``.
Added keys do not change the version; renamed or removed ones do.
"""

from __future__ import annotations

import math
from pathlib import Path

from effideploy.bench import metrics
from effideploy.bench.plots import QUALITY_NAMES, write_plots
from effideploy.bench.results import BenchReport
from effideploy.io import atomic_output_dir, write_json

REPORT_SCHEMA_VERSION = 1


def write_report(report: BenchReport, output: str | Path, *, overwrite: bool = False) -> Path:
    """Write the report folder atomically (nothing is left behind if anything fails)."""
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        report.plots = write_plots(report, staging)
        write_json(staging / "report.json", {"schema_version": REPORT_SCHEMA_VERSION, **report.to_dict()})
        (staging / "report.md").write_text(markdown(report))
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


def _stderr(task) -> float:
    return metrics.binomial_stderr(task.accuracy, task.n)


def _accuracy(task) -> str:
    return f"{_pm(task.accuracy, _stderr(task))} ({task.n})"


def _pm(value, stderr, digits: int = 3) -> str:
    """``value ± SE`` (the SE left out where unknown)."""
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return _f(value, digits)
    return f"{_f(value, digits)} ± {_f(stderr, digits)}"


def _noise_note(within) -> str:
    return "n/a" if within is None else ("within noise" if within else "**beyond noise**")


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


def _verdict_line(record) -> str:
    ideal = record.ideal or {}
    parts = [f"decode {_f(record.decode_speedup)}x (ideal {_f(ideal.get('decode_speedup_flops'))}x by FLOPs, "
             f"{_f(ideal.get('decode_speedup_weight_bytes'))}x by weight bytes read)",
             f"TTFT {_f(record.ttft_speedup)}x (ideal {_f(ideal.get('prefill_speedup_flops'))}x)"]
    removed = _removed(ideal.get("decode_speedup_flops")), _removed(ideal.get("decode_speedup_weight_bytes"))
    if None not in removed:
        parts.append(f"{removed[0] * 100:.1f}% of decode FLOPs and {removed[1] * 100:.1f}% of weight bytes per token removed")
    if record.size_reduction is not None:
        parts.append(f"weights stored {_f(record.size_reduction * 100, 1)}% smaller")
    if record.perplexity_increase is not None:
        parts.append(f"perplexity {record.perplexity_increase * 100:+.1f}%")
    suite = getattr(record, "suite_accuracy", None)
    if suite is not None:
        noise = {True: ", within noise", False: ", beyond noise", None: ""}[suite.within_noise]
        parts.append(f"accuracy drop {_pm(suite.drop, suite.drop_stderr)} over {len(suite.tasks)} competent "
                     f"task(s), {suite.n} items{noise}")
    parts.append(f"OP {_f(record.op, 3)}, OL {_f(record.loyalty, 3)}")
    if record.kl_divergence is not None:
        parts.append(f"KL to dense {_pm(record.kl_divergence, record.kl_divergence_stderr, 4)} nats and top-"
                     f"{record.fidelity_top_k} agreement {_pm(record.top_k_agreement, record.top_k_agreement_stderr)} "
                     "measured on the runtime")
    if record.chat_rouge_l is not None:
        parts.append(f"chat ROUGE-L {_f(record.chat_rouge_l, 3)} against dense's responses")
    slower = not math.isnan(record.decode_speedup) and round(record.decode_speedup, 2) < 1  # as printed
    return f"- **{record.candidate}**: " + ", ".join(parts) + (" — **slower than dense**" if slower else "")


def _lm_eval_section(report: BenchReport) -> list[str]:
    """``--lm-eval-task``: lm-evaluation-harness's own numbers on each model's runtime artifact."""
    section = report.lm_eval
    if not section:
        return []
    items = ("the bench's own seeded items (the same as its multiple-choice scorer's)" if section["samples"]
             else "all documents" if section["limit"] is None else f"lm-eval's first {section['limit']} documents")
    out = ["", "## lm-evaluation-harness", "",
           f"lm-eval's `simple_evaluate` through effideploy's adapter on each model's {report.runtime.get('runtime')} "
           f"artifact, tasks {', '.join(section['tasks'])}, on {items}. ± is lm-eval's stderr.", "",
           "| model | task | metric | value |", "|---|---|---|---|"]
    for label, tasks in section["models"].items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if "," not in metric or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                err = metrics.get(metric.replace(",", "_stderr,", 1))
                shown = f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")
                out.append(f"| {label} | {task} | {metric} | {shown} |")
    return out


def markdown(report: BenchReport) -> str:
    config, comparisons = report.config, report.comparisons
    env, runtime = report.environment, report.runtime
    out = [f"# effideploy bench: {config['dense']} vs {len(comparisons)} candidate(s) on {runtime.get('runtime')}", ""]
    out.append(f"{report.created} · {runtime.get('engine', runtime.get('runtime'))} · {env['cpu']} "
               f"({env['cpu_count']} cores, {env['torch_threads']} torch threads) · GPU: {', '.join(env['gpu']) or 'none'} · "
               f"load average {env.get('load_average_start')} at start, {env.get('load_average_end')} at end · "
               f"{report.seconds:.0f} s")
    if report.pipeline:
        run = report.pipeline
        options = run["prune_options"]
        out += ["", f"Pipeline (`effideploy run`): {run['method']} at FFN sparsity {', '.join(map(str, run['sparsities']))} "
                f"from one calibration pass ({options.get('calib_samples', 128)} x {options.get('calib_seqlen', 1024)} "
                f"tokens of WikiText-2 validation); " + ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
                + (f"; reused checkpoints: {', '.join(run['reused'])}" if run["reused"] else "")
                + (f"; {run['total_seconds']:.0f} s in all" if run.get("total_seconds") is not None else "") + "."]
    out += ["", "## Verdict", ""] + [_verdict_line(r) for r in comparisons]
    if report.policy:
        policy = report.policy
        out += ["", f"Policy **{policy['name']}** ({policy['require']} candidates must pass): "
                f"**{'PASS' if policy['passed'] else 'FAIL'}**"]
    out += _speed_sections(report) + _memory_section(report) + _accuracy_section(report) + _effivlm_section(report)
    out += _fidelity_section(report) + _chat_section(report) + _lm_eval_section(report)
    out += _pareto_section(report) + _policy_section(report) + _method_section(report)
    return "\n".join(out)


def _speed_sections(report: BenchReport) -> list[str]:
    config, models = report.config, report.models
    out = ["", f"## Latency (greedy, batch 1, {config['prompts']} prompt(s) of {config['prompt_tokens']} tokens, "
           f"{config['new_tokens']} new tokens, {config['repeats']} interleaved repeats, ms)", ""]
    rows = []
    for m in models:
        s = m.latency.summary()
        rows.append([m.label, *[_ms(s[k][p]) for k in ("ttft_s", "tpot_s", "e2e_s") for p in ("p50", "p90", "p99")],
                     f"{s['ttft_s']['n']}/{s['tpot_s']['n']}"])
    out.append(_table(["model", "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "e2e p50", "p90", "p99",
                       "n (TTFT/TPOT)"], rows))
    sizes = sorted({b for m in models for b in m.throughput}, key=int)
    if sizes:
        out += ["", "## Throughput (generated tokens/s, median of repeats)", ""]
        out.append(_table(["model"] + [f"batch {b}" for b in sizes],
                          [[m.label] + [_f(metrics.percentile(m.throughput[b], 50), 1) if b in m.throughput else "n/a"
                                        for b in sizes] for m in models]))
    out += ["", "## Measured against ideal", "",
            "Ideal ratios count only the work removed: FLOPs of the matmuls (attention, FFN and the vocab x hidden "
            "output head; prefill adds QK^T/AV over the prompt, decode over the cache) and weight bytes read per "
            f"decoded token, for a {config['prompt_tokens']}-token prompt and {config['new_tokens']} new tokens. "
            "Measured ratios are dense median / candidate median. The removed shares are 1 - 1/ideal ratio.", ""]
    rows = []
    for r in report.comparisons:
        ideal = r.ideal or {}
        rows.append([r.candidate, _pct(_removed(ideal.get("prefill_speedup_flops"))),
                     _pct(_removed(ideal.get("decode_speedup_flops"))),
                     _pct(_removed(ideal.get("decode_speedup_weight_bytes"))),
                     _f(r.decode_speedup), _f(ideal.get("decode_speedup_flops")),
                     _f(ideal.get("decode_speedup_weight_bytes")), _f(r.ttft_speedup),
                     _f(ideal.get("prefill_speedup_flops")), _f(r.e2e_speedup), _f(r.throughput_speedup),
                     _f(r.size_ratio), _f(r.weight_bytes_ratio)])
    out.append(_table(["candidate", "prefill FLOPs removed", "decode FLOPs removed", "weight bytes/token removed",
                       "decode (measured)", "decode (ideal, FLOPs)", "decode (ideal, bytes)",
                       "TTFT (measured)", "prefill (ideal, FLOPs)", "e2e", "throughput (largest batch)",
                       "parameters dense/cand", "weights stored dense/cand"], rows))
    return out


def _memory_section(report: BenchReport) -> list[str]:
    out = ["", "## Memory and size", ""]
    rows = []
    for m in report.models:
        p, mem, size, weights = m.parameters, m.memory or {}, m.size, m.weights
        rows.append([m.label, _f(p.counts["total"] / 1e6, 2) if p else "n/a", weights.format if weights else "n/a",
                     _mb(weights.stored_bytes if weights else None), _mb(weights.bytes_per_token if weights else None),
                     _mb(size.artifact_bytes if size else None),
                     _f(mem.get("peak_rss_mb"), 0), _f(mem.get("model_rss_mb"), 0), _f(mem.get("gpu_peak_allocated_mb"), 0)])
    # MiB (2**20 bytes) throughout: what bench/memory.py measures (its *_mb fields are MiB, named before this note)
    out.append(_table(["model", "parameters (M)", "weights", "weights stored (MiB)", "weights read per token (MiB)",
                       "artifact (MiB)", "peak RSS (MiB)", "model RSS (MiB)", "GPU peak (MiB)"], rows))
    out += ["", "Peak RSS: a fresh process per model opens it on the runtime and generates once; the peak is the larger "
            "of the process's own high-water mark (VmHWM) and its process tree's RSS sampled every 20 ms. "
            "Model RSS is that peak minus the process's RSS after importing the runtime, before loading the model."]
    return out


def _accuracy_section(report: BenchReport) -> list[str]:
    config, models = report.config, report.models
    tasks = list(next((m.tasks for m in models if m.tasks), {}))
    out = ["", "## Accuracy", ""]
    header = ["model", "WikiText-2 PPL"] + tasks + (["mean accuracy"] if tasks else [])
    rows = []
    for m in models:
        ppl = m.perplexity
        row = [m.label, "n/a" if not ppl else _f(ppl.perplexity, 2) + (" (2nd halves)" if ppl.scope == "second_half" else "")]
        present = [m.tasks[t] for t in tasks if t in m.tasks]
        row += [_accuracy(m.tasks[t]) if t in m.tasks else "n/a" for t in tasks]
        if tasks:
            mean, stderr = metrics.combined_mean([t.accuracy for t in present], [_stderr(t) for t in present])
            row.append(f"{_pm(mean, stderr)} ({sum(t.n for t in present)})" if present else "n/a")
        rows.append(row)
    dense_tasks = models[0].tasks
    if tasks:
        chance = [dense_tasks[t].chance for t in tasks]
        rows.append(["*chance*", ""] + [_f(c, 3) for c in chance] + [_f(sum(chance) / len(chance), 3)])
    out.append(_table(header, rows))
    data = report.data
    out += ["", f"Perplexity over the first {data['ppl_windows']} windows of {config['ppl_seqlen']} tokens of "
            f"WikiText-2 test; multiple choice on up to {config['mc_limit']} examples per task (seeded subset, seed "
            f"{config['seed']}): " + ", ".join(f"{t['name']} ({min(t['examples'], config['mc_limit'] or t['examples'])}"
                                               f" of {t['examples']})" for t in data["tasks"])
            + ". Each accuracy is `acc ± SE (items)`, SE = sqrt(p (1 - p) / (n - 1)) over the items (lm-eval's "
              "stderr); the mean's SE combines the tasks' as independent, sqrt(sum SE^2) / tasks."]
    excluded = report.comparisons[0].excluded_tasks if report.comparisons else {}
    if excluded:
        out.append("Left out of OP, OG and the mean accuracy drop because the dense model is not above chance there "
                   "(a ratio of two at-chance accuracies is noise): "
                   + "; ".join(f"{name}: {why}" for name, why in excluded.items()) + ".")
    return out + _paired_section(report)


def _paired_section(report: BenchReport) -> list[str]:
    """Per candidate and task: dense and candidate on the same items, the drop with its paired SE, McNemar's
    discordant counts, within noise or not; the suite mean over competent tasks last (what max_accuracy_drop reads)."""
    if not any(r.task_accuracy for r in report.comparisons):
        return []
    out = ["", "## Candidate against dense on the same items", "",
           f"Drop = dense - candidate accuracy on the same items; ± is the paired SE (SE of the per-item difference "
           f"dense_i - candidate_i, 1/0/-1); *within noise*: |drop| <= {metrics.NOISE_Z:g} paired SE. The suite row is "
           "the mean over the tasks where dense is above chance (the `max_accuracy_drop` value), its SE the tasks' "
           "paired SEs combined as independent.", ""]
    rows = []
    for r in report.comparisons:
        entries = list(r.task_accuracy.items())
        if r.suite_accuracy is not None:
            entries.append(("**suite mean (competent tasks)**", r.suite_accuracy))
        for name, p in entries:
            suite = p is r.suite_accuracy
            rows.append([r.candidate, name, p.n, _pm(p.dense, p.dense_stderr), _pm(p.candidate, p.candidate_stderr),
                         _pm(p.drop, p.drop_stderr), "n/a" if p.dense_only is None else p.dense_only,
                         "n/a" if p.candidate_only is None else p.candidate_only, _noise_note(p.within_noise),
                         ", ".join(p.tasks) if suite else ("yes" if p.competent else "no (dense at chance)")])
    out.append(_table(["candidate", "task", "items", "dense", "candidate", "drop ± paired SE",
                       "dense right, cand wrong", "cand right, dense wrong", "noise", "in suite mean"], rows))
    return out


def _effivlm_section(report: BenchReport) -> list[str]:
    out = ["", "## EffiVLM-Bench metrics", "",
           "OP = sqrt(mean of squared score ratios to dense) over the tasks and WikiText-2 (score 1/PPL); OG = std/mean x "
           "100 of those ratios; OL = share of predictions identical to dense (next-token argmax over the perplexity "
           "windows and chosen options, pooled); OE = TTFT and decode speedups. OL's ± is its SE over independent "
           "units, the perplexity window for tokens (positions of one window share its context) and the item for "
           "choices, with the units counted in brackets.", ""]
    out.append(_table(["candidate", "OP", "OG (%)", "OL", "OL tokens", "OL choices", "OE TTFT", "OE decode",
                       "greedy tokens = dense"],
                      [[r.candidate, _f(r.op, 3), _f(r.og, 1), _loyalty_cell(r, None),
                        _loyalty_cell(r, "tokens"), _loyalty_cell(r, "choices"),
                        _f(r.ttft_speedup), _f(r.decode_speedup), _f(r.generation_match, 3)]
                       for r in report.comparisons]))
    return out


def _fidelity_section(report: BenchReport) -> list[str]:
    """KL and top-k agreement to dense measured on the runtime's artifacts, beside tune's screen predictions."""
    measured = [r for r in report.comparisons if r.kl_divergence is not None]
    skipped = [r.candidate for r in report.comparisons if r.kl_divergence is None]
    if not measured:
        return []
    predicted = any(r.kl_divergence_predicted is not None for r in report.comparisons)
    k, m = measured[0].fidelity_top_k, measured[0].fidelity_kl_support
    out = ["", "## Next-token fidelity (measured on the runtime)", "",
           f"Each candidate's next-token distributions against dense's at the same positions, both from the "
           f"{report.runtime.get('runtime')} runtime's artifacts: KL(dense || candidate) on dense's top-{m} tokens "
           f"plus one tail bucket of the remaining mass (a lower bound of the full-vocabulary KL, close to it when the "
           f"top-{m} hold most of the mass), the overlap of the two top-{k} sets, and top-1 agreement (OL's token "
           "part). ± is the SE over windows. Text: " + (measured[0].fidelity_source or "n/a") + "."
           + (" Predicted (screen): effideploy tune's PyTorch screen on other WikiText-2 test windows (drawn after "
              "these), fake-quantized weights where the recipe quantizes." if predicted else ""), ""]
    header = ["candidate", "KL (nats)", f"top-{k} agreement", "top-1 agreement", "positions"]
    if predicted:
        header += ["KL predicted (screen)", f"top-{k} predicted (screen)"]
    rows = []
    for r in measured:
        row = [r.candidate, _pm(r.kl_divergence, r.kl_divergence_stderr, 4),
               _pm(r.top_k_agreement, r.top_k_agreement_stderr), _f(r.top1_agreement, 3), str(r.fidelity_positions)]
        if predicted:
            row += [_f(r.kl_divergence_predicted, 4), _f(r.top_k_agreement_predicted, 3)]
        rows.append(row)
    out.append(_table(header, rows))
    if skipped:
        out += ["", "Not measured (compressed context, scored on second halves only): " + ", ".join(skipped) + "."]
    return out


def _loyalty_cell(record, part: str | None) -> str:
    """OL (pooled, or its ``tokens`` / ``choices`` part) as ``value ± SE (units)``."""
    units = getattr(record, "loyalty_units", None) or {}
    names = {"tokens": "windows", "choices": "items"}
    if part is None:
        value, stderr = record.loyalty, record.loyalty_stderr
        count = " + ".join(f"{units[k]} {names[k]}" for k in names if k in units)
    else:
        value, stderr = getattr(record, f"loyalty_{part}"), getattr(record, f"loyalty_{part}_stderr")
        count = f"{units[part]} {names[part]}" if part in units else ""
    return _pm(value, stderr) + (f" ({count})" if count and value is not None else "")


def _one_line(text: str, limit: int = 320) -> str:
    text = text.strip().replace("\n", " ↵ ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _chat_section(report: BenchReport) -> list[str]:
    """Chat fidelity (--chat-prompts): each model's greedy chat responses against dense's, and per candidate the
    pair of responses that differ most."""
    dense = report.dense
    if dense.chat is None:
        return []
    chat, by_label = dense.chat, {m.label: m for m in report.models}
    out = ["", f"## Chat (greedy responses through the chat template: {chat.n} prompt(s), at most "
           f"{chat.max_new_tokens} new tokens)", "",
           "Each prompt of the packaged chat set is one user turn rendered by the model's own chat template; every "
           "model answers greedily on this runtime and each candidate's response is compared with dense's: exact "
           "match (share of identical responses), token F1 (bag-of-tokens overlap) and ROUGE-L (longest common "
           "subsequence F-measure), means over prompts. Dense log-lik is the dense model's mean per-token "
           "log-likelihood of a model's responses (its stop token included when one was generated); the drop is "
           "dense's own minus the candidate's: near 0, the candidate says what dense finds likely.", ""]
    rows = [[dense.label, "1.000", "1.000", "1.000", _f(chat.mean_loglik, 3), "0.000", _f(chat.mean_tokens, 1),
             _pct(chat.stopped_share)]]
    for r in report.comparisons:
        model = by_label.get(r.candidate)
        if r.chat_prompts is None or model is None or model.chat is None:
            rows.append([r.candidate] + ["n/a"] * 7)
            continue
        rows.append([r.candidate, _f(r.chat_exact_match, 3), _f(r.chat_token_f1, 3), _f(r.chat_rouge_l, 3),
                     _f(r.chat_loglik, 3), _f(r.chat_loglik_drop, 3), _f(model.chat.mean_tokens, 1),
                     _pct(model.chat.stopped_share)])
    out.append(_table(["model", "exact match", "token F1", "ROUGE-L", "dense log-lik / token", "drop vs dense's own",
                       "response tokens (mean)", "stopped at EOS"], rows))
    for r in report.comparisons:
        model = by_label.get(r.candidate)
        if not r.chat_items or model is None or model.chat is None:
            continue
        worst = min(r.chat_items, key=lambda item: item["rouge_l"])
        i = worst["prompt"]
        if worst["exact_match"] == 1.0:
            out += ["", f"**{r.candidate}**: every response identical to dense's."]
            continue
        out += ["", f"**{r.candidate}**, the response least like dense's (prompt {i + 1}, ROUGE-L "
                f"{_f(worst['rouge_l'], 3)}): *{_one_line(chat.prompts[i])}*", "",
                f"> dense: {_one_line(chat.texts[i])}", ">",
                f"> {r.candidate}: {_one_line(model.chat.texts[i])}"]
    return out


def _pareto_section(report: BenchReport) -> list[str]:
    out = ["", "## Pareto front (quality against speedup; * = non-dominated)", ""]
    fronts = report.pareto
    rows = []
    for index, model in enumerate(p.model for p in fronts["op"]["decode_speedup"]):
        row = [model]
        for by_axis in fronts.values():
            row.append(_f(by_axis["decode_speedup"][index].quality, 3))
            row += [_f(by_axis[axis][index].speedup) + (" *" if by_axis[axis][index].non_dominated else "")
                    for axis in by_axis]
        rows.append(row)
    header = ["model"]
    for quality, by_axis in fronts.items():
        header += [QUALITY_NAMES[quality]] + [f"{axis.split('_')[0]} ({quality.split('_')[0]} front)" for axis in by_axis]
    out.append(_table(header, rows))
    return out


def _policy_section(report: BenchReport) -> list[str]:
    if not report.policy:
        return []
    policy = report.policy
    out = ["", f"## Policy: {policy['name']} ({policy.get('path') or 'inline'})", ""]
    out.append(_table(["candidate", "threshold", "limit", "value", "result"],
                      [[c["candidate"], c["threshold"], _f(c["limit"], 3), _pm(c["value"], c.get("stderr")),
                        ("pass" if c["passed"] else "**FAIL**") + _check_noise(c)] for c in policy["checks"]]))
    scopes = {c["scope"] for c in policy["checks"] if c.get("scope")}
    if scopes:
        out += ["", "max_accuracy_drop is the suite's mean over the tasks where dense is above chance: "
                + "; ".join(sorted(scopes)) + "."]
    out += ["", "Candidates: " + ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in policy["candidates"].items())
            + f"; overall **{'PASS' if policy['passed'] else 'FAIL'}** (require {policy['require']})."]
    return out


def _check_noise(check: dict) -> str:
    """What the SE says about a check (the verdict itself uses the value): a drop within noise of none, a value
    within noise of its limit."""
    notes = []
    if check.get("within_noise") is not None:
        notes.append("difference within noise" if check["within_noise"] else "difference beyond noise")
    if check.get("near_limit"):
        notes.append("within noise of the limit")
    return f" ({'; '.join(notes)})" if notes else ""


def _load_reading(env: dict) -> str:
    """What the 1-minute load average says about the timings (the run's own threads count in it)."""
    loads = [v[0] for v in (env.get("load_average_start"), env.get("load_average_end")) if v]
    if loads and max(loads) > env["cpu_count"]:
        return ("above the core count, other processes competed for the CPU and absolute timings are inflated and "
                "noisy; the interleaved ratios are the numbers to read.")
    if loads:
        return ("within the core count (this run's own threads included), so little else competed for the CPU; "
                "the interleaved ratios are still the numbers to read.")
    return "not readable here; the interleaved ratios are the numbers to read."


def _method_section(report: BenchReport) -> list[str]:
    env, runtime = report.environment, report.runtime
    out = ["", "## How this was measured", "",
           f"- Runtime: {runtime} with options {report.runtime_options}.",
           "- Warm-up first; then the timed repeats run round-robin over the models with the order rotated each "
           "round, so load from other processes falls on all models alike. TTFT is the prefill of one prompt; TPOT "
           "each later token; end-to-end the sum per request. Speedups compare medians.",
           f"- The machine's load average was {env.get('load_average_start')} at start and "
           f"{env.get('load_average_end')} at the end (on {env['cpu_count']} cores): {_load_reading(env)}",
           "- Percentiles interpolate linearly between samples; with few samples p99 is close to the maximum."]
    if report.phase_seconds:
        out.append("- Wall time of the bench by phase: "
                   + ", ".join(f"{k} {v:.0f} s" for k, v in report.phase_seconds.items()) + ".")
    out += [f"- {note}" for note in report.notes]
    if report.plots:
        out += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report.plots]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    out += ["", "## Environment", "", f"effideploy {env['effideploy']}, Python {env['python']}, {env['platform']}; "
            f"{versions}; {env['memory_gb']} GB RAM.", ""]
    return out
