"""Every weight scheme's screen against what its runtime stores: the fake-quantized weight (``apply_scheme``, the
screen's own path) equals the exported weight dequantized by an independent reader, and the bytes the cost model
reads equal the exported files'. GGUF: the gguf package's reader and dequantizer; compressed-tensors: its own
decompressor (``vllm_quant.dequantize_state_dict``); MatMulNBits: tests/search/test_tune_onnx.py (ORT's quantizer
and kernel) plus the bytes here."""

import importlib.util
import json

import pytest
import torch

from effideploy.quantization.schemes import apply_scheme, fitted_scheme, layout, model_tensors
from tests.conftest import tiny_llama, train_tiny_tokenizer

# hidden 256 keeps the k-quants on most matrices; FFN 320 is not a multiple of 256 (ffn_down takes the fallback)
# nor of 128 (w4a16 takes group 64); 8 blocks make llama.cpp's use_more_bits pick blocks 0, 3, 6 and 7.
SHAPES = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scheme-model")
    tiny_llama(seed=3, **SHAPES).save_pretrained(folder)
    train_tiny_tokenizer().save_pretrained(folder)
    return folder


def screened(folder, runtime, name):
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model

    source = resolve_model(str(folder))
    scheme = fitted_scheme(runtime, name, source.config_dict)
    return scheme, apply_scheme(load_model(source), scheme), model_tensors(source.config_dict)


def test_w4a16_picks_a_group_that_fits_or_refuses_the_model():
    from effideploy.errors import EffideployError

    smollm2 = dict(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert fitted_scheme("vllm", "int4", smollm2).group_size == 64  # 576 takes no group of 128
    with pytest.raises(EffideployError, match="multiples of 32"):
        fitted_scheme("vllm", "w4a16", dict(smollm2, intermediate_size=1382))  # a CFSP width


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["q8_0", "q4_k_m", "f16"])
def test_gguf_screen_equals_the_exported_weights(tmp_path, model_dir, name):
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    if llamacpp_unavailable():
        pytest.skip(llamacpp_unavailable())
    import gguf
    import numpy as np

    from effideploy.cli import main
    from effideploy.exporters.llamacpp.gguf import gguf_name, permute_rope

    out = tmp_path / name
    with pytest.raises(SystemExit) as code:
        main(["export", str(model_dir), "--runtime", "llamacpp", "--quantize", name, "--no-verify", "--output", str(out)])
    assert code.value.code in (0, None)
    reader = gguf.GGUFReader(str(next(out.glob("*.gguf"))))
    stored = {t.name: t for t in reader.tensors}
    scheme, model, tensors = screened(model_dir, "llamacpp", name)
    storage = layout(scheme, tensors)
    modules = dict(model.named_modules())
    total = 0
    for tensor in tensors:
        if tensor.role == "lm_head" and tensor.tied:
            continue  # the tied head is token_embd, checked as the embedding (with the head's type)
        file = stored[gguf_name(tensor.name + ".weight")]
        tied = tensor.role == "embedding" and any(t.tied for t in tensors)
        kind = storage["lm_head" if tied else tensor.name]  # a tied table is stored as the output head
        assert file.tensor_type.name.lower() == kind.format, tensor.name  # the type llama.cpp chose
        assert file.n_bytes == kind.bytes, tensor.name
        total += file.n_bytes
        ours = modules[tensor.name].weight.detach().float()
        if tensor.kind in ("q_proj", "k_proj"):  # the exporter permutes rows to llama.cpp's rope order
            heads = SHAPES["num_attention_heads" if tensor.kind == "q_proj" else "num_key_value_heads"]
            ours = permute_rope(ours, heads)
        theirs = gguf.quants.dequantize(file.data, file.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(ours.numpy(), theirs.astype(np.float32), err_msg=tensor.name)
    matrices = sum(t.n_bytes for t in reader.tensors if len(t.shape) == 2)
    assert total == matrices  # every matrix of the file was compared


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["w8a8", "w4a16"])
def test_compressed_tensors_screen_equals_the_decompressed_export(tmp_path, model_dir, name):
    if importlib.util.find_spec("compressed_tensors") is None:
        pytest.skip("needs compressed-tensors (vLLM brings it)")
    from compressed_tensors.quantization import QuantizationConfig

    from effideploy.cli import main
    from effideploy.exporters.vllm.quant import dequantize_state_dict
    from effideploy.models.weights import SafetensorsWeights, read_header

    scheme, model, tensors = screened(model_dir, "vllm", name)
    out = tmp_path / name
    with pytest.raises(SystemExit) as code:
        main(["export", str(model_dir), "--runtime", "vllm", "--no-verify", "--output", str(out),
              *[f"--{k.replace('_', '-')}={v}" for k, v in scheme.export_options().items()]])
    assert code.value.code in (0, None)
    config = json.loads((out / "config.json").read_text())
    (quant,) = QuantizationConfig.model_validate(config["quantization_config"]).config_groups.values()
    quant.format = quant.format or config["quantization_config"]["format"]
    weights = SafetensorsWeights(out)
    state = dequantize_state_dict({n: weights.get(n) for n in weights.names()}, quant)
    modules = dict(model.named_modules())
    sizes = {}
    for path in out.glob("*.safetensors"):
        sizes.update({n: entry[4] for n, entry in read_header(path).items()})
    storage = layout(scheme, tensors)
    for tensor in tensors:
        if tensor.role == "lm_head" and tensor.tied:
            assert "lm_head.weight" not in sizes  # vLLM ties it: not stored
            continue
        ours = modules[tensor.name].weight.detach().float()
        torch.testing.assert_close(ours, state[tensor.name + ".weight"], rtol=0, atol=0, msg=tensor.name)
        stored = sum(v for n, v in sizes.items() if n.rsplit(".", 1)[0] == tensor.name)
        assert stored == storage[tensor.name].bytes, tensor.name


@pytest.mark.vllm
def test_w8a8_screen_quantizes_activations_as_the_parity_reference(tmp_path, model_dir):
    """The screen's W8A8 model (per-token int8 activations, this machine's int8 GEMM) gives the logits of the
    exporter's parity reference, which is built from the export's stored codes (exporters/vllm/quant_checks.py)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM (the kernel probe)")
    from effideploy.cli import main
    from effideploy.exporters.vllm.quant_checks import fake_quant_reference

    _, model, _ = screened(model_dir, "vllm", "w8a8")
    out = tmp_path / "w8a8"
    with pytest.raises(SystemExit):
        main(["export", str(model_dir), "--runtime", "vllm", "--quantize", "w8a8", "--no-verify", "--output", str(out)])
    reference, _ = fake_quant_reference(out)
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.onnx
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_matmulnbits_bytes_are_the_exported_graphs(tmp_path, model_dir, name):
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip("needs onnx, onnxruntime and onnxscript")
    from effideploy.cli import main
    from effideploy.exporters.manifest import read_export_manifest

    out = tmp_path / name
    with pytest.raises(SystemExit):
        main(["export", str(model_dir), "--runtime", "onnx", "--quantize", name, "--no-verify", "--output", str(out)])
    recorded = read_export_manifest(out)["weight_storage"]
    scheme, _, tensors = screened(model_dir, "onnx", name)
    storage = layout(scheme, tensors)
    read = sum(s.bytes for n, s in storage.items() if not n.endswith("embed_tokens"))
    assert read == recorded["bytes_per_token"]  # every MatMulNBits with its scales, the untied head included
