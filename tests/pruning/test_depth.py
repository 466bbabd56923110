"""Depth and attention pruning on tiny random models: the sublayer statistics of the calibration pass, the three
methods (drop-blocks, drop-attention, cfsp-joint), the checkpoint without the removed sublayers and its numerics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from effideploy.errors import EffideployError, OptionError
from effideploy.pruning import PruneConfig, prune_checkpoint
from effideploy.pruning.calibration import collect_stats, load_stats, save_stats
from tests.conftest import tiny_llama

N_BLOCKS = 6
CALIB = dict(calib_samples=8, calib_seqlen=32)


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-deep")
    tiny_llama(seed=3, num_hidden_layers=N_BLOCKS).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _prune(folder, tmp_path, calib_file, **options):
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model

    config = PruneConfig(**{**CALIB, **options})
    return prune_checkpoint(resolve_model(str(folder)), config, tmp_path / options["method"],
                            calibration=resolve_text(str(calib_file), "calibration", None))


def _tensor_names(folder) -> set[str]:
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            names.update(handle.keys())
    return names


def _reference(folder, kept: list[int], no_attention: list[int]):
    """The dense model with blocks removed and attentions zeroed by hand: what the checkpoint must compute."""
    from torch import nn
    from transformers import LlamaForCausalLM

    from effideploy.checkpoint.remote.modeling_decilm import NoOpAttention

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in kept)
    model.config.num_hidden_layers = len(kept)
    for new, original in enumerate(kept):
        layer = model.model.layers[new]
        layer.self_attn.layer_idx = new
        if original in no_attention:
            layer.self_attn, layer.input_layernorm = NoOpAttention(new), nn.Identity()
    return model


def test_sublayer_statistics_match_the_residual_updates(deep_model_dir):
    """Angles and update energies of the single pass equal those measured with hooks on the whole model."""
    from effideploy.models.build import build_config
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.pruning.calibration import angular_distance
    from transformers import LlamaForCausalLM

    source = resolve_model(str(deep_model_dir))
    layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
    windows = torch.randint(3, 384, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(layerwise, windows, batch_size=3)

    model = LlamaForCausalLM.from_pretrained(deep_model_dir, dtype=torch.float32).eval()
    seen = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(("x", i), k.get("hidden_states", a[0] if a else None)), with_kwargs=True))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("h", i), a[0])))
        handles.append(layer.register_forward_hook(lambda m, a, k, out, i=i: seen.__setitem__(("y", i), out),
                                                   with_kwargs=True))
    with torch.no_grad():
        model(windows, use_cache=False)
    for i, block in enumerate(stats.blocks):
        x, h, y = seen[("x", i)], seen[("h", i)], seen[("y", i)]
        assert block.attention_angular == pytest.approx(float(angular_distance(x, h).mean()), rel=1e-4)
        assert block.ffn_angular == pytest.approx(float(angular_distance(h, y).mean()), rel=1e-4)
        assert block.drop_loss("attention") == pytest.approx(float(((h - x).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()), rel=1e-4)
        assert block.drop_loss("ffn") == pytest.approx(float(((y - h).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()), rel=1e-4)
        assert block.drop_loss("block") == pytest.approx(float(((y - x).pow(2).sum(-1) / y.pow(2).sum(-1)).mean()), rel=1e-4)
        assert 0.0 <= block.attention_angular <= 1.0 and 0.0 <= block.ffn_angular <= 1.0


def test_sublayer_statistics_survive_save_and_load(deep_model_dir, tmp_path):
    from effideploy.models.build import build_config
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights

    source = resolve_model(str(deep_model_dir))
    layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
    stats = collect_stats(layerwise, torch.randint(3, 384, (2, 16)))
    save_stats(stats, tmp_path / "stats.safetensors")
    loaded = load_stats(tmp_path / "stats.safetensors")
    assert [b.drop_loss("attention") for b in loaded.blocks] == [b.drop_loss("attention") for b in stats.blocks]
    assert [b.ffn_angular for b in loaded.blocks] == [b.ffn_angular for b in stats.blocks]


def test_drop_blocks_removes_the_least_important_blocks(deep_model_dir, tmp_path, calib_file):
    target, plan = _prune(deep_model_dir, tmp_path, calib_file, method="drop-blocks", count=2)
    stats = plan.stats
    smallest = sorted(range(N_BLOCKS), key=lambda i: stats.blocks[i].angular)[:2]
    assert sorted(plan.dropped_blocks) == sorted(smallest)
    config = json.loads((target / "config.json").read_text())
    assert config["num_hidden_layers"] == N_BLOCKS - 2 == len(config["block_configs"])
    names = _tensor_names(target)
    assert not any(name.startswith(f"model.layers.{N_BLOCKS - 2}.") for name in names)
    kept = [i for i in range(N_BLOCKS) if i not in smallest]
    # the checkpoint's block j is the dense block kept[j], weights unchanged (full FFN, nothing compensated)
    from effideploy.models.weights import SafetensorsWeights

    moved = SafetensorsWeights(target).get("model.layers.1.mlp.down_proj.weight")
    dense = tiny_llama(seed=3, num_hidden_layers=N_BLOCKS).state_dict()
    assert torch.equal(moved, dense[f"model.layers.{kept[1]}.mlp.down_proj.weight"])
    record = json.loads((target / "effideploy.json").read_text())
    assert record["structure"]["dropped_blocks"] == sorted(smallest)
    assert record["structure"]["kept_blocks"] == kept
    assert record["blocks"][smallest[0]]["dropped"] is True
    assert set(record["blocks"][0]["scores"]["drop_loss"]) == {"block", "attention", "ffn"}


def test_drop_attention_removes_weights_and_computes_the_dense_model_without_them(deep_model_dir, tmp_path, calib_file):
    from transformers import AutoModelForCausalLM

    target, plan = _prune(deep_model_dir, tmp_path, calib_file, method="drop-attention", count=3)
    removed = plan.no_op_attention
    assert len(removed) == 3 and 0 not in removed  # the first block's attention stays (vLLM's layout rule)
    names = _tensor_names(target)
    for i in range(N_BLOCKS):
        has = any(name.startswith(f"model.layers.{i}.self_attn.") for name in names)
        assert has == (i not in removed)
        assert (f"model.layers.{i}.input_layernorm.weight" in names) == (i not in removed)
    config = json.loads((target / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [i in removed for i in range(N_BLOCKS)]

    model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True, dtype=torch.float32).eval()
    reference = _reference(deep_model_dir, list(range(N_BLOCKS)), removed)
    ids = torch.tensor([[5, 17, 99, 230, 41, 8, 77, 150]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
        # cached generation (layer 0 of the cache must count tokens) equals step-by-step full recomputation
        generated = model.generate(ids, max_new_tokens=10, do_sample=False)
        sequence = ids
        for _ in range(10):
            sequence = torch.cat([sequence, reference(sequence, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert generated.tolist() == sequence.tolist()


MIXED = {"dropped": {2}, "no_attention": {3, 5}}  # block 3 becomes checkpoint block 2, block 5 block 4


@pytest.fixture
def mixed_checkpoint(deep_model_dir, tmp_path, calib_file, monkeypatch):
    """Dropped blocks and no-op attention in one checkpoint, chosen by hand (the methods choose by scores)."""
    from effideploy.pruning.depth import Structure
    from effideploy.pruning.methods.drop_attention import DropAttention

    monkeypatch.setattr(DropAttention, "structure", lambda self, scores, stats, shape, weights: Structure(
        widths=list(shape.full_widths), dropped=set(MIXED["dropped"]), no_attention=set(MIXED["no_attention"])))
    return _prune(deep_model_dir, tmp_path, calib_file, method="drop-attention", count=1)[0]


def test_dropped_blocks_and_no_op_attention_together_generate_like_the_reference(deep_model_dir, mixed_checkpoint):
    """The checkpoint computes the dense model minus what was removed; cached generation matches the reference."""
    from transformers import AutoModelForCausalLM

    from effideploy.runtimes.pytorch import TorchRuntime

    target = mixed_checkpoint
    config = json.loads((target / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, False, True, False, True]
    model = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True, dtype=torch.float32).eval()
    reference = _reference(deep_model_dir, [0, 1, 3, 4, 5], sorted(MIXED["no_attention"]))
    ids = torch.tensor([[300, 2, 45, 9, 180, 66, 21]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    tokens = TorchRuntime(model=model).generate([ids[0].tolist()], 8).tokens
    assert tokens == TorchRuntime(model=reference).generate([ids[0].tolist()], 8).tokens


@pytest.mark.parametrize("target_params", [0.2, 0.45])
def test_joint_meets_its_parameter_target_within_one_block(deep_model_dir, tmp_path, calib_file, target_params):
    from effideploy.models.build import build_config, count_parameters
    from effideploy.models.resolve import resolve_model

    target, plan = _prune(deep_model_dir, tmp_path, calib_file, method="cfsp-joint", target_params=target_params,
                          calib_samples=24, calib_seqlen=64)
    record = json.loads((target / "effideploy.json").read_text())
    removed = record["sparsity"]["parameters_removed"]
    counts = count_parameters(build_config(resolve_model(str(deep_model_dir)).config_dict))
    block = (counts["attention"] + counts["ffn"] + counts["norms"]) / N_BLOCKS / counts["total"]
    # lstsq adds a down_proj bias (and zero gate/up biases) to every block: a few hidden-sized vectors
    bias = (2 * 256 + 128) * N_BLOCKS / counts["total"]
    assert target_params - bias <= removed <= target_params + block
    assert first_kept_has_attention(plan)
    assert record["structure"]["rule"].startswith("removed by estimated output loss")


def first_kept_has_attention(plan) -> bool:
    return plan.kept_blocks[0].attention


def test_joint_speedup_target(deep_model_dir, tmp_path, calib_file):
    from effideploy.bench.metrics import matmul_parameters
    from effideploy.models.build import build_config, count_parameters
    from effideploy.models.resolve import resolve_model

    target, plan = _prune(deep_model_dir, tmp_path, calib_file, method="cfsp-joint", target_speedup=1.5,
                          compensation="none")
    dense = matmul_parameters(count_parameters(build_config(resolve_model(str(deep_model_dir)).config_dict)))
    pruned = matmul_parameters(count_parameters(build_config(json.loads((target / "config.json").read_text()))))
    assert dense / pruned >= 1.5
    assert dense / pruned < 1.5 * 1.25  # one block of this model is ~1/6 of the matmul weights


def test_drop_attention_refuses_a_target_attention_alone_cannot_reach(deep_model_dir, tmp_path, calib_file):
    with pytest.raises(OptionError, match="cannot be reached by drop-attention"):
        _prune(deep_model_dir, tmp_path, calib_file, method="drop-attention", target_params=0.6)
    assert not (tmp_path / "drop-attention").exists()


def test_structural_methods_need_a_size():
    with pytest.raises(OptionError, match="count cannot be combined with --target-params or --target-speedup: give one size target"):
        PruneConfig(method="drop-blocks", count=2, target_params=0.1)
    with pytest.raises(OptionError, match="target_speedup must be a number above 1"):
        PruneConfig(method="cfsp-joint", target_speedup=0.9)


def test_in_memory_prune_refuses_removed_sublayers():
    from effideploy.pruning import prune_

    model = tiny_llama(num_hidden_layers=N_BLOCKS)
    with pytest.raises(EffideployError, match="prune_checkpoint"):
        prune_(model, PruneConfig(method="drop-blocks", count=1, **CALIB), torch.randint(3, 384, (8, 32)))


def test_vllm_layout_rule_refuses_a_first_block_without_attention():
    from types import SimpleNamespace as NS

    from effideploy.exporters.vllm.checks import check_no_op_layout
    from effideploy.pruning.depth import first_block_problem

    def block(attention_no_op, ffn_no_op=False):
        return NS(attention=NS(no_op=attention_no_op), ffn=NS(no_op=ffn_no_op))

    with pytest.raises(EffideployError, match="block 0 has a no-op attention but an FFN"):
        check_no_op_layout([block(True), block(False)])
    with pytest.raises(EffideployError, match="block 1 has a no-op attention"):
        check_no_op_layout([block(True, True), block(True), block(False)])
    check_no_op_layout([block(False), block(True), block(False)])
    assert first_block_problem({0}, {1}, 4) == 1 and first_block_problem({1}, {1}, 4) is None


def test_torch_token_compression_refuses_blocks_without_attention(deep_model_dir, tmp_path, calib_file):
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.pytorch import TorchRuntime

    target, _ = _prune(deep_model_dir, tmp_path, calib_file, method="drop-attention", count=1)
    runtime = TorchRuntime(model=load_model(resolve_model(str(target))))
    runtime.compress("streamingllm:0.5")
    with pytest.raises(EffideployError, match="does not support blocks without attention"):
        runtime.generate([list(range(5, 30))], 4)


def test_parameter_count_of_a_checkpoint_without_sublayers(deep_model_dir, tmp_path, calib_file):
    from effideploy.models.build import build_config, count_parameters

    target, _ = _prune(deep_model_dir, tmp_path, calib_file, method="drop-attention", count=2)
    counted = count_parameters(build_config(json.loads((target / "config.json").read_text())))["total"]
    stored = 0
    for path in target.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            stored += sum(math.prod(handle.get_slice(n).get_shape()) for n in handle.keys())
    assert counted == stored


def test_cli_drop_attention_writes_a_checkpoint(tmp_path, tiny_model_dir, calib_file):
    from tests.test_cli import run_cli

    out = tmp_path / "cli"
    code, stdout, err = run_cli("prune", "--model", tiny_model_dir, "--method", "drop-attention", "--count", "1",
                                "--calib", calib_file, "--calib-samples", "4", "--calib-seqlen", "32", "--output", out)
    assert code == 0, err
    assert "no-op attention [" in stdout + err
    record = json.loads((out / "effideploy.json").read_text())
    assert len(record["structure"]["no_op_attention"]) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--method", "drop-blocks", "--count", "1", "--target-params", "0.1"], "--count and --target-params were given together"),
    (["--method", "cfsp-joint"], "cfsp-joint needs a size target: give --target-params or --target-speedup"),
    (["--method", "drop-blocks", "--count", "9"], "--count 9 is more than"),
    (["--method", "drop-blocks", "--count", "1", "--recover"], "--recover is not supported yet with drop-blocks"),
])
def test_cli_refuses_bad_structural_options(tmp_path, tiny_model_dir, calib_file, args, fragment):
    from tests.test_cli import assert_one_line_error, run_cli

    out = tmp_path / "refused"
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "4",
                           "--calib-seqlen", "32", "--output", out, *args)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()
