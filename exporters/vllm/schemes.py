"""The weight schemes the vLLM exporter writes (``exporters/vllm/quant.py``: compressed-tensors), as the search reads
them.

* ``w8a8`` (generic ``int8``): int8 codes, one float32 scale per output channel, every decoder projection; the
  output head and the embedding stay float32 (a tied head is not stored: vLLM ties it). vLLM quantizes each
  projection's input per token to int8 at run time and multiplies codes in oneDNN's integer arithmetic (exact with
  VNNI, int16-saturating on AVX2: ``runtimes/vllm_kernels``); the screen reproduces both: the weights are rounded by
  compressed-tensors itself (``quant.quantize_linear``, the exporter's own call) and each projection's forward
  is the parity reference's (``quant_checks.W8A8Forward``) on those codes.
* ``w4a16`` (generic ``int4``): int4 codes in groups of ``group_size`` input columns with bfloat16 scales, served in
  bfloat16; ``fitted`` picks the largest of 128 / 64 / 32 that divides every projection's input and keeps vLLM's
  CPU kernel's multiples of 32 (SmolLM2's hidden 576 takes 64), or refuses the model in one line. The screen rounds
  the weights with compressed-tensors and the embedding / head to bfloat16; it does not emulate bfloat16
  activations and norms (an approximation: the screen computes them in float32).

Float: float32 (the exporter's default).
"""

from __future__ import annotations

from dataclasses import dataclass

from effideploy.errors import EffideployError
from effideploy.quantization.schemes import Declaration, Storage, WeightScheme, WeightTensor

GROUPS = (128, 64, 32)  # tried largest first: fewer scales, closer to the exporter's default of 128
KERNEL_MULTIPLE = 32  # vllm_quant.CPU_WNA16_MULTIPLE (not imported: keep this module free of compressed-tensors)


def _compressed(weight, scheme: str, group_size: int | None, dtype: str) -> tuple:
    """(codes as float, scale, local compressed tensors) of one weight, by the exporter's own compressed-tensors call."""
    import torch

    from effideploy.exporters.vllm.quant import quantization_scheme, quantize_linear

    quant = quantization_scheme(scheme, group_size)
    local = quantize_linear(weight, quant, getattr(torch, dtype))
    return quant, local


@dataclass(frozen=True)
class W8A8(WeightScheme):
    name: str = "w8a8"

    @property
    def quantizes(self) -> bool:
        return True

    def storage(self, tensor: WeightTensor) -> Storage:
        if tensor.role != "projection":  # lm_head is in compressed-tensors' ignore list; a tied one is not stored
            return Storage("float32", tensor.parameters * 4.0, separate=False)
        return Storage("w8a8 int8 per channel", tensor.parameters + tensor.shape[0] * 4.0, quantized=True)

    def fake_quantize(self, weight, tensor, storage):
        if not storage.quantized:
            return weight
        _, local = _compressed(weight, "w8a8", None, "float32")
        return (local["weight"].float() * local["weight_scale"].float()).to(weight.dtype)

    def activation_forward(self, module, tensor, storage):
        if not storage.quantized:
            return None
        import torch

        from effideploy.exporters.vllm.quant_checks import W8A8Forward
        from effideploy.runtimes.vllm_kernels import INT8_SATURATING, probe

        # the codes of the weight before rounding (apply_scheme asks before it rounds), as the exporter stores them
        _, local = _compressed(module.weight.data, "w8a8", None, "float32")
        saturating = probe().int8_mm == INT8_SATURATING  # what this machine's oneDNN computes
        return W8A8Forward(module, local["weight"].to(torch.int8), local["weight_scale"], saturating)


@dataclass(frozen=True)
class W4A16(WeightScheme):
    name: str = "w4a16"
    group_size: int = 128
    dtype: str = "bfloat16"

    @property
    def quantizes(self) -> bool:
        return True

    @property
    def ffn_multiple(self) -> int:
        # the CPU kernel's 32 and a group that divides the width (fitted() picks the largest of 128/64/32 that fits
        # every input; widths in multiples of 64 let SmolLM2-shaped models keep group 64)
        return 64

    def storage(self, tensor: WeightTensor) -> Storage:
        if tensor.role != "projection":
            return Storage("bfloat16", tensor.parameters * 2.0)
        out_features, in_features = tensor.shape
        # packed int32 (eight nibbles), a bfloat16 scale per group, weight_shape (two int64)
        return Storage(f"w4a16 int4 group {self.group_size}",
                       tensor.parameters / 2 + out_features * (in_features // self.group_size) * 2.0 + 16,
                       quantized=True)

    def fake_quantize(self, weight, tensor, storage):
        import torch

        if not storage.quantized:
            return weight.to(torch.bfloat16).to(weight.dtype)
        from compressed_tensors.compressors.base import BaseCompressor

        quant, local = _compressed(weight, "w4a16", self.group_size, self.dtype)
        compressor = BaseCompressor.get_value_from_registry(quant.format)
        return compressor.decompress(local, quant)["weight"].to(weight.dtype)

    def fitted(self, tensors: list[WeightTensor]) -> "W4A16":
        shapes = [t.shape for t in tensors if t.role == "projection"]
        off = sorted({size for shape in shapes for size in shape if size % KERNEL_MULTIPLE})
        if not off:
            for group in GROUPS:
                if all(in_features % group == 0 for _, in_features in shapes):
                    return W4A16(group_size=group)
        raise EffideployError(
            f"w4a16 cannot hold this model: vLLM's CPU int4 kernel needs every projection's widths to be multiples of "
            f"{KERNEL_MULTIPLE} and a group of {'/'.join(map(str, GROUPS))} to divide every input width; "
            + (f"widths {', '.join(map(str, off[:6]))} are not multiples of {KERNEL_MULTIPLE}" if off else
               "no group divides them all") + " (export --realign rounds FFN widths down; or use w8a8)")

    def export_options(self) -> dict:
        return {"quantize": "w4a16", "group_size": self.group_size}


DECLARATION = Declaration(float=WeightScheme("float32", 4.0), schemes=(W8A8(), W4A16()),
                          aliases={"int8": "w8a8", "int4": "w4a16"})
