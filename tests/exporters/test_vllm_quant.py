"""Quantized vLLM exports (``export --runtime vllm --quantize w8a8|w4a16``): compressed-tensors checkpoints that stock
vLLM loads for nemotron-nas with per-block widths, parity within the stated tolerance, the manifest's quantize and
weight_storage sections, and the refusals (which run without a vLLM engine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from effideploy.errors import EffideployError
from effideploy.exporters.vllm.export import MANIFEST_FILE, export_vllm
from effideploy.exporters.vllm.checks import QUANTIZED_TOP1_AGREEMENT
from tests.exporters.test_vllm import write_tiny_pruned
from tests.kernels import require_vllm_kernel

WIDTHS_32 = [256, 128, 192, 64]  # multiples of 32, not all of 128


@pytest.fixture(scope="module")
def pruned32(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_pruned(tmp_path_factory.mktemp("tiny-pruned32"), tiny_tokenizer, widths=WIDTHS_32)


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def linear_bytes(storage: dict, embed_bytes: int) -> int:
    return storage["bytes_per_token"] - embed_bytes


# ------------------------------------------------------------------------------------------- refusals (no vLLM)

@pytest.mark.parametrize("options, fragment", [
    ({"quantize": "int3"}, "unknown --quantize scheme"),
    ({"quantize": "w4a16", "group_size": 48}, "--group-size 48 does not divide the hidden size 128"),
    ({"quantize": "w4a16", "group_size": 7}, "positive even number"),
    ({"quantize": "w4a16", "dtype": "float32"}, "needs --dtype bfloat16 or float16"),
    ({"quantize": "w8a8", "group_size": 32}, "--group-size applies only to --quantize w4a16"),
    ({"group_size": 32}, "--group-size applies only"),
])
def test_bad_quantize_options_are_refused_and_write_nothing(pruned32, tmp_path, options, fragment):
    with pytest.raises(EffideployError, match=fragment.replace("(", r"\(")) as info:
        export_vllm(pruned32, tmp_path / "out", verify=False, **options)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_w4a16_widths_not_a_multiple_of_the_group_name_the_blocks(pruned32, tmp_path):
    with pytest.raises(EffideployError) as info:  # default group 128: blocks 2 (192) and 3 (64) do not fit
        export_vllm(pruned32, tmp_path / "out", quantize="int4", verify=False)
    message = str(info.value)
    assert "blocks 2 (192), 3 (64)" in message and "--realign" in message and "--group-size 32 or 64" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


def test_w4a16_realign_rounds_widths_down_to_the_group(tiny_tokenizer, tmp_path):
    source = write_tiny_pruned(tmp_path / "src", tiny_tokenizer, widths=[256, 160, 224, 128])
    result = export_vllm(source, tmp_path / "out", quantize="w4a16", realign=True, verify=False)
    assert result.details["ffn_widths"] == [256, 128, 128, 128]
    assert [b["index"] for b in result.manifest["realign"]["blocks"]] == [1, 2]
    assert result.manifest["width_multiple"] == 128


def test_quantizing_a_quantized_export_is_refused(pruned32, tmp_path):
    export_vllm(pruned32, tmp_path / "q", quantize="w8a8", verify=False)
    with pytest.raises(EffideployError, match="already quantized"):
        export_vllm(tmp_path / "q", tmp_path / "again", quantize="w4a16", group_size=32, verify=False)
    # a folder whose manifest records quantization, even without quantization_config in config.json
    shutil.copytree(tmp_path / "q", tmp_path / "q2")
    config = json.loads((tmp_path / "q2" / "config.json").read_text())
    config.pop("quantization_config")
    (tmp_path / "q2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EffideployError, match="already a quantized export"):
        export_vllm(tmp_path / "q2", tmp_path / "again", quantize="w8a8", verify=False)
    assert not (tmp_path / "again").exists()


def test_manifest_and_weight_storage_without_vllm(pruned32, tmp_path):
    fp = manifest(export_vllm(pruned32, tmp_path / "fp", verify=False).output)
    w8 = manifest(export_vllm(pruned32, tmp_path / "w8", quantize="int8", verify=False).output)
    w4 = manifest(export_vllm(pruned32, tmp_path / "w4", quantize="w4a16", group_size=32, verify=False).output)
    assert fp["quantize"] is None and fp["weight_storage"]["format"] == "float32"
    for key, value in {"scheme": "w8a8", "bits": 8, "strategy": "channel", "symmetric": True, "method": "rtn",
                       "activations": "int8 dynamic per token", "format": "int-quantized", "group_size": None}.items():
        assert w8["quantize"][key] == value, key
    for key, value in {"scheme": "w4a16", "bits": 4, "strategy": "group", "group_size": 32, "symmetric": True,
                       "activations": "bfloat16", "format": "pack-quantized", "method": "rtn"}.items():
        assert w4["quantize"][key] == value, key
    assert w8["quantize"]["tool"].startswith("compressed-tensors ")
    assert (w8["dtype"], w4["dtype"]) == ("float32", "bfloat16")
    assert w8["weight_storage"]["format"] == "w8a8 int8 per channel"
    assert w4["weight_storage"]["format"] == "w4a16 int4 group 32"
    # bytes: the tied embedding (384 x 128) is lm_head and stays in the export dtype
    embed = {"fp": 384 * 128 * 4, "w8": 384 * 128 * 4, "w4": 384 * 128 * 2}
    fp_linear = linear_bytes(fp["weight_storage"], embed["fp"])
    w8_linear = linear_bytes(w8["weight_storage"], embed["w8"])
    w4_linear = linear_bytes(w4["weight_storage"], embed["w4"])
    assert 0.25 < w8_linear / fp_linear < 0.26  # int8 + one fp32 scale per output channel
    assert 0.125 < w4_linear / fp_linear < 0.15  # int4 + one bf16 scale per 32 inputs
    for m in (w8, w4):
        assert m["weight_storage"]["stored_bytes"] < fp["weight_storage"]["stored_bytes"]
    config = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert config["block_configs"][2]["ffn"]["intermediate_size"] == 192


# ---------------------------------------------------------------------------------------------- vLLM engine

@pytest.mark.vllm
@pytest.mark.parametrize("scheme, group_size", [("w8a8", None), ("w4a16", 32)])
def test_pruned_quantized_export_loads_in_vllm_within_tolerance(pruned32, tmp_path, scheme, group_size):
    require_vllm_kernel(scheme=scheme)
    result = export_vllm(pruned32, tmp_path / scheme, quantize=scheme, group_size=group_size)
    parity = result.parity
    assert parity.match and parity.top1_agreement >= QUANTIZED_TOP1_AGREEMENT
    assert parity.positions == sum(parity.prompt_tokens) + parity.prompts * (parity.new_tokens - 1)
    assert parity.max_abs_logprob_diff < 0.5
    assert 0 <= parity.vs_unquantized.top1_agreement <= 1
    assert parity.vs_unquantized.max_abs_logit_diff > 0
    assert manifest(result.output)["quantize"]["vllm_version"]


@pytest.mark.vllm
def test_dense_llama_quantizes_too(tiny_model_dir, tmp_path):
    """A plain Llama (FFN 256) through the int8 alias. (int4 at group 128 on this random tiny model agrees with its
    float32 fake-quant reference at only ~96% of positions in bf16: too close to the 95% bar for a stable test; the
    pruned w4a16 test above runs group 32.)"""
    pytest.importorskip("vllm")
    result = export_vllm(tiny_model_dir, tmp_path / "dense", quantize="int8")
    assert result.manifest["architecture"] == "LlamaForCausalLM"
    assert result.manifest["quantize"]["scheme"] == "w8a8" and result.manifest["quantize"]["group_size"] is None
    assert not (tmp_path / "dense" / "modeling_decilm.py").exists()
    assert result.parity.match and result.parity.dtype == "float32"


# ------------------------------------------------------------------------------- GPTQ from the pruning's pass

@pytest.fixture(scope="module")
def pruned_with_stats(tmp_path_factory, tiny_model_dir, calib_file) -> Path:
    """CFSP at 50%, widths multiples of 32, with the Linear input statistics kept (prune --keep-stats)."""
    from effideploy.data.text import TextSpec
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    config = PruneConfig(method="cfsp", sparsity=0.5, align=32, calib_samples=8, calib_seqlen=64, keep_stats=True)
    text = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    target, _ = prune_checkpoint(resolve_model(tiny_model_dir), config,
                                 tmp_path_factory.mktemp("kept") / "cfsp50", calibration=text)
    return target


def test_w4a16_gptq_from_kept_statistics_beats_round_to_nearest(pruned_with_stats, tmp_path):
    """Every projection's stored int4 weight (read back by compressed-tensors' decompressor) has a smaller
    layer-output error under the kept second moments than round-to-nearest on the same grid."""
    from effideploy.exporters.vllm.quant import dequantize_state_dict, quantization_scheme
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.quantization.gptq import output_error
    from effideploy.quantization.hessians import CheckpointHessians

    gptq = export_vllm(pruned_with_stats, tmp_path / "gptq", quantize="w4a16", group_size=32, quant_method="gptq",
                       verify=False)
    rtn = export_vllm(pruned_with_stats, tmp_path / "rtn", quantize="w4a16", group_size=32, verify=False)
    record = manifest(gptq.output)["quantize"]
    assert record["method"] == "gptq" and record["hessians"]["windows"] == 8
    assert manifest(rtn.output)["quantize"]["method"] == "rtn"
    quant = quantization_scheme("w4a16", 32)
    float_weights, kept = SafetensorsWeights(pruned_with_stats), CheckpointHessians.of(pruned_with_stats)

    def stored(folder):
        weights = SafetensorsWeights(folder)
        return dequantize_state_dict({name: weights.get(name) for name in weights.names()}, quant)

    ours, nearest = stored(gptq.output), stored(rtn.output)
    compared = 0
    for name in ours:
        if not name.startswith("model.layers.") or not name.endswith("proj.weight"):
            continue
        module = name[: -len(".weight")]
        hessian = kept.for_module(module)
        weight = float_weights.get(name).float()
        assert output_error(weight, ours[name], hessian) < output_error(weight, nearest[name], hessian), module
        compared += 1
    assert compared == 4 * 7


def test_gptq_needs_kept_statistics_and_no_realign(pruned32, pruned_with_stats, tmp_path):
    with pytest.raises(EffideployError, match="needs the statistics of the pruning pass"):
        export_vllm(pruned32, tmp_path / "out", quantize="w8a8", quant_method="gptq", verify=False)
    with pytest.raises(EffideployError, match="needs --quantize"):
        export_vllm(pruned_with_stats, tmp_path / "out", quant_method="gptq", verify=False)
    with pytest.raises(EffideployError, match="--realign is not supported"):
        export_vllm(pruned_with_stats, tmp_path / "out", quantize="w4a16", group_size=64, quant_method="gptq",
                    realign=True, verify=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.vllm
def test_w8a8_gptq_export_serves_in_vllm_within_tolerance(pruned_with_stats, tmp_path):
    pytest.importorskip("vllm")
    result = export_vllm(pruned_with_stats, tmp_path / "gptq", quantize="w8a8", quant_method="gptq")
    assert result.parity.match and result.parity.top1_agreement >= QUANTIZED_TOP1_AGREEMENT
    assert result.manifest["quantize"]["method"] == "gptq"
