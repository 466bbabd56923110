"""The search's parts on hand-made inputs: the space, the cost model, the shortlist and the binding threshold."""

import math

import pytest

from effideploy.bench.policy import policy_from_dict
from effideploy.errors import EffideployError
from effideploy.search.cost import CostModel, Features, Predicted
from effideploy.search.screen import ScreenResult
from effideploy.search.search import RecipeRecord
from effideploy.search.selection import binding_thresholds, shortlist
from effideploy.search.space import FfnSparsity, KvBudget, Recipe, SearchSpace, WeightQuantization


def test_space_is_the_product_of_the_levers_without_the_dense_model():
    space = SearchSpace((FfnSparsity(values=(0.0, 0.2)), WeightQuantization(values=(None, "int8")), KvBudget()))
    assert [r.label for r in space.recipes()] == ["dense+int8", "cfsp-0.2", "cfsp-0.2+int8"]
    assert [r.family for r in space.recipes()] == ["quantization", "pruning", "pruning+quantization"]
    with pytest.raises(EffideployError, match="sparsities"):
        FfnSparsity(values=(1.5,))
    # a scheme is a name the runtime's exporter declares: checked against that runtime, before any work
    from effideploy.search.feasibility import resolve_space

    with pytest.raises(EffideployError, match="unknown scheme 'int3'"):
        resolve_space(SearchSpace((WeightQuantization(values=("int3",)),)), "onnx")


def features(decode_bytes, flops_float=0.0, flops_quant=0.0, stored=1.0):
    return Features(decode_bytes, flops_float, flops_quant, stored)


def test_cost_model_recovers_a_linear_cost_and_predicts_speedups():
    # TPOT = 2 ms + 1 ms per 100 MB; TTFT = 10 ms + 5 ms per GFLOP float, 2 ms per GFLOP quantized
    tpot = lambda b: 0.002 + b * 1e-11
    ttft = lambda f, q: 0.010 + f * 5e-12 + q * 2e-12
    dense, int8, pruned = features(500e6, 1e10), features(140e6, 0, 1e10), features(350e6, 7e9)
    model = CostModel().fit([(label, f, tpot(f.decode_bytes), ttft(f.prefill_flops_float, f.prefill_flops_quant))
                             for label, f in (("dense", dense), ("int8", int8), ("pruned", pruned))])
    # decode: 2 coefficients over 3 distinct points, a real residual (zero on this exact line); TTFT: 3 over 3,
    # an exact fit by construction, so no residual is claimed
    assert model.decode.degrees_of_freedom == 1 and model.decode.residual_pct == pytest.approx(0, abs=1e-6)
    assert model.ttft.degrees_of_freedom == 0 and model.ttft.residual_pct is None
    unseen = features(100e6, 0, 7e9)
    speed = model.speedups(dense, unseen)
    assert speed["decode_speedup"] == pytest.approx(tpot(500e6) / tpot(100e6))
    assert speed["ttft_speedup"] == pytest.approx(ttft(1e10, 0) / ttft(0, 7e9))
    # without quantized points the quantized-FLOPs term is left out rather than fitted to nothing
    float_only = CostModel().fit([("dense", dense, 0.007, 0.06), ("pruned", pruned, 0.0055, 0.045)])
    assert set(float_only.ttft.coefficients) == {"prefill_flops_float"}


def test_cost_model_holds_a_slope_the_noise_pulls_negative_at_zero_and_matches_a_bounded_solver():
    """Four noisy timings, three slopes: the unconstrained exact fit gives a negative ms/GB (a byte that speeds a
    token up); the fit holds it at zero, says so in the report, and equals scipy's bounded least squares."""
    import numpy as np
    optimize = pytest.importorskip("scipy.optimize")
    from effideploy.search.cost import LinearFit
    from effideploy.search.report import _residual

    names = ("a", "b", "c")
    rows = [{"a": 1e9, "b": 0.0, "c": 0.0}, {"a": 0.2e9, "b": 0.3e9, "c": 0.0}, {"a": 0.2e9, "b": 0.0, "c": 0.5e9},
            {"a": 0.9e9, "b": 0.0, "c": 0.0}, {"a": 0.1e9, "b": 0.28e9, "c": 0.0}]
    times = [0.0100, 0.0052, 0.0051, 0.0092, 0.0058]  # b's rows: more bytes, less time than noise allows
    matrix = np.array([[1.0] + [r[n] for n in names] for r in rows])
    free, *_ = np.linalg.lstsq(matrix, np.array(times), rcond=None)
    assert (free[1:] < 0).any()  # the data really does pull a slope negative
    fit = LinearFit(names).fit(rows, times)
    assert all(c >= 0 for c in fit.coefficients.values()) and fit.pinned
    scale = matrix.max(axis=0)
    reference = optimize.lsq_linear(matrix / scale, np.array(times), bounds=([-np.inf, 0, 0, 0], np.inf),
                                    tol=1e-14, lsmr_tol="auto").x / scale
    assert fit.intercept == pytest.approx(reference[0], rel=1e-6, abs=1e-9)
    for name, value in zip(names, reference[1:]):
        assert fit.coefficients[name] == pytest.approx(value, rel=1e-5, abs=1e-16)
    assert f"{fit.pinned[0]} held at 0 ms" in _residual(fit.to_dict())
    # data a line fits with positive slopes is fitted as before (nothing pinned, the exact slopes)
    exact = LinearFit(names).fit(rows, [0.001 + 1e-11 * r["a"] + 2e-11 * r["b"] + 3e-11 * r["c"] for r in rows])
    assert not exact.pinned and exact.coefficients["b"] == pytest.approx(2e-11)


def test_cost_model_gives_each_kernel_its_own_slope_from_the_real_schemes_bytes():
    """Decode time per byte differs by kernel (here q4_k_m several times q8_0's per byte, as llama.cpp's unpacking
    can make it); features come from the real llama.cpp schemes on a model's shapes, and a pruned + q4_k_m recipe, never
    timed, is predicted from the slopes of the kernels that read its bytes (its F16 fallbacks at the float slope)."""
    from effideploy.quantization.schemes import fitted_scheme, model_tensors
    from effideploy.search.cost import DECODE_KERNEL, recipe_features
    from tests.conftest import tiny_llama

    dense_config = tiny_llama(seed=0, intermediate_size=512).config.to_dict()
    narrow = dict(dense_config, intermediate_size=400)  # no multiple of 32: down_proj falls back to F16
    slope = {"float": 1e-11, "q8_0": 1.2e-11, "q4_k_m": 8e-11}

    def feats(config, scheme):
        return recipe_features(Recipe(), config, 64, 8, fitted_scheme("llamacpp", scheme, config),
                               model_tensors(config))

    def tpot(f):
        return 0.001 + sum(slope[k[len(DECODE_KERNEL):]] * v for k, v in f.to_dict().items() if k.startswith(DECODE_KERNEL))

    points = {"dense": feats(dense_config, None), "dense+q8_0": feats(dense_config, "q8_0"),
              "dense+q4_k_m": feats(dense_config, "q4_k_m"), "pruned": feats(narrow, None)}
    model = CostModel().fit([(label, f, tpot(f), 0.01) for label, f in points.items()])
    assert {k[len(DECODE_KERNEL):] for k in model.decode.coefficients} == set(slope)
    target = feats(narrow, "q4_k_m")
    kernels = dict(target.decode_kernels)
    assert kernels["float"] > dict(points["dense+q4_k_m"].decode_kernels)["float"]  # the fallback shows
    speed = model.speedups(points["dense"], target)["decode_speedup"]
    assert speed == pytest.approx(tpot(points["dense"]) / tpot(target), rel=1e-6)
    # one slope for all bytes (what a single line gives) cannot be exact for this recipe (on this tiny model the
    # float head dominates every recipe's bytes, so the gap is small, but not rounding)
    pooled = model.decode_pooled.predict(points["dense"].to_dict()) / model.decode_pooled.predict(target.to_dict())
    assert abs(pooled / speed - 1) > 1e-3


def record(label, sparsity, quantize, decode, ppl_increase, measured=None, failed=None):
    r = RecipeRecord(recipe=Recipe(ffn_sparsity=sparsity, quantize=quantize), checkpoint=".", features=features(1.0))
    r.screen = ScreenResult(perplexity=10 * (1 + ppl_increase), perplexity_dense=10.0, kl=0.1, top1_agreement=0.9,
                            top_k_agreement=0.9)
    r.predicted = Predicted(decode_speedup=decode)
    r.measured, r.failed = measured, failed
    return r


def test_shortlist_takes_the_fastest_predicted_passes_and_the_best_of_each_family():
    from effideploy.search.selection import predicted_failures

    policy = policy_from_dict({"thresholds": {"max_perplexity_increase": 0.3, "min_decode_speedup": 1.5}})
    records = [record("q8", 0, "int8", 2.7, 0.01), record("q4", 0, "int4", 3.2, 0.9),
               record("p2q8", 0.2, "int8", 3.0, 0.2), record("p1q8", 0.1, "int8", 2.9, 0.1),
               record("p3", 0.3, None, 1.2, 0.3), record("p1", 0.1, None, 1.1, 0.05)]
    for r in records:
        r.screen_failed = sorted(predicted_failures(r, policy))
    assert records[1].screen_failed == ["max_perplexity_increase"]  # +90% is far outside +30% (and its slack)
    assert records[4].screen_failed == ["min_decode_speedup"] and records[5].screen_failed == ["min_decode_speedup"]
    chosen = [r.recipe.label for r in shortlist(records, policy, 2)]
    assert chosen == ["cfsp-0.2+int8", "cfsp-0.1+int8", "dense+int8"]  # no pruning-only recipe is predicted to pass
    # a borderline int4 (+32%, inside the slack) is faster, but the family is represented by the clear pass
    records[1] = record("q4", 0, "int4", 3.2, 0.32)
    chosen = [r.recipe.label for r in shortlist(records, policy, 2)]
    assert chosen == ["dense+int4", "cfsp-0.2+int8", "dense+int8"]


def test_binding_threshold_is_the_closest_candidates_failure():
    policy = policy_from_dict({"thresholds": {"max_perplexity_increase": 0.3, "min_decode_speedup": 3.0}})
    a = record("a", 0, "int8", 2.7, 0.0, measured={"perplexity_increase": 0.01, "decode_speedup": 2.7},
               failed=["min_decode_speedup"])
    b = record("b", 0.3, "int4", 4.0, 0.9, measured={"perplexity_increase": 0.9, "decode_speedup": 4.0},
               failed=["max_perplexity_increase"])
    binding = binding_thresholds([a, b], policy)
    assert binding["closest"] == "dense+int8" and binding["thresholds"] == ["min_decode_speedup"]
    assert binding["values"]["min_decode_speedup"] == 2.7 and binding["failing_counts"] == {
        "min_decode_speedup": 1, "max_perplexity_increase": 1}
    a.failed = []
    assert binding_thresholds([a, b], policy) is None


def test_the_screen_windows_are_held_apart_from_the_bench_perplexity_windows():
    import torch

    from effideploy.search.search import SearchConfig
    from effideploy.search.stages import screen_windows

    ids = torch.arange(5000)  # each token is its own position
    config = SearchConfig(screen_windows=16, screen_seqlen=64, ppl_windows=4, ppl_seqlen=1024)
    windows = screen_windows(ids, config)
    assert windows.shape == (16, 64) and int(windows.min()) >= 4 * 1024  # never a token the bench scores
    assert int(screen_windows(ids, SearchConfig(screen_windows=16, screen_seqlen=64, ppl_windows=0)).min()) < 4096
    with pytest.raises(EffideployError, match="fewer than one screen window"):
        screen_windows(ids, SearchConfig(screen_windows=1, screen_seqlen=1000, ppl_windows=4, ppl_seqlen=1024))
