"""Quantized ONNX exports (MatMulNBits int8 / int4, rtn / hqq): tolerance-based parity against the fake-quant
reference, the stored-weight accounting, the manifest, and the refusals.

The graphs come from the tiny dense and pruned exports of tests/exporters/test_onnx.py (made once per session);
``graph_of`` stands in for the torch export with a copy of one of them, so each test here runs the quantizer,
the parity checks and the manifest for real in a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import read_export_parity
from tests.exporters.test_onnx import exported, manifest, pruned_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.onnx


@pytest.fixture
def graph_of(monkeypatch, tmp_path_factory, tiny_model_dir, calib_file):
    """graph_of("dense"|"pruned"): make export_onnx take that session export's graph instead of exporting again."""
    from effideploy.exporters.onnx import graph as onnx_graph

    def use(kind: str):
        done = exported(kind, tmp_path_factory, tiny_model_dir, calib_file)

        def copy_graph(model, path, **_):
            for file in done.output.glob("model.onnx*"):
                shutil.copy2(file, Path(path).parent / file.name)
            return {"opset": None, "fusions": {}}

        monkeypatch.setattr(onnx_graph, "export_graph", copy_graph)
        return done

    return use


def matmul_nbits(path: Path) -> list[dict]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in graph.node if node.op_type == "MatMulNBits"]


# ------------------------------------------------------------------------------------------- exports

def test_int4_rtn_export_passes_parity_and_records_what_is_stored(graph_of, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    dense = graph_of("dense")
    result = export_onnx(tiny_model_dir, tmp_path / "int4", quantize="int4")
    record = manifest(result.output)
    quantize = record["quantize"]
    assert {k: quantize[k] for k in ("scheme", "bits", "block_size", "method", "symmetric", "accuracy_level", "op")} == {
        "scheme": "int4", "bits": 4, "block_size": 32, "method": "rtn", "symmetric": True, "accuracy_level": 4,
        "op": "com.microsoft.MatMulNBits"}
    assert quantize["tool"].startswith("onnxruntime ") and "MatMulNBitsQuantizer" in quantize["tool"]
    nodes = matmul_nbits(result.details["model_file"])
    assert len(nodes) == 4 * 5 + 1 == quantize["quantized_matmuls"]  # every projection and the lm_head
    assert all(n["bits"] == 4 and n["block_size"] == 32 and n["accuracy_level"] == 4 for n in nodes)

    parity = read_export_parity(result.output).quantized
    # with float activations the graph is the reference to summation noise; as shipped, int8 activations move it
    assert parity.exact_max_abs_diff <= parity.exact_tolerance < 0.01
    assert parity.exact_max_abs_diff < parity.logits_max_abs_diff / 10
    assert parity.logits_max_abs_diff <= parity.logits_tolerance
    assert parity.top1_agreement_decided >= 0.95 and parity.decided_positions > 0
    # The fake-quant reference explains the quantized graph far better than the unquantized model does.
    assert parity.logits_max_abs_diff < parity.vs_float.logits_max_abs_diff / 3
    assert 0 <= parity.vs_float.top1_agreement <= 1 and 0 <= parity.vs_float.token_agreement <= 1

    storage, float_storage = record["weight_storage"], manifest(dense.output)["weight_storage"]
    assert storage["format"] == "int4 MatMulNBits block 32 (rtn)" and float_storage["format"] == "float32"
    # 4 bits + one fp32 scale per 32 weights = 0.625 bytes per weight against 4: 6.4x fewer bytes per token.
    assert 6.0 < float_storage["bytes_per_token"] / storage["bytes_per_token"] < 6.5
    assert storage["stored_bytes"] < float_storage["stored_bytes"]
    assert storage["stored_bytes"] <= result.details["model_bytes"] < storage["stored_bytes"] + 200_000
    with OnnxRuntime(result.output) as runtime:
        assert len(runtime.generate([[5, 6, 7, 8]], 4).tokens[0]) == 4


def test_int8_and_int4_hqq_gptq_exports_of_a_pruned_checkpoint(graph_of, tmp_path_factory, tiny_model_dir, calib_file,
                                                          tmp_path):
    from effideploy.exporters.onnx.export import export_onnx

    graph_of("pruned")
    checkpoint = pruned_checkpoint(tmp_path_factory, tiny_model_dir, calib_file)
    widths = [b["ffn"]["intermediate_size"] for b in json.loads((checkpoint / "config.json").read_text())["block_configs"]]
    float_bytes = manifest(exported("pruned", tmp_path_factory, tiny_model_dir, calib_file).output)["weight_storage"]
    storages = {}
    for scheme, method in (("int8", None), ("int4", "hqq"), ("int4", "rtn"), ("int4", "gptq")):
        result = export_onnx(checkpoint, tmp_path / f"{scheme}-{method}", quantize=scheme, quant_method=method,
                             block_size=None if scheme == "int8" else 16)
        record = manifest(result.output)
        assert record["quantize"]["method"] == (method or "rtn")
        parity = read_export_parity(result.output).quantized
        assert parity.logits_max_abs_diff <= parity.logits_tolerance
        assert parity.logits_max_abs_diff < parity.vs_float.logits_max_abs_diff
        # Each block keeps its own width: the down projections' K.
        down = [n["K"] for n in matmul_nbits(result.details["model_file"]) if n["N"] == 128 and n["K"] != 128]
        assert down == widths
        storages[(scheme, method)] = record["weight_storage"]
    assert record["quantize"]["block_size"] == 16 and storages[("int4", "hqq")]["format"] == "int4 MatMulNBits block 16 (hqq)"
    assert record["quantize"]["calibration"]["windows"] == 8 and record["quantize"]["symmetric"] is True  # gptq
    assert storages[("int4", "hqq")]["bytes_per_token"] > storages[("int4", "rtn")]["bytes_per_token"]  # float zeros
    assert storages[("int4", "gptq")]["bytes_per_token"] == storages[("int4", "rtn")]["bytes_per_token"]
    assert (storages[("int4", "rtn")]["bytes_per_token"] < storages[("int8", None)]["bytes_per_token"]
            < float_bytes["bytes_per_token"])
    assert 3.3 < float_bytes["bytes_per_token"] / storages[("int8", None)]["bytes_per_token"] < 3.7


def test_gptq_from_the_statistics_the_pruning_pass_kept(graph_of, tmp_path_factory, tiny_model_dir, calib_file,
                                                         tmp_path):
    """prune --keep-stats, then export --quant-method gptq: no second pass over calibration text; every block's
    MatMulNBits holds GPTQ's codes for the kept second moments (the head stays round-to-nearest), with a smaller
    layer-output error than round-to-nearest, and parity holds; int8 GPTQ works from the same statistics."""
    from effideploy.data.text import TextSpec
    from effideploy.exporters.onnx import quant as onnx_quant
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.exporters.onnx.quant import dequantized_weights, linear_targets
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint
    from effideploy.quantization.gptq import onnx_grid, output_error, rtn
    from effideploy.quantization.hessians import CheckpointHessians

    graph_of("pruned")  # the same weights: keep_stats only adds hooks to the pass
    config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=4, calib_seqlen=64, keep_stats=True)
    text = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    checkpoint, _ = prune_checkpoint(resolve_model(tiny_model_dir), config, tmp_path / "kept", calibration=text)

    def no_second_pass(*_a, **_k):
        raise AssertionError("GPTQ ran a calibration pass although the pruning kept its statistics")

    import effideploy.exporters.onnx.export as onnx_exporter
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(onnx_exporter, "calibration_windows", no_second_pass)
    try:
        result = export_onnx(checkpoint, tmp_path / "gptq", quantize="int4", quant_method="gptq", block_size=16)
        int8 = export_onnx(checkpoint, tmp_path / "gptq8", quantize="int8", quant_method="gptq")
    finally:
        monkeypatch.undo()
    record = manifest(result.output)["quantize"]
    assert record["method"] == "gptq" and record["gptq_matmuls"] == 4 * 5 and len(record["rtn_matmuls"]) == 1
    assert record["hessians"]["windows"] == 4 and "pruning" in record["hessians"]["source"]
    assert manifest(int8.output)["quantize"]["gptq_matmuls"] == 20
    for export in (result, int8):
        parity = read_export_parity(export.output).quantized
        assert parity.logits_max_abs_diff <= parity.logits_tolerance

    reference = load_model(resolve_model(checkpoint), dtype=torch.float32)
    hessians = CheckpointHessians.of(checkpoint)
    floats = [(names, torch.cat([m.weight.detach() for m in modules]).float())
              for names, modules in ((tuple(n for n, _ in group), [m for _, m in group])
                                     for group in linear_targets(reference).values())]
    better = 0
    for stored in dequantized_weights(result.details["model_file"]).values():
        stored = torch.from_numpy(stored).T  # [out, in], like the Linear
        names, weight = min(((n, w) for n, w in floats if w.shape == stored.shape),
                            key=lambda item: float((item[1] - stored).norm()))  # its own float weight
        hessian = hessians.for_module(names[0])
        if hessian is None:
            assert names == ("lm_head",)
            continue
        nearest = rtn(weight, onnx_grid(4), 16).dequantized
        better += output_error(weight, stored, hessian) < output_error(weight, nearest, hessian)
    assert better == 4 * 5  # packed q/k/v, o, gate, up, down per block


def test_dequantized_weights_are_what_the_kernel_multiplies_by(tmp_path):
    """A lone MatMulNBits node of each kind, run by ONNX Runtime without activation rounding (accuracy_level 0
    would be the same; 1 = fp32 compute), against x @ the dequantized weight."""
    import onnx
    from onnx import TensorProto, helper

    from effideploy.exporters.onnx.quant import dequantized_weights, quantization_settings, quantize_graph

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((80, 24)).astype(np.float32)  # K = 80: a partial last block
    x = rng.standard_normal((3, 80)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "float.onnx")
    import onnxruntime

    for scheme, method in (("int8", "rtn"), ("int4", "rtn"), ("int4", "hqq")):
        out = tmp_path / f"{scheme}-{method}.onnx"
        quantize_graph(tmp_path / "float.onnx", out, quantization_settings(scheme, 16, method, "float32"))
        model = onnx.load(str(out))
        for node in model.graph.node:
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 1  # fp32 compute: no activation rounding
        (dequantized,) = dequantized_weights(out).values()
        got = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ dequantized, atol=2e-4, rtol=0)
        assert np.abs(dequantized - weight).max() < (0.3 if scheme == "int4" else 0.02)  # |w| <= 3.6


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4", "block_size": 24}, "--block-size must be a power of two >= 16"),
    ({"quantize": "int8", "block_size": 8}, "--block-size must be a power of two >= 16"),
    ({"quantize": "int2"}, "--quantize must be one of int8, int4"),
    ({"quantize": "int4", "quant_method": "awq"}, "--quant-method must be one of rtn, hqq, gptq"),
    ({"quantize": "int8", "quant_method": "hqq"}, "hqq is 4-bit only"),
    ({"quantize": "int8", "quant_method": "gptq"}, "needs the statistics of the pruning pass"),
    ({"quantize": "int4", "dtype": "float16"}, "use --dtype float32 with --quantize int4"),
    ({"block_size": 64}, "need --quantize"),
])
def test_bad_quantization_options_are_refused_before_any_work(tmp_path, tiny_model_dir, options, message):
    from effideploy.exporters.onnx.export import export_onnx

    with pytest.raises(EffideployError, match=message):
        export_onnx(tiny_model_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_source_is_refused(graph_of, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx

    dense = graph_of("dense")
    with pytest.raises(EffideployError, match="is an ONNX export; quantize from the checkpoint"):
        export_onnx(dense.output, tmp_path / "a", quantize="int8")
    quantized = tmp_path / "compressed"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(EffideployError, match=r"already quantized \(compressed-tensors"):
        export_onnx(quantized, tmp_path / "b", quantize="int4")
    (quantized / "effideploy_export.json").write_text(json.dumps({"runtime": "vllm", "quantize": {"scheme": "w4a16"}}))
    with pytest.raises(EffideployError, match=r"already quantized \(w4a16\)"):
        export_onnx(quantized, tmp_path / "c", quantize="int4")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_quantized_graph_off_its_reference_fails_and_keeps_nothing(graph_of, monkeypatch, tiny_model_dir, tmp_path):
    """A graph whose weights are not the ones the reference dequantized (here one projection's reference weights
    nudged by 1%, as a packing bug would shift them) fails the float-activation check, and nothing is kept."""
    import torch

    from effideploy.exporters.onnx import export as onnx_export
    from effideploy.exporters.onnx.export import export_onnx

    graph_of("dense")
    real = onnx_export.fake_quant_reference

    def nudged(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            weight = model.model.layers[0].mlp.down_proj.weight
            weight.mul_(1.01)
        return model

    monkeypatch.setattr(onnx_export, "fake_quant_reference", nudged)
    with pytest.raises(EffideployError, match=r"int4 parity failed against the fake-quant reference: with float "
                                              r"activations max \|logit diff\| .* weights are not the ones"):
        export_onnx(tiny_model_dir, tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_cli_quantization_options(graph_of, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from effideploy.cli import app

    graph_of("dense")
    bad = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--runtime", "onnx", "--output", str(tmp_path / "x"),
                                   "--quantize", "int4", "--block-size", "24"])
    assert isinstance(bad.exception, EffideployError)  # the entry point prints it in one line, exit 2
    assert str(bad.exception) == "--block-size must be a power of two >= 16 (MatMulNBits), got 24"
    assert not (tmp_path / "x").exists()
    good = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--runtime", "onnx", "--output", str(tmp_path / "y"),
                                    "--quantize", "int4", "--block-size", "64", "--quant-method", "hqq"])
    assert good.exit_code == 0, good.output
    assert "quantizedgraphvsfake-quant" in "".join(good.output.split())  # rich wraps long lines
    assert manifest(tmp_path / "y")["weight_storage"]["format"] == "int4 MatMulNBits block 64 (hqq)"
