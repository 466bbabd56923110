"""Uncertainty in the sign-off: binomial SEs of accuracies, the paired comparison of candidate against dense on the
same items (SE of the per-item difference, McNemar's discordant counts, the within-noise flag), loyalty's SE over
windows and items, and ``max_accuracy_drop`` on the suite mean over competent tasks only."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from effideploy.bench import metrics
from effideploy.bench.compare import compare
from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.policy import evaluate, policy_from_dict, sign_off
from effideploy.bench.report import _paired_section, _policy_section
from effideploy.bench.results import ModelResult
from effideploy.errors import EffideployError
from effideploy.eval.multiple_choice import TaskResult, mean_stderr
from effideploy.eval.perplexity import PerplexityResult


def task(name, correct, chance=0.5, indices=None, chosen=None):
    """A scorer record from known per-item outcomes (chosen: 0 where right, 1 where wrong, for a 2-way task)."""
    correct = [bool(c) for c in correct]
    chosen = [0 if c else 1 for c in correct] if chosen is None else chosen
    return TaskResult(name=name, accuracy=sum(correct) / len(correct), chosen=chosen, correct=correct,
                      indices=list(range(len(correct))) if indices is None else indices, chance=chance)


def model(label, tasks, predictions=None):
    result = ModelResult(label=label, kind="x", spec=label, artifact=Path("."), checkpoint=None)
    result.tasks = {t.name: t for t in tasks}
    if predictions is not None:
        result.perplexity = PerplexityResult(nll=[[1.0] * len(row) for row in predictions], predictions=predictions,
                                             seqlen=len(predictions[0]) + 1)
    return result


CONFIG = BenchConfig(candidates=(CandidateSpec(model="x"),), prompt_tokens=10, new_tokens=4)


def test_binomial_stderr_of_a_known_case():
    """30 of 100 right: SE = sqrt(0.3 x 0.7 / 99), the sample SD of the 0/1 outcomes over sqrt(100), lm-eval's."""
    outcomes = [1] * 30 + [0] * 70
    expected = math.sqrt(0.3 * 0.7 / 99)
    assert metrics.binomial_stderr(0.3, 100) == pytest.approx(expected)
    assert np.std(outcomes, ddof=1) / math.sqrt(100) == pytest.approx(expected)
    assert mean_stderr(outcomes) == pytest.approx(expected)  # the scorer's own TaskResult.stderr
    assert math.isnan(metrics.binomial_stderr(1.0, 1))
    record = compare(model("dense", [task("t", outcomes)]), model("cand", [task("t", outcomes)]), CONFIG)
    paired = record.task_accuracy["t"]
    assert paired.n == 100 and paired.dense_stderr == pytest.approx(expected)
    assert paired.candidate_stderr == pytest.approx(expected)
    # the same model: no difference, zero paired SE, within noise
    assert paired.drop == 0 and paired.drop_stderr == 0 and paired.within_noise is True


def test_paired_stderr_equals_numpy_on_the_per_item_differences():
    rng = np.random.default_rng(0)
    dense_correct = rng.random(200) < 0.7
    cand_correct = np.where(rng.random(200) < 0.8, dense_correct, ~dense_correct)  # flips a fifth of the items
    record = compare(model("dense", [task("t", dense_correct)]), model("cand", [task("t", cand_correct)]), CONFIG)
    paired = record.task_accuracy["t"]
    d = dense_correct.astype(float) - cand_correct.astype(float)
    assert paired.drop == pytest.approx(d.mean())
    assert paired.drop_stderr == pytest.approx(np.std(d, ddof=1) / math.sqrt(len(d)))
    # pairing: smaller than the SE of two independent accuracies
    assert paired.drop_stderr < math.hypot(paired.dense_stderr, paired.candidate_stderr)
    assert paired.dense_only == int(np.sum(dense_correct & ~cand_correct))
    assert paired.candidate_only == int(np.sum(~dense_correct & cand_correct))


def test_mcnemar_counts_on_a_hand_made_case():
    dense = [1, 1, 1, 0, 0, 1, 0]
    cand = [1, 0, 0, 1, 0, 1, 0]
    assert metrics.paired_difference(dense, cand) == {"n": 7, "drop": pytest.approx(1 / 7),
                                                      "stderr": pytest.approx(np.std([0, 1, 1, -1, 0, 0, 0], ddof=1) / math.sqrt(7)),
                                                      "dense_only": 2, "candidate_only": 1}
    record = compare(model("dense", [task("t", dense)]), model("cand", [task("t", cand)]), CONFIG)
    assert (record.task_accuracy["t"].dense_only, record.task_accuracy["t"].candidate_only) == (2, 1)
    with pytest.raises(EffideployError, match="same items"):
        metrics.paired_difference(dense, cand[:-1])


def test_different_items_are_refused():
    dense = task("t", [1, 0, 1], indices=[0, 1, 2])
    cand = task("t", [1, 0, 1], indices=[0, 1, 3])
    with pytest.raises(EffideployError, match="different items"):
        compare(model("dense", [dense]), model("cand", [cand]), CONFIG)


def test_within_noise_flips_as_the_difference_grows():
    """Dense right on all 100 items, the candidate wrong on k of them: drop = k/100, paired SE =
    sqrt(p (1 - p) / 99); |drop| <= 2 SE holds up to p <= 4 / (n + 3), i.e. k <= 3."""
    flags = []
    for k in range(8):
        record = compare(model("dense", [task("t", [1] * 100)]),
                         model("cand", [task("t", [0] * k + [1] * (100 - k))]), CONFIG)
        paired = record.task_accuracy["t"]
        assert paired.drop == pytest.approx(k / 100) and paired.dense_only == k and paired.candidate_only == 0
        flags.append(paired.within_noise)
        assert record.accuracy_drop_within_noise is paired.within_noise  # one competent task: the suite is it
    assert flags == [True, True, True, True, False, False, False, False]


def test_max_accuracy_drop_reads_the_suite_mean_over_competent_tasks_only():
    """Dense is 0.9 on a 2-way task (competent) and at chance (0.5) on another, over 60 items each; whatever the
    candidate does on the at-chance task, the drop, its SE and the check stay those of the competent task."""
    competent_dense = [1] * 54 + [0] * 6
    competent_cand = [1] * 48 + [0] * 12
    chance_dense = [1, 0] * 30
    policy = policy_from_dict({"thresholds": {"max_accuracy_drop": 0.05}})
    values = []
    for chance_cand in ([1, 0] * 30, [0] * 60, [1] * 60):
        record = compare(model("dense", [task("competent", competent_dense), task("noise", chance_dense)]),
                         model("cand", [task("competent", competent_cand), task("noise", chance_cand)]), CONFIG)
        assert set(record.excluded_tasks) == {"noise"} and record.task_accuracy["noise"].competent is False
        assert record.suite_accuracy.tasks == ["competent"] and record.suite_accuracy.n == 60
        [check] = evaluate(policy, [record])
        values.append((check.value, check.stderr))
        assert check.value == pytest.approx(0.1) and not check.passed
        assert "competent" in check.scope and "left out (dense not above chance): noise" in check.scope
    assert values[0] == values[1] == values[2]
    d = np.array(competent_dense, float) - np.array(competent_cand, float)
    assert values[0][1] == pytest.approx(np.std(d, ddof=1) / math.sqrt(60))


def test_suite_mean_combines_per_task_paired_ses():
    """Two competent tasks: the suite drop is the mean of the two drops, its SE sqrt(se1^2 + se2^2) / 2."""
    rng = np.random.default_rng(1)
    a_dense, b_dense = rng.random(80) < 0.9, rng.random(50) < 0.8
    a_cand, b_cand = a_dense & (rng.random(80) < 0.9), b_dense | (rng.random(50) < 0.2)
    record = compare(model("dense", [task("a", a_dense), task("b", b_dense)]),
                     model("cand", [task("a", a_cand), task("b", b_cand)]), CONFIG)
    a, b, suite = record.task_accuracy["a"], record.task_accuracy["b"], record.suite_accuracy
    assert suite.drop == pytest.approx((a.drop + b.drop) / 2) == pytest.approx(record.accuracy_drop)
    assert suite.drop_stderr == pytest.approx(math.hypot(a.drop_stderr, b.drop_stderr) / 2)
    assert record.accuracy_drop_stderr == suite.drop_stderr and suite.n == 130
    assert suite.dense_only == a.dense_only + b.dense_only and suite.candidate_only == a.candidate_only + b.candidate_only
    assert suite.dense_stderr == pytest.approx(math.hypot(a.dense_stderr, b.dense_stderr) / 2)


def test_loyalty_stderr_counts_windows_and_items_as_units():
    dense_rows = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]]
    cand_rows = [[1, 2, 3, 0], [5, 0, 0, 8], [1, 1, 1, 1]]  # 3/4, 2/4, 4/4 identical
    dense = model("dense", [task("t", [1, 1, 0, 0], chosen=[0, 0, 1, 1])], predictions=dense_rows)
    cand = model("cand", [task("t", [1, 0, 0, 1], chosen=[0, 1, 1, 0])], predictions=cand_rows)
    record = compare(dense, cand, CONFIG)
    assert record.loyalty_units == {"tokens": 3, "choices": 4}
    # tokens: a ratio over 3 windows of 4 positions = the SE of the per-window shares (equal sizes)
    assert record.loyalty_tokens_stderr == pytest.approx(np.std([0.75, 0.5, 1.0], ddof=1) / math.sqrt(3))
    # choices: one unit per item, chosen options 1, 0, 1, 0 identical
    assert record.loyalty_choices_stderr == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    units = [(3, 4), (2, 4), (4, 4), (1, 1), (0, 1), (1, 1), (0, 1)]
    share = 11 / 16
    expected = math.sqrt(7 / 6 * sum((a - share * m) ** 2 for a, m in units)) / 16
    assert record.loyalty == pytest.approx(share) and record.loyalty_stderr == pytest.approx(expected)
    check = evaluate(policy_from_dict({"thresholds": {"min_loyalty": 0.6}}), [record])[0]
    assert check.stderr == pytest.approx(expected) and check.near_limit is True and check.within_noise is None


def test_the_report_shows_the_paired_difference_and_the_noise(tmp_path):
    """report.json's comparison and policy check carry the fields; report.md the drop ± paired SE and the flags."""
    dense = model("dense", [task("t", [1] * 100), task("noise", [1, 0] * 50)])
    small = model("small", [task("t", [0] * 2 + [1] * 98), task("noise", [1, 0] * 50)])
    large = model("large", [task("t", [0] * 20 + [1] * 80), task("noise", [0] * 100)])
    records = [compare(dense, small, CONFIG), compare(dense, large, CONFIG)]
    policy = sign_off(policy_from_dict({"thresholds": {"max_accuracy_drop": 0.01}}), records)
    payload = json.loads(json.dumps({"comparisons": [r.to_dict() for r in records], "policy": policy}))
    first = payload["comparisons"][0]
    assert first["suite_accuracy"]["drop"] == pytest.approx(0.02) and first["accuracy_drop_within_noise"] is True
    assert first["task_accuracy"]["t"]["dense_only"] == 2 and first["task_accuracy"]["noise"]["competent"] is False
    small_check, large_check = payload["policy"]["checks"]
    assert not small_check["passed"] and small_check["within_noise"] is True  # fails, yet within noise of none
    assert not large_check["passed"] and large_check["within_noise"] is False
    report = SimpleNamespace(comparisons=records, policy=policy)
    text = "\n".join(_paired_section(report) + _policy_section(report))
    se = np.std([1] * 2 + [0] * 98, ddof=1) / 10
    assert f"0.020 ± {se:.3f}" in text and "within noise" in text and "**beyond noise**" in text
    # small: drop 0.02 against 0.01, 2 SE = 0.028: within noise of none and of the limit; large: 0.2, beyond both
    assert "**FAIL** (difference within noise; within noise of the limit)" in text
    assert "**FAIL** (difference beyond noise)" in text and small_check["near_limit"] and not large_check["near_limit"]
    assert "no (dense at chance)" in text and "mean over 1 competent task(s) (t; 100 items)" in text


def test_dense_and_candidate_are_scored_on_the_same_items_by_the_real_scorer(tiny_tokenizer, tmp_path):
    """Two tiny random models through the bench's own scorer on a seeded subset: the same items for both, and the
    paired SE of their per-item outcomes equals numpy's."""
    from effideploy.bench.quality import measure_multiple_choice
    from effideploy.eval.multiple_choice import load_task
    from effideploy.runtimes.pytorch import TorchRuntime
    from tests.conftest import tiny_llama

    folder = tmp_path / "arith"
    folder.mkdir()
    examples = [{"input": f"{a} plus {b} is", "target_scores": {str(a + b): 1, str(a + b + 1): 0, str(a * b + 7): 0}}
                for a in range(6) for b in range(4)]
    (folder / "task.json").write_text(json.dumps({"name": "arith", "examples": examples}))
    config = BenchConfig(candidates=(CandidateSpec(model="x"),), mc_limit=16, seed=3)
    dense, cand = model("dense", []), model("cand", [])
    for result, seed in ((dense, 0), (cand, 1)):
        measure_multiple_choice(result, TorchRuntime(model=tiny_llama(seed=seed)), [load_task(folder)],
                                tiny_tokenizer, config)
    assert dense.tasks["arith"].indices == cand.tasks["arith"].indices and dense.tasks["arith"].n == 16
    paired = compare(dense, cand, CONFIG).task_accuracy["arith"]
    d = np.array(dense.tasks["arith"].correct, float) - np.array(cand.tasks["arith"].correct, float)
    assert paired.n == 16 and paired.drop == pytest.approx(d.mean())
    assert paired.drop_stderr == pytest.approx(np.std(d, ddof=1) / 4)
    assert paired.dense_stderr == pytest.approx(dense.tasks["arith"].stderr)


def test_the_load_note_says_above_the_core_count_only_when_it_was():
    """The method section said "above the core count, other processes competed" at every load, also at 1.0 on 2
    cores (a quiet machine running the bench's one thread)."""
    from effideploy.bench.report import _load_reading

    assert _load_reading({"cpu_count": 2, "load_average_start": [3.4, 2.0, 1.0],
                          "load_average_end": [1.0, 1.0, 1.0]}).startswith("above the core count")
    quiet = _load_reading({"cpu_count": 2, "load_average_start": [1.05, 0.99, 0.75], "load_average_end": [1.0, 1.0, 0.85]})
    assert quiet.startswith("within the core count") and "competed for the CPU and" not in quiet
    assert _load_reading({"cpu_count": 2, "load_average_start": None, "load_average_end": None}).startswith("not readable")
