"""Token compression on long prompts: loyalty to the full cache, KV memory saved and decode speedup per method and
budget, on the PyTorch runtime and on ONNX Runtime (its runner evicts through ``make_kv_hook`` between prefill and
decode; PyramidKV and FastV do not run there). Prints a markdown table.

    nice -n 5 python benchmarks/scripts/token_compression.py --model llama --prompts 3 --new-tokens 32 --threads 1

ONNX Runtime needs an export with attention outputs (for H2O/SnapKV); ``--onnx-dir`` is made with
``export_onnx(..., attention_outputs=True)`` when it does not exist yet (about 0.5 GB for SmolLM2).

Prompts are consecutive windows of WikiText-2 test (``--prompt-tokens`` each, spread over the file). The full cache
generates the reference continuation greedily (TorchRuntime's prefill/decode steps). Definitions:

- loyalty: top-1 agreement with that continuation, teacher-forced: the compressed model reads the prompt (compressed
  as the method does), then the full-cache tokens one decode step at a time, and at each of the ``--new-tokens``
  positions its argmax is compared with the full-cache token, so one early divergence does not decide the rest.
  Position 1 comes from the prefill, which KV-eviction methods leave untouched (they evict after it), so it always
  agrees for them; FastV prunes inside the prefill.
- KV saved: 1 - (bytes of the prompt's KV cache after compression) / (bytes of the full prompt cache).
- decode: median seconds per decode step over all prompts. Each prompt's compressed steps are paired with the same
  steps on its full prompt cache, run right after, so the speedup compares like with like on a shared machine.
  ONNX Runtime rows compare with ONNX Runtime's own full cache (reference tokens and timings).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from effideploy.compression import METHODS as REGISTRY
from effideploy.compression import make_kv_hook, torch_hooks, validate_for_runtime
from effideploy.errors import EffideployError
from effideploy.compression.memory import record_saving
from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
from effideploy.models.build import load_model, load_tokenizer
from effideploy.models.resolve import resolve_model
from effideploy.runtimes.pytorch import decode_one_token, prefill

METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "random", "fastv"]


def spec_text(method: str, budget: float, fastv_layer: int) -> str:
    return f"fastv:k={fastv_layer},r={budget:g}" if method == "fastv" else f"{method}:{budget:g}"


def timed(function, *args):
    start = time.perf_counter()
    out = function(*args)
    return out, time.perf_counter() - start


def teacher_forced(model, cache, first_logits, reference: list[int]):
    """Argmax at each position while feeding the reference tokens, and the time of each decode step."""
    predictions, steps = [int(first_logits.argmax(-1))], []
    for token in reference[:-1]:
        logits, seconds = timed(decode_one_token, model, torch.tensor([[token]]), cache)
        predictions.append(int(logits.argmax(-1)))
        steps.append(seconds)
    return predictions, steps


def onnx_pass(runtime, prompt: list[int], new_tokens: int, reference: list[int] | None = None, kv_hook=None):
    """Prefill (+ kv_hook) then decode on ONNX Runtime, feeding ``reference`` (teacher forcing) or its own argmax.
    Returns (predictions, decode step seconds, KV length after the hook, prefill + hook seconds)."""
    length = len(prompt)
    cache = runtime.new_cache(1, length + new_tokens)
    start = time.perf_counter()
    logits, attentions = runtime.prefill(np.array([prompt], dtype=np.int64), cache)
    if kv_hook is not None:
        cache.replace(kv_hook(cache.past(), attentions, length))
    kept, prefill_seconds = cache.length, time.perf_counter() - start
    predictions, steps = [int(logits[0, -1].argmax())], []
    for step in range(new_tokens - 1):
        token = reference[step] if reference is not None else predictions[-1]
        logits, seconds = timed(runtime.decode_one_token, np.array([token], dtype=np.int64), length + step, cache)
        predictions.append(int(logits[0].argmax()))
        steps.append(seconds)
    return predictions, steps, kept, prefill_seconds


def onnx_rows(args, source, prompts) -> list[tuple]:
    from effideploy.runtimes.onnx import OnnxRuntime

    folder = Path(args.onnx_dir).expanduser()
    if not (folder / "model.onnx").exists():
        from effideploy.exporters.onnx.export import export_onnx

        print(f"exporting {args.model} to {folder} with attention outputs", flush=True)
        export_onnx(source, folder, attention_outputs=True)
    runtime = OnnxRuntime(folder, threads=args.threads)
    references = [onnx_pass(runtime, prompt, args.new_tokens)[0] for prompt in prompts]
    rows = []
    for method in args.methods:
        for budget in args.budgets:
            spec = spec_text(method, budget, args.fastv_layer)
            try:
                hook = make_kv_hook(validate_for_runtime(spec, "onnx", attention_outputs=bool(runtime.attention_outputs)))
            except EffideployError as exc:
                print(f"  onnx {spec}: skipped ({exc})", flush=True)
                break
            agree, steps, full_steps, saved, prefills = 0, [], [], [], []
            for prompt, reference in zip(prompts, references):
                predictions, own, kept, seconds = onnx_pass(runtime, prompt, args.new_tokens, reference, hook)
                paired = onnx_pass(runtime, prompt, args.new_tokens, reference)[1]
                agree += sum(p == r for p, r in zip(predictions, reference))
                steps += own
                full_steps += paired
                saved.append(1 - kept / len(prompt))
                prefills.append(seconds)
            rows.append(("onnx", spec, agree / (len(prompts) * args.new_tokens), statistics.mean(saved),
                         statistics.median(steps), statistics.median(full_steps), statistics.mean(prefills)))
            print(f"  onnx {spec}: loyalty {rows[-1][2]:.3f}, decode {rows[-1][4] * 1e3:.1f} ms "
                  f"(full {rows[-1][5] * 1e3:.1f})", flush=True)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's K (prune at layer K with layer K-1's attention)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--onnx-dir", default="~/.cache/effideploy/bench/token-compression-onnx",
                        help="ONNX export with attention outputs (made here if missing)")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in REGISTRY]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {REGISTRY.names()}")

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    ids = tokenize_text(load_tokenizer(source), load_text(resolve_text("wikitext2", "test")))
    windows = consecutive_windows(ids, args.prompt_tokens)
    prompts = [w.tolist() for w in windows[:: max(1, len(windows) // args.prompts)][: args.prompts]]

    rows = torch_rows(args, load_model(source), prompts) if "torch" in args.runtimes else []
    if "onnx" in args.runtimes:
        if importlib.util.find_spec("effideploy.runtimes.onnx") is None:
            print("ONNX Runtime: runtimes/onnx.py is not there; not measured.")
        else:
            rows += onnx_rows(args, source, prompts)

    print("\n| runtime | method:budget | loyalty (teacher-forced top-1) | KV saved | decode ms/token | full-cache ms/token | "
          "decode speedup | prefill s |")
    print("|---|---|---|---|---|---|---|---|")
    for runtime, spec, loyalty, saved, decode, full_decode, prefill_seconds in rows:
        print(f"| {runtime} | {spec} | {loyalty:.3f} | {saved:.1%} | {decode * 1e3:.1f} | {full_decode * 1e3:.1f} | "
              f"{full_decode / decode:.2f}x | {prefill_seconds:.2f} |")
    print(f"({time.perf_counter() - started:.0f} s)")


def torch_rows(args, model, prompts) -> list[tuple]:
    references, full_caches, full_prefill = [], [], []
    for prompt in prompts:
        cache = DynamicCache(config=model.config)
        logits, seconds = timed(prefill, model, torch.tensor([prompt]), cache)
        full_caches.append(copy.deepcopy(cache))
        tokens = [int(logits.argmax(-1))]
        for _ in range(args.new_tokens - 1):
            tokens.append(int(decode_one_token(model, torch.tensor([[tokens[-1]]]), cache).argmax(-1)))
        references.append(tokens)
        full_prefill.append(seconds)
    print(f"model {args.model}: {len(prompts)} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} thread(s); full prefill {statistics.mean(full_prefill):.2f} s", flush=True)

    rows = []
    for method in args.methods:
        for budget in args.budgets:
            spec = spec_text(method, budget, args.fastv_layer)
            hooks = torch_hooks(spec)
            agree, steps, full_steps, prefills = 0, [], [], []
            for prompt, reference, full_cache in zip(prompts, references, full_caches):
                cache = DynamicCache(config=model.config)
                with hooks(model, len(prompt)):
                    logits, seconds = timed(prefill, model, torch.tensor([prompt]), cache)
                    predictions, own_steps = teacher_forced(model, cache, logits, reference)
                _, paired = teacher_forced(model, copy.deepcopy(full_cache), logits, reference)
                agree += sum(p == r for p, r in zip(predictions, reference))
                steps += own_steps
                full_steps += paired
                prefills.append(seconds)
            decode, full_decode = statistics.median(steps), statistics.median(full_steps)
            rows.append(("torch", spec, agree / (len(prompts) * args.new_tokens),
                         statistics.mean(map(record_saving, hooks.records)), decode, full_decode, statistics.mean(prefills)))
            print(f"  {spec}: loyalty {rows[-1][2]:.3f}, decode {decode * 1e3:.1f} ms (full {full_decode * 1e3:.1f})", flush=True)
    return rows


if __name__ == "__main__":
    main()
