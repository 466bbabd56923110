"""Which int8 GEMM vLLM-CPU's W8A8 runs on this machine, and what the parity reference must emulate.

    python benchmarks/scripts/vllm_int8_kernel.py                       # this machine's oneDNN ISA
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/scripts/vllm_int8_kernel.py   # as an AVX2 machine (no VNNI) runs it

1. Kernel: vLLM's own ``onednn_scaled_mm`` on SmolLM2-shaped random layers (per-token int8 activations, int8
   weights) against the exact int8 product and against ``runtimes.vllm_kernels.int8_mm(saturating=True)`` (the
   int16-saturating ``vpmaddubsw`` pairs of oneDNN's AVX2 path): relative max error of each.
2. Model: SmolLM2-135M (dense) exported as W8A8 (compressed-tensors, round-to-nearest) and scored teacher-forced in
   vLLM against both references: top-1 agreement on decided positions (the parity criterion, 95%).
Writes benchmarks/results/vllm_int8_kernel[-ISA].json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

KERNEL = r"""
import json, torch
from vllm import _custom_ops as ops
from effideploy.runtimes.vllm_kernels import int8_mm
torch.manual_seed(0)
rows = []
for M, K, N in [(1, 576, 1536), (64, 576, 1536), (64, 1536, 576), (64, 576, 192)]:
    x = torch.randn(M, K)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N, 1) * 0.01 + 0.001
    handler = ops.create_onednn_scaled_mm(w.t(), scale, torch.float32, True, False, 32)
    xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty(M, N)
    ops.onednn_scaled_mm(handler, xq, out, xs, xzp, None, None)
    peak = float(out.abs().max())
    rows.append({"M": M, "K": K, "N": N, **{name: float((out.double() - int8_mm(xq, w, saturating=sat)
                 * xs.double() * scale.t().double()).abs().max()) / peak for name, sat in (("exact", False), ("saturating", True))}})
print(json.dumps(rows))
"""


def main() -> int:
    import subprocess

    from effideploy.exporters.vllm.export import export_vllm
    from effideploy.exporters.vllm.quant_checks import check_quantized_parity
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.vllm_kernels import INT8_EXACT, INT8_SATURATING, probe

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    kernels = probe()
    done = subprocess.run([sys.executable, "-c", KERNEL], capture_output=True, text=True, check=True)
    kernel_rows = json.loads(done.stdout.strip().splitlines()[-1])
    source = resolve_model("llama")
    parity = {}
    with tempfile.TemporaryDirectory() as work:
        export = export_vllm(source, Path(work) / "w8a8", quantize="w8a8", verify=False).output
        for mode in (INT8_EXACT, INT8_SATURATING):
            record = check_quantized_parity(export, source, dtype="float32", int8_gemm=mode, require=False)
            parity[mode] = {key: getattr(record, key) for key in ("top1_agreement", "decided_positions", "positions",
                                                                  "top1_agreement_all_positions", "max_abs_logprob_diff")}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    result = {"command": ("ONEDNN_MAX_CPU_ISA=" + isa + " " if isa else "") + "python benchmarks/scripts/vllm_int8_kernel.py",
              "cpu": cpu, "avx512_vnni": "avx512_vnni" in flags, "onednn_max_cpu_isa": isa, "probe": kernels.__dict__,
              "kernel_relative_max_error": kernel_rows, "smollm2_w8a8_parity": parity}
    name = "vllm_int8_kernel" + (f"-{isa.lower()}" if isa else "") + ".json"
    path = ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
