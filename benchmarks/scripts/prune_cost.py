"""What pruning costs: calibration time against the reference's two passes, and peak memory against depth.

1. Time (``--model``, default the embedded SmolLM2-135M): effideploy's calibration is one layer-by-layer forward
   that collects everything CFSP needs (block angular distances, FFN activation statistics, the second moments
   of least-squares compensation). The released CFSP code runs two: a whole-model forward with
   ``output_hidden_states`` for the angular distances, then a layer-by-layer forward with hooks for the channel
   scores. The reference-style figure here is exactly that: the whole-model forward plus our layer-by-layer pass
   (which does what the reference's second pass does), on the same windows, in the same process.

2. Memory: synthetic random Llama models of the same width with 8 and 32 decoder blocks are pruned end to end
   (``effideploy prune`` in a fresh process: calibrate, plan, rewrite, write) and their peak resident memory is
   compared with that of a process that merely loads the whole model, as whole-model pruning code must.

Prints the ratios measured in this run:

    python benchmarks/scripts/prune_cost.py                      # 16 x 1024 calibration windows on SmolLM2
    python benchmarks/scripts/prune_cost.py --samples 128        # the reference's 128 x 1024 (about 15 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHILD_PEAK = r"""
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024 if code == 0 else -1)
"""

LOAD_WHOLE = r"""
import sys, torch
from effideploy.models.build import load_model
from effideploy.models.resolve import resolve_model
model = load_model(resolve_model(sys.argv[1]))
with torch.no_grad():  # one short forward: every weight is read, as whole-model pruning code reads them
    model(torch.zeros(1, 16, dtype=torch.long))
"""


def time_calibration(model: str, samples: int, seqlen: int, batch_size: int) -> dict:
    from effideploy.data.text import load_text, resolve_text, sample_windows, tokenize_text
    from effideploy.models.build import build_config, load_model, load_tokenizer
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.pruning.calibration import collect_stats
    from effideploy.pruning.config import PruneConfig

    source = resolve_model(model)
    ids = tokenize_text(load_tokenizer(source), load_text(resolve_text("wikitext2", "calibration")))
    windows = sample_windows(ids, samples, seqlen, 0)
    stride = PruneConfig.gram_stride

    def layerwise_pass() -> float:
        layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
        with tempfile.TemporaryDirectory() as gram_dir:
            start = time.perf_counter()
            collect_stats(layerwise, windows, batch_size, gram=True, gram_dir=gram_dir, gram_stride=stride)
            return time.perf_counter() - start

    def whole_model_angular_pass() -> float:
        # The reference's first pass: hidden states of every block from a whole-model forward.
        dense = load_model(source)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in windows.split(batch_size):
                hidden = dense(batch, output_hidden_states=True).hidden_states
                for before, after in zip(hidden[:-1], hidden[1:]):
                    torch.nn.functional.cosine_similarity(before, after, dim=-1).clamp(-1, 1).acos()
        return time.perf_counter() - start

    ours = layerwise_pass()
    first = whole_model_angular_pass()
    second = layerwise_pass()  # the same work as the reference's second pass (measured again: drift shows up)
    return {"windows": samples, "seqlen": seqlen, "ours_s": ours, "reference_first_pass_s": first,
            "reference_second_pass_s": second, "ratio": ours / (first + second)}


def synthetic_model(folder: Path, layers: int, hidden: int, intermediate: int, tokenizer) -> float:
    """A random Llama saved as safetensors with a real tokenizer; returns its size in MB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def peak_mb(command: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD_PEAK, *command], capture_output=True, text=True, check=True)
    value = int(out.stdout.strip().splitlines()[-1])
    if value < 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return value


def memory_by_depth(depths: list[int], hidden: int, intermediate: int, calib_tokens: int) -> list[dict]:
    from effideploy.data.text import resolve_text
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model

    tokenizer = load_tokenizer(resolve_model("llama"))
    text = resolve_text("wikitext2", "calibration")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prune-cost-") as tmp:
        for layers in depths:
            folder = Path(tmp) / f"random-{layers}"
            size = synthetic_model(folder, layers, hidden, intermediate, tokenizer)
            prune = [sys.executable, "-m", "effideploy", "prune", "--model", str(folder), "--sparsity", "0.5",
                     "--calib", text.path, "--calib-samples", "8", "--calib-seqlen", str(calib_tokens),
                     "--output", str(Path(tmp) / f"pruned-{layers}"), "--threads", "1"]
            rows.append({"layers": layers, "weights_mb": size, "prune_peak_mb": peak_mb(prune),
                         "load_whole_peak_mb": peak_mb([sys.executable, "-c", LOAD_WHOLE, str(folder)])})
            for path in Path(tmp).glob(f"*-{layers}"):
                shutil.rmtree(path)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--depths", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("EFFIDEPLOY_PROGRESS", "0")
    result = {"threads": torch.get_num_threads()}

    if not args.skip_time:
        timing = time_calibration(args.model, args.samples, args.seqlen, args.batch_size)
        result["time"] = timing
        print(f"calibration, {timing['windows']} x {timing['seqlen']} tokens, {result['threads']} threads:")
        print(f"  effideploy (one layer-by-layer pass)       {timing['ours_s']:8.1f} s")
        print(f"  reference style (whole-model + layerwise)  "
              f"{timing['reference_first_pass_s'] + timing['reference_second_pass_s']:8.1f} s "
              f"({timing['reference_first_pass_s']:.1f} + {timing['reference_second_pass_s']:.1f})")
        print(f"  ratio ours / reference style               {timing['ratio']:8.2f}")

    rows = memory_by_depth(args.depths, args.hidden, args.intermediate, 256)
    result["memory"] = rows
    small, large = rows
    print(f"peak memory, random Llama hidden {args.hidden} / FFN {args.intermediate}, prune 50% end to end:")
    print("  layers | weights MB | effideploy prune peak MB | whole-model load peak MB")
    for row in rows:
        print(f"  {row['layers']:6d} | {row['weights_mb']:10.0f} | {row['prune_peak_mb']:24d} | "
              f"{row['load_whole_peak_mb']:24d}")
    print(f"  {large['layers']} vs {small['layers']} layers: weights x{large['weights_mb'] / small['weights_mb']:.2f}, "
          f"effideploy prune peak x{large['prune_peak_mb'] / small['prune_peak_mb']:.2f}, "
          f"whole-model load peak x{large['load_whole_peak_mb'] / small['load_whole_peak_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
