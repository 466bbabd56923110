"""Policy files: parsing, validation and the pass/fail arithmetic (the exit codes are tested through the CLI)."""

from pathlib import Path

import pytest

from effideploy.bench.compare import Comparison
from effideploy.bench.policy import THRESHOLDS, evaluate, load_policy, passed, policy_from_dict, sign_off
from effideploy.errors import EffideployError

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "bench" / "policies" / "default.toml"


def test_the_shipped_policy_parses_and_documents_every_threshold():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.require == "all" and policy.thresholds
    text = DEFAULT_POLICY.read_text()
    for name in THRESHOLDS:  # every field appears in the example, set or commented out
        assert name in text, name


def test_load_policy_from_toml(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text('name = "ci"\nrequire = "any"\n[thresholds]\nmin_loyalty = 0.9\nmax_p99_latency_ms = 250\n')
    policy = load_policy(path)
    assert policy.name == "ci" and policy.require == "any"
    assert policy.thresholds == {"min_loyalty": 0.9, "max_p99_latency_ms": 250.0}


@pytest.mark.parametrize("text, fragment", [
    ("[thresholds]\nmin_loyality = 0.9\n", "unknown threshold 'min_loyality'"),
    ("thresholds = 3\n", "must be a table"),
    ("[thresholds]\nmin_op = \"high\"\n", "must be a finite number"),
    ("[thresholds]\nmin_op = true\n", "must be a finite number"),
    ("[thresholds]\nmin_op = nan\n", "must be a finite number"),
    ("require = \"most\"\n[thresholds]\nmin_op = 0.9\n", "require must be one of"),
    ("limits = 1\n[thresholds]\nmin_op = 0.9\n", "unknown key(s) limits"),
    ("name = \"x\"\n", "no thresholds"),
    ("[thresholds\nmin_op = 0.9\n", "not valid TOML"),
])
def test_bad_policies_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(EffideployError, match=None) as info:
        load_policy(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(EffideployError, match="not found"):
        load_policy(tmp_path / "nope.toml")


def test_checks_compare_each_candidate_with_each_limit():
    policy = policy_from_dict({"thresholds": {"min_decode_speedup": 1.1, "max_perplexity_increase": 0.2,
                                              "max_peak_memory_mb": 1000}})
    comparisons = [
        Comparison(candidate="a", kind="x", decode_speedup=1.3, perplexity_increase=0.1, peak_memory_mb=900.0),
        Comparison(candidate="b", kind="x", decode_speedup=1.1, perplexity_increase=0.25, peak_memory_mb=1000.0),
        Comparison(candidate="c", kind="x", decode_speedup=1.5, perplexity_increase=0.0),  # memory not measured
    ]
    checks = {(c.candidate, c.name): c for c in evaluate(policy, comparisons)}
    assert all(checks[("a", name)].passed for name in policy.thresholds)
    assert checks[("b", "min_decode_speedup")].passed  # limits are inclusive
    assert checks[("b", "max_peak_memory_mb")].passed
    assert not checks[("b", "max_perplexity_increase")].passed
    assert checks[("c", "max_peak_memory_mb")].value is None and not checks[("c", "max_peak_memory_mb")].passed
    section = sign_off(policy, comparisons)
    assert section["candidates"] == {"a": True, "b": False, "c": False} and section["passed"] is False


def test_require_any_passes_when_one_candidate_passes():
    comparisons = [Comparison(candidate="a", kind="x", loyalty=0.95), Comparison(candidate="b", kind="x", loyalty=0.5)]
    strict = policy_from_dict({"thresholds": {"min_loyalty": 0.9}})
    lenient = policy_from_dict({"require": "any", "thresholds": {"min_loyalty": 0.9}})
    assert not passed(strict, evaluate(strict, comparisons))
    assert passed(lenient, evaluate(lenient, comparisons))
    assert not passed(lenient, evaluate(lenient, []))  # nothing measured never passes
