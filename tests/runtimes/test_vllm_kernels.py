"""What this machine's vLLM serves (``effideploy.runtimes.vllm_kernels``): the int8 GEMM model against vLLM's own
oneDNN kernel, in the exact (VNNI) and the saturating (AVX2, forced with ``ONEDNN_MAX_CPU_ISA=AVX2``) arithmetic;
and the refusals of what a machine's kernels lack, before any work (these run without a vLLM engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from effideploy.errors import EffideployError
from effideploy.runtimes import vllm_kernels
from effideploy.runtimes.vllm_kernels import INT8_EXACT, INT8_SATURATING, VllmKernels, int8_mm
from tests.exporters.test_vllm import tiny_pruned_dir  # noqa: F401 - the pruned tiny checkpoint fixture

AVX2_MACHINE = VllmKernels(platform="cpu", library="_C_AVX2", w4a16=False, fp8_kv=False, int8_mm=INT8_SATURATING,
                           w8a8_float32=True)
# Sapphire Rapids and later: vLLM sends W8A8 GEMMs to its AMX kernel, which takes bfloat16/float16 activations only
AMX_MACHINE = VllmKernels(platform="cpu", library="_C", w4a16=True, fp8_kv=True, int8_mm=INT8_EXACT, w8a8_float32=False)

# Run in a child: oneDNN reads ONEDNN_MAX_CPU_ISA once per process. Shapes cover decode (M=1), odd K and the widths
# of SmolLM2 (576 / 1536); x has two large neighbouring columns so the AVX2 path's int16 pairs saturate.
KERNEL_SCRIPT = r"""
import json, torch
from vllm import _custom_ops as ops
from effideploy.runtimes.vllm_kernels import int8_mm, quantize_per_token
torch.manual_seed(0)
rows = []
for M, K, N in [(1, 576, 1536), (7, 1536, 576), (3, 201, 96), (16, 128, 384)]:
    x = torch.randn(M, K) * 2
    x[:, 10:12] = 25.0
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N, 1) * 0.01 + 0.001
    handler = ops.create_onednn_scaled_mm(w.t(), scale, torch.float32, True, False, 32)
    xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
    ours_q, ours_s = quantize_per_token(x)
    out = torch.empty(M, N)
    ops.onednn_scaled_mm(handler, xq, out, xs, xzp, None, None)
    got = out.double()
    peak = float(got.abs().max())
    err = {mode: float((got - int8_mm(xq, w, saturating=mode) * xs.double() * scale.t().double()).abs().max()) / peak
           for mode in (False, True)}
    rows.append({"shape": [M, K, N], "exact": err[False], "saturating": err[True],
                 "quant_codes_equal": bool(torch.equal(ours_q, xq.float())),
                 "quant_scales_close": float((ours_s - xs).abs().max())})
print(json.dumps(rows))
"""


def run_kernel_script(isa: str | None) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if key not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.vllm
@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_int8_gemm_model_reproduces_vllms_own_kernel(isa):
    """vLLM's onednn_scaled_mm equals int8_mm in the mode the probe reports for the same ISA setting, to float
    rounding, and differs from the other mode by far more (so the model tells the two apart)."""
    pytest.importorskip("vllm")
    import torch

    if isa and not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        pytest.skip("kernel unavailable on this machine: no AVX2")
    env_before = os.environ.get("ONEDNN_MAX_CPU_ISA")
    try:
        if isa:
            os.environ["ONEDNN_MAX_CPU_ISA"] = isa
        else:
            os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
        mode = vllm_kernels.probe().int8_mm  # keyed by the ISA setting: one cache entry per value
    finally:
        if env_before is None:
            os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
        else:
            os.environ["ONEDNN_MAX_CPU_ISA"] = env_before
    if isa == "AVX2":
        assert mode == INT8_SATURATING  # oneDNN held to AVX2 has no VNNI: the pair sums saturate
    rows = run_kernel_script(isa)
    chosen, other = ("saturating", "exact") if mode == INT8_SATURATING else ("exact", "saturating")
    for row in rows:
        assert row["quant_codes_equal"] and row["quant_scales_close"] < 1e-6, row  # the same per-token quantization
        assert row[chosen] < 1e-5, row
    assert max(row[other] for row in rows) > 1e-2, rows


def test_saturating_model_by_hand():
    """Two products of 255 * 127 in one pair clip at 32767; the same products in different pairs do not."""
    import torch

    x = torch.tensor([[127, 127, 0, 0]], dtype=torch.int8)  # + 128: 255, 255, 128, 128
    w = torch.tensor([[127, 127, 0, 0], [127, 0, 127, 0]], dtype=torch.int8)
    exact = int8_mm(x, w, saturating=False)
    clipped = int8_mm(x, w, saturating=True)
    assert exact.tolist() == [[2 * 127 * 127, 127 * 127]]
    # pair (255*127 + 255*127) = 64770 -> 32767, minus the compensation 128 * 254
    assert clipped.tolist() == [[32767 - 128 * 254, 127 * 127]]


def test_refusals_name_the_missing_kernel():
    assert AVX2_MACHINE.missing(scheme="w8a8") is None and AVX2_MACHINE.missing() is None
    w4 = AVX2_MACHINE.missing(scheme="w4a16")
    kv = AVX2_MACHINE.missing(kv_cache_dtype="fp8_e5m2")
    assert w4.startswith("kernel unavailable on this machine: ") and "cpu_gemm_wna16" in w4 and "_C_AVX2" in w4
    assert kv.startswith("kernel unavailable on this machine: ") and "AVX-512 or AMX" in kv
    full = VllmKernels(platform="cpu", library="_C", w4a16=True, fp8_kv=True, int8_mm=INT8_EXACT, w8a8_float32=True)
    assert full.missing(scheme="w4a16", kv_cache_dtype="fp8") is None
    amx = AMX_MACHINE.missing(scheme="w8a8")
    assert amx.startswith("kernel unavailable on this machine: ") and "int8_scaled_mm_with_quant" in amx
    assert "--dtype bfloat16" in amx and "\n" not in amx
    assert AMX_MACHINE.missing(scheme="w8a8", dtype="float32") == amx
    assert AMX_MACHINE.missing(scheme="w8a8", dtype="bfloat16") is None and AMX_MACHINE.missing(scheme="w4a16") is None


@pytest.mark.parametrize("options", [{"quantize": "w4a16", "group_size": 32, "realign": True}, {"token_compression": "kv-dtype:fp8"},
                                     {"kv_cache_dtype": "fp8_e4m3"}])
def test_export_refuses_what_the_machine_cannot_serve_before_any_work(tiny_pruned_dir, tmp_path, monkeypatch, options):
    """With the parity check on (it serves the export here), an unservable scheme or KV dtype is one error line,
    in well under a second, and nothing is written; --no-verify (an export for another machine) is not refused."""
    import effideploy.exporters.vllm.export as vllm_export
    from effideploy.exporters.vllm.export import export_vllm

    monkeypatch.setattr(vllm_kernels, "probe", lambda use_cache=True: AVX2_MACHINE)
    monkeypatch.setattr(vllm_kernels, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_export, "vllm_installed", lambda: True)
    tick = time.perf_counter()
    with pytest.raises(EffideployError) as info:
        export_vllm(tiny_pruned_dir, tmp_path / "out", verify=True, **options)
    assert time.perf_counter() - tick < 5
    message = str(info.value)
    assert message.startswith("kernel unavailable on this machine: ") and "\n" not in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    result = export_vllm(tiny_pruned_dir, tmp_path / "elsewhere", verify=False, **options)
    assert result.output.is_dir()


@pytest.mark.vllm
def test_probe_answers_are_what_vllm_does_here():
    """The probe's fp8-KV, W4A16 and float32-W8A8 answers agree with vLLM's own checks in a fresh process (the last:
    whether SmolLM2's q_proj, 576 x 576 int8, would go to the AMX kernel)."""
    pytest.importorskip("vllm")
    kernels = vllm_kernels.probe()
    script = ("import json, torch; from vllm import _custom_ops; "
              "from vllm.model_executor.layers.utils import check_cpu_sgl_kernel; "
              "print(json.dumps([hasattr(torch.ops._C, 'cpu_gemm_wna16'), "
              "bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()), "
              "not check_cpu_sgl_kernel(576, 576, torch.int8)]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    w4a16, fp8, w8a8_float32 = json.loads(done.stdout.strip().splitlines()[-1])
    assert (kernels.w4a16, kernels.fp8_kv, kernels.w8a8_float32) == (w4a16, fp8, w8a8_float32)


def test_tune_leaves_out_and_refuses_what_the_machine_cannot_serve(monkeypatch):
    """On a machine whose vLLM lacks W4A16 and an fp8 KV cache: tune's default weight schemes drop int4 with the
    reason, a named int4 or kv-dtype:fp8 is refused up front, and int8 (W8A8) stays."""
    pytest.importorskip("vllm")
    from effideploy.errors import OptionError
    from effideploy.search.feasibility import check_recipes, servable_default
    from effideploy.search.space import Recipe, WeightQuantization

    monkeypatch.setattr(vllm_kernels, "probe", lambda use_cache=True: AVX2_MACHINE)
    kept, notes = servable_default(WeightQuantization(values=(None, "int8", "int4")), "vllm")
    assert kept == (None, "w8a8")  # the search's int8 is vLLM's W8A8
    assert len(notes) == 1 and "int4" in notes[0] and "kernel unavailable on this machine" in notes[0]
    check_recipes([Recipe(quantize="int8"), Recipe(ffn_sparsity=0.2, quantize="w8a8")], "vllm")
    for recipe, fragment in [(Recipe(quantize="int4"), "cpu_gemm_wna16"), (Recipe(kv="kv-dtype:fp8"), "AVX-512 or AMX")]:
        with pytest.raises(OptionError) as info:
            check_recipes([recipe], "vllm")
        assert fragment in str(info.value) and "\n" not in str(info.value)
