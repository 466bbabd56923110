"""Every method end to end on tiny random models: physical shapes, budget arithmetic, determinism."""

import copy

import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.pruning import METHODS, PruneConfig, prune_
from tests.conftest import tiny_llama

WINDOWS = torch.randint(0, 384, (6, 32), generator=torch.Generator().manual_seed(0))


# FFN-width methods; the structural ones (drop-blocks, drop-attention, cfsp-joint) are in test_depth.py
WIDTH_METHODS = [name for name in METHODS.names() if not getattr(METHODS.get(name), "structural", False)]


@pytest.mark.parametrize("method", WIDTH_METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_every_method_shrinks_the_model_physically(method, sparsity):
    model = tiny_llama()
    dense_params = sum(p.numel() for p in model.parameters())
    plan = prune_(model, PruneConfig(method=method, sparsity=sparsity, calib_samples=6, calib_seqlen=32), WINDOWS)
    for layer, width in zip(model.model.layers, plan.widths):
        assert layer.mlp.gate_proj.weight.shape == (width, 128)
        assert layer.mlp.up_proj.weight.shape == (width, 128)
        assert layer.mlp.down_proj.weight.shape == (128, width)
        assert 1 <= width <= 256
    assert model.config.model_type == "nemotron-nas"
    assert model.config.ffn_widths() == plan.widths
    removed = dense_params - sum(p.numel() for p in model.parameters())
    assert removed > 0
    total = sum(plan.full_widths)
    if method != "cfsp-reference":  # the reference keeps int(n r) + 1 per block
        assert abs(sum(plan.widths) - round((1 - sparsity) * total)) <= 1
    assert abs(plan.ffn_sparsity - sparsity) < 0.02
    logits = model(WINDOWS[:1]).logits
    assert logits.shape == (1, 32, 384) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["cfsp", "flap", "wanda-sp"])
def test_same_seed_same_plan(method):
    config = PruneConfig(method=method, sparsity=0.4, calib_samples=6, calib_seqlen=32)
    plans = [prune_(tiny_llama(), config, WINDOWS) for _ in range(2)]
    assert plans[0].widths == plans[1].widths
    for a, b in zip(plans[0].blocks, plans[1].blocks):
        assert torch.equal(a.kept, b.kept)


def test_kept_channels_are_the_best_scored_and_outputs_are_preserved():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    plan = prune_(model, PruneConfig(method="mag-sp", sparsity=0.5), None)
    for layer, dense_layer, block in zip(model.model.layers, dense.model.layers, plan.blocks):
        norms = dense_layer.mlp.down_proj.weight.norm(dim=0)
        assert set(block.kept.tolist()) == set(norms.topk(block.width).indices.tolist())
        torch.testing.assert_close(layer.mlp.down_proj.weight, dense_layer.mlp.down_proj.weight[:, block.kept])
        # A block's FFN output equals the dense FFN restricted to the kept channels.
        x = torch.randn(3, 128)
        inner = dense_layer.mlp.act_fn(dense_layer.mlp.gate_proj(x)) * dense_layer.mlp.up_proj(x)
        torch.testing.assert_close(layer.mlp(x), inner[:, block.kept] @ dense_layer.mlp.down_proj.weight[:, block.kept].T)


def test_flap_bias_compensates_the_mean_of_removed_channels():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    plan = prune_(model, PruneConfig(method="flap", sparsity=0.5, calib_samples=6, calib_seqlen=32), WINDOWS)
    assert model.config.mlp_bias
    for layer, dense_layer, block, stats in zip(model.model.layers, dense.model.layers, plan.blocks, plan.stats.blocks):
        removed = sorted(set(range(256)) - set(block.kept.tolist()))
        expected = dense_layer.mlp.down_proj.weight[:, removed] @ stats.act_mean[removed].float()
        torch.testing.assert_close(layer.mlp.down_proj.bias, expected)
        assert torch.count_nonzero(layer.mlp.gate_proj.bias) == 0


def ffn_activations(layer, windows_hidden):
    mlp = layer.mlp
    return mlp.act_fn(mlp.gate_proj(windows_hidden)) * mlp.up_proj(windows_hidden)


def test_lstsq_compensation_is_the_least_squares_refit():
    """CFSP's default compensation refits down_proj and a bias on the kept channels: on the calibration
    activations it must equal an explicit least-squares solve and beat plain slicing."""
    dense = tiny_llama(seed=3)
    windows = torch.randint(0, 384, (48, 32), generator=torch.Generator().manual_seed(5))  # 1536 tokens > 4 x 257
    captured = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, i=i: captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(windows)
    for handle in handles:
        handle.remove()
    model = copy.deepcopy(dense)
    plan = prune_(model, PruneConfig(method="cfsp", sparsity=0.5, calib_samples=48, calib_seqlen=32, damp=1e-9,
                                     gram_stride=1), windows)
    assert model.config.mlp_bias
    for i, block in enumerate(plan.blocks):
        acts = torch.cat(captured[i]).double()
        target = acts @ dense.model.layers[i].mlp.down_proj.weight.double().T
        design = torch.cat([acts[:, block.kept], torch.ones(len(acts), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, target).solution.T
        layer = model.model.layers[i].mlp.down_proj
        refit = acts[:, block.kept] @ layer.weight.double().T + layer.bias.double()
        torch.testing.assert_close(refit, design @ solution.T, rtol=1e-3, atol=1e-3)
        sliced = acts[:, block.kept] @ dense.model.layers[i].mlp.down_proj.weight.double()[:, block.kept].T
        assert (refit - target).pow(2).sum() < 0.9 * (sliced - target).pow(2).sum()


def test_lstsq_falls_back_to_bias_with_too_few_calibration_tokens(capsys):
    """128 tokens cannot determine 129 unknowns per row: every block gets FLAP's bias instead, and it says so."""
    windows = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(5))
    lstsq, bias = tiny_llama(seed=3), tiny_llama(seed=3)
    plan = prune_(lstsq, PruneConfig(method="cfsp", sparsity=0.5, calib_samples=4, calib_seqlen=32), windows)
    prune_(bias, PruneConfig(method="cfsp", compensation="bias", sparsity=0.5, calib_samples=4, calib_seqlen=32), windows)
    assert {block.compensation for block in plan.blocks} == {"bias"}
    assert "4 block(s) got bias instead of lstsq" in capsys.readouterr().err
    for a, b in zip(lstsq.state_dict().values(), bias.state_dict().values()):
        assert torch.equal(a, b)


def test_gram_stride_keeps_enough_tokens_per_channel():
    from effideploy.pruning.calibration import effective_gram_stride

    assert effective_gram_stride(4, 128 * 1024, 1536) == 4  # 131k tokens: 32k for a 1536-wide FFN
    assert effective_gram_stride(4, 16 * 512, 1536) == 1  # 8k tokens: every one of them
    assert effective_gram_stride(4, 60_000, 1536) == 1
    assert effective_gram_stride(4, 70_000, 1536) == 2


def test_compensation_none_keeps_the_paper_method_bias_free():
    model = tiny_llama()
    prune_(model, PruneConfig(method="cfsp", compensation="none", sparsity=0.5, calib_samples=6, calib_seqlen=32), WINDOWS)
    assert not model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias is None


@pytest.mark.parametrize("align", [16, 64])
def test_align_rounds_every_block_and_never_empties_one(align):
    plan = prune_(tiny_llama(), PruneConfig(method="cfsp", sparsity=0.9, align=align, calib_samples=6, calib_seqlen=32), WINDOWS)
    assert all(w % align == 0 and w >= align for w in plan.widths)


def test_cfsp_reference_align_128_is_cuda_friendly():
    model = tiny_llama(intermediate_size=512)
    plan = prune_(model, PruneConfig(method="cfsp-reference", sparsity=0.5, align=128, calib_samples=6, calib_seqlen=32), WINDOWS)
    assert all(w % 128 == 0 for w in plan.widths)


def test_pruning_twice_is_refused():
    model = tiny_llama()
    prune_(model, PruneConfig(method="mag-sp", sparsity=0.5))
    with pytest.raises(EffideployError, match="already pruned"):
        prune_(model, PruneConfig(method="mag-sp", sparsity=0.5))


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_the_open_interval_is_refused(sparsity):
    with pytest.raises(EffideployError, match="sparsity must be in \\(0, 1\\)"):
        PruneConfig(sparsity=sparsity)
