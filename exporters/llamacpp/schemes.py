"""The weight schemes the llama.cpp exporter writes (GGUF via ``llama_model_quantize``), as the search reads them.

* ``q8_0`` (generic ``int8``): every matrix, the embedding included, in blocks of 32 with an f16 scale.
* ``q4_k_m`` (generic ``int4``): llama.cpp's mix (``llama_tensor_get_type``): the output head (the embedding when
  tied) q6_K; attn_v and ffn_down q6_K in the blocks ``use_more_bits`` picks (the first and last eighth, every third
  between), q4_K elsewhere; a row whose width is not a multiple of 256 takes the fallback (q4_K -> q5_0, q6_K ->
  q8_0; the head goes to q8_0 directly), and F16 where 32 does not divide it.
* ``f16``: every matrix in f16 (also the float storage: what the exporter writes without --quantize).

Which type each tensor gets is decided here from the shapes (checked against the types read back from real
exports in tests/quantization/test_schemes.py). The rounding is llama.cpp's own: ``ggml_quantize_chunk`` of the
ggml library llama-cpp-python ships (the function ``llama_model_quantize`` calls, no importance matrix), then the
``gguf`` package's dequantizer, so the screen's weight equals the stored one (tested); without llama-cpp-python
the ``gguf`` package's reference quantizer serves q8_0 / q5_0 (identical to ggml's), and q4_K / q6_K are refused.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache

from effideploy.errors import EffideployError
from effideploy.quantization.schemes import Declaration, Storage, WeightScheme, WeightTensor

K_ROW, BLOCK_ROW = 256, 32  # QK_K and QK8_0 (llamacpp.K_QUANT_ROW / BLOCK_ROW)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's tensor-type fallback for rows % 256


def use_more_bits(index: int, count: int) -> bool:
    """llama.cpp's choice of the blocks that get more bits in the _M mixes."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


@dataclass(frozen=True)
class GgufType(WeightScheme):
    name: str = "q8_0"
    dtype: str = "float32"

    @property
    def quantizes(self) -> bool:
        return self.name not in ("f16", "f32", "bf16")

    @property
    def ffn_multiple(self) -> int:
        # down_proj's rows are the FFN width: q8_0 blocks of 32, k-quants super-blocks of 256 (else a fallback type).
        # f16 has no blocks, but llama.cpp multiplies f16 rows off a multiple of 32 on a slow path: CFSP 30% of
        # SmolLM2 prefilled at 0.72x of dense unaligned and 1.25x aligned to 32, decode 1.09x -> 1.14x (one run,
        # benchmarks/results/llamacpp_aligned_2026-12-03/f16). f32 is a parity format, left as pruned.
        if not self.quantizes:
            return 1 if self.name == "f32" else BLOCK_ROW
        return BLOCK_ROW if self.name in ("q8_0", "q4_0", "q5_0") else K_ROW

    def tensor_type(self, tensor: WeightTensor) -> str:
        """The GGML type llama.cpp gives this tensor under this file type."""
        width = tensor.shape[1]
        if self.name == "f16":
            return "F16"
        if self.name == "q8_0":
            kind = "Q8_0"
        elif tensor.role == "lm_head" or (tensor.role == "embedding" and tensor.tied):
            return "Q8_0" if width % K_ROW else "Q6_K"
        elif tensor.kind in ("v_proj", "down_proj") and use_more_bits(tensor.index, tensor.count):
            kind = "Q6_K"
        else:
            kind = "Q4_K"
        if kind in FALLBACK and width % K_ROW:
            kind = FALLBACK[kind]
        return "F16" if width % BLOCK_ROW else kind

    def storage(self, tensor: WeightTensor) -> Storage:
        import gguf

        kind = self.tensor_type(tensor)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
        return Storage(kind.lower(), tensor.shape[0] * tensor.shape[1] // block * size, quantized=kind != "F16")

    def fake_quantize(self, weight, tensor, storage):
        import torch

        if storage.format == "f16":
            return weight.to(torch.float16).to(weight.dtype)
        return torch.from_numpy(quantize_dequantize(weight.float().numpy(), storage.format.upper())).to(weight.dtype)


def quantize_dequantize(array, kind: str):
    """``array`` [rows, width] (float32) through GGML type ``kind`` and back: llama.cpp's quantizer where
    llama-cpp-python is installed, else the gguf package's (q8_0 / q5_0 only)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[kind]
    array = np.ascontiguousarray(array, dtype=np.float32)
    lib = _ggml()
    if lib is not None:
        rows, width = array.shape
        lib.ggml_quantize_init(int(qtype))
        packed = np.zeros((rows, lib.ggml_row_size(int(qtype), width)), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(qtype), array.ctypes.data, packed.ctypes.data, 0, rows, width, None)
    else:
        try:
            packed = gguf.quants.quantize(array, qtype)
        except NotImplementedError:
            raise EffideployError(f"the screen of {kind} needs llama.cpp's quantizer (llama-cpp-python); the gguf "
                                  "package does not quantize it") from None
    return gguf.quants.dequantize(packed, qtype).astype(np.float32).reshape(array.shape)


@lru_cache(maxsize=1)
def _ggml():
    """libggml-base from the llama-cpp-python package (None without it), with the signatures used above."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so")
    if not os.path.isfile(path):
        return None
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


DECLARATION = Declaration(float=GgufType("f16", dtype="float16"),
                          schemes=(GgufType("q8_0"), GgufType("q4_k_m"), GgufType("f16", dtype="float16")),
                          aliases={"int8": "q8_0", "int4": "q4_k_m", "float16": "f16", "fp16": "f16"})
