"""The search on ONNX Runtime on a tiny model: quantization-only recipes are timed for the cost model, the
fake-quantized screen agrees with the exported int8 graph, the report compares families; and a winning KV budget
is shipped as an export inside the output that carries it, rebuilt by reproduce.sh's real commands."""

import importlib.util
import json
from pathlib import Path

import pytest

from effideploy.cli import main
from tests.conftest import DATA

pytestmark = [pytest.mark.onnx, pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs onnx, onnxruntime and onnxscript")]

SMALL = ["--runtime", "onnx", "--calib-samples", "4", "--calib-seqlen", "64", "--screen-windows", "2",
         "--screen-seqlen", "64", "--repeats", "1", "--ppl-windows", "2", "--ppl-seqlen", "64", "--prompt-tokens", "24",
         "--new-tokens", "4", "--mc-limit", "5", "--no-memory", "--threads", "1", "--data-dir", str(DATA)]


def loose_policy(tmp_path):
    """Every recipe of a tiny random model passes this (so every shortlisted recipe is benched and can win)."""
    path = tmp_path / "loose.toml"
    path.write_text('name = "loose"\n[thresholds]\nmax_perplexity_increase = 100.0\nmin_decode_speedup = 0.01\n')
    return path


def tune(*args):
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *map(str, args)])
    return exit_info.value.code


def test_onnx_search_with_quantization(tmp_path, tiny_model_dir, tiny_task_dir):
    out = tmp_path / "search"
    # A shortlist as large as the space (3 recipes) under a loose policy: every recipe is benched, so the check of
    # the screen against the real int8 graph below always runs.
    code = tune("--model", tiny_model_dir, "--policy", loose_policy(tmp_path), "--output", out, "--sparsities", "0,0.5",
                "--quantize", "none,int8", "--shortlist", "3", "--task", tiny_task_dir, *SMALL)
    assert code == 0
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["cost_model"]["fitted_on"] == ["dense", "dense+int8", "cfsp-0.5"]
    assert set(data["cost_model"]["ttft"]["coefficients"]) == {"prefill_flops_float", "prefill_flops_quant"}
    benched = {r["label"]: r for r in data["recipes"] if r["stage"] == "benched"}
    assert set(benched) == {"dense+int8", "cfsp-0.5", "cfsp-0.5+int8"}
    # the fake-quantized screen of dense+int8 against the real int8 graph's perplexity (different windows, so loose)
    record = benched["dense+int8"]
    assert record["screen"]["perplexity_increase"] == pytest.approx(record["measured"]["perplexity_increase"], abs=0.05)
    assert data["comparisons"]["quantization"]["best"] == "dense+int8"
    assert "## Against the alternatives" in (out / "report" / "report.md").read_text()


def test_a_winning_kv_budget_on_the_dense_model_ships_as_an_export_inside_the_output(tmp_path, tiny_model_dir,
                                                                                    tiny_task_dir):
    from effideploy.exporters.manifest import read_export_manifest
    from tests.search.test_tune_outputs import run_script

    out = tmp_path / "search"
    # The only recipe: the dense model with a KV budget (no pruning, so no calibration).
    code = tune("--model", tiny_model_dir, "--policy", loose_policy(tmp_path), "--output", out, "--sparsities", "0",
                "--quantize", "none", "--kv", "streamingllm:0.5", "--shortlist", "1", "--task", tiny_task_dir, *SMALL)
    assert code == 0
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["recommended"] == "dense+streamingllm:0.5" and data["link"]["linked"]
    link = out / "recommended"
    target = link.resolve()
    assert link.is_symlink() and (out / "exports").resolve() in target.parents  # inside the output, never the model
    assert target != Path(tiny_model_dir).resolve() and str(target) == str(Path(data["artifact"]).resolve())
    manifest = read_export_manifest(target)
    assert manifest["token_compression"]["method"] == "streamingllm"  # the export carries the KV budget
    calls = run_script(out / "report" / "reproduce.sh", tmp_path / "run")
    assert calls == [["export", str(tiny_model_dir), "--runtime", "onnx", "--token-compression", "streamingllm:0.5",
                      "--output", "out/recommended"]]
