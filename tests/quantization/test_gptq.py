"""GPTQ on both grids against round-to-nearest: the layer-output error it minimises, codes on the grid, and the
second moments the pruning pass keeps for it, against a transformers forward on the same windows."""

from __future__ import annotations

import pytest
import torch

from effideploy.quantization.gptq import compressed_tensors_grid, gptq, onnx_grid, output_error, rtn


def correlated_inputs(columns: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator)  # correlated columns: what GPTQ exploits
    return torch.randn(tokens, columns, generator=generator) @ mixing


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 40), (8, 32), (4, 96)])
def test_gptq_cuts_the_output_error_of_round_to_nearest_on_the_same_grid(bits, group):
    x = correlated_inputs(96)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    grid = onnx_grid(bits)
    nearest, ours = rtn(weight, grid, group), gptq(weight, hessian, grid, group)
    assert output_error(weight, ours.dequantized, hessian) < 0.7 * output_error(weight, nearest.dequantized, hessian)
    # The codes lie on the grid and dequantize with the stored per-group scales.
    assert ours.q.min() >= 0 and ours.q.max() <= 2 ** bits - 1 and torch.equal(ours.q, ours.q.round())
    assert ours.scales.shape == (48, -(-96 // group))
    per_column = ours.scales.repeat_interleave(group, dim=1)[:, :96]
    torch.testing.assert_close(ours.dequantized, (ours.q - 2 ** (bits - 1)) * per_column)


def test_rtn_on_the_onnx_grid_maps_each_block_extreme_to_code_zero():
    weight = torch.tensor([[0.5, -2.0, 1.0, 0.25], [3.0, 1.0, -1.0, 0.0]])
    result = rtn(weight, onnx_grid(4), 4)
    torch.testing.assert_close(result.scales[:, 0], torch.tensor([0.25, -0.375]))
    assert result.q[0, 1] == 0 and result.q[1, 0] == 0  # the signed extreme is -8 * scale
    torch.testing.assert_close(result.dequantized[0], torch.tensor([0.5, -2.0, 1.0, 0.25]))


def test_gptq_on_the_compressed_tensors_grid_uses_its_scales():
    from compressed_tensors.quantization import preset_name_to_scheme

    args = preset_name_to_scheme("W4A16", targets=["Linear"]).weights
    args.group_size = 32
    grid = compressed_tensors_grid(args, torch.bfloat16)
    x = correlated_inputs(64)
    hessian = x.T @ x / x.shape[0]
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ours, nearest = gptq(weight, hessian, grid, 32), rtn(weight, grid, 32)
    assert ours.q.min() >= -8 and ours.q.max() <= 7
    assert torch.equal(ours.scales, ours.scales.to(torch.bfloat16).float())  # stored exactly in bf16
    assert output_error(weight, ours.dequantized, hessian) < output_error(weight, nearest.dequantized, hessian)


def test_a_hessian_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="does not match a weight with 8 input columns"):
        gptq(torch.randn(4, 8), torch.eye(6), onnx_grid(4), 4)


def test_inputs_never_active_get_zero_weights():
    x = correlated_inputs(16)
    x[:, 3] = 0
    result = gptq(torch.randn(4, 16), x.T @ x, onnx_grid(8), 16)
    assert torch.all(result.dequantized[:, 3] == 0)


def test_pruning_keeps_each_linear_inputs_second_moments(tmp_path, tiny_model_dir, calib_file, tiny_tokenizer):
    """prune --keep-stats: the kept means equal E[x x^T] of a transformers forward over the same windows (every
    TOKEN_STRIDE-th token), down_proj's restricted to the kept channels."""
    from transformers import AutoModelForCausalLM

    from effideploy.data.text import TextSpec
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint
    from effideploy.pruning.engine import calibration_windows
    from effideploy.quantization.hessians import FILE, TOKEN_STRIDE, CheckpointHessians

    config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=4, calib_seqlen=64, keep_stats=True)
    text = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    target, plan = prune_checkpoint(resolve_model(tiny_model_dir), config, tmp_path / "kept", calibration=text)
    assert (target / FILE).is_file()

    windows = calibration_windows(tiny_tokenizer, text, config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[::TOKEN_STRIDE].double()
            seen[name] = x.T @ x / x.shape[0]
        return record

    layer = model.model.layers[2]
    for name, module in (("attn_in", layer.self_attn.q_proj), ("o_in", layer.self_attn.o_proj),
                         ("mlp_in", layer.mlp.up_proj), ("down_in", layer.mlp.down_proj)):
        module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(windows)
    kept = CheckpointHessians.of(target)
    assert kept.meta["windows"] == 4 and kept.meta["tokens_per_block"] == 4 * 64 // TOKEN_STRIDE
    channels = plan.blocks[2].kept
    expected = {"model.layers.2.self_attn.k_proj": seen["attn_in"], "model.layers.2.self_attn.o_proj": seen["o_in"],
                "model.layers.2.mlp.gate_proj": seen["mlp_in"],
                "model.layers.2.mlp.down_proj": seen["down_in"][channels][:, channels]}
    for module, reference in expected.items():
        torch.testing.assert_close(kept.for_module(module).double(), reference, rtol=1e-4, atol=1e-5)
    assert kept.for_module("model.layers.2.mlp.down_proj").shape == (plan.blocks[2].width,) * 2
    assert kept.for_module("lm_head") is None


def test_keep_stats_with_shared_statistics_needs_their_spool(tmp_path, tiny_model_dir, calib_file):
    from effideploy.data.text import TextSpec
    from effideploy.errors import EffideployError
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint
    from effideploy.pruning.engine import calibrate_source

    config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=2, calib_seqlen=32, keep_stats=True,
                         compensation="bias")
    text = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    source = resolve_model(tiny_model_dir)
    stats = calibrate_source(source, config, text)
    with pytest.raises(EffideployError, match="needs the hessians_dir"):
        prune_checkpoint(source, config, tmp_path / "out", calibration=text, stats=stats)
    assert not (tmp_path / "out").exists()
    spool = tmp_path / "spool"
    spool.mkdir()
    stats = calibrate_source(source, config, text, hessians_dir=str(spool))
    target, _ = prune_checkpoint(source, config, tmp_path / "out", calibration=text, stats=stats, hessians_dir=spool)
    assert (target / "calibration" / "hessians.safetensors").is_file()
