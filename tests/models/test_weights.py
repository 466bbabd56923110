"""SafetensorsWeights reads tensors without memory-mapping the file; it must agree with safetensors itself."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from effideploy.errors import EffideployError
from effideploy.models.weights import SafetensorsWeights


def test_reads_every_dtype_and_shape_like_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(5, 7),
        "b.bf16": torch.randn(3, 4).to(torch.bfloat16),
        "c.f16": torch.randn(9).to(torch.float16),
        "d.int": torch.arange(12, dtype=torch.int64).reshape(2, 2, 3),
        "e.scalar": torch.tensor(3.5),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = SafetensorsWeights(tmp_path)
    reference = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(weights.names()) == sorted(reference)
    for name, tensor in reference.items():
        got = weights.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor)
    assert weights.get("b.bf16", torch.float32).dtype == torch.float32


def test_sharded_index_and_missing_tensor(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "part-1.safetensors"))
    save_file({"y": torch.zeros(3)}, str(tmp_path / "part-2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}))
    weights = SafetensorsWeights(tmp_path)
    assert torch.equal(weights.get("y"), torch.zeros(3)) and "x" in weights
    with pytest.raises(EffideployError, match="tensor z is missing"):
        weights.get("z")


def test_not_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(EffideployError, match="not a safetensors file"):
        SafetensorsWeights(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EffideployError, match="holds no .safetensors"):
        SafetensorsWeights(tmp_path / "empty")


def _llama_dict(**overrides):
    values = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4, "intermediate_size": 8,
              "num_attention_heads": 1, "vocab_size": 6}
    values.update(overrides)
    return values


def test_the_layer_count_is_checked_against_the_headers_before_anything_per_layer(tmp_path):
    from effideploy.models.weights import check_layer_count

    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"]
    check_layer_count(tmp_path, _llama_dict(), names)
    # 10^100 layers: refused at once (the check walks the tensors present, never range(num_hidden_layers))
    with pytest.raises(EffideployError, match="says num_hidden_layers 10{100}, but the weights hold 2 blocks "
                                              r"\(block 2 is missing\)"):
        check_layer_count(tmp_path, _llama_dict(num_hidden_layers=10**100), names)
    with pytest.raises(EffideployError, match="the weights hold block 1, but config.json says num_hidden_layers 1"):
        check_layer_count(tmp_path, _llama_dict(num_hidden_layers=1), names)
    with pytest.raises(EffideployError, match=r"block 0 is missing"):
        check_layer_count(tmp_path, _llama_dict(), names[2:])
    # a pruned checkpoint's block may have no tensors at all (both sublayers no-op): fewer blocks present is fine
    check_layer_count(tmp_path, _llama_dict(model_type="nemotron-nas", num_hidden_layers=3), names)


def test_the_memory_plan_refuses_sizes_no_file_can_hold():
    from effideploy.memory_plan import MAX_FILE_BYTES, Shapes

    shapes = Shapes.from_config(_llama_dict(num_hidden_layers=10**9, hidden_size=4096, intermediate_size=11008,
                                            num_attention_heads=32, vocab_size=32000))
    assert shapes.weight_bytes < MAX_FILE_BYTES  # large, but a file could hold it: the plan decides
    for field, value in (("num_hidden_layers", 10**18), ("hidden_size", 10**200), ("vocab_size", 2**70)):
        with pytest.raises(EffideployError, match="more than 2\\^63 bytes of weights, more than any file can hold"):
            Shapes.from_config(_llama_dict(**{field: value}))
