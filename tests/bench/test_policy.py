"""Policy files: parsing, validation and the pass/fail arithmetic (the exit codes are tested through the CLI);
the packaged default policy (``--policy default`` from any folder) and inputs that are not policy files."""

import json
import os
from pathlib import Path

import pytest

from effideploy.bench.compare import Comparison
from effideploy.bench.policy import (DEFAULT_POLICY, THRESHOLDS, evaluate, load_policy, packaged_policies, passed,
                                     policy_from_dict, resolve_policy, sign_off)
from effideploy.errors import EffideployError
from tests.bench.conftest import TINY_BENCH_ARGS
from tests.test_cli import assert_one_line_error, run_cli

REPO_DEFAULT = Path(__file__).resolve().parents[2] / "bench" / "policies" / "default.toml"


def test_the_shipped_policy_parses_and_documents_every_threshold():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.require == "all" and policy.thresholds and policy.name == "default"
    text = resolve_policy(DEFAULT_POLICY).read_text()
    for name in THRESHOLDS:  # every field appears in the example, set or commented out
        assert name in text, name


def test_the_packaged_policies_are_ordered_strict_default_loose():
    """strict is at least as tight as default on every threshold default sets, loose at most as tight, and each
    quality gate moves in its direction (otherwise the three-policy verdicts of docs/search.md compare nothing)."""
    shipped = packaged_policies()
    assert {"strict", "default", "loose"} <= set(shipped)
    strict, default, loose = (load_policy(name) for name in ("strict", "default", "loose"))
    assert (strict.name, loose.name) == ("strict", "loose") and strict.require == loose.require == "all"
    assert set(default.thresholds) <= set(strict.thresholds)
    assert set(loose.thresholds) <= set(default.thresholds)
    tighter = {"max": lambda a, b: a <= b, "min": lambda a, b: a >= b}
    moved = 0
    for name, limit in default.thresholds.items():
        better = tighter[THRESHOLDS[name].direction]
        assert better(strict.thresholds[name], limit), name
        if name in loose.thresholds:
            assert better(limit, loose.thresholds[name]), name
            moved += loose.thresholds[name] != limit
    assert moved >= 3  # loose really is looser on quality, not a copy
    assert {"max_kl_divergence", "min_top_k_agreement"} <= set(strict.thresholds) - set(default.thresholds)


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
    with pytest.raises(EffideployError, match="not found") as info:
        load_policy(tmp_path / "nope.toml")
    assert "packaged policies: default" in str(info.value)  # the name that works from anywhere


def test_default_is_the_packaged_file_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").write_text("not a policy [")  # a local file of that name does not shadow it
    shipped = packaged_policies()["default"]
    # In this editable checkout the package data is the repository's file; in a wheel install it lies in
    # site-packages (scripts/ci_wheel.sh checks that one).
    assert shipped.resolve() == REPO_DEFAULT
    assert resolve_policy("default") == shipped and resolve_policy(Path("default")) == shipped
    assert load_policy("default").path == str(shipped)
    # Anything with a folder is a path: the local file is read (and here it is not valid TOML).
    with pytest.raises(EffideployError, match="not valid TOML"):
        load_policy(tmp_path / "default")
    assert load_policy(REPO_DEFAULT).thresholds == load_policy("default").thresholds  # a path still works


def test_tune_defaults_to_the_packaged_policy(tmp_path, monkeypatch):
    import typer.main

    from effideploy.cli.app import app
    import effideploy.cli  # noqa: F401 - registers the commands

    command = typer.main.get_command(app).commands["tune"]
    default = next(p.default for p in command.params if p.name == "policy")
    monkeypatch.chdir(tmp_path)  # not the repository root: the old default, a relative path, failed here
    assert load_policy(default).path == str(packaged_policies()["default"])


@pytest.mark.parametrize("kind", ["folder", "/dev/null", "/dev/zero", "fifo"])
def test_a_policy_that_is_not_a_regular_file_is_named(tmp_path, kind):
    if kind == "folder":
        path, fragment = tmp_path, "is a folder"
    elif kind == "fifo":
        path, fragment = tmp_path / "pipe", "is a pipe"
        os.mkfifo(path)  # reading it would block forever
    else:
        path, fragment = Path(kind), "is a device"
    with pytest.raises(EffideployError) as info:
        load_policy(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "not found" not in message and "\n" not in message


def test_a_huge_policy_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.toml"
    with path.open("wb") as handle:
        handle.truncate((1 << 20) + 1)  # sparse: no megabyte written
    with pytest.raises(EffideployError, match="a policy is a small TOML file"):
        load_policy(path)


@pytest.mark.parametrize("command, policy, fragment", [
    ("bench", "FOLDER", "is a folder"),
    ("bench", "/dev/null", "is a device"),
    ("bench", "/dev/zero", "is a device"),
    ("tune", "/dev/zero", "is a device"),
    ("run", "FOLDER", "is a folder"),
])
def test_cli_names_a_policy_that_is_a_folder_or_a_device(tmp_path, command, policy, fragment):
    policy = str(tmp_path) if policy == "FOLDER" else policy
    code, _, err = run_cli(command, "--policy", policy, "--output", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(code, err, fragment)
    assert policy in err and "not found" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_cli_bench_policy_default_from_another_folder(tmp_path, tiny_model_dir):
    """`--policy default` outside the repository: the packaged policy gates the run (a model against itself is not
    faster, so the default policy fails it: exit 1, not a "not found" exit 2)."""
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--output",
                             tmp_path / "r", "--policy", "default", "--no-memory", "--mc-limit", "0", *TINY_BENCH_ARGS,
                             cwd=tmp_path)
    assert code == 1, out + err
    section = json.loads((tmp_path / "r" / "report.json").read_text())["policy"]
    assert section["name"] == "default" and section["path"] == str(packaged_policies()["default"])
    assert section["thresholds"] == load_policy(REPO_DEFAULT).thresholds


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
