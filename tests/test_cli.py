"""Bad input through the real command line: one-line error, exit code 2, nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, cwd=None, env=None):
    full_env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "effideploy", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, env=full_env, timeout=600)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stderr, fragment):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


def test_help_lists_the_commands():
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("prune", "eval"):
        assert command in out


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.2"])
def test_sparsity_out_of_range(tmp_path, tiny_model_dir, sparsity):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--sparsity", sparsity, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "--sparsity must be in (0, 1)")
    assert not (tmp_path / "out").exists()


def test_missing_model(tmp_path):
    code, _, err = run_cli("prune", "--model", tmp_path / "nope", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "not found")


def test_unknown_method(tmp_path, tiny_model_dir):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--method", "sparsegpt", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "unknown pruning method 'sparsegpt'")


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    code, _, err = run_cli("prune", "--model", folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "unsupported architecture 'GPT2LMHeadModel'")


def test_pickled_weights_are_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not opened")
    code, _, err = run_cli("prune", "--model", folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "pickled weights (pytorch_model.bin)")


def test_calibration_text_shorter_than_one_window(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", text, "--calib-seqlen", "64",
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, "shorter than one window")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite_and_input_is_never_the_output(tmp_path, tiny_model_dir, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--output", out)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--output", tiny_model_dir, "--overwrite")
    assert_one_line_error(code, err, "overlaps the input")


def test_prune_writes_a_checkpoint_and_eval_reads_it(tmp_path, tiny_model_dir, calib_file):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "4",
                                "--calib-seqlen", "64", "--sparsity", "0.5", "--output", out)
    assert code == 0, err
    assert (out / "effideploy.json").exists()
    assert "FFN sparsity 0.500" in err + stdout
    code, stdout, err = run_cli("eval", "ppl", out, "--text", calib_file, "--seqlen", "64", "--windows", "2")
    assert code == 0, err
    assert "perplexity" in err + stdout


def test_interrupted_run_leaves_nothing(tmp_path, tiny_model_dir, calib_file, monkeypatch):
    """A failure while writing removes the staging folder and leaves no output."""
    from effideploy.data.text import TextSpec
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, engine

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "copy_tokenizer", boom)
    spec = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    with pytest.raises(KeyboardInterrupt):
        engine.prune_checkpoint(resolve_model(tiny_model_dir), PruneConfig(calib_samples=2, calib_seqlen=32),
                                tmp_path / "out", calibration=spec)
    assert list(tmp_path.iterdir()) == []
