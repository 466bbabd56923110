"""The weight schemes the ONNX exporter writes (``exporters/onnx/quant.py``), as the search reads them.

``int8`` / ``int4``: MatMulNBits, round-to-nearest, symmetric, blocks of 32 input channels with one float32 scale
per block and no zero points (ORT's ``MatMulNBitsQuantizer`` with ``is_symmetric=True``); every projection and the
output head (untied from the embedding first) are quantized; the embedding stays a float32 Gather table. The screen's
rounding (:func:`quantize_dequantize`) is MLAS's: checked against ORT's quantizer and kernel in
tests/search/test_tune_onnx.py. Float: float32 (the exporter's default dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from effideploy.quantization.schemes import Declaration, Storage, WeightScheme, WeightTensor

BLOCK_SIZE = 32  # quant.DEFAULT_BLOCK_SIZE (not imported: that module imports onnx)


@dataclass(frozen=True)
class MatMulNBits(WeightScheme):
    name: str = "int8"
    bits: int = 8
    block_size: int = BLOCK_SIZE

    @property
    def ffn_multiple(self) -> int:
        return self.block_size  # down_proj's input in whole blocks: no padded last block per row

    @property
    def quantizes(self) -> bool:
        return True

    def storage(self, tensor: WeightTensor) -> Storage:
        if tensor.role == "embedding":
            return Storage("float32 (Gather)", tensor.parameters * 4.0)
        out_features, in_features = tensor.shape
        blocks = math.ceil(in_features / self.block_size)  # the last block is padded
        return Storage(f"MatMulNBits int{self.bits} block {self.block_size}",
                       out_features * blocks * (self.block_size * self.bits / 8 + 4), quantized=True,
                       separate=tensor.tied)

    def fake_quantize(self, weight, tensor, storage):
        if not storage.quantized:
            return weight
        return quantize_dequantize(weight, self.bits, self.block_size)


def quantize_dequantize(weight, bits: int, block_size: int):
    """[out, in] weight -> the same shape after symmetric blockwise RTN (MLAS's symmetric MatMulNBits rounding:
    scale = signed absmax / -2^(bits-1), zero point 2^(bits-1), codes clamped to [0, 2^bits - 1])."""
    import torch

    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(out_features, -1, block_size)
    index = w.abs().argmax(-1, keepdim=True)
    signed_max = w.gather(-1, index)
    zero = 2 ** (bits - 1)
    scale = signed_max / -zero
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return ((q - zero) * scale).reshape(out_features, -1)[:, :in_features].to(weight.dtype)


DECLARATION = Declaration(float=WeightScheme("float32", 4.0),
                          schemes=(MatMulNBits(name="int8", bits=8), MatMulNBits(name="int4", bits=4)))
