"""Decode speed of an FFN-pruned model against its dense original on ONNX Runtime, measured against the ideal.

    python benchmarks/scripts/onnx_speedup.py                        # SmolLM2 dense + a 50% CFSP prune, exported here
    python benchmarks/scripts/onnx_speedup.py --pruned out/pruned    # an existing checkpoint (exported under --work)
    python benchmarks/scripts/onnx_speedup.py --dense out/export-dense --pruned out/export-onnx   # existing exports

Both models are loaded in one process and measured interleaved (dense, pruned, pruned, dense, ...) after a warm-up,
so drift and other load on the machine hit both alike: bs1 greedy generation of --new-tokens after a prompt of
--prompt-tokens through the runtime's own prefill / decode_one_token steps; decode ms/token is the median over
every decode step of every round. On a shared machine wall time also counts time the threads waited for a core, so
the CPU time of the process per step is reported too (ORT threads sleep between ops by default here, --spinning 0,
so idle threads do not count): it still includes memory-bandwidth contention but not time slicing.

Ideal speedup = matmul parameters per decoded token, dense / pruned: each weight of the attention projections, the
FFNs and the lm_head is one multiply-add per token and, at bs1, one read from memory (the embedding is a lookup).
The target is a measured speedup of at least 90% of that ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from effideploy.bench.artifacts import export_for, matmul_parameters_of

import numpy as np

TARGET_FRACTION = 0.9


def timed_generation(runtime, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[float]]:
    """Greedy bs1 generation step by step: (prefill seconds, wall seconds and CPU seconds of each decode step)."""
    cache = runtime.new_cache(1, len(prompt) + new_tokens)
    start = time.perf_counter()
    logits, _ = runtime.prefill(np.array([prompt]), cache)
    token = logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - start
    wall, cpu = [], []
    for step in range(new_tokens - 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        token = runtime.decode_one_token(token, len(prompt) + step, cache).argmax(-1)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return prefill, wall, cpu


def pruned_checkpoint(work: Path, sparsity: float, calib_samples: int, calib_seqlen: int) -> str:
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    target = work / f"cfsp{int(sparsity * 100)}"
    if not (target / "config.json").is_file():
        print(f"pruning SmolLM2 at {sparsity} (CFSP, {calib_samples}x{calib_seqlen} calibration) -> {target}", flush=True)
        config = PruneConfig(method="cfsp", sparsity=sparsity, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
        prune_checkpoint(resolve_model("llama"), config, target, calibration=resolve_text("wikitext2"), overwrite=True)
    return str(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="llama", help="Dense model or its ONNX export (default: SmolLM2-135M).")
    parser.add_argument("--pruned", default=None, help="Pruned checkpoint or its ONNX export (default: prune SmolLM2).")
    parser.add_argument("--work", type=Path, default=Path("out/onnx-speedup"), help="Where exports are made/reused.")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6, help="Timed generations per model (interleaved).")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--spinning", choices=["0", "1"], default="0",
                        help="ORT worker threads sleep between ops (0) or spin (1, ORT's default: slightly faster on an "
                             "idle machine, but slower on a busy one and the CPU time then counts the spinning).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers as JSON.")
    args = parser.parse_args()

    from effideploy.runtimes.onnx import OnnxRuntime

    pruned_spec = args.pruned or pruned_checkpoint(args.work, args.sparsity, args.calib_samples, args.calib_seqlen)
    folders = {"dense": export_for("onnx", args.dense, args.work, "dense"),
               "pruned": export_for("onnx", pruned_spec, args.work, "pruned")}
    config = {"session.intra_op.allow_spinning": args.spinning}
    runtimes = {name: OnnxRuntime(folder, threads=args.threads, session_config=config) for name, folder in folders.items()}
    manifests = {name: runtime.manifest for name, runtime in runtimes.items()}
    vocab = manifests["dense"]["model"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(3, vocab, size=args.prompt_tokens).tolist()

    for runtime in runtimes.values():  # warm-up: first-run allocations, page-in of the weights
        runtime.generate([prompt], 8)
    decode = {name: [] for name in runtimes}
    decode_cpu = {name: [] for name in runtimes}
    prefill = {name: [] for name in runtimes}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    order = list(runtimes)
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            prefill_seconds, wall, cpu = timed_generation(runtimes[name], prompt, args.new_tokens)
            prefill[name].append(prefill_seconds)
            decode[name] += wall
            decode_cpu[name] += cpu
    load_after = os.getloadavg()[0]

    rows = {}
    for name in runtimes:
        steps = np.array(decode[name]) * 1e3
        rows[name] = {
            "export": str(folders[name]),
            "decode_ms_per_token": float(np.median(steps)),
            "decode_ms_p10_p90": [float(np.percentile(steps, 10)), float(np.percentile(steps, 90))],
            "decode_cpu_ms_per_token": float(np.median(decode_cpu[name]) * 1e3),
            "prefill_ms": float(statistics.median(prefill[name]) * 1e3),
            "matmul_parameters": matmul_parameters_of(folders[name])[0],
            "export_seconds": manifests[name]["seconds"].get("export"),
            "model_bytes": manifests[name]["sizes"]["model_bytes"],
            "parity": manifests[name]["parity"],
        }
    measured = rows["dense"]["decode_ms_per_token"] / rows["pruned"]["decode_ms_per_token"]
    measured_cpu = rows["dense"]["decode_cpu_ms_per_token"] / rows["pruned"]["decode_cpu_ms_per_token"]
    ideal = rows["dense"]["matmul_parameters"] / rows["pruned"]["matmul_parameters"]
    result = {
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": args.threads, "spinning": args.spinning, "runtime": runtimes["dense"].describe(),
        "models": rows, "speedup_measured": measured, "speedup_ideal": ideal, "fraction_of_ideal": measured / ideal,
        "speedup_measured_cpu_time": measured_cpu,
        "target_fraction": TARGET_FRACTION, "load_average": [load_before, load_after],
        "seconds": time.perf_counter() - started,
    }

    print(f"\nONNX Runtime {result['runtime']['engine'].split()[-1]}, {args.threads} threads, bs1, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens x {args.rounds} rounds (interleaved); "
          f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores\n")
    print("| model | decode ms/token (p10-p90) | decode CPU ms/token | prefill ms | matmul params/token | ONNX MB "
          "| export s | parity (max abs dlogit) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        parity = row["parity"]["logits_max_abs_diff"] if row["parity"] else float("nan")
        print(f"| {name} | {row['decode_ms_per_token']:.2f} ({row['decode_ms_p10_p90'][0]:.2f}-"
              f"{row['decode_ms_p10_p90'][1]:.2f}) | {row['decode_cpu_ms_per_token']:.2f} | {row['prefill_ms']:.0f} | {row['matmul_parameters'] / 1e6:.1f} M | "
              f"{row['model_bytes'] / 1e6:.0f} | {row['export_seconds'] or float('nan'):.0f} | {parity:.1e} |")
    verdict = "meets" if measured / ideal >= TARGET_FRACTION else "misses"
    print(f"\nspeedup measured {measured:.3f}x, ideal {ideal:.3f}x: {measured / ideal:.1%} of ideal "
          f"({verdict} the {TARGET_FRACTION:.0%} target); by CPU time {measured_cpu:.3f}x, {measured_cpu / ideal:.1%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for runtime in runtimes.values():
        runtime.close()


if __name__ == "__main__":
    main()
