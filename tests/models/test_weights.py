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
