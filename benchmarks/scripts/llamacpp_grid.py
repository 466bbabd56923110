"""Pruned SmolLM2 on llama.cpp: dense vs CFSP-pruned checkpoints, each as several GGUF types, measured in one run
(and, with --with onnx,vllm, the same checkpoints on ONNX Runtime and vLLM CPU in the same interleaved rounds).

    python benchmarks/scripts/llamacpp_grid.py                               # dense, cfsp-0.2, cfsp-0.5 x f16/q8_0/q4_k_m
    python benchmarks/scripts/llamacpp_grid.py --types f16,q4_k_m --windows 10 --with onnx,vllm

Every GGUF is made by ``effideploy export --runtime llamacpp`` (export_or_reuse under --work, parity-checked: the
float32 GGUF's greedy tokens equal transformers', the typed one's recorded). All models are opened first (the
LlamaCppRuntime adapter, llama.cpp's C API, --threads threads, f16 KV cache) and measured in interleaved rounds, one
busy at a time, forward then reverse order, so load from other jobs hits all alike: bs1 greedy generation of
--new-tokens after --prompt-tokens of WikiText-2 test text. Decode tokens/s = 1 / median decode step over all rounds;
prefill tokens/s = prompt tokens / median time to first token.

Speedup = dense's median step time / the model's, against the dense model of the same GGUF type (and runtime);
"ideal" beside it = matmul parameters per decoded token, dense / pruned (each weight read once per token at bs1).
Perplexity: WikiText-2 test, --windows consecutive windows of --seqlen tokens, through the adapter's
``score_windows``; loyalty: share of positions whose argmax equals dense float32 transformers' on the same windows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from effideploy.bench.artifacts import export_for, matmul_parameters_of

DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")


def pruned_checkpoint(work: Path, sparsity: float) -> str:
    """SmolLM2 pruned with CFSP at ``sparsity`` on a small calibration set (8 x 256 tokens), reused when present."""
    target = work / f"smollm2-cfsp{int(sparsity * 100)}"
    if not (target / "config.json").is_file():
        from effideploy.data.text import resolve_text
        from effideploy.models.resolve import resolve_model
        from effideploy.pruning import PruneConfig, prune_checkpoint

        print(f"pruning SmolLM2 at {sparsity:.0%} -> {target}", flush=True)
        config = PruneConfig(method="cfsp", sparsity=sparsity, calib_samples=8, calib_seqlen=256)
        prune_checkpoint(resolve_model("llama"), config, target, calibration=resolve_text("wikitext2"), overwrite=True)
    return str(target)


def text_ids(folder: str, count: int) -> list[int]:
    from effideploy.data.text import load_text, resolve_text
    from effideploy.models.build import load_tokenizer

    return load_tokenizer(folder)(load_text(resolve_text("wikitext2", "test"))[:12 * count]).input_ids[:count]


def open_runtime(runtime: str, path: Path, threads: int, n_ctx: int):
    if runtime == "llamacpp":
        from effideploy.runtimes.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx, max_batch=1)
    from effideploy.runtimes import open_runtime as open_any

    options = {"max_model_len": n_ctx} if runtime == "vllm" else {}
    return open_any(runtime, path, threads=threads, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="llama", help="the dense model (default: the embedded SmolLM2)")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES))
    parser.add_argument("--sparsities", default="0.2,0.5", help="CFSP-pruned here (8 x 256 calibration tokens)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="pruned checkpoints to use instead of --sparsities")
    parser.add_argument("--other-exports", type=Path, default=None,
                        help="where --with looks for (and writes) its exports (default: --work/exports)")
    parser.add_argument("--with", dest="others", default="", help="also: onnx,vllm (float32 exports)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-verify", action="store_true", help="skip the exports' parity checks (faster)")
    parser.add_argument("--work", type=Path, default=Path("out/llamacpp-grid"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/llamacpp"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from effideploy.models.resolve import resolve_model

    checkpoints = {"dense": str(resolve_model(args.dense).path)}
    for item in args.checkpoint:
        label, path = item.split("=", 1)
        checkpoints[label] = path
    for sparsity in [] if args.checkpoint else [float(s) for s in args.sparsities.split(",") if s]:
        checkpoints[f"cfsp-{sparsity:g}"] = pruned_checkpoint(args.work, sparsity)
    types = [t for t in args.types.split(",") if t]
    others = [r for r in args.others.split(",") if r]

    # --------------------------------------------------------------------------------------------------- exports
    entries = []  # (runtime, type, label, path)
    export_seconds = {}
    for label, checkpoint in checkpoints.items():
        for kind in types:
            tick = time.perf_counter()
            verify = {"verify": False} if args.no_verify else {}
            path = export_for("llamacpp", checkpoint, args.work / "exports", label, quantize=kind, **verify)
            export_seconds[f"{label}/{kind}"] = time.perf_counter() - tick
            entries.append(("llamacpp", kind, label, path))
        for runtime in others:
            root = args.other_exports or args.work / "exports"
            entries.append((runtime, "float32", label, export_for(runtime, checkpoint, root, label)))
    ideal = {label: matmul_parameters_of(path)[0] for label, path in checkpoints.items()}
    prompt = text_ids(checkpoints["dense"], args.prompt_tokens)
    n_ctx = max(args.prompt_tokens + args.new_tokens, args.seqlen) + 16

    # ----------------------------------------------------------------------------------------------------- speed
    opened, failed = {}, {}
    for runtime, kind, label, path in entries:
        print(f"opening {runtime} {kind} {label}", flush=True)
        try:
            engine = open_runtime(runtime, path, args.threads, n_ctx)
            engine.generate([prompt], 4)  # warm-up
        except Exception as exc:  # noqa: BLE001 - one runtime failing must not lose the others' measurements
            failed[f"{runtime} {kind} {label}"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
            print(f"  failed: {failed[f'{runtime} {kind} {label}']}", flush=True)
            continue
        opened[(runtime, kind, label)] = engine
    samples = {key: {"ttft": [], "decode": []} for key in opened}
    order = list(opened)
    started = time.perf_counter()
    for round_index in range(args.rounds):
        for key in (order if round_index % 2 == 0 else order[::-1]):
            result = opened[key].generate([prompt], args.new_tokens)
            samples[key]["ttft"].append(result.prefill_seconds[0])
            samples[key]["decode"] += result.decode_seconds[0]
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    speed_seconds = time.perf_counter() - started
    load = __import__("os").getloadavg()

    # ----------------------------------------------------------------------------------------------- quality
    import torch

    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.eval.perplexity import window_perplexity
    from effideploy.models.build import load_tokenizer
    from effideploy.runtimes.pytorch import TorchRuntime

    ids = tokenize_text(load_tokenizer(checkpoints["dense"]), load_text(resolve_text("wikitext2", "test")))
    windows = consecutive_windows(ids, args.seqlen, args.windows)
    torch.set_num_threads(args.threads)
    reference = window_perplexity(TorchRuntime(checkpoints["dense"]), windows, description="dense fp32 (transformers)")
    dense_predictions = [t for row in reference.predictions for t in row]
    quality = {}
    for key, engine in opened.items():
        if key[0] != "llamacpp":
            continue
        result = window_perplexity(engine, windows, description=" ".join(key))
        predictions = [t for row in result.predictions for t in row]
        quality[key] = {"perplexity": result.perplexity,
                        "loyalty": sum(a == b for a, b in zip(predictions, dense_predictions)) / len(predictions)}
    engines = {" ".join(k): e.describe() for k, e in opened.items()}
    for engine in opened.values():
        engine.close()

    # ----------------------------------------------------------------------------------------------- report
    rows = []
    for (runtime, kind, label), sample in samples.items():
        step = statistics.median(sample["decode"])
        ttft = statistics.median(sample["ttft"])
        if (runtime, kind, "dense") not in samples:
            continue
        dense_step = statistics.median(samples[(runtime, kind, "dense")]["decode"])
        dense_ttft = statistics.median(samples[(runtime, kind, "dense")]["ttft"])
        path = next(p for r, k, l, p in entries if (r, k, l) == (runtime, kind, label))
        size = sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".gguf", ".onnx", ".data", ".safetensors"))
        rows.append({"runtime": runtime, "type": kind, "model": label, "decode_tok_s": 1 / step,
                     "prefill_tok_s": len(prompt) / ttft, "decode_speedup": dense_step / step,
                     "prefill_speedup": dense_ttft / ttft, "ideal_speedup": ideal["dense"] / ideal[label],
                     "weights_mib": size / 2**20, **quality.get((runtime, kind, label), {})})
    payload = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "checkpoints": checkpoints,
               "reference_perplexity_fp32": reference.perplexity, "prompt_tokens": len(prompt),
               "speed_seconds": speed_seconds, "export_seconds": export_seconds,
               "engines": engines,
               "failed": failed, "rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / "grid.json").write_text(json.dumps(payload, indent=2, default=str))
    payload["load_average_after_speed"] = load
    cores = __import__("os").cpu_count()
    state = (f"under load (load average {load[0]:.1f} after the speed rounds, above the {cores} cores: other jobs "
             "competed)" if load[0] > cores else
             f"quiet (load average {load[0]:.1f} after the speed rounds on {cores} cores, this script's own threads included)")
    lines = [f"measured {payload['measured']} {state}, {args.threads} thread(s) per engine, {args.rounds} interleaved "
             "rounds", "",
             f"dense fp32 (transformers) perplexity: {reference.perplexity:.2f} ({args.windows} x {args.seqlen} WikiText-2 test)",
             "", "| runtime | type | model | decode tok/s | prefill tok/s | decode speedup | ideal | prefill speedup | "
             "weights MiB | PPL | loyalty |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['runtime']} | {row['type']} | {row['model']} | {row['decode_tok_s']:.1f} | "
                     f"{row['prefill_tok_s']:.0f} | {row['decode_speedup']:.2f}x | {row['ideal_speedup']:.2f}x | "
                     f"{row['prefill_speedup']:.2f}x | {row['weights_mib']:.0f} | "
                     f"{row.get('perplexity', float('nan')):.2f} | {row.get('loyalty', float('nan')):.1%} |")
    (args.out / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
