"""Prune SmolLM2 at 20% and 50% FFN sparsity (CFSP, default 128 x 1024 calibration, one pass shared by both).

    python benchmarks/scripts/prune_smollm2.py [OUT]      # default out/smollm2: OUT/cfsp-0.2, OUT/cfsp-0.5

The checkpoints behind benchmarks/results/quantization_onnx (calibration took 1008 s on the shared 2-core machine).
"""
import sys
import time
from pathlib import Path
from effideploy.data.text import resolve_text
from effideploy.models.resolve import resolve_model
from effideploy.pruning import PruneConfig, calibrate_source, prune_checkpoint
from effideploy.io import scratch_dir

source = resolve_model("llama")
text = resolve_text("wikitext2", "calibration")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/smollm2")
out.mkdir(parents=True, exist_ok=True)
configs = {s: PruneConfig(method="cfsp", sparsity=s) for s in (0.2, 0.5)}
tick = time.perf_counter()
with scratch_dir(out / "x", "gram") as gram:
    stats = calibrate_source(source, configs[0.2], text, gram_dir=str(gram))
    print(f"calibration {time.perf_counter() - tick:.0f} s", flush=True)
    for s, c in configs.items():
        prune_checkpoint(source, c, out / f"cfsp-{s:g}", calibration=text, stats=stats, overwrite=True)
        print(f"pruned {s}", flush=True)
print(f"total {time.perf_counter() - tick:.0f} s")
