"""Integration: a pruned SmolLM2 quantized and served by stock ONNX Runtime (int4 MatMulNBits) and stock vLLM
(compressed-tensors W4A16), each export passing its tolerance-based parity against a fake-quant reference."""

import pytest

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def pruned_smollm2(tmp_path_factory):
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    # align 64: every FFN width a multiple of the W4A16 group size used below (SmolLM2's hidden size 576 is not a
    # multiple of vLLM's default group 128, so its q/k/v/gate/up inputs need groups of 64 or 32)
    config = PruneConfig(method="cfsp", sparsity=0.5, align=64, calib_samples=8, calib_seqlen=256)
    folder, plan = prune_checkpoint(resolve_model("llama"), config, tmp_path_factory.mktemp("q") / "pruned",
                                    calibration=resolve_text("wikitext2"))
    assert all(width % 64 == 0 for width in plan.widths)
    return folder


def fp32_matmul_bytes(folder) -> int:
    """What one decode step reads from the float32 checkpoint: every projection and the lm_head, 4 bytes each."""
    from effideploy.bench.metrics import matmul_parameters
    from effideploy.models.build import build_config, count_parameters
    from effideploy.models.resolve import resolve_model

    return 4 * matmul_parameters(count_parameters(build_config(resolve_model(folder).config_dict)))


def test_int4_onnx_export_of_pruned_smollm2_serves_in_onnx_runtime(pruned_smollm2, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.models.build import load_tokenizer
    from effideploy.runtimes.onnx import OnnxRuntime

    result = export_onnx(pruned_smollm2, tmp_path / "int4", quantize="int4")
    manifest = result.manifest
    assert manifest["quantize"]["scheme"] == "int4" and manifest["quantize"]["bits"] == 4
    # int4 blocks of 32 with a scale each: ~4.5 bits a weight where quantized (fp16 storage would be 0.5)
    assert manifest["weight_storage"]["bytes_per_token"] < 0.45 * fp32_matmul_bytes(pruned_smollm2)
    prompt = load_tokenizer(pruned_smollm2)("Robert Boulter is an English film , television and theatre actor .").input_ids
    with OnnxRuntime(result.output, threads=2) as runtime:
        tokens = runtime.generate([prompt], 8).tokens[0]
    assert len(tokens) == 8


@pytest.mark.vllm
def test_w4a16_vllm_export_of_pruned_smollm2_passes_parity_in_stock_vllm(pruned_smollm2, tmp_path):
    from tests.kernels import require_vllm_kernel

    require_vllm_kernel(scheme="w4a16")
    from effideploy.exporters.vllm.export import export_vllm
    from effideploy.exporters.vllm.checks import QUANTIZED_TOP1_AGREEMENT

    result = export_vllm(pruned_smollm2, tmp_path / "w4a16", quantize="w4a16", group_size=64)
    assert result.parity.match and result.parity.top1_agreement >= QUANTIZED_TOP1_AGREEMENT
    assert result.manifest["quantize"]["group_size"] == 64 and result.manifest["dtype"] == "bfloat16"
    # int4 projections in groups of 64 and the (tied, unquantized) lm_head in bfloat16
    assert result.manifest["weight_storage"]["bytes_per_token"] < 0.3 * fp32_matmul_bytes(pruned_smollm2)
