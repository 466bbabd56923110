"""``effideploy recover`` through the real command line."""

import json
import os
import subprocess
import sys

import pytest


def run_cli(*args):
    env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "effideploy", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=600)
    return result.returncode, result.stdout + result.stderr


def assert_one_line_error(code, output, fragment):
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip() and "not sharded" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], output


@pytest.mark.parametrize("options, fragment", [
    (["--budget", "100"], "cannot give every one of the 4 blocks rank 1"),
    (["--budget", "5000", "--mean-rank", "4"], "either --budget or --mean-rank"),
    (["--dtype", "float16"], "--dtype must be auto, float32 or bfloat16"),
])
def test_bad_options_are_one_line_errors(tmp_path, pruned_dir, calib_file, options, fragment):
    code, output = run_cli("recover", pruned_dir, "--output", tmp_path / "out", "--data", calib_file, *options)
    assert_one_line_error(code, output, fragment)
    assert not (tmp_path / "out").exists()


def test_recover_writes_a_checkpoint_and_warns_without_provenance(tmp_path, pruned_dir, calib_file):
    code, output = run_cli("recover", pruned_dir, "--output", tmp_path / "out", "--data", calib_file, "--steps", "3",
                           "--batch-size", "2", "--seqlen", "32", "--mean-rank", "2", "--lr", "1e-2")
    assert code == 0, output
    assert "recovered" in output and "3 steps, 192 tokens" in output and "warning" not in output
    recovery = json.loads((tmp_path / "out" / "effideploy.json").read_text())["recovery"]
    assert recovery["rule"] == "importance" and recovery["training"]["steps"] == 3

    bare = tmp_path / "bare"
    bare.mkdir()
    for item in pruned_dir.iterdir():
        if item.name != "effideploy.json":
            (bare / item.name).write_bytes(item.read_bytes())
    code, output = run_cli("recover", bare, "--output", tmp_path / "out2", "--data", calib_file, "--steps", "1",
                           "--batch-size", "1", "--seqlen", "32")
    assert code == 0 and "warning: no effideploy.json" in output and "using uniform LoRA ranks" in output


def test_prune_recover_writes_only_the_recovered_checkpoint(tmp_path, tiny_model_dir, calib_file):
    code, output = run_cli("prune", "--model", tiny_model_dir, "--output", tmp_path / "out", "--calib", calib_file,
                           "--calib-samples", "4", "--calib-seqlen", "64", "--threads", "1", "--recover",
                           "--recover-steps", "3", "--recover-batch-size", "2", "--recover-seqlen", "32",
                           "--recover-mean-rank", "2", "--recover-lr", "1e-2", "--recover-teacher", tiny_model_dir)
    assert code == 0, output
    assert "pruned" in output and "recovered" in output and "3 steps, 192 tokens" in output, output
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no pruned-only folder, no staging left behind
    record = json.loads((tmp_path / "out" / "effideploy.json").read_text())
    assert record["method"] == "cfsp" and record["sparsity"]["ffn_actual"] > 0.4
    recovery = record["recovery"]
    assert recovery["rule"] == "importance" and recovery["training"]["steps"] == 3
    assert recovery["training"]["data"]["path"] == str(calib_file.resolve())  # --calib is the default text
    assert recovery["training"]["teacher"]["path"] == str(tiny_model_dir)
    assert "not kept" in recovery["input"]


@pytest.mark.parametrize("options, fragment", [
    (["--recover-steps", "0"], "--steps must be a positive integer"),
    (["--recover-mean-rank", "0.5"], "--mean-rank must be at least 1"),
    (["--recover-data", "missing.txt"], "text source 'missing.txt' not found"),
    (["--recover-teacher", "MISSING"], "not found: not a folder"),
])
def test_prune_recover_refuses_bad_recovery_options_before_pruning(tmp_path, tiny_model_dir, calib_file, options,
                                                                    fragment):
    options = [str(tmp_path / "missing-teacher") if option == "MISSING" else option for option in options]
    code, output = run_cli("prune", "--model", tiny_model_dir, "--output", tmp_path / "out", "--calib", calib_file,
                           "--calib-samples", "4", "--calib-seqlen", "64", "--threads", "1", "--recover", *options)
    assert_one_line_error(code, output, fragment)
    assert list(tmp_path.iterdir()) == []
