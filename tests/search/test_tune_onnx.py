"""The search on ONNX Runtime with weight quantization on a tiny model: quantization-only recipes are timed for
the cost model, the fake-quantized screen agrees with the exported int8 graph, and the report compares families."""

import importlib.util
import json

import pytest

from effideploy.cli import main
from tests.conftest import DATA

pytestmark = [pytest.mark.onnx, pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs onnx, onnxruntime and onnxscript")]


def test_onnx_search_with_quantization(tmp_path, tiny_model_dir, tiny_task_dir):
    policy = tmp_path / "easy.toml"
    policy.write_text('name = "easy"\n[thresholds]\nmax_perplexity_increase = 100.0\nmin_decode_speedup = 0.01\n')
    out = tmp_path / "search"
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--model", str(tiny_model_dir), "--policy", str(policy), "--output", str(out), "--runtime", "onnx",
              "--sparsities", "0,0.5", "--quantize", "none,int8", "--calib-samples", "4", "--calib-seqlen", "64",
              "--screen-windows", "2", "--screen-seqlen", "64", "--shortlist", "1", "--repeats", "1",
              "--ppl-windows", "2", "--ppl-seqlen", "64", "--prompt-tokens", "24", "--new-tokens", "4",
              "--mc-limit", "5", "--task", str(tiny_task_dir), "--no-memory", "--threads", "1",
              "--data-dir", str(DATA)])
    assert exit_info.value.code == 0
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["cost_model"]["fitted_on"] == ["dense", "dense+int8", "cfsp-0.5"]
    assert set(data["cost_model"]["ttft"]["coefficients"]) == {"prefill_flops_float", "prefill_flops_quant"}
    benched = {r["label"]: r for r in data["recipes"] if r["stage"] == "benched"}
    # the fake-quantized screen of dense+int8 against the real int8 graph's perplexity (different windows, so loose)
    if "dense+int8" in benched:
        record = benched["dense+int8"]
        assert record["screen"]["perplexity_increase"] == pytest.approx(record["measured"]["perplexity_increase"], abs=0.05)
    assert data["comparisons"]["quantization"]["best"] is not None
    assert "## Against the alternatives" in (out / "report" / "report.md").read_text()
