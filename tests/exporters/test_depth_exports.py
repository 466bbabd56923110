"""A checkpoint with dropped blocks and no-op attention in ONNX Runtime and vLLM: the ONNX graph has no attention node
and no KV tensors for the removed attention, and transformers, ONNX Runtime and vLLM give identical greedy tokens."""

from __future__ import annotations

import json
from unittest import mock

import pytest

from effideploy.pruning import PruneConfig, prune_checkpoint
from tests.conftest import tiny_llama

N_BLOCKS = 6
DROPPED, NO_ATTENTION = {2}, {3, 5}  # checkpoint: 5 blocks, attention removed in blocks 2 and 4
PROMPTS = [[5, 17, 99, 230, 41, 8, 77, 150, 12, 3, 64, 200, 31], [300, 2, 45, 9, 180, 66, 21]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory, tiny_tokenizer, calib_file):
    """Dropped blocks and no-op attention chosen by hand (the methods choose by scores), FFNs narrowed by CFSP's
    channel order with lstsq compensation so the checkpoint has every kind of change."""
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning.depth import Structure
    from effideploy.pruning.methods.cfsp_joint import CFSPJoint

    root = tmp_path_factory.mktemp("depth-exports")
    tiny_llama(seed=3, num_hidden_layers=N_BLOCKS).save_pretrained(root / "dense")
    tiny_tokenizer.save_pretrained(root / "dense")

    def structure(self, scores, stats, shape, weights):
        return Structure(widths=[w - 64 for w in shape.full_widths], dropped=set(DROPPED), no_attention=set(NO_ATTENTION))

    with mock.patch.object(CFSPJoint, "structure", structure):
        target, _ = prune_checkpoint(resolve_model(str(root / "dense")),
                                     PruneConfig(method="cfsp-joint", target_params=0.3, calib_samples=24, calib_seqlen=64),
                                     root / "pruned", calibration=resolve_text(str(calib_file), "calibration", None))
    return target


def _torch_tokens(folder):
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.pytorch import TorchRuntime

    return TorchRuntime(model=load_model(resolve_model(str(folder)))).generate(PROMPTS, NEW_TOKENS).tokens


@pytest.mark.onnx
def test_onnx_graph_lacks_removed_attention_and_matches_transformers(mixed_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    result = export_onnx(mixed_checkpoint, tmp_path / "onnx")
    assert result.parity.tokens_match
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    kv_inputs = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    assert kv_inputs == [f"past_key_values.{i}.{kind}" for i in range(3) for kind in ("key", "value")]
    assert sum(node.op_type == "GroupQueryAttention" for node in graph.node) == 3
    assert result.manifest["graph"]["kv_layers"] == [0, 1, 3]
    assert json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 3
    with OnnxRuntime(result.output) as runtime:
        assert runtime.generate(PROMPTS, NEW_TOKENS).tokens == _torch_tokens(mixed_checkpoint)
        # KV eviction works per attention layer (the runner's caches exist for blocks with attention only)
        runtime.compress("streamingllm:0.5")
        assert len(runtime.generate(PROMPTS[:1], 4).tokens[0]) == 4


@pytest.mark.vllm
def test_transformers_onnx_runtime_and_vllm_give_identical_greedy_tokens(mixed_checkpoint, tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("onnxruntime")
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.exporters.vllm.export import export_vllm
    from effideploy.exporters.vllm.checks import vllm_greedy
    from effideploy.runtimes.onnx import OnnxRuntime

    exported = export_vllm(mixed_checkpoint, tmp_path / "vllm", verify=True)
    assert exported.parity.match
    vllm_tokens = vllm_greedy(exported.output, PROMPTS, NEW_TOKENS, dtype="float32", kv_cache_dtypes=["auto"])["auto"]["tokens"]
    with OnnxRuntime(export_onnx(mixed_checkpoint, tmp_path / "onnx").output) as runtime:
        onnx_tokens = runtime.generate(PROMPTS, NEW_TOKENS).tokens
    assert vllm_tokens == onnx_tokens == _torch_tokens(mixed_checkpoint)


def test_vllm_export_refuses_a_first_block_without_attention(mixed_checkpoint, tmp_path):
    """The layout vLLM's nemotron-nas decoder mishandles is refused before anything is written."""
    import shutil

    from effideploy.errors import EffideployError
    from effideploy.exporters.vllm.export import export_vllm

    broken = tmp_path / "broken"
    shutil.copytree(mixed_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["block_configs"][0]["attention"] = {"no_op": True}
    (broken / "config.json").write_text(json.dumps(config))
    for path in broken.glob("*.safetensors"):  # the weights must agree with the config to get that far
        from safetensors.torch import load_file, save_file

        tensors = {k: v for k, v in load_file(path).items()
                   if not k.startswith(("model.layers.0.self_attn.", "model.layers.0.input_layernorm."))}
        save_file(tensors, path, metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if not k.startswith(("model.layers.0.self_attn.", "model.layers.0.input_layernorm."))}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EffideployError, match="block 0 has a no-op attention but an FFN"):
        export_vllm(broken, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.llamacpp
def test_llamacpp_runs_dropped_blocks_and_no_op_attention_as_transformers_does(mixed_checkpoint, tmp_path):
    """The search's depth lever is in the default space on llama.cpp too: the ``deci`` GGUF (0 heads for a removed
    attention, a shorter stack for dropped blocks) gives transformers' greedy tokens (the export's f32 parity)."""
    from effideploy.exporters.llamacpp.export import export_llamacpp
    from effideploy.exporters.llamacpp.gguf import read_gguf_summary
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    if llamacpp_unavailable():
        pytest.skip(llamacpp_unavailable())
    result = export_llamacpp(mixed_checkpoint, tmp_path / "gguf", quantize="f32")
    summary = read_gguf_summary(result.output / "model-f32.gguf")
    assert summary["architecture"] == "deci" and summary["head_count"] == [2, 2, 0, 2, 0]  # 5 blocks kept
    assert result.parity is not None and result.parity.match
