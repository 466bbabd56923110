"""Decode speed of FFN-pruned models against their dense original in stock vLLM, measured against the ideal.

    python benchmarks/scripts/vllm_speedup.py                          # SmolLM2 dense + a 50% CFSP prune, exported here
    python benchmarks/scripts/vllm_speedup.py --pruned out/pruned --pruned out/pruned-a128   # checkpoints (exported under --work)
    python benchmarks/scripts/vllm_speedup.py --dense out/vllm-dense --pruned out/vllm-pruned  # existing vLLM exports

Each model runs in its own vLLM engine in its own worker process (the VllmRuntime adapter: in-process engine,
eager, fp32, prefix caching off). All engines are started first and then measured in interleaved rounds (dense,
pruned..., then the reverse order, ...), one engine busy at a time, so drift and other load on the machine hit all
alike: after a warm-up, bs1 greedy generation of --new-tokens after a prompt of --prompt-tokens WikiText-2 test
tokens. Decode ms/token is the median over every decode step of every round (each step stamped as vLLM's engine
returns its token); TTFT the median over rounds.

Ideal speedup = matmul parameters per decoded token, dense / pruned: each weight of the attention projections, the
FFNs and the lm_head is one multiply-add per token and, at bs1, one read from memory (the embedding is a lookup).
The target is a measured speedup of at least 90% of that ideal.

On a machine shared with other jobs, pass --threads 1: with more OpenMP threads than free cores the threads spin at
every barrier and decode times collapse unevenly (0.7-1.2 s/token instead of ~50 ms, measured on 2 cores at load 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from effideploy.bench.artifacts import export_for, matmul_parameters_of

TARGET_FRACTION = 0.9
RESULT = "@@RESULT "


def default_pruned(work: Path) -> str:
    """SmolLM2 pruned 50% with CFSP on a small calibration set (8 x 256 tokens), reused when present."""
    target = work / "smollm2-cfsp50"
    if not (target / "config.json").is_file():
        from effideploy.data.text import resolve_text
        from effideploy.models.resolve import resolve_model
        from effideploy.pruning import PruneConfig, prune_checkpoint

        print(f"pruning SmolLM2 at 50% -> {target}", flush=True)
        config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=8, calib_seqlen=256)
        prune_checkpoint(resolve_model("llama"), config, target, calibration=resolve_text("wikitext2"), overwrite=True)
    return str(target)


def prompt_ids(folder: Path, length: int) -> list[int]:
    from transformers import AutoTokenizer

    from effideploy.data.text import load_text, resolve_text

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    text = load_text(resolve_text("wikitext2", "test"))[:20 * length]
    return tokenizer(text).input_ids[:length]


# ------------------------------------------------------------------------------------------------------- worker

def worker(path: str, prompt: list[int], new_tokens: int, threads: int | None) -> None:
    """Open one engine, warm it up, then answer each ``run`` line on stdin with one measured generation."""
    from effideploy.runtimes.vllm import VllmRuntime

    with VllmRuntime(path, max_model_len=len(prompt) + new_tokens + 16, threads=threads) as runtime:
        runtime.generate([prompt], new_tokens)  # warm-up: oneDNN primitives, allocator
        print(RESULT + json.dumps({"ready": True, "describe": runtime.describe()}), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            result = runtime.generate([prompt], new_tokens)
            print(RESULT + json.dumps({"ttft": result.prefill_seconds[0], "decode": result.decode_seconds[0]}), flush=True)


class Worker:
    def __init__(self, label: str, path: Path, prompt_file: Path, new_tokens: int, threads: int | None) -> None:
        command = [sys.executable, __file__, "--worker", str(path), "--prompt-file", str(prompt_file),
                   "--new-tokens", str(new_tokens)] + (["--threads", str(threads)] if threads else [])
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "EFFIDEPLOY_PROGRESS": "0"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.label, self.path = label, path
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.rounds: list[dict] = []

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise RuntimeError(f"the vLLM worker for {self.label} ({self.path}) exited with {self.process.wait()}")

    def run(self) -> None:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        self.rounds.append(self.read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="llama", help="Dense model or its vLLM export (default: SmolLM2).")
    parser.add_argument("--pruned", action="append", help="Pruned checkpoint or vLLM export (repeatable).")
    parser.add_argument("--work", type=Path, default=Path("out/vllm-speedup"), help="Where exports are written.")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each engine (default: all).")
    parser.add_argument("--verify", action="store_true", help="Run the parity check when exporting.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results as JSON.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.prompt_file.read_text()), args.new_tokens, args.threads)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    models = {"dense": export_for("vllm", args.dense, args.work, "dense", verify=args.verify)}
    for spec in args.pruned or [default_pruned(args.work)]:
        label = Path(spec).expanduser().resolve().name
        models[label] = export_for("vllm", spec, args.work, label, verify=args.verify)
    prompt_file = args.work / "prompt.json"
    prompt_file.write_text(json.dumps(prompt_ids(models["dense"], args.prompt_tokens)))

    workers = []
    try:
        for label, path in models.items():  # one at a time: engine start-ups compete for the same cores
            print(f"starting vLLM on {label}: {path}", flush=True)
            workers.append(Worker(label, path, prompt_file, args.new_tokens, args.threads))
            workers[-1].describe = workers[-1].read()["describe"]
        for round_index in range(args.rounds):
            for item in workers if round_index % 2 == 0 else workers[::-1]:
                item.run()
    finally:
        for item in workers:
            item.close()

    rows = []
    dense_params = None
    for item in workers:
        params, widths = matmul_parameters_of(item.path)
        dense_params = dense_params or params
        decode = statistics.median(step for r in item.rounds for step in r["decode"]) * 1e3
        ttft = statistics.median(r["ttft"] for r in item.rounds) * 1e3
        rows.append({"label": item.label, "path": str(item.path), "ffn_widths": widths, "matmul_parameters": params,
                     "ideal_speedup": dense_params / params, "decode_ms_per_token": decode, "ttft_ms": ttft,
                     "round_decode_ms": [statistics.mean(r["decode"]) * 1e3 for r in item.rounds]})
    for row in rows:
        row["decode_speedup"] = rows[0]["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["ttft_speedup"] = rows[0]["ttft_ms"] / row["ttft_ms"]
        row["fraction_of_ideal"] = row["decode_speedup"] / row["ideal_speedup"]

    print(f"\n{workers[0].describe['engine']}, fp32, threads {workers[0].describe['threads']}; prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, bs1, {args.rounds} interleaved rounds\n")
    print("| model | FFN widths | matmul params (M) | decode ms/token | TTFT ms | decode speedup | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        widths = row["ffn_widths"]
        print(f"| {row['label']} | {min(widths)}..{max(widths)} | {row['matmul_parameters'] / 1e6:.1f} | "
              f"{row['decode_ms_per_token']:.2f} | {row['ttft_ms']:.1f} | {row['decode_speedup']:.3f}x | "
              f"{row['ideal_speedup']:.3f}x | {row['fraction_of_ideal']:.0%} |")
    for row in rows[1:]:
        verdict = "meets" if row["fraction_of_ideal"] >= TARGET_FRACTION else "misses"
        print(f"{row['label']}: {verdict} the target of {TARGET_FRACTION:.0%} of the ideal speedup")
    if args.json:
        args.json.write_text(json.dumps({"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "rounds": args.rounds, "engine": workers[0].describe, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
