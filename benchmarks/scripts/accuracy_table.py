"""WikiText-2 perplexity of every pruning method at several sparsities on one model, from one calibration pass.

Every method except mag-sp reads the same calibration statistics (block angular distances, FFN activation sums),
so they are collected once (and cached with --stats-cache) and each method/sparsity is then planned, applied to
a fresh copy of the dense model and evaluated. Prints a markdown table for docs/pruning.md.

    python benchmarks/scripts/accuracy_table.py --model llama --sparsities 0.2 0.3 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from effideploy.data.text import consecutive_windows, load_text, resolve_text, sample_windows, tokenize_text
from effideploy.eval.perplexity import perplexity
from effideploy.models.build import build_config, load_model, load_tokenizer
from effideploy.models.layerwise import LayerwiseModel
from effideploy.models.resolve import resolve_model
from effideploy.models.weights import SafetensorsWeights
from effideploy.pruning.calibration import collect_stats, load_stats, save_stats
from effideploy.pruning.config import PruneConfig
from effideploy.pruning.engine import plan_from_stats
from effideploy.pruning.rewrite import apply_plan

METHODS = ["cfsp", "cfsp-reference", "wanda-sp", "mag-sp", "flap", "uniform"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.2, 0.3, 0.5])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--stats-cache", type=Path, default=None, help="Reuse/save calibration statistics here.")
    parser.add_argument("--calib-dtype", default="float32")
    parser.add_argument("--gram-stride", type=int, default=PruneConfig.gram_stride,
                        help="Second moments for lstsq compensation from every k-th token (as prune --gram-stride).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON.")
    parser.add_argument("--extra", nargs="*", default=[], help="Extra runs as method:key=value,key=value.")
    args = parser.parse_args()

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    calib_ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "calibration")))
    test_ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test")))
    eval_windows = consecutive_windows(test_ids, args.seqlen, args.eval_windows)
    layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))

    if args.stats_cache and args.stats_cache.exists():
        stats = load_stats(args.stats_cache)
    else:
        windows = sample_windows(calib_ids, args.calib_samples, args.calib_seqlen, args.seed)
        stats = collect_stats(layerwise, windows, compute_dtype=args.calib_dtype, gram=True,
                              gram_stride=args.gram_stride)
        if args.stats_cache:
            save_stats(stats, args.stats_cache)
    print(f"calibration: {stats.n_windows} x {stats.seqlen} tokens ({args.calib_dtype}, second moments every "
          f"{args.gram_stride} tokens), {stats.seconds:.1f} s", flush=True)

    dense = load_model(source)
    results = {"dense": perplexity(dense, eval_windows).perplexity}
    print(f"dense: {results['dense']:.2f}", flush=True)
    runs = [(method, sparsity, {}) for method in args.methods for sparsity in args.sparsities]
    for item in args.extra:
        method, _, options = item.partition(":")
        values = dict(option.split("=") for option in options.split(",") if option)
        parsed = {key: (value if key == "compensation" else float(value)) for key, value in values.items()}
        sparsity = parsed.pop("sparsity", 0.5)
        runs.append((method, sparsity, parsed))
    for method, sparsity, options in runs:
        if "align" in options:
            options["align"] = int(options["align"])
        config = PruneConfig(method=method, sparsity=sparsity, calib_samples=stats.n_windows,
                             calib_seqlen=stats.seqlen, seed=args.seed, gram_stride=args.gram_stride, **options)
        start = time.perf_counter()
        plan = plan_from_stats(layerwise, config, stats)
        model = apply_plan(copy.deepcopy(dense), plan)
        value = perplexity(model, eval_windows).perplexity
        label = method + ("" if not options else " " + ",".join(f"{k}={v}" for k, v in options.items()))
        results[f"{label}@{sparsity}"] = value
        print(f"{label} @ {sparsity}: {value:.2f}  widths {min(plan.widths)}..{max(plan.widths)}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        del model

    print()
    sparsities = sorted({sparsity for _, sparsity, _ in runs})
    labels = list(dict.fromkeys(key.rpartition("@")[0] for key in results if key != "dense"))
    print("| method | " + " | ".join(f"{s * 100:g}%" for s in sparsities) + " |")
    print("|---|" + "---|" * len(sparsities))
    print(f"| dense | {results['dense']:.2f} |" + " |" * (len(sparsities) - 1))
    for label in labels:
        cells = [f"{results[f'{label}@{s}']:.2f}" if f"{label}@{s}" in results else "" for s in sparsities]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
