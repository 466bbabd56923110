"""Compensating the FFN output for the channels a block loses.

With A the block's intermediate activation (input of down_proj, width n), W = W_down [h, n] and S the kept
channels, the FFN output is y = W A. Two compensations, both computed from calibration statistics:

- ``bias`` (FLAP): the removed channels' mean contribution becomes a down_proj bias, b = W[:, ~S] E[A_~S].
- ``lstsq``: the least-squares optimal affine map from the kept activations to the full output,
  [W', b] = argmin E|| W A - W' A_S - b ||^2, solved in closed form from the second moments of A:
  [W', b] = (W [E[A A_S^T], E[A]] + [W_S Lambda, 0]) ( [[E[A_S A_S^T], E[A_S]], [E[A_S]^T, 1]] + diag(Lambda, lambda_1) )^-1.
  It reduces to W_S (no change) when the removed channels are uncorrelated with the kept ones and zero-mean,
  and contains the ``bias`` compensation as its mean term. A ridge sum_i lambda_i ||W'_i - W_S,i||^2 with
  lambda_i = damp * E[A_i^2] (each channel's own scale) keeps the solve stable and tends to plain slicing (no
  compensation) as damp grows.
"""

from __future__ import annotations

import torch


def removed_mask(width: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[kept] = False
    return mask


def mean_bias(down: torch.Tensor, act_mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    removed = removed_mask(down.shape[1], kept)
    return down[:, removed] @ act_mean[removed].to(down.dtype)


def least_squares(
    down: torch.Tensor, gram: torch.Tensor, act_mean: torch.Tensor, kept: torch.Tensor, damp: float = 1e-2,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (new down_proj weight [h, |S|], bias [h]) in down's dtype, on down's device; computed in float64,
    on ``device`` when given (a GPU: the solve at FFN 11008 costs ~1 TFLOP)."""
    home = down.device
    w = down.to(device or home).double()
    g = gram.to(w.device).double()
    mu = act_mean.to(w.device).double()
    kept = kept.to(w.device)
    k = kept.numel()
    lhs = torch.empty(k + 1, k + 1, dtype=torch.float64, device=w.device)
    lhs[:k, :k] = g[kept][:, kept]
    lhs[:k, k] = mu[kept]
    lhs[k, :k] = mu[kept]
    lhs[k, k] = 1.0
    # Per-channel ridge, damp x each channel's own second moment: LLM activations span orders of magnitude, and a
    # ridge scaled by the mean diagonal (dominated by outlier channels) swamps every ordinary channel.
    ridge = damp * lhs.diagonal().clone()
    lhs.diagonal().add_(ridge)
    cross = torch.cat([g[:, kept], mu[:, None]], dim=1)  # E[A [A_S; 1]^T], [n, k + 1]
    rhs = w @ cross  # [h, k + 1]
    # The ridge pulls towards the plainly sliced weights [W_S, 0], not towards zero (which would wipe out the
    # contribution of kept channels the fit cannot pin down).
    rhs[:, :k] += ridge[:k] * w[:, kept]
    solution = torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric
    return solution[:, :k].to(home, down.dtype), solution[:, k].to(home, down.dtype)
