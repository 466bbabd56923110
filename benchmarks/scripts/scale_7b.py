"""Scale evidence: a randomly initialised model with Llama-2-7B's shapes pruned end to end on this CPU machine.

    python benchmarks/scripts/scale_7b.py --work /work/scale7b            # make, prune, export, check, clean up
    python benchmarks/scripts/scale_7b.py --work /work/scale7b --keep     # keep the folders

Steps (each a subprocess of the installed ``effideploy`` CLI, measured with ``/usr/bin/time -v``):

1. ``make``: config.json (32 blocks, hidden 4096, FFN 11008, 32 heads, vocabulary 32000, bfloat16), a byte-level BPE
   tokenizer trained on WikiText-2 (up to 32000 tokens), and the weights written as safetensors shards of eight
   blocks (~3.2 GB) with an index. The shards are written tensor by tensor behind a precomputed header, so this
   script never holds more than one tensor (at most 262 MB) of the 13.5 GB model.
2. ``prune --sparsity 0.5 --calib-samples 4 --calib-seqlen 128`` (CFSP) under ``/usr/bin/time -v``: peak RSS and
   wall time; the provenance's per-step seconds say where the time goes. ``--compensation bias``: with 512
   calibration tokens every block would fall back from lstsq to bias anyway (lstsq needs 4 tokens per kept
   channel, ~22k here), so the default only adds 32 x 970 MB of float64 second moments spooled to disk for
   nothing. The cost of lstsq at this size is measured separately (step 4).
3. ``export --runtime vllm --no-verify --dtype bfloat16`` under ``/usr/bin/time -v`` (hard links, no engine start),
   then a structural check: every block's FFN tensor shapes in the export's safetensors headers against
   ``config.json``'s ``block_configs``, and the attention / embedding shapes against Llama-2-7B's.
4. lstsq probe: the second moments of one 11008-wide block (its accumulation over 512 tokens) and the float64
   least-squares solve at the kept width of a median block, timed once: x 32 is what lstsq compensation would
   add to a 7B prune with enough calibration tokens.

Prints a Markdown report (also written to --report). Measured on a shared 2-core machine: other agents were running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1"

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json)
SHAPES = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2, hidden_act="silu",
)
BLOCKS_PER_SHARD = 8


def block_tensors(index: int) -> list[tuple[str, list[int]]]:
    h, f = SHAPES["hidden_size"], SHAPES["intermediate_size"]
    p = f"model.layers.{index}."
    return [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
            *[(p + f"self_attn.{name}_proj.weight", [h, h]) for name in "qkvo"],
            (p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]), (p + "mlp.down_proj.weight", [h, f])]


def shard_plan() -> list[list[tuple[str, list[int]]]]:
    v, h, n = SHAPES["vocab_size"], SHAPES["hidden_size"], SHAPES["num_hidden_layers"]
    shards = []
    for start in range(0, n, BLOCKS_PER_SHARD):
        shards.append([t for i in range(start, min(start + BLOCKS_PER_SHARD, n)) for t in block_tensors(i)])
    shards[0] = [("model.embed_tokens.weight", [v, h]), *shards[0]]
    shards[-1] = [*shards[-1], ("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return shards


def write_shard(path: Path, tensors: list[tuple[str, list[int]]], generator: torch.Generator) -> int:
    """A bf16 safetensors file written tensor by tensor: the header (offsets from the shapes) first, then each tensor
    generated, written and freed. Norm weights are ones, matrices N(0, 0.02) as transformers initialises Llama."""
    header, offset = {}, 0
    for name, shape in tensors:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data area to 8 bytes
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, SHAPES["initializer_range"],
                                                                          generator=generator).to(torch.bfloat16)
            handle.write(tensor.view(torch.uint8).numpy().tobytes())
            del tensor
    return offset


def make_model(folder: Path) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SHAPES["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([(WIKI / "wiki.valid.raw").read_text(), (WIKI / "wiki.test.raw").read_text()],
                                  trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    shards = shard_plan()
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(folder / name, tensors, generator)
        weight_map.update({tensor: name for tensor, _ in tensors})
        print(f"  wrote {name} ({total / 1e9:.1f} GB so far)", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "parameters": total // 2, "tokenizer_vocab": tokenizer.get_vocab_size(),
            "seconds": time.perf_counter() - started}


def timed(command: list[str], log: Path) -> dict:
    """Run ``command`` under /usr/bin/time -v; peak RSS (kB -> GB) and wall seconds from its report."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT,
                                env=dict(os.environ, EFFIDEPLOY_PROGRESS="0"))
    text = log.read_text()
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{text[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"peak_rss_gb": rss * 1024 / 1e9, "wall_s": time.perf_counter() - started, "log": text}


def structural_check(export: Path) -> dict:
    """Every tensor's shape in the export's headers against config.json (block_configs for the FFN)."""
    from effideploy.models.weights import SafetensorsWeights

    config = json.loads((export / "config.json").read_text())
    entries = SafetensorsWeights(export)._entries
    h, v = config["hidden_size"], config["vocab_size"]
    kv = h // config["block_configs"][0]["attention"]["n_heads_in_group"]  # head_dim x KV heads
    expected = {"model.embed_tokens.weight": [v, h], "lm_head.weight": [v, h], "model.norm.weight": [h]}
    widths = []
    for index, block in enumerate(config["block_configs"]):
        width = block["ffn"]["intermediate_size"]
        widths.append(width)
        p = f"model.layers.{index}."
        expected.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                         p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                         p + "mlp.gate_proj.weight": [width, h], p + "mlp.up_proj.weight": [width, h],
                         p + "mlp.down_proj.weight": [h, width], p + "input_layernorm.weight": [h],
                         p + "post_attention_layernorm.weight": [h]})
        if config.get("mlp_bias"):  # bias compensation: every FFN projection gets one
            expected.update({p + "mlp.gate_proj.bias": [width], p + "mlp.up_proj.bias": [width],
                             p + "mlp.down_proj.bias": [h]})
    mismatched = [name for name, shape in expected.items() if name not in entries or list(entries[name][3]) != shape]
    dtypes = sorted({str(entry[2]).replace("torch.", "") for entry in entries.values()})
    if mismatched:
        sys.exit(f"export shapes disagree with config.json: {mismatched[:5]}")
    return {"tensors_checked": len(expected), "tensors": len(entries), "blocks": len(widths), "widths": widths,
            "architectures": config.get("architectures"), "dtypes": dtypes}


def lstsq_probe(width: int, kept: int, tokens: int) -> dict:
    """One block's lstsq cost at 7B size: second moments of ``tokens`` activations and the float64 solve."""
    from effideploy.pruning.compensation import least_squares

    g = torch.Generator().manual_seed(0)
    activation = torch.randn(tokens, width, generator=g)
    tick = time.perf_counter()
    gram = (activation.T @ activation).double()
    accumulate = time.perf_counter() - tick
    gram.diagonal().add_(tokens)  # full rank, as with >= width tokens
    down = torch.randn(SHAPES["hidden_size"], width, generator=g) * 0.02
    tick = time.perf_counter()
    least_squares(down, gram / tokens, activation.mean(0).double(), torch.arange(kept), damp=1e-3)
    return {"width": width, "kept": kept, "tokens": tokens, "gram_s": accumulate,
            "solve_s": time.perf_counter() - tick, "gram_mb": width * width * 8 / 1e6}


def phase_peaks(model: Path, folder: Path) -> dict:
    """The prune's phases run in this process, peak RSS (ru_maxrss, monotone) and current RSS after each: which
    phase sets the process's peak, and whether freed memory went back to the system."""
    import resource

    import psutil

    from effideploy.checkpoint.config import pruned_config
    from effideploy.data.text import resolve_text
    from effideploy.models.build import build_config, load_tokenizer
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.pruning import PruneConfig
    from effideploy.pruning.engine import calibrate, calibration_windows, plan_from_stats, write_blocks

    def sample(tick) -> dict:
        return {"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                "rss_gb": psutil.Process().memory_info().rss / 1e9, "seconds": time.perf_counter() - tick}

    tick = time.perf_counter()
    config = PruneConfig(sparsity=0.5, calib_samples=4, calib_seqlen=128, compensation="bias", device="cpu")
    source = resolve_model(str(model))
    layerwise = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
    phases = {"imported": sample(tick)}
    tick = time.perf_counter()
    windows = calibration_windows(load_tokenizer(source), resolve_text("wikitext2"), config)
    phases["tokenize"] = sample(tick)
    tick = time.perf_counter()
    with torch.no_grad():
        stats = calibrate(layerwise, config, windows)
    phases["calibration"] = sample(tick)
    tick = time.perf_counter()
    with torch.no_grad():
        plan = plan_from_stats(layerwise, config, stats)
    phases["score_and_allocate"] = sample(tick)
    tick = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    write_blocks(layerwise, plan, pruned_config(layerwise.config, plan.widths, mlp_bias=True).mlp_bias, folder)
    phases["write"] = sample(tick)
    shutil.rmtree(folder)
    return phases


def report(made: dict, prune: dict, export: dict, check: dict, probe: dict, provenance: dict) -> str:
    gb = made["bytes"] / 1e9
    seconds = provenance["seconds"]
    widths = check["widths"]
    log = prune["log"].splitlines()
    plan = next((log[i:i + 2] for i, line in enumerate(log) if line.startswith("memory plan")), ["(not printed)"])
    lines = [
        "# Llama-2-7B-shaped model pruned on the CPU (random weights)",
        "",
        f"Model: {made['parameters'] / 1e9:.2f} B parameters, {SHAPES['num_hidden_layers']} blocks, hidden "
        f"{SHAPES['hidden_size']}, FFN {SHAPES['intermediate_size']}, vocabulary {SHAPES['vocab_size']}, "
        f"bfloat16 safetensors, {gb:.2f} GB on disk ({len(shard_plan())} shards); tokenizer: byte-level BPE, "
        f"{made['tokenizer_vocab']} tokens. Machine: 2 shared cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM, no GPU; measured under load "
        "(other agents running). Script: `benchmarks/scripts/scale_7b.py`.",
        "",
        "| step | wall | peak RSS | peak RSS / model size |",
        "|---|---|---|---|",
        f"| make the model (streamed writer) | {made['seconds']:.0f} s | - | - |",
        f"| `prune --sparsity 0.5 --calib-samples 4 --calib-seqlen 128 --compensation bias` | {prune['wall_s']:.0f} s | "
        f"{prune['peak_rss_gb']:.2f} GB | {prune['peak_rss_gb'] / gb:.2f} |",
        f"| `export --runtime vllm --no-verify --dtype bfloat16` | {export['wall_s']:.0f} s | "
        f"{export['peak_rss_gb']:.2f} GB | {export['peak_rss_gb'] / gb:.2f} |",
        "",
        "Where the prune's time went (provenance `seconds`): "
        + ", ".join(f"{key} {value:.0f} s" for key, value in seconds.items()) + ".",
        "",
        f"Result: FFN sparsity {provenance['sparsity']['ffn_actual']:.3f}, parameters removed "
        f"{provenance['sparsity']['parameters_removed']:.3f}; widths {min(widths)}..{max(widths)} "
        f"(median {sorted(widths)[len(widths) // 2]}).",
        "",
        f"vLLM export, structural check (no engine start): {check['tensors_checked']} of {check['tensors']} tensors' "
        f"shapes match config.json ({check['blocks']} block_configs, architectures {check['architectures']}, "
        f"dtypes {check['dtypes']}).",
        "",
        f"lstsq compensation at this size, one block measured: second moments of {probe['tokens']} tokens x "
        f"{probe['width']} channels {probe['gram_s']:.1f} s ({probe['gram_mb']:.0f} MB float64, spooled to disk per "
        f"block), solve at kept width {probe['kept']} {probe['solve_s']:.1f} s; x 32 blocks: "
        f"~{32 * probe['solve_s'] / 60:.0f} min of solves and {32 * probe['gram_mb'] / 1e3:.0f} GB of spooled "
        f"second moments. lstsq also needs >= 4 calibration tokens per kept channel (~{4 * (probe['kept'] + 1)} "
        "here), i.e. at least 22 x 1024-token windows; with 4 x 128 tokens every block falls back to bias.",
        "",
        "Memory plan printed by `prune` before the work:",
        "",
        "```",
        *plan,
        "```",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/work/scale7b"))
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" / "scale_7b.md")
    parser.add_argument("--keep", action="store_true", help="keep the model, pruned and export folders")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--phases", action="store_true", help="only: peak RSS after each prune phase, in process")
    parser.add_argument("--smoke", action="store_true", help="check the script on a 2-block model of hidden 256")
    parser.add_argument("--blocks", type=int, default=None, help="fewer blocks of the same shapes (phase peaks do "
                        "not depend on depth)")
    args = parser.parse_args()
    if args.blocks:
        SHAPES.update(num_hidden_layers=args.blocks)
    if args.smoke:  # the same steps on small shapes (seconds), to check the script itself
        SHAPES.update(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4)
    work = args.work
    model, pruned, export = work / "llama2-7b-shaped", work / "pruned", work / "export-vllm"
    work.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    cli = [sys.executable, "-m", "effideploy"]
    if (model / "model.safetensors.index.json").is_file() and (work / "made.json").is_file():
        made = json.loads((work / "made.json").read_text())
    else:
        made = make_model(model)
        (work / "made.json").write_text(json.dumps(made))
    print(f"model: {made['bytes'] / 1e9:.2f} GB in {made['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.phases:
        phases = phase_peaks(model, work / "phases")
        print(json.dumps(phases, indent=1))
        args.report.with_name(args.report.stem + "_phases.json").write_text(json.dumps(phases, indent=1))
        if not args.keep:
            shutil.rmtree(work)
        return
    prune = timed([*cli, "prune", "--model", str(model), "--sparsity", "0.5", "--calib-samples", "4",
                   "--calib-seqlen", "128", "--compensation", "bias", "--output", str(pruned), "--overwrite",
                   *threads], work / "prune.log")
    print(f"prune: {prune['wall_s']:.0f} s, peak RSS {prune['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    provenance = json.loads((pruned / "effideploy.json").read_text())
    exported = timed([*cli, "export", str(pruned), "--runtime", "vllm", "--no-verify", "--dtype", "bfloat16",
                      "--output", str(export), "--overwrite"], work / "export.log")
    check = structural_check(export)
    widths = sorted(check["widths"])
    probe = lstsq_probe(SHAPES["intermediate_size"], widths[len(widths) // 2], 512)
    print(f"lstsq probe: {probe}", file=sys.stderr, flush=True)
    text = report(made, prune, exported, check, probe, provenance)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    (args.report.with_suffix(".json")).write_text(json.dumps(
        {"model": made, "prune": {k: v for k, v in prune.items() if k != "log"},
         "export": {k: v for k, v in exported.items() if k != "log"}, "check": check, "lstsq_probe": probe,
         "provenance_seconds": provenance["seconds"], "sparsity": provenance["sparsity"]}, indent=1))
    print(text)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
