"""The arithmetic of a sign-off, as pure functions over plain numbers (tested on hand-made inputs).

EffiVLM-Bench's metrics of a candidate against its dense baseline:

- OP (overall performance) = sqrt(mean_b (score_b / dense_score_b)^2) over benchmarks b (higher-is-better scores).
- OG (generalization gap) = coefficient of variation of those per-benchmark ratios, std / mean x 100 (population
  std): how unevenly the loss is spread over tasks.
- OL (loyalty) = share of the candidate's predictions identical to the dense model's.
- OE (efficiency) = TTFT speedup and decode (TPOT) speedup, dense time / candidate time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from effideploy.errors import EffideployError

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: Sequence[float]) -> dict:
    """n, mean, std (population) and the p50/p90/p99 of a list of timings."""
    samples = [float(s) for s in samples]
    n = len(samples)
    mean = sum(samples) / n if n else float("nan")
    std = math.sqrt(sum((s - mean) ** 2 for s in samples) / n) if n else float("nan")
    summary = {"n": n, "mean": mean, "std": std, "min": min(samples, default=float("nan")),
               "max": max(samples, default=float("nan"))}
    summary.update({f"p{q}": percentile(samples, q) for q in PERCENTILES})
    return summary


def ratios(candidate: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """candidate / dense per benchmark present in both; a benchmark where the dense score is 0 has no ratio."""
    return {name: candidate[name] / dense[name] for name in dense if name in candidate and dense[name] > 0}


# A task counts in OP/OG only where the dense model is above chance by this many standard errors (of chance
# accuracy over the items used): a ratio of two at-chance accuracies is noise, and OP > 1 for a damaged model.
ABOVE_CHANCE_Z = 2.0


def chance_z(accuracy: float, chance: float, n: int) -> float:
    """(accuracy - chance) / SE, the SE of a uniform random pick's accuracy over ``n`` items; NaN when unknown."""
    if n <= 0 or not (0.0 < chance < 1.0) or math.isnan(accuracy):
        return float("nan")
    return (accuracy - chance) / math.sqrt(chance * (1.0 - chance) / n)


def at_chance_tasks(dense: dict[str, tuple[float, float, int]], z: float = ABOVE_CHANCE_Z) -> dict[str, str]:
    """{task: why} for the tasks (name -> dense accuracy, chance, items) where the dense model is not above chance
    by ``z`` standard errors; a task whose chance level is unknown is kept (nothing says it is at chance)."""
    excluded = {}
    for name, (accuracy, chance, n) in dense.items():
        score = chance_z(accuracy, chance, n)
        if not math.isnan(score) and score < z:
            excluded[name] = (f"dense accuracy {accuracy:.3f} vs chance {chance:.3f} over {n} items "
                              f"({score:+.1f} SE < {z:g})")
    return excluded


# ------------------------------------------------------------------------------------------------ uncertainty
# Every standard error here is the sample standard deviation of the per-unit values over sqrt(units), lm-eval's
# convention (``eval.multiple_choice.mean_stderr``): for 0/1 outcomes sqrt(p (1 - p) / (n - 1)), the binomial SE
# with Bessel's correction, so an accuracy's SE equals the stderr lm-eval prints for the same items. NaN below 2
# units: one item says nothing about its spread.

# A candidate-minus-dense difference is "within noise" when |difference| <= NOISE_Z x its standard error (about a
# 95% interval that includes no difference). A zero difference with a zero SE (the same answer on every item) is
# within noise; a nonzero one with a zero SE (e.g. the candidate lost every item) is not.
NOISE_Z = 2.0


def binomial_stderr(accuracy: float, n: int) -> float:
    """SE of an accuracy over ``n`` independent items: sqrt(p (1 - p) / (n - 1)) (equal to the sample SD of the
    items' 0/1 outcomes over sqrt(n)); NaN below 2 items or for an unknown accuracy."""
    if n < 2 or accuracy is None or math.isnan(accuracy):
        return float("nan")
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / (n - 1))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, SE of the mean) of independent per-unit values: sample SD / sqrt(n)."""
    values = [float(v) for v in values]
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_difference(dense_correct: Sequence[bool], candidate_correct: Sequence[bool]) -> dict:
    """Dense against candidate on the same items, item by item: ``drop`` = mean of d_i = dense_i - candidate_i
    (dense accuracy - candidate accuracy), ``stderr`` = SE of the d_i (sample SD / sqrt(n): the pairing removes the
    variance the two models share on easy and hard items), and McNemar's discordant counts ``dense_only`` (dense
    right, candidate wrong) and ``candidate_only`` (the reverse); drop = (dense_only - candidate_only) / n."""
    if len(dense_correct) != len(candidate_correct):
        raise EffideployError(f"a paired comparison needs the same items, got {len(dense_correct)} and "
                              f"{len(candidate_correct)} outcomes")
    diffs = [int(bool(a)) - int(bool(b)) for a, b in zip(dense_correct, candidate_correct)]
    drop, stderr = mean_and_stderr(diffs)
    return {"n": len(diffs), "drop": drop, "stderr": stderr, "dense_only": sum(d == 1 for d in diffs),
            "candidate_only": sum(d == -1 for d in diffs)}


def within_noise(difference: float | None, stderr: float | None, z: float = NOISE_Z) -> bool | None:
    """|difference| <= z x SE (see NOISE_Z); None where either is unknown."""
    if difference is None or stderr is None or math.isnan(difference) or math.isnan(stderr):
        return None
    return abs(difference) <= z * stderr


def combined_mean(values: Sequence[float], stderrs: Sequence[float]) -> tuple[float, float]:
    """(mean, SE) of a plain mean of independent estimates (tasks over disjoint items): sqrt(sum SE^2) / k."""
    if not values:
        return float("nan"), float("nan")
    k = len(values)
    return sum(values) / k, math.sqrt(sum(se * se for se in stderrs)) / k


def share_stderr(units: Sequence[tuple[int, int]]) -> float:
    """SE of a pooled share sum(a) / sum(m) over independent units of (a identical, m total) predictions, e.g. the
    windows of a perplexity text: the predictions inside one window share its context and are not independent, so
    the unit is the window, not the token. Ratio estimator over clusters: sqrt(C / (C - 1) x sum_c (a_c - L m_c)^2)
    / sum(m) with L the pooled share; with one prediction per unit it is the sample SD / sqrt(C). NaN below 2 units."""
    units = [(a, m) for a, m in units if m]
    total = sum(m for _, m in units)
    if len(units) < 2 or not total:
        return float("nan")
    share = sum(a for a, _ in units) / total
    c = len(units)
    return math.sqrt(c / (c - 1) * sum((a - share * m) ** 2 for a, m in units)) / total


def overall_performance(per_benchmark_ratios: Sequence[float]) -> float:
    """OP: the quadratic mean of the score ratios (1.0 = as good as dense on every benchmark)."""
    if not per_benchmark_ratios:
        return float("nan")
    return math.sqrt(sum(r * r for r in per_benchmark_ratios) / len(per_benchmark_ratios))


def generalization_gap(per_benchmark_ratios: Sequence[float]) -> float:
    """OG: std / mean x 100 of the ratios (0 = the same relative score on every benchmark)."""
    if not per_benchmark_ratios:
        return float("nan")
    mean = sum(per_benchmark_ratios) / len(per_benchmark_ratios)
    std = math.sqrt(sum((r - mean) ** 2 for r in per_benchmark_ratios) / len(per_benchmark_ratios))
    return std / mean * 100.0 if mean else float("nan")


def agreement(dense: Sequence, candidate: Sequence) -> tuple[int, int]:
    """(identical, total) predictions of two equally long prediction lists."""
    if len(dense) != len(candidate):
        raise EffideployError(f"loyalty compares equal numbers of predictions, got {len(dense)} and {len(candidate)}")
    return sum(int(a == b) for a, b in zip(dense, candidate)), len(dense)


def loyalty(*pairs: tuple[int, int]) -> float:
    """OL over pooled (identical, total) counts, e.g. next-token argmax and chosen multiple-choice options."""
    identical = sum(p[0] for p in pairs)
    total = sum(p[1] for p in pairs)
    return identical / total if total else float("nan")


def speedup(dense_seconds: float, candidate_seconds: float) -> float:
    """How many times faster the candidate is (below 1: slower)."""
    if not candidate_seconds or math.isnan(candidate_seconds) or math.isnan(dense_seconds):
        return float("nan")
    return dense_seconds / candidate_seconds


def efficiency(dense_ttft: float, candidate_ttft: float, dense_tpot: float, candidate_tpot: float) -> dict:
    """OE: TTFT and decode speedups (from medians, which are less sensitive to a busy machine than means)."""
    return {"ttft_speedup": speedup(dense_ttft, candidate_ttft), "decode_speedup": speedup(dense_tpot, candidate_tpot)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points (x, y) where both are better when larger: True where no other point is at least as good on
    both and strictly better on one. NaN coordinates are never on the front."""
    flags = []
    for i, (x, y) in enumerate(points):
        if math.isnan(x) or math.isnan(y):
            flags.append(False)
            continue
        dominated = any(
            j != i and ox >= x and oy >= y and (ox > x or oy > y)
            for j, (ox, oy) in enumerate(points)
            if not (math.isnan(ox) or math.isnan(oy))
        )
        flags.append(not dominated)
    return flags


def matmul_parameters(counts: dict[str, int]) -> int:
    """Weights multiplied per generated token: attention and FFN projections plus the output head, which is a
    vocab x hidden matmul even when tied to the embedding (the embedding lookup itself is not a matmul)."""
    return counts["attention"] + counts["ffn"] + (counts["lm_head"] or counts["embedding"])


def prefill_flops(matmul_params: int, attention_width: int, prompt_tokens: int) -> float:
    """Forward FLOPs of a causal prompt: 2 per weight per token, plus QK^T and AV over the causal triangle
    (``attention_width`` = layers x query width)."""
    return 2.0 * matmul_params * prompt_tokens + 2.0 * attention_width * prompt_tokens * prompt_tokens


def decode_flops(matmul_params: int, attention_width: int, context_tokens: float) -> float:
    """FLOPs of one decode step attending over ``context_tokens`` cached positions."""
    return 2.0 * matmul_params + 4.0 * attention_width * context_tokens


def ideal_ratios(dense_counts: dict, candidate_counts: dict, attention_width: int, prompt_tokens: int,
                 new_tokens: int, bytes_per_parameter: float = 4.0, candidate_cached_prompt: float | None = None,
                 dense_bytes_per_token: float | None = None, candidate_bytes_per_token: float | None = None) -> dict:
    """What removing FLOPs and weight bytes alone would predict (no kernel, cache or framework overhead):
    prefill speedup from FLOPs, decode speedup from FLOPs (compute-bound) and from weight bytes read per token
    (memory-bound), and the size ratio. ``candidate_cached_prompt``: prompt entries the candidate keeps in its KV
    cache after prefill (token compression; default all), which shortens the attention of every decode step.
    ``*_bytes_per_token``: the weight bytes one decode step reads as stored (quantized weights and their scales);
    by default the matmul parameters at ``bytes_per_parameter`` each."""
    dense_mm, cand_mm = matmul_parameters(dense_counts), matmul_parameters(candidate_counts)
    dense_bytes = dense_bytes_per_token or dense_mm * bytes_per_parameter
    cand_bytes = candidate_bytes_per_token or cand_mm * bytes_per_parameter
    context = prompt_tokens + new_tokens / 2.0
    kept = prompt_tokens if candidate_cached_prompt is None else candidate_cached_prompt
    return {
        "matmul_parameters": {"dense": dense_mm, "candidate": cand_mm},
        "prefill_speedup_flops": prefill_flops(dense_mm, attention_width, prompt_tokens)
        / prefill_flops(cand_mm, attention_width, prompt_tokens),
        "decode_speedup_flops": decode_flops(dense_mm, attention_width, context)
        / decode_flops(cand_mm, attention_width, kept + new_tokens / 2.0),
        "decode_speedup_weight_bytes": dense_bytes / cand_bytes,
        "size_ratio": dense_counts["total"] / candidate_counts["total"],
        "weight_bytes_per_token": {"dense": dense_bytes, "candidate": cand_bytes},
        "weight_bytes": {"dense": dense_counts["total"] * bytes_per_parameter,
                         "candidate": candidate_counts["total"] * bytes_per_parameter},
    }
