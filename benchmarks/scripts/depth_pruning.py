"""Width, depth and attention pruning of SmolLM2 at equal parameters removed, from one calibration pass.

    python benchmarks/scripts/depth_pruning.py [--work out/depth] [--windows 40] [--onnx] [--vllm]

For each of CFSP's FFN sparsities 0.2 and 0.5 (width only, what effideploy did before; they remove 11.8% and 29.6%
of SmolLM2's parameters) the same fraction of parameters is removed by ``drop-blocks`` (ShortGPT's rule),
``drop-attention`` (no-op attention, only where attention alone can reach the target) and ``cfsp-joint`` (loss per
parameter saved, over FFN channels, attention sublayers and blocks). Every checkpoint comes from one calibration
pass (``calibrate_source``, with second moments for lstsq).

Quality (PyTorch, float32): WikiText-2 test perplexity over ``--windows`` consecutive windows of ``--seqlen`` tokens,
and loyalty = the fraction of scored positions where the candidate's next-token argmax equals the dense model's.
Speed (``--onnx`` / ``--vllm``): bs1 greedy generation of ``--new-tokens`` after a random prompt of 256 and 2048
tokens; TTFT = prefill time, decode = median ms per token. ONNX Runtime runs dense and candidate interleaved in one
process (``--rounds`` each); vLLM runs one engine at a time (sequential, so drift on a shared machine is not
cancelled). Speedups are dense / candidate, beside the ideal decode speedup (matmul weights read per token) and
the ideal prefill speedup from FLOPs (weights plus QK^T/AV over the causal triangle, which removing attention cuts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = (256, 2048)


def checkpoints(work: Path, calib_samples: int, calib_seqlen: int) -> dict[str, dict]:
    """label -> {path, method, target}; pruned from one calibration pass, reused when present."""
    from effideploy.data.text import resolve_text
    from effideploy.errors import OptionError
    from effideploy.io import scratch_dir
    from effideploy.pruning import PruneConfig, calibrate_source, prune_checkpoint

    source_spec = "llama"
    from effideploy.models.resolve import resolve_model

    source = resolve_model(source_spec)
    text = resolve_text("wikitext2", "calibration")
    work.mkdir(parents=True, exist_ok=True)
    common = dict(calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    plan = {}
    for sparsity in (0.2, 0.5):
        plan[f"width-{sparsity:g}"] = PruneConfig(method="cfsp", sparsity=sparsity, **common)
    labels = {"dense": {"path": str(source.path), "method": "dense", "target": 0.0}}
    missing = [label for label in plan if not (work / label / "config.json").is_file()]
    structural = ("drop-blocks", "drop-attention", "cfsp-joint")
    missing += [f"{m}-{s:g}" for s in (0.2, 0.5) for m in structural if not (work / f"{m}-{s:g}").exists()]
    stats, gram_scope = None, None
    if missing:
        gram_scope = scratch_dir(work / "x", "gram")
        gram = gram_scope.__enter__()
        tick = time.perf_counter()
        stats = calibrate_source(source, plan["width-0.2"], text, gram=True, gram_dir=str(gram))
        print(f"calibration ({calib_samples} x {calib_seqlen} tokens): {time.perf_counter() - tick:.0f} s", flush=True)
    try:
        for sparsity in (0.2, 0.5):
            label = f"width-{sparsity:g}"
            if not (work / label / "config.json").is_file():
                prune_checkpoint(source, plan[label], work / label, calibration=text, stats=stats, overwrite=True)
            removed = json.loads((work / label / "effideploy.json").read_text())["sparsity"]["parameters_removed"]
            labels[label] = {"path": str(work / label), "method": "cfsp", "target": removed}
            for method in structural:
                name = f"{method}-{sparsity:g}"
                target = work / name
                if not target.exists():
                    config = PruneConfig(method=method, target_params=removed, **common)
                    try:
                        prune_checkpoint(source, config, target, calibration=text, stats=stats, overwrite=True)
                    except OptionError as exc:  # attention alone cannot remove 29.6%
                        target.mkdir(parents=True)
                        (target / "refused.txt").write_text(str(exc) + "\n")
                if (target / "refused.txt").is_file():
                    print(f"{name}: {(target / 'refused.txt').read_text().strip()}", flush=True)
                    continue
                labels[name] = {"path": str(target), "method": method, "target": removed}
    finally:
        if gram_scope is not None:
            gram_scope.__exit__(None, None, None)
    return labels


def describe(path: str) -> dict:
    from effideploy.bench.metrics import matmul_parameters
    from effideploy.models.build import attention_layers, build_config, count_parameters
    from effideploy.models.resolve import read_config_dict

    config = build_config(read_config_dict(Path(path)))
    counts = count_parameters(config)
    record = json.loads((Path(path) / "effideploy.json").read_text()) if (Path(path) / "effideploy.json").is_file() else {}
    return {"parameters": counts["total"], "matmul_parameters": matmul_parameters(counts), "blocks": config.num_hidden_layers,
            "attention_layers": len(attention_layers(config)),
            "structure": record.get("structure"), "ffn_widths_sum": sum(getattr(config, "ffn_widths", lambda: [])())}


def quality(labels: dict, windows: int, seqlen: int) -> dict:
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.pytorch import TorchRuntime

    dense_source = resolve_model("llama")
    ids = tokenize_text(load_tokenizer(dense_source), load_text(resolve_text("wikitext2", "test")))
    sequences = consecutive_windows(ids, seqlen, windows).tolist()
    results, dense_argmax = {}, None
    for label, entry in labels.items():
        tick = time.perf_counter()
        runtime = TorchRuntime(model=load_model(resolve_model(entry["path"])))
        with torch.no_grad():
            scores = runtime.score_windows(sequences)
        nll = torch.cat([s.nll for s in scores])
        argmax = torch.cat([s.argmax for s in scores])
        if dense_argmax is None:
            dense_argmax = argmax
        results[label] = {"perplexity": float(torch.exp(torch.stack([s.nll.mean() for s in scores]).mean())),
                          "loyalty": float((argmax == dense_argmax).float().mean()),
                          "tokens": int(nll.numel()), "seconds": time.perf_counter() - tick}
        print(f"{label}: ppl {results[label]['perplexity']:.2f}, loyalty {results[label]['loyalty']:.3f}", flush=True)
        del runtime
    return results


def onnx_speed(labels: dict, work: Path, new_tokens: int, rounds: int, threads: int) -> dict:
    from onnx_speedup import timed_generation

    from effideploy.bench.artifacts import export_for
    from effideploy.runtimes.onnx import OnnxRuntime

    folders = {label: export_for("onnx", entry["path"], work / "exports", label) for label, entry in labels.items()}
    config = {"session.intra_op.allow_spinning": "0"}
    results = {label: {} for label in labels}
    dense = OnnxRuntime(folders["dense"], threads=threads, session_config=config)
    vocab = dense.manifest["model"]["vocab_size"]
    for label in labels:
        if label == "dense":
            continue
        candidate = OnnxRuntime(folders[label], threads=threads, session_config=config)
        for length in PROMPTS:
            prompt = np.random.default_rng(length).integers(3, vocab, size=length).tolist()
            timings = {"dense": ([], []), "candidate": ([], [])}
            pair = {"dense": dense, "candidate": candidate}
            for runtime in pair.values():
                runtime.generate([prompt[:64]], 4)  # warm-up
            for index in range(rounds):
                for name in (("dense", "candidate") if index % 2 == 0 else ("candidate", "dense")):
                    prefill, wall, _ = timed_generation(pair[name], prompt, new_tokens)
                    timings[name][0].append(prefill)
                    timings[name][1].extend(wall)
            row = {name: {"ttft_ms": statistics.median(t[0]) * 1e3, "decode_ms": statistics.median(t[1]) * 1e3}
                   for name, t in timings.items()}
            row["ttft_speedup"] = row["dense"]["ttft_ms"] / row["candidate"]["ttft_ms"]
            row["decode_speedup"] = row["dense"]["decode_ms"] / row["candidate"]["decode_ms"]
            results[label][str(length)] = row
            print(f"onnx {label} prompt {length}: TTFT x{row['ttft_speedup']:.2f}, decode x{row['decode_speedup']:.2f}",
                  flush=True)
        candidate.close()
    dense.close()
    return results


def vllm_speed(labels: dict, work: Path, new_tokens: int, rounds: int, threads: int) -> dict:
    from effideploy.exporters.vllm.export import export_vllm
    from effideploy.runtimes.vllm import VllmRuntime

    results = {}
    for label, entry in labels.items():
        folder = work / "vllm" / label
        if not (folder / "config.json").is_file():
            export_vllm(entry["path"], folder, verify=False, overwrite=True)
        runtime = VllmRuntime(folder, max_model_len=max(PROMPTS) + new_tokens + 8, threads=threads)
        row = {}
        for length in PROMPTS:
            prompt = np.random.default_rng(length).integers(3, 49152, size=length).tolist()
            runtime.generate([prompt[:64]], 4)
            ttft, decode = [], []
            for _ in range(rounds):
                generation = runtime.generate([prompt], new_tokens)
                ttft.append(generation.prefill_seconds[0])
                decode.extend(generation.decode_seconds[0])
            row[str(length)] = {"ttft_ms": statistics.median(ttft) * 1e3, "decode_ms": statistics.median(decode) * 1e3}
        runtime.close()
        results[label] = row
        print(f"vllm {label}: {row}", flush=True)
    for label in labels:
        for length in map(str, PROMPTS):
            results[label][length]["ttft_speedup"] = results["dense"][length]["ttft_ms"] / results[label][length]["ttft_ms"]
            results[label][length]["decode_speedup"] = results["dense"][length]["decode_ms"] / results[label][length]["decode_ms"]
    return results


def ideal(shape: dict, dense: dict, length: int) -> dict:
    """Ideal speedups: decode from matmul weights per token; prefill from FLOPs over a causal prompt."""
    from effideploy.bench.metrics import prefill_flops

    width = 576  # SmolLM2's query width (9 heads x 64) per attention layer
    return {"decode": dense["matmul_parameters"] / shape["matmul_parameters"],
            "prefill": prefill_flops(dense["matmul_parameters"], width * dense["attention_layers"], length)
            / prefill_flops(shape["matmul_parameters"], width * shape["attention_layers"], length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/depth"))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--vllm", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-labels", default=None,
                        help="Comma-separated models to time (default all; dense is always timed).")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/depth/depth_pruning.json"))
    args = parser.parse_args()

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    labels = checkpoints(args.work, args.calib_samples, args.calib_seqlen)
    shapes = {label: describe(entry["path"]) for label, entry in labels.items()}
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result = {"settings": vars(args) | {"work": str(args.work), "json": str(args.json)},
              "labels": labels, "shapes": shapes,
              "quality": previous.get("quality") if previous.get("quality") and set(previous["quality"]) == set(labels)
              else quality(labels, args.windows, args.seqlen),
              "onnx": previous.get("onnx"), "vllm": previous.get("vllm")}
    timed = labels if not args.speed_labels else {
        label: entry for label, entry in labels.items() if label == "dense" or label in args.speed_labels.split(",")}
    if args.onnx:
        result["onnx"] = onnx_speed(timed, args.work, args.new_tokens, args.rounds, args.threads)
    if args.vllm:
        result["vllm"] = vllm_speed(timed, args.work, args.new_tokens, args.rounds, args.threads)
    result["ideal"] = {label: {str(n): ideal(shapes[label], shapes["dense"], n) for n in PROMPTS} for label in labels}
    result["load_average"] = [load_before, os.getloadavg()[0]]
    result["seconds"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    dense = result["shapes"]["dense"]
    print(f"\n| model | params removed | blocks | attention layers | WikiText-2 ppl | loyalty | ORT TTFT x (256 / 2048) "
          "| ORT decode x (256 / 2048) | vLLM TTFT x (256 / 2048) | vLLM decode x (256 / 2048) | ideal decode x "
          "| ideal prefill x (256 / 2048) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def pair(section, label, key):
        rows = (result.get(section) or {}).get(label)
        if not rows or "256" not in rows:
            return "-"
        return f"{rows['256'][key]:.2f} / {rows['2048'][key]:.2f}"

    for label, shape in result["shapes"].items():
        q = result["quality"][label]
        ideal_rows = result["ideal"][label]
        print(f"| {label} | {1 - shape['parameters'] / dense['parameters']:.3f} | {shape['blocks']} | "
              f"{shape['attention_layers']} | {q['perplexity']:.2f} | {q['loyalty']:.3f} | "
              f"{pair('onnx', label, 'ttft_speedup')} | {pair('onnx', label, 'decode_speedup')} | "
              f"{pair('vllm', label, 'ttft_speedup')} | {pair('vllm', label, 'decode_speedup')} | "
              f"{ideal_rows['256']['decode']:.2f} | {ideal_rows['256']['prefill']:.2f} / {ideal_rows['2048']['prefill']:.2f} |")


if __name__ == "__main__":
    main()
