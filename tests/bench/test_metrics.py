"""The sign-off arithmetic on hand-made inputs, checked against independent computations (numpy, by hand)."""

import math

import numpy as np
import pytest

from effideploy.bench import metrics
from effideploy.errors import EffideployError


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q):
    samples = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.35]
    assert metrics.percentile(samples, q) == pytest.approx(np.percentile(samples, q))


def test_percentile_of_one_sample_and_of_none():
    assert metrics.percentile([2.5], 99) == 2.5
    assert math.isnan(metrics.percentile([], 50))


def test_summarize():
    samples = [1.0, 2.0, 3.0, 4.0]
    summary = metrics.summarize(samples)
    assert summary["n"] == 4 and summary["mean"] == 2.5 and summary["min"] == 1.0 and summary["max"] == 4.0
    assert summary["std"] == pytest.approx(np.std(samples))  # population std
    assert summary["p50"] == 2.5 and summary["p90"] == pytest.approx(np.percentile(samples, 90))


def test_op_is_the_quadratic_mean_of_ratios():
    # scores 0.8/0.8 and 0.3/0.6: ratios 1.0 and 0.5 -> sqrt((1 + 0.25) / 2)
    ratios = metrics.ratios({"a": 0.8, "b": 0.3}, {"a": 0.8, "b": 0.6})
    assert ratios == {"a": 1.0, "b": 0.5}
    assert metrics.overall_performance(list(ratios.values())) == pytest.approx(math.sqrt(1.25 / 2))
    assert metrics.overall_performance([1.0, 1.0, 1.0]) == 1.0
    assert math.isnan(metrics.overall_performance([]))


def test_ratios_skip_tasks_where_dense_scores_zero_or_the_candidate_was_not_scored():
    assert metrics.ratios({"a": 0.5, "b": 0.2}, {"a": 0.0, "b": 0.4, "c": 0.9}) == {"b": 0.5}


def test_og_is_the_coefficient_of_variation_in_percent():
    # ratios 1.0 and 0.5: mean 0.75, population std 0.25 -> 33.3%
    assert metrics.generalization_gap([1.0, 0.5]) == pytest.approx(100 / 3)
    assert metrics.generalization_gap([0.9, 0.9, 0.9]) == pytest.approx(0.0)
    values = [0.7, 1.1, 0.95, 0.4]
    assert metrics.generalization_gap(values) == pytest.approx(np.std(values) / np.mean(values) * 100)


def test_loyalty_pools_identical_predictions():
    tokens = metrics.agreement([1, 2, 3, 4, 5, 6], [1, 2, 0, 4, 0, 6])  # 4 of 6
    choices = metrics.agreement([0, 1, 1, 2], [0, 1, 0, 2])  # 3 of 4
    assert tokens == (4, 6) and choices == (3, 4)
    assert metrics.loyalty(tokens) == pytest.approx(4 / 6)
    assert metrics.loyalty(tokens, choices) == pytest.approx(7 / 10)
    assert math.isnan(metrics.loyalty())
    with pytest.raises(EffideployError, match="equal numbers"):
        metrics.agreement([1, 2], [1])


def test_efficiency_is_dense_time_over_candidate_time():
    oe = metrics.efficiency(dense_ttft=0.30, candidate_ttft=0.20, dense_tpot=0.05, candidate_tpot=0.04)
    assert oe["ttft_speedup"] == pytest.approx(1.5) and oe["decode_speedup"] == pytest.approx(1.25)
    assert metrics.speedup(0.1, 0.2) == pytest.approx(0.5)  # slower is reported as it is
    assert math.isnan(metrics.speedup(0.1, 0.0))


def test_pareto_front_marks_non_dominated_points():
    points = [(1.0, 1.0), (1.5, 0.9), (1.4, 0.8), (2.0, 0.5), (1.5, 0.9), (0.9, 0.95), (float("nan"), 2.0)]
    # (1.4, 0.8) is dominated by (1.5, 0.9); (0.9, 0.95) by (1.0, 1.0); equal points do not dominate each other
    assert metrics.pareto_front(points) == [True, True, False, True, True, False, False]


def test_matmul_parameters_count_the_output_head_even_when_tied():
    counts = {"attention": 100, "ffn": 300, "embedding": 50, "lm_head": 0, "norms": 7, "total": 457}
    assert metrics.matmul_parameters(counts) == 450
    assert metrics.matmul_parameters({**counts, "lm_head": 60}) == 460


def test_ideal_ratios_from_hand_made_counts():
    dense = {"attention": 100, "ffn": 300, "embedding": 100, "lm_head": 0, "total": 500}
    pruned = {"attention": 100, "ffn": 150, "embedding": 100, "lm_head": 0, "total": 350}
    ideal = metrics.ideal_ratios(dense, pruned, attention_width=2, prompt_tokens=10, new_tokens=4)
    # matmul parameters 500 vs 350; decode context 10 + 4 / 2 = 12
    assert ideal["decode_speedup_weight_bytes"] == pytest.approx(500 / 350)
    assert ideal["decode_speedup_flops"] == pytest.approx((2 * 500 + 4 * 2 * 12) / (2 * 350 + 4 * 2 * 12))
    assert ideal["prefill_speedup_flops"] == pytest.approx((2 * 500 * 10 + 2 * 2 * 100) / (2 * 350 * 10 + 2 * 2 * 100))
    assert ideal["size_ratio"] == pytest.approx(500 / 350)
    assert ideal["weight_bytes"] == {"dense": 2000.0, "candidate": 1400.0}
    # quantized storage: the bytes each decode step reads as stored, not parameters x 4
    stored = metrics.ideal_ratios(dense, pruned, attention_width=2, prompt_tokens=10, new_tokens=4,
                                  dense_bytes_per_token=2000, candidate_bytes_per_token=350 + 44)
    assert stored["decode_speedup_weight_bytes"] == pytest.approx(2000 / 394)
    assert stored["decode_speedup_flops"] == ideal["decode_speedup_flops"]  # int8 weights do the same matmuls


def test_ideal_decode_speedup_of_a_shorter_cache():
    counts = {"attention": 100, "ffn": 300, "embedding": 100, "lm_head": 0, "total": 500}
    ideal = metrics.ideal_ratios(counts, counts, attention_width=10, prompt_tokens=100, new_tokens=10,
                                 candidate_cached_prompt=20)
    # same weights; the cache shrinks from 100 + 5 to 20 + 5 average entries attended per decode step
    assert ideal["decode_speedup_flops"] == pytest.approx((2 * 500 + 40 * 105) / (2 * 500 + 40 * 25))
    assert ideal["prefill_speedup_flops"] == 1.0 and ideal["decode_speedup_weight_bytes"] == 1.0


def test_tasks_where_dense_is_at_chance_are_named_for_exclusion():
    # 2-way tasks over 100 items: SE of chance = 0.05, so 0.61 is 2.2 SE above chance (kept), 0.58 is 1.6 SE (left out)
    excluded = metrics.at_chance_tasks({"good": (0.61, 0.5, 100), "noise": (0.58, 0.5, 100),
                                        "below": (0.40, 0.5, 100), "unknown": (0.5, float("nan"), 100)})
    assert set(excluded) == {"noise", "below"}
    assert "0.580 vs chance 0.500 over 100 items (+1.6 SE < 2)" in excluded["noise"]
    assert metrics.chance_z(0.75, 0.25, 300) == pytest.approx(0.5 / math.sqrt(0.25 * 0.75 / 300))
