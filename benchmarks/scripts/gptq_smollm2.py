"""GPTQ from the pruning's own calibration pass vs round-to-nearest vs ONNX Runtime's GPTQ, on SmolLM2.

    python benchmarks/scripts/gptq_smollm2.py [OUT] [--samples N] [--windows W] [--vllm]

1. Prunes SmolLM2 with CFSP at 20% (--align 64, so vLLM's W4A16 takes group 64), keeping every Linear's input
   second moments (``keep_stats``): one calibration pass of N x 1024 tokens (default 32).
2. Exports it to ONNX Runtime as int4 (MatMulNBits, block 32) three ways: round-to-nearest, GPTQ from the kept
   statistics (no second pass), and ONNX Runtime's own GPTQ (its own pass over 8 x 128 tokens, from a copy of the
   checkpoint without the kept statistics; only with --ort-gptq); with --vllm also W4A16 (group 64) rtn and gptq for vLLM.
3. Scores W consecutive 1024-token windows of WikiText-2 test (default 40) on each, and on the dense and pruned
   float models, and prints perplexity, loyalty (argmax agreement with the dense fp32 model) and export times.
Results: benchmarks/results/gptq_smollm2.md (the printed table).
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
from effideploy.errors import EffideployError
from effideploy.eval.perplexity import window_perplexity
from effideploy.exporters.onnx.export import export_onnx
from effideploy.models.build import load_tokenizer
from effideploy.models.resolve import resolve_model
from effideploy.pruning import PruneConfig, prune_checkpoint
from effideploy.runtimes import open_runtime

parser = argparse.ArgumentParser()
parser.add_argument("out", nargs="?", default="out/gptq")
parser.add_argument("--samples", type=int, default=32)
parser.add_argument("--windows", type=int, default=40)
parser.add_argument("--vllm", action="store_true")
parser.add_argument("--ort-gptq", action="store_true", help="also ONNX Runtime's own GPTQ (~15 min here)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
source = resolve_model("llama")
times = {}

checkpoint = out / "cfsp-0.2-stats"
if not checkpoint.exists():
    tick = time.perf_counter()
    prune_checkpoint(source, PruneConfig(method="cfsp", sparsity=0.2, align=64, calib_samples=args.samples,
                                         keep_stats=True),
                     checkpoint, calibration=resolve_text("wikitext2", "calibration"))
    times["prune (one pass, stats kept)"] = time.perf_counter() - tick
without = out / "cfsp-0.2-nostats"
if not without.exists():
    shutil.copytree(checkpoint, without, ignore=shutil.ignore_patterns("calibration"), copy_function=os.link)

exports = {}
variants = [("int4 rtn", checkpoint, "rtn"), ("int4 gptq (kept stats)", checkpoint, "gptq")]
if args.ort_gptq:
    variants.append(("int4 gptq (ORT, own pass)", without, "gptq"))
for label, src, method in variants:
    folder = out / label.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
    if not folder.exists():
        tick = time.perf_counter()
        try:
            export_onnx(src, folder, quantize="int4", quant_method=method)
        except EffideployError as failure:  # reported, and measured anyway: the table says which export failed
            print(f"{label}: {failure}; exported again without the check", flush=True)
            export_onnx(src, folder, quantize="int4", quant_method=method, verify=False)
            label += " (parity FAILED)"
        times[f"export {label}"] = time.perf_counter() - tick
    exports[label] = ("onnx", folder)
if args.vllm:
    from effideploy.exporters.vllm.export import export_vllm

    for method in ("rtn", "gptq"):
        folder = out / f"vllm-w4a16-g64-{method}"
        if not folder.exists():
            tick = time.perf_counter()
            export_vllm(checkpoint, folder, quantize="w4a16", group_size=64, quant_method=method)
            times[f"export vllm w4a16 {method}"] = time.perf_counter() - tick
        exports[f"vLLM w4a16 g64 {method}"] = ("vllm", folder)

ids = tokenize_text(load_tokenizer(source), load_text(resolve_text("wikitext2", "test")))
windows = consecutive_windows(ids, 1024, args.windows)
rows = {}
for label, (runtime, path) in {"dense fp32": ("torch", source.path), "cfsp-0.2 fp32": ("torch", checkpoint),
                               **exports}.items():
    with open_runtime(runtime, path) as model:
        rows[label] = window_perplexity(model, windows, description=label)
dense = rows["dense fp32"]
print(f"\nSmolLM2-135M, CFSP 20% (align 64, {args.samples} x 1024 calibration), WikiText-2 test, "
      f"{args.windows} x 1024 windows\n")
print("| model | PPL | vs dense | vs cfsp-0.2 fp32 | loyalty to dense |")
print("|---|---|---|---|---|")
for label, result in rows.items():
    agree = [sum(a == b for a, b in zip(p, q)) / len(p) for p, q in zip(result.predictions, dense.predictions)]
    print(f"| {label} | {result.perplexity:.2f} | {100 * (result.perplexity / dense.perplexity - 1):+.1f}% | "
          f"{100 * (result.perplexity / rows['cfsp-0.2 fp32'].perplexity - 1):+.1f}% | {sum(agree) / len(agree):.3f} |")
print("\n" + json.dumps({k: round(v, 1) for k, v in times.items()}))
