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

SMALL = ["--runtime", "onnx", "--depth", "none", "--calib-samples", "4", "--calib-seqlen", "64", "--screen-windows", "2",
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
    # the shipped artifact is the very export the bench measured (reused, not exported again), linked inside
    bench = json.loads((out / "report" / "bench" / "report.json").read_text())
    measured = {m["label"]: m for m in bench["models"]}[data["recommended"]]
    assert Path(data["artifact"]).resolve() == Path(measured["artifact"]).resolve()
    assert (out / "recommended").resolve() == Path(data["artifact"]).resolve()
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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_features", [64, 80])  # whole blocks, and a last block MatMulNBits pads
def test_the_screens_fake_quantization_is_what_onnx_runtime_computes(tmp_path, bits, in_features):
    """The screen's quantize_dequantize against ONNX Runtime itself: a MatMul quantized by ORT's own
    MatMulNBitsQuantizer with the exporter's settings, run by ORT's MatMulNBits kernel on the identity, gives the
    weights as the kernel sees them."""
    import logging

    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from effideploy.exporters.onnx.quant import ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE
    from effideploy.exporters.onnx.schemes import quantize_dequantize

    root = logging.getLogger()  # importing ORT's quantizer reconfigures the root logger (see onnx_quant)
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    root.handlers[:], root.level = handlers, level

    torch.manual_seed(bits + in_features)
    weight = torch.randn(8, in_features)  # [out, in], as a Linear holds it
    weight[0, 3], weight[5, 40] = 9.0, -7.5  # outliers: a block's scale comes from its signed absmax
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [in_features, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [in_features, 8])],
        [numpy_helper.from_array(weight.T.contiguous().numpy(), "w")])  # ONNX MatMul: [K, N]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=DEFAULT_BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits))
    quantizer.process()
    quantized = quantizer.model.model
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits"]
    path = tmp_path / "q.onnx"
    onnx.save(quantized, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kernel = session.run(None, {"x": np.eye(in_features, dtype=np.float32)})[0].T  # [out, in]
    ours = quantize_dequantize(weight, bits, DEFAULT_BLOCK_SIZE).numpy()
    assert not np.allclose(ours, weight.numpy(), atol=1e-3)  # it does quantize
    np.testing.assert_allclose(ours, kernel, rtol=1e-5, atol=1e-5 * float(np.abs(kernel).max()))
