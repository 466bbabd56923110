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
