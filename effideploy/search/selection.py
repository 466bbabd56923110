"""Which recipes the search times, benches and recommends, from estimates and measurements: the screen's and the
cost model's estimate of each policy threshold, the cost-model points, the shortlist, the binding threshold when
nothing passes, the Pareto fronts and the comparison against each lever family."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from effideploy.search.levers import FAMILY_TEXT

if TYPE_CHECKING:
    from effideploy.search.search import RecipeRecord

# The screen is a few windows: a recipe passes it when within this relative slack of each threshold.
SCREEN_SLACK = 0.15


# Policy threshold -> how the screen and the cost model estimate it before anything is benched.
def screen_value(record: RecipeRecord, threshold: str) -> float | None:
    s, p = record.screen, record.predicted
    return {
        "max_perplexity_increase": s.perplexity_increase if s else None,
        "max_perplexity": s.perplexity if s else None,
        "min_loyalty": s.top1_agreement if s else None,
        "min_op": (s.perplexity_dense / s.perplexity) if s else None,  # the WikiText-2 part of OP
        "max_kl_divergence": s.kl if s else None,
        "min_top_k_agreement": s.top_k_agreement if s else None,
        "min_decode_speedup": p.decode_speedup,
        "min_ttft_speedup": p.ttft_speedup,
        "max_peak_memory_mb": p.peak_memory_mb,
        "min_size_reduction": p.size_reduction,
    }.get(threshold)


def violation(value: float | None, limit: float, direction: str) -> float:
    """How far a value is on the wrong side of its limit, relative to the limit (0: passes; inf: unknown)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    scale = abs(limit) or 1.0
    return max(0.0, (value - limit) / scale) if direction == "max" else max(0.0, (limit - value) / scale)


def predicted_failures(record: RecipeRecord, policy, slack: float = SCREEN_SLACK) -> dict[str, float]:
    """Thresholds the screen/cost model predict the recipe fails by more than ``slack`` (estimable ones only)."""
    from effideploy.bench.policy import THRESHOLDS

    out = {}
    for name, limit in policy.thresholds.items():
        value = screen_value(record, name)
        if value is None:
            continue
        gap = violation(value, limit, THRESHOLDS[name].direction)
        if gap > slack:
            out[name] = gap
    return out


def calibration_recipes(records: list[RecipeRecord]) -> list[RecipeRecord]:
    """Cost-model points (the dense model is always measured): the recipes that use one lever alone, as that lever
    asks (``Lever.timed``): each value of a lever whose kernels differ (weight schemes), and the most reduced
    (fewest bytes per decoded token) of the levers that only change bytes and FLOPs (structure); together they
    span the bytes and FLOPs the space reaches."""
    chosen, most = [], []
    for record in records:
        used = record.recipe.used()
        if len(used) != 1:
            continue
        timed = used[0][0].timed
        if timed == "each":
            chosen.append(record)
        elif timed == "most":
            most.append(record)
    if most:
        chosen.append(min(most, key=lambda r: r.features.decode_bytes))
    if not chosen:  # a space of KV budgets only: time the first recipe
        chosen = records[:1]
    return chosen


def candidate_spec(record: RecipeRecord):
    """The bench's candidate: what each lever adds (the checkpoint, the weights as stored, the KV budget)."""
    from effideploy.bench.config import CandidateSpec

    fields, options = {"model": None, "label": record.label}, {}
    for lever, value in record.recipe.settings():
        part = dict(lever.candidate_fields(value, record))
        options.update(part.pop("export_options", {}))
        fields.update(part)
    return CandidateSpec(**fields, export_options=tuple(sorted(options.items())))


def shortlist(records: list[RecipeRecord], policy, size: int) -> list[RecipeRecord]:
    """Predicted to pass, fastest predicted decode first (``size`` of them), plus the fastest predicted-passing
    recipe of each family (quantization only, pruning only) for the report's comparison; when none is predicted
    to pass, the ``size`` recipes closest to passing, so the verdict still rests on measurements."""
    def speed(r) -> float:
        # a recipe the cost model's run timed is ranked by that measurement, not by the fit through it
        if r.stage == "calibration" and r.measured and r.measured.get("decode_speedup") is not None:
            return r.measured["decode_speedup"]
        return r.predicted.decode_speedup or 0.0

    passing = sorted([r for r in records if not r.screen_failed], key=speed, reverse=True)
    chosen = passing[:size]
    # A family's representative is its fastest recipe predicted to pass without the slack when there is one: a
    # borderline one (e.g. int4 at +36% perplexity against a 35% limit) may fail for real and leave the family
    # without a passing benched recipe to compare with.
    strict = [r for r in passing if not predicted_failures(r, policy, slack=0.0)]
    for family in FAMILY_TEXT:
        best = next((r for r in strict + passing if r.recipe.family == family), None)
        if best is not None and best not in chosen:
            chosen.append(best)
    if not chosen:
        chosen = sorted(records, key=lambda r: (max(predicted_failures(r, policy).values(), default=0.0), -speed(r)))[:size]
    return chosen


def binding_thresholds(records: list[RecipeRecord], policy) -> dict | None:
    """When nothing passes: the benched candidate closest to passing (smallest worst relative violation) and the
    thresholds it fails, with how many benched candidates fail each."""
    from effideploy.bench.policy import THRESHOLDS

    benched = [r for r in records if r.failed is not None]
    if not benched or any(not r.failed for r in benched):
        return None
    def worst(r):
        return max(violation((r.measured or {}).get(THRESHOLDS[n].metric), policy.thresholds[n], THRESHOLDS[n].direction)
                   for n in r.failed)
    closest = min(benched, key=worst)
    counts = {}
    for record in benched:
        for name in record.failed:
            counts[name] = counts.get(name, 0) + 1
    return {"closest": closest.label, "thresholds": closest.failed,
            "values": {n: (closest.measured or {}).get(THRESHOLDS[n].metric) for n in closest.failed},
            "limits": {n: policy.thresholds[n] for n in closest.failed}, "failing_counts": counts}


def mark_fronts(records: list[RecipeRecord], dense_memory) -> None:
    """Pareto fronts of screened quality (dense PPL / recipe PPL) against decode speedup, TTFT speedup and memory
    (dense peak / recipe peak), each recipe at its measured value where benched, else its predicted one."""
    from effideploy.bench.metrics import pareto_front

    dense_peak = (dense_memory or {}).get("peak_rss_mb")
    for axis in ("decode_speedup", "ttft_speedup", "memory"):
        points = []
        for r in records:
            quality = r.screen.perplexity_dense / r.screen.perplexity if r.screen else float("nan")
            final = r.measured if r.measured and r.measured.get("run") == "final" else {}
            if axis == "memory":
                peak = final.get("peak_memory_mb") or r.predicted.peak_memory_mb
                x = dense_peak / peak if dense_peak and peak else float("nan")
            else:
                x = (r.measured or {}).get(axis) if r.measured else getattr(r.predicted, axis)
            points.append((float("nan") if x is None else x, quality))
        for record, flag in zip(records, pareto_front(points)):
            record.on_front[axis] = flag


def family_comparisons(records: list[RecipeRecord], best: RecipeRecord | None) -> dict:
    """The recommended recipe against the fastest passing benched recipe of each family."""
    out = {}
    benched = [r for r in records if r.failed == []]
    for family in FAMILY_TEXT:
        rival = max((r for r in benched if r.recipe.family == family), key=lambda r: r.measured["decode_speedup"],
                    default=None)
        if rival is None:
            out[family] = {"best": None}
            continue
        out[family] = {"best": rival.label, "decode_speedup": rival.measured["decode_speedup"],
                       "perplexity_increase": rival.measured.get("perplexity_increase")}
        if best is not None:
            out[family]["recommended_over_best"] = best.measured["decode_speedup"] / rival.measured["decode_speedup"]
    return out
