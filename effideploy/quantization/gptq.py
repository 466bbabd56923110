"""GPTQ (Frantar et al., 2022) for one Linear, on a caller-chosen quantization grid.

Each weight column (an input dimension) is rounded in turn, and the rounding error is spread over the columns not
yet rounded through the inverse of the input's second moments H = E[x x^T] (the Hessian of the layer's squared
output error). The grid is the exporter's: ONNX Runtime's MatMulNBits (symmetric, zero point 2^(bits-1), scale =
the block's largest-magnitude weight / -2^(bits-1)) or compressed-tensors' symmetric int4/int8 scales. The scale
of a group is computed when the sweep reaches the group, from the columns as already updated (the reference
implementation's ``static_groups=False``), so the grid the runtime reads is exactly the one GPTQ rounded to.

The exporters write ``QuantizedWeight.q`` and ``scales`` in their own packed layout; ``dequantized`` is what the
runtime multiplies by (the parity reference loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Ridge added to H's diagonal, relative to its mean (the reference implementation's percdamp).
DAMP = 0.01
# Columns processed between the lazy batch updates of the rest of the matrix (the reference's blocksize).
SWEEP_COLUMNS = 128


@dataclass(frozen=True)
class Grid:
    """A symmetric integer grid: q in [qmin, qmax], w = (q - offset) * scale, one scale per row and group.

    ``scale_of`` maps a [rows, columns] slice to per-row scales (already rounded to the dtype they are stored in);
    ``offset`` is the stored zero point (ORT's implied 8 / 128; 0 for compressed-tensors' signed values)."""

    bits: int
    qmin: int
    qmax: int
    offset: int
    scale_of: Callable[[torch.Tensor], torch.Tensor]

    def quantize(self, column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer codes of one column [rows] under per-row ``scale`` (rows with a zero scale get the offset)."""
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(column / safe) + self.offset
        q = torch.where(scale == 0, torch.full_like(q, self.offset), q)
        return q.clamp(self.qmin, self.qmax)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (q - self.offset) * scale


def onnx_grid(bits: int) -> Grid:
    """ONNX Runtime's symmetric MatMulNBits grid: codes 0..2^bits-1 around 2^(bits-1); the block's value of largest
    magnitude maps to code 0 (scale = that value / -2^(bits-1), signed), as ORT's round-to-nearest does."""
    half = 2 ** (bits - 1)

    def scale_of(block: torch.Tensor) -> torch.Tensor:
        index = block.abs().argmax(dim=1, keepdim=True)
        return (block.gather(1, index).squeeze(1) / -half).float()

    return Grid(bits=bits, qmin=0, qmax=2 ** bits - 1, offset=half, scale_of=scale_of)


def compressed_tensors_grid(args, dtype: torch.dtype) -> Grid:
    """compressed-tensors' symmetric grid for ``args`` (its QuantizationArgs): its own ``calculate_qparams`` on the
    slice's min/max, the scale rounded to the dtype it is stored in, signed codes [-2^(b-1), 2^(b-1)-1]."""
    from compressed_tensors.quantization.utils import calculate_qparams

    bits = args.num_bits

    def scale_of(block: torch.Tensor) -> torch.Tensor:
        lo, hi = block.amin(dim=1), block.amax(dim=1)
        scale, _ = calculate_qparams(lo, hi, args)
        return scale.to(dtype).float()

    return Grid(bits=bits, qmin=-(2 ** (bits - 1)), qmax=2 ** (bits - 1) - 1, offset=0, scale_of=scale_of)


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # [rows, columns] integer codes (float dtype holding integers)
    scales: torch.Tensor  # [rows, groups] float32
    dequantized: torch.Tensor  # [rows, columns] float32: (q - offset) * scale

    @property
    def groups(self) -> int:
        return self.scales.shape[1]


def rtn(weight: torch.Tensor, grid: Grid, group_size: int) -> QuantizedWeight:
    """Round-to-nearest on the same grid (the baseline GPTQ is measured against)."""
    w = weight.float()
    rows, columns = w.shape
    q, scales = torch.empty_like(w), []
    for start in range(0, columns, group_size):
        stop = min(start + group_size, columns)
        scale = grid.scale_of(w[:, start:stop])
        scales.append(scale)
        for column in range(start, stop):
            q[:, column] = grid.quantize(w[:, column], scale)
    scales = torch.stack(scales, dim=1)
    return QuantizedWeight(q=q, scales=scales, dequantized=_dequantize(q, scales, grid, group_size))


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, group_size: int, damp: float = DAMP) -> QuantizedWeight:
    """GPTQ of ``weight`` [rows, columns] (a Linear's [out, in]) given its input's second moments ``hessian``
    [in, in] (any positive scale: only H's shape matters). ``group_size`` >= columns means one scale per row."""
    w = weight.detach().float().clone()
    rows, columns = w.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match a weight with {columns} input columns")
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # inputs never active: their weights cannot matter, quantize them to zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(columns, dtype=h.dtype) * damp * torch.diagonal(h).mean()
    # The upper Cholesky factor of H^-1: row i holds the update direction for the columns after i.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    group_size = min(group_size, columns)
    # Sweep blocks are whole groups, so a group's scale is taken from columns that have every earlier update.
    sweep = max(group_size, SWEEP_COLUMNS // group_size * group_size)
    q = torch.empty_like(w)
    scales = torch.empty(rows, (columns + group_size - 1) // group_size)
    scale = None
    for start in range(0, columns, sweep):
        stop = min(start + sweep, columns)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group_size == 0:
                scale = grid.scale_of(block[:, i:i + group_size] if group_size < columns else w)
                scales[:, column // group_size] = scale
            codes = grid.quantize(block[:, i], scale)
            q[:, column] = codes
            error = (block[:, i] - grid.dequantize(codes, scale)) / h_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * h_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ h_inv[start:stop, stop:]
    return QuantizedWeight(q=q, scales=scales, dequantized=_dequantize(q, scales, grid, group_size))


def _dequantize(q: torch.Tensor, scales: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    per_column = scales.repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    return grid.dequantize(q, per_column)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error over the inputs H was collected from (GPTQ's objective)."""
    delta = (weight.float() - approx.float()).double()
    return float(torch.einsum("ij,jk,ik->", delta, hessian.double(), delta))
