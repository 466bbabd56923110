"""A candidate against the dense model measured in the same run: ``Comparison``, the typed record the policy and the
report read by attribute, and the Pareto fronts of quality against speed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from effideploy.bench import metrics
from effideploy.bench.config import DENSE_LABEL, BenchConfig
from effideploy.bench.results import ModelResult
from effideploy.errors import EffideployError
from effideploy.eval.perplexity import second_half_start


@dataclass
class PairedAccuracy:
    """Candidate against dense on the same items of one task (or of the suite: the mean over competent tasks).

    Accuracies carry the binomial SE over their items (``metrics.binomial_stderr``). ``drop`` = dense - candidate;
    ``drop_stderr`` is the SE of the per-item differences (paired: both models answered the same items), with
    McNemar's discordant counts; ``within_noise``: |drop| <= ``metrics.NOISE_Z`` x ``drop_stderr``. The paired
    fields are None where a model's per-item outcomes are not known. For the suite every figure is the plain mean
    of the per-task figures (as ``accuracy_drop``, which the policy gates, is) with the per-task SEs combined as
    independent (the tasks' items are disjoint), ``n`` and the counts summed, ``tasks`` naming the tasks."""

    n: int
    dense: float
    candidate: float
    dense_stderr: float
    candidate_stderr: float
    drop: float
    drop_stderr: float | None = None
    dense_only: int | None = None  # items dense answered right and the candidate wrong
    candidate_only: int | None = None  # the reverse
    within_noise: bool | None = None
    metric: str = "acc"
    competent: bool = True  # dense above chance: the task counts in the suite mean, OP and OG
    tasks: list[str] = field(default_factory=list)  # the suite's tasks


@dataclass
class Comparison:
    """Every ratio of one candidate to the dense model (EffiVLM-Bench's OP/OG/OL/OE among them). A metric that was
    not measured is None; the policy fails a threshold on a None."""

    candidate: str
    kind: str
    # accuracy
    perplexity: float | None = None
    perplexity_dense: float | None = None
    perplexity_scope: str | None = None
    perplexity_increase: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # candidate / dense score per benchmark
    excluded_tasks: dict[str, str] = field(default_factory=dict)  # tasks left out of OP/OG/accuracy: dense at chance
    op: float = float("nan")
    og: float = float("nan")
    accuracy_mean: float | None = None
    accuracy_mean_dense: float | None = None
    accuracy_drop: float | None = None
    loyalty: float = float("nan")
    loyalty_tokens: float | None = None
    loyalty_choices: float | None = None
    loyalty_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # uncertainty (docs/accuracy.md, "Uncertainty"): per task and for the suite mean over competent tasks, dense and
    # candidate on the same items; accuracy_drop_* are the suite's, for the policy
    task_accuracy: dict[str, PairedAccuracy] = field(default_factory=dict)
    suite_accuracy: PairedAccuracy | None = None
    accuracy_drop_stderr: float | None = None
    accuracy_drop_within_noise: bool | None = None
    # loyalty's SE over independent units: perplexity windows for tokens, items for choices (metrics.share_stderr)
    loyalty_stderr: float | None = None
    loyalty_tokens_stderr: float | None = None
    loyalty_choices_stderr: float | None = None
    loyalty_units: dict[str, int] = field(default_factory=dict)  # {"tokens": windows, "choices": items}
    # next-token distributions against dense, measured on the runtime's artifacts over the perplexity windows
    # (bench/fidelity.py: KL on dense's top-20 support plus a tail bucket, top-5 and top-1 agreement; SEs over
    # windows); None for a compressed candidate (scored on second halves) or without perplexity windows.
    # effideploy tune's PyTorch screen predicts the same quantities; its values stay in the search record.
    kl_divergence: float | None = None
    kl_divergence_stderr: float | None = None
    top_k_agreement: float | None = None
    top_k_agreement_stderr: float | None = None
    top1_agreement: float | None = None  # the same positions' argmax agreement as loyalty_tokens
    fidelity_top_k: int | None = None
    fidelity_kl_support: int | None = None  # dense's top-m ids the KL is estimated on (plus one tail bucket)
    fidelity_positions: int | None = None
    fidelity_source: str | None = None  # which artifact and text: "onnx runtime artifact, WikiText-2 test windows 1..8 ..."
    # effideploy tune's prediction of the two from its PyTorch screen (other windows of WikiText-2 test, drawn after
    # the perplexity windows); None in a plain bench. The policy reads the measured fields above.
    kl_divergence_predicted: float | None = None
    top_k_agreement_predicted: float | None = None
    # chat fidelity (--chat-prompts; effideploy.eval.chat): greedy responses through the chat template against dense's
    chat_prompts: int | None = None
    chat_exact_match: float | None = None
    chat_token_f1: float | None = None
    chat_rouge_l: float | None = None
    chat_loglik: float | None = None  # dense's mean per-token log-likelihood of the candidate's responses
    chat_loglik_dense: float | None = None  # ... of dense's own responses
    chat_loglik_drop: float | None = None  # chat_loglik_dense - chat_loglik, nats per token
    chat_items: list[dict] = field(default_factory=list)  # per prompt: exact_match, token_f1, rouge_l, loglik(s)
    # speed
    ttft_speedup: float = float("nan")
    decode_speedup: float = float("nan")
    e2e_speedup: float = float("nan")
    p99_latency_ms: float = float("nan")
    p99_tpot_ms: float = float("nan")
    generation_match: float = float("nan")
    throughput_speedups: dict[str, float] = field(default_factory=dict)
    throughput_speedup: float | None = None
    # memory and size
    peak_memory_mb: float | None = None
    peak_memory_ratio: float | None = None
    model_memory_ratio: float | None = None
    size_ratio: float | None = None
    size_reduction: float | None = None
    parameters_removed: int | None = None
    ideal: dict | None = None  # metrics.ideal_ratios: what the removed FLOPs and weight bytes alone predict
    weight_bytes_ratio: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def accuracy_scope(self) -> str:
        """What ``accuracy_drop`` (the policy's ``max_accuracy_drop``) is the mean over, in words."""
        suite = self.suite_accuracy
        left = f"; left out (dense not above chance): {', '.join(self.excluded_tasks)}" if self.excluded_tasks else ""
        if suite is None:
            return "no multiple-choice task where dense is above chance" + left
        return f"mean over {len(suite.tasks)} competent task(s) ({', '.join(suite.tasks)}; {suite.n} items){left}"


def compare(dense: ModelResult, candidate: ModelResult, config: BenchConfig) -> Comparison:
    record = Comparison(candidate=candidate.label, kind=candidate.kind)
    _accuracy(record, dense, candidate)
    _loyalty(record, dense, candidate)
    _speed(record, dense, candidate)
    _size(record, dense, candidate, config)
    _chat(record, dense, candidate)
    _fidelity(record, candidate)
    return record


def _fidelity(record: Comparison, candidate: ModelResult) -> None:
    """KL and top-k agreement to dense, measured where the perplexity windows were scored (bench/quality.py)."""
    fidelity = candidate.fidelity
    if fidelity is None:
        return
    record.kl_divergence, record.kl_divergence_stderr = fidelity.kl, fidelity.kl_stderr
    record.top_k_agreement, record.top_k_agreement_stderr = fidelity.top_k_agreement, fidelity.top_k_agreement_stderr
    record.top1_agreement, record.fidelity_top_k = fidelity.top1_agreement, fidelity.k
    record.fidelity_kl_support = fidelity.kl_support
    record.fidelity_positions, record.fidelity_source = fidelity.positions, fidelity.source


def _accuracy(record: Comparison, dense: ModelResult, candidate: ModelResult) -> None:
    """Perplexity on the same positions, per-task accuracy, and OP / OG over both."""
    ppl = candidate.perplexity
    if ppl is not None and dense.perplexity is not None:
        dense_ppl = dense.perplexity.perplexity
        if ppl.scope == "second_half":
            dense_ppl = dense.perplexity.perplexity_from(second_half_start(dense.perplexity.seqlen))
        record.perplexity, record.perplexity_dense, record.perplexity_scope = ppl.perplexity, dense_ppl, ppl.scope
        record.perplexity_increase = ppl.perplexity / dense_ppl - 1.0
    # Only tasks the dense model is competent on measure what a candidate lost; the others are named in the report.
    record.excluded_tasks = metrics.at_chance_tasks({name: (task.accuracy, task.chance, task.n)
                                                     for name, task in dense.tasks.items()})
    dense_scores = {name: task.accuracy for name, task in dense.tasks.items() if name not in record.excluded_tasks}
    candidate_scores = {name: task.accuracy for name, task in candidate.tasks.items()
                        if name not in record.excluded_tasks}
    if record.perplexity is not None:  # lower is better: 1 / perplexity makes the ratio dense_ppl / candidate_ppl
        dense_scores["wikitext2"], candidate_scores["wikitext2"] = 1 / record.perplexity_dense, 1 / record.perplexity
    record.ratios = metrics.ratios(candidate_scores, dense_scores)
    record.op = metrics.overall_performance(list(record.ratios.values()))
    record.og = metrics.generalization_gap(list(record.ratios.values()))
    names = [name for name in dense_scores if name in candidate_scores and name != "wikitext2"]
    if names:
        record.accuracy_mean = sum(candidate_scores[n] for n in names) / len(names)
        record.accuracy_mean_dense = sum(dense_scores[n] for n in names) / len(names)
        record.accuracy_drop = record.accuracy_mean_dense - record.accuracy_mean
    _paired_accuracy(record, dense, candidate, names)


def paired_task(dense_task, candidate_task, competent: bool = True) -> PairedAccuracy:
    """One task's :class:`PairedAccuracy` from the scorer's two results. Both models are scored on the same seeded
    subset (``select_examples`` with the run's limit and seed); a result scored on other items is refused, since a
    paired difference over different items is meaningless."""
    if dense_task.indices != candidate_task.indices:
        raise EffideployError(f"task {dense_task.name}: dense and candidate were scored on different items "
                              f"({len(dense_task.indices)} and {len(candidate_task.indices)})")
    n = dense_task.n
    out = PairedAccuracy(n=n, dense=dense_task.accuracy, candidate=candidate_task.accuracy,
                         dense_stderr=metrics.binomial_stderr(dense_task.accuracy, n),
                         candidate_stderr=metrics.binomial_stderr(candidate_task.accuracy, candidate_task.n),
                         drop=dense_task.accuracy - candidate_task.accuracy, metric=dense_task.metric,
                         competent=competent)
    if dense_task.correct and len(dense_task.correct) == n and len(candidate_task.correct) == n:
        paired = metrics.paired_difference(dense_task.correct, candidate_task.correct)
        out.drop_stderr = paired["stderr"]  # drop stays dense - candidate accuracy: the same number as the mean d_i
        out.dense_only, out.candidate_only = paired["dense_only"], paired["candidate_only"]
        out.within_noise = metrics.within_noise(out.drop, out.drop_stderr)
    return out


def _paired_accuracy(record: Comparison, dense: ModelResult, candidate: ModelResult, suite: list[str]) -> None:
    """Every task of both models, paired; the suite (``suite``: the competent tasks, the names ``accuracy_drop``
    averages) as the mean of per-task differences with the per-task SEs combined (not pooled items: the policy
    gates the unweighted mean over tasks, and this is that mean's SE)."""
    record.task_accuracy = {name: paired_task(dense.tasks[name], candidate.tasks[name],
                                              competent=name not in record.excluded_tasks)
                            for name in dense.tasks if name in candidate.tasks}
    if not suite:
        return
    parts = [record.task_accuracy[name] for name in suite]
    mean = metrics.combined_mean
    dense_mean, dense_se = mean([p.dense for p in parts], [p.dense_stderr for p in parts])
    cand_mean, cand_se = mean([p.candidate for p in parts], [p.candidate_stderr for p in parts])
    summary = PairedAccuracy(n=sum(p.n for p in parts), dense=dense_mean, candidate=cand_mean, dense_stderr=dense_se,
                             candidate_stderr=cand_se, drop=record.accuracy_drop,
                             metric="/".join(sorted({p.metric for p in parts})), tasks=list(suite))
    if all(p.drop_stderr is not None for p in parts):
        _, summary.drop_stderr = mean([p.drop for p in parts], [p.drop_stderr for p in parts])
        summary.dense_only = sum(p.dense_only for p in parts)
        summary.candidate_only = sum(p.candidate_only for p in parts)
        summary.within_noise = metrics.within_noise(summary.drop, summary.drop_stderr)
    record.suite_accuracy = summary
    record.accuracy_drop_stderr, record.accuracy_drop_within_noise = summary.drop_stderr, summary.within_noise


def _loyalty(record: Comparison, dense: ModelResult, candidate: ModelResult) -> None:
    """OL: next-token argmax on the same positions, and the chosen options."""
    pairs = {}
    ppl = candidate.perplexity
    if ppl is not None and dense.perplexity is not None:
        offset = second_half_start(dense.perplexity.seqlen) if ppl.scope == "second_half" else 0
        dense_tokens = [t for row in dense.perplexity.predictions for t in row[offset:]]
        candidate_tokens = [t for row in ppl.predictions for t in row]
        pairs["tokens"] = metrics.agreement(dense_tokens, candidate_tokens)
    names = [name for name in dense.tasks if name in candidate.tasks]
    if names:
        pairs["choices"] = metrics.agreement([x for n in names for x in dense.tasks[n].chosen],
                                             [x for n in names for x in candidate.tasks[n].chosen])
    record.loyalty = metrics.loyalty(*pairs.values()) if pairs else float("nan")
    record.loyalty_tokens = metrics.loyalty(pairs["tokens"]) if "tokens" in pairs else None
    record.loyalty_choices = metrics.loyalty(pairs["choices"]) if "choices" in pairs else None
    record.loyalty_counts = {k: {"identical": v[0], "total": v[1]} for k, v in pairs.items()}
    # The SE's unit: a perplexity window for tokens (the argmax at neighbouring positions of one text shares its
    # context, so positions are not independent and a per-token SE would be far too small), an item for choices
    # (items are independent draws). Pooled OL's SE treats windows and items alike as units.
    units = {}
    if "tokens" in pairs:
        units["tokens"] = [metrics.agreement(list(d[offset:]), list(c))
                           for d, c in zip(dense.perplexity.predictions, ppl.predictions)]
    if "choices" in pairs:
        units["choices"] = [(int(a == b), 1) for n in names
                            for a, b in zip(dense.tasks[n].chosen, candidate.tasks[n].chosen)]
    record.loyalty_units = {k: len(v) for k, v in units.items()}
    record.loyalty_stderr = metrics.share_stderr([u for v in units.values() for u in v]) if units else None
    record.loyalty_tokens_stderr = metrics.share_stderr(units["tokens"]) if "tokens" in units else None
    record.loyalty_choices_stderr = metrics.share_stderr(units["choices"]) if "choices" in units else None


def _speed(record: Comparison, dense: ModelResult, candidate: ModelResult) -> None:
    d, c = dense.latency, candidate.latency
    efficiency = metrics.efficiency(d.p50("ttft_s"), c.p50("ttft_s"), d.p50("tpot_s"), c.p50("tpot_s"))
    record.ttft_speedup, record.decode_speedup = efficiency["ttft_speedup"], efficiency["decode_speedup"]
    record.e2e_speedup = metrics.speedup(d.p50("e2e_s"), c.p50("e2e_s"))
    record.p99_latency_ms = metrics.percentile(c.e2e_s, 99) * 1000
    record.p99_tpot_ms = metrics.percentile(c.tpot_s, 99) * 1000
    record.generation_match = generation_match(d.tokens or [], c.tokens or [])
    shared = [b for b in candidate.throughput if b in dense.throughput]
    record.throughput_speedups = {b: metrics.percentile(candidate.throughput[b], 50)
                                  / metrics.percentile(dense.throughput[b], 50) for b in shared}
    record.throughput_speedup = record.throughput_speedups[max(shared, key=int)] if shared else None


def _size(record: Comparison, dense: ModelResult, candidate: ModelResult, config: BenchConfig) -> None:
    if candidate.memory and dense.memory:
        record.peak_memory_mb = candidate.memory["peak_rss_mb"]
        record.peak_memory_ratio = candidate.memory["peak_rss_mb"] / dense.memory["peak_rss_mb"]
        record.model_memory_ratio = candidate.memory["model_rss_mb"] / dense.memory["model_rss_mb"]
    dp, cp = dense.parameters, candidate.parameters
    dw, cw = dense.weights, candidate.weights
    if dp and cp:
        record.size_ratio = dp.counts["total"] / cp.counts["total"]
        record.size_reduction = 1.0 - cp.counts["total"] / dp.counts["total"]
        record.parameters_removed = dp.counts["total"] - cp.counts["total"]
        kept = (candidate.kv_cache or {}).get("kept_mean")
        record.ideal = metrics.ideal_ratios(dp.counts, cp.counts, dp.attention_width, config.prompt_tokens,
                                            config.new_tokens, candidate_cached_prompt=kept,
                                            dense_bytes_per_token=dw.bytes_per_token if dw else None,
                                            candidate_bytes_per_token=cw.bytes_per_token if cw else None)
    if dw and cw:  # what is stored: pruning and quantization both count
        record.weight_bytes_ratio = dw.stored_bytes / cw.stored_bytes
        record.size_reduction = 1.0 - cw.stored_bytes / dw.stored_bytes


def _chat(record: Comparison, dense: ModelResult, candidate: ModelResult) -> None:
    """Chat fidelity: the candidate's greedy chat responses against dense's on the same rendered prompts."""
    if dense.chat is None or candidate.chat is None:
        return
    from effideploy.eval.chat import compare_responses

    fidelity = compare_responses(dense.chat, candidate.chat)
    record.chat_prompts, record.chat_exact_match = fidelity.n, fidelity.exact_match
    record.chat_token_f1, record.chat_rouge_l = fidelity.token_f1, fidelity.rouge_l
    record.chat_loglik, record.chat_loglik_dense = fidelity.loglik, fidelity.loglik_dense
    record.chat_loglik_drop, record.chat_items = fidelity.loglik_drop, fidelity.items


def generation_match(dense: list[list[int]], candidate: list[list[int]]) -> float:
    """Share of greedily generated tokens equal to the dense model's, position by position."""
    pairs = [(a, b) for x, y in zip(dense, candidate) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


QUALITIES = {"op": "OP", "perplexity_ratio": "dense PPL / candidate PPL"}
SPEEDUPS = ("decode_speedup", "ttft_speedup", "throughput_speedup")


@dataclass
class ParetoPoint:
    model: str
    speedup: float
    quality: float
    non_dominated: bool


def pareto(comparisons: list[Comparison]) -> dict[str, dict[str, list[ParetoPoint]]]:
    """Non-dominated models (the dense one at quality 1, speedup 1 included) of each quality against each speedup:
    OP as EffiVLM-Bench defines it, and the WikiText-2 perplexity ratio alone (which still separates models where
    small-sample task accuracies are noise)."""
    fronts = {}
    for quality in QUALITIES:
        fronts[quality] = {}
        for axis in SPEEDUPS:
            points = [(DENSE_LABEL, 1.0, 1.0)]
            for record in comparisons:
                score = record.op if quality == "op" else record.ratios.get("wikitext2", float("nan"))
                speed = getattr(record, axis)
                points.append((record.candidate, float("nan") if speed is None else speed, score))
            flags = metrics.pareto_front([(x, y) for _, x, y in points])
            fronts[quality][axis] = [ParetoPoint(name, x, y, flag) for (name, x, y), flag in zip(points, flags)]
    return fronts

