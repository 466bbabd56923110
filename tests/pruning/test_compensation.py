"""The least-squares refit against a direct solve, and its ridge's limit (plain slicing)."""

import torch

from effideploy.pruning.compensation import least_squares, mean_bias


def activations(tokens=4000, width=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=generator, dtype=torch.float64)
    return torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mix + 0.5  # correlated, mean 0.5


def test_small_damp_is_the_ordinary_least_squares_fit():
    acts = activations()
    down = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    gram, mean = acts.T @ acts / len(acts), acts.mean(0)
    weight, bias = least_squares(down, gram, mean, kept, damp=1e-12)
    design = torch.cat([acts[:, kept], torch.ones(len(acts), 1, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(design, acts @ down.T).solution.T
    torch.testing.assert_close(weight, expected[:, :-1])
    torch.testing.assert_close(bias, expected[:, -1])


def test_large_damp_tends_to_plain_slicing_not_to_zero():
    acts = activations()
    down = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kept = torch.tensor([1, 4, 5, 9])
    gram, mean = acts.T @ acts / len(acts), acts.mean(0)
    weight, bias = least_squares(down, gram, mean, kept, damp=1e6)
    torch.testing.assert_close(weight, down[:, kept], rtol=1e-3, atol=1e-3)
    assert bias.abs().max() < 1e-3
    # In between, the fit is better than slicing and than slicing plus FLAP's bias.
    weight, bias = least_squares(down, gram, mean, kept, damp=1e-3)
    target = acts @ down.T
    refit = ((acts[:, kept] @ weight.T + bias - target) ** 2).mean()
    flap = ((acts[:, kept] @ down[:, kept].T + mean_bias(down, mean, kept) - target) ** 2).mean()
    assert refit < flap < ((acts[:, kept] @ down[:, kept].T - target) ** 2).mean()
