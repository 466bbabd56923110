"""Measure a dense baseline and its candidates on one runtime in one run, and compare them.

The roles live in their own modules: ``artifacts`` (what each model opens, export-or-reuse), ``measure`` (latency,
throughput, memory), ``quality`` (perplexity, multiple choice, chat fidelity), ``compare`` (the typed per-candidate record and the
Pareto fronts), ``report`` (markdown, JSON, plots). This module orders them and times each phase.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from effideploy import progress
from effideploy.bench.artifacts import candidate_label, describe_model, prepare_candidate, prepare_model
from effideploy.bench.compare import compare, pareto
from effideploy.bench.config import DENSE_LABEL, BenchConfig, expanded_candidates
from effideploy.bench.environment import environment, load_average
from effideploy.bench.measure import RuntimePool, measure_latency, measure_memory, measure_throughput
from effideploy.bench.quality import measure_chat, measure_multiple_choice, measure_perplexity
from effideploy.bench.results import BenchReport, ModelResult


def runtime_options(config: BenchConfig, models: list[ModelResult], longest: int) -> dict:
    """What every model is opened with: threads, and the context the run needs (for adapters that size their cache
    up front; at least 2048 tokens where every model has that many positions)."""
    from effideploy.runtimes import RUNTIMES

    options = {"threads": config.threads} if config.threads else {}
    if config.device is not None:
        options["device"] = config.device
    limits = [m.parameters.max_positions for m in models if m.parameters and m.parameters.max_positions]
    options.update(RUNTIMES.get(config.runtime).context_options(min([max(2048, longest + 1), *limits])))
    return options


def run_bench(config: BenchConfig) -> BenchReport:
    """Measure everything and return the report (see ``report.REPORT_SCHEMA_VERSION`` for its JSON form)."""
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, sample_windows, tokenize_text
    from effideploy.eval.multiple_choice import find_tasks, load_task
    from effideploy.exporters.manifest import read_export_manifest
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes import RUNTIMES

    runtime_class = RUNTIMES.get(config.runtime)
    started = time.perf_counter()
    load_before = load_average()
    notes: list[str] = []
    dense_path = Path(config.dense).expanduser()
    manifest = read_export_manifest(dense_path) if dense_path.is_dir() else None  # an export: its source has the tokenizer
    tokenizer = load_tokenizer(resolve_model(manifest["source"]["path"] if manifest else config.dense))
    # Fail on bad input before anything slow.
    tasks = [] if config.mc_limit == 0 else [load_task(path) for path in find_tasks(config.tasks, config.data_dir)]
    if config.mc_limit != 0 and not tasks:
        notes.append("no BIG-bench tasks found (give --task or --data-dir): multiple choice skipped")
    chat_prompts, chat_ids = [], []
    if config.chat_prompts:
        from effideploy.eval.chat import chat_template_missing, load_chat_prompts, render_chat

        reason = chat_template_missing(tokenizer)
        if reason is None:
            chat_prompts = load_chat_prompts(config.chat_prompts)
            chat_ids = render_chat(tokenizer, chat_prompts)
        else:
            notes.append(f"chat fidelity not measured: {reason}; --chat-prompts needs a model served through a chat "
                         "template")
    candidates = expanded_candidates(config)
    for spec in candidates:
        if spec.compression:  # exports get what the method needs (export_options), so only the method is checked
            runtime_class.check_compression(spec.compression, **runtime_class.export_options(spec.compression))

    phases: dict[str, float] = {}  # wall seconds per phase, for the report's account of the run's cost
    tick = time.perf_counter()
    taken = {DENSE_LABEL}
    models = [prepare_model(config, runtime_class, DENSE_LABEL, "dense", config.dense)]
    for spec in candidates:
        models.append(prepare_candidate(config, runtime_class, candidate_label(spec, taken), spec))
    for model in models:
        describe_model(model)
    phases["export" if runtime_class.capabilities.exporter else "prepare"] = time.perf_counter() - tick

    with progress.status("Tokenizing WikiText-2 test"):
        test_ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test", config.data_dir)))
    windows = consecutive_windows(test_ids, config.ppl_seqlen, config.ppl_windows) if config.ppl_windows else None
    n_prompt_windows = max(config.prompts, max(config.batch_sizes, default=1))
    prompt_windows = sample_windows(test_ids, n_prompt_windows, config.prompt_tokens, config.seed).tolist()
    prompts = prompt_windows[: config.prompts]
    longest_chat = max((len(ids) + config.chat_new_tokens for ids in chat_ids), default=0)
    options = runtime_options(config, models, max(config.ppl_seqlen, config.prompt_tokens + config.new_tokens,
                                                  longest_chat))

    if config.memory:
        tick = time.perf_counter()
        measure_memory(models, prompts[0], config, options)
        phases["memory"] = time.perf_counter() - tick
    else:
        notes.append("memory not measured (--no-memory)")

    pool = RuntimePool(config.runtime, options)
    try:
        tick = time.perf_counter()
        for model in models:
            pool.open(model)
        for model in models:
            model.runtime = pool[model.label].describe()
        phases["open"] = time.perf_counter() - tick
        tick = time.perf_counter()
        measure_latency(models, pool, prompts, config)
        phases["latency"] = time.perf_counter() - tick
        tick = time.perf_counter()
        notes += measure_throughput(models, pool, prompt_windows, config)
        phases["throughput"] = time.perf_counter() - tick
        phases["perplexity"] = phases["multiple choice"] = 0.0
        for model in models:
            tick = time.perf_counter()
            if windows is not None:  # dense first: the candidates' fidelity reads its top-k
                measure_perplexity(model, pool[model.label], windows, dense=None if model is models[0] else models[0])
            phases["perplexity"] += time.perf_counter() - tick
            tick = time.perf_counter()
            if tasks:
                measure_multiple_choice(model, pool[model.label], tasks, tokenizer, config)
            phases["multiple choice"] += time.perf_counter() - tick
        if chat_ids:
            from effideploy.eval.chat import stop_token_ids

            tick = time.perf_counter()
            measure_chat(models, pool, chat_ids, chat_prompts, tokenizer, config,
                         stop_token_ids(tokenizer, models[0].config_dict))
            phases["chat"] = time.perf_counter() - tick
    finally:
        pool.close()

    dense, candidates = models[0], models[1:]
    comparisons = [compare(dense, model, config) for model in candidates]
    cores, load_after = os.cpu_count() or 1, load_average()
    if max((load_before or [0])[0], (load_after or [0])[0]) > cores:
        notes.append(f"the machine was oversubscribed (load average above {cores} cores): absolute timings are inflated; "
                     "multi-threaded torch slows down sharply under contention, --threads 1 is steadier there")
    return BenchReport(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=config.to_dict(),
        runtime=dense.runtime,
        runtime_options=options,
        environment={**environment(), "load_average_start": load_before, "load_average_end": load_after},
        data={"wikitext2_test": resolve_text("wikitext2", "test", config.data_dir).path,
              "ppl_windows": 0 if windows is None else int(windows.shape[0]),
              "tasks": [{"name": t.name, "path": t.path, "examples": len(t.examples)} for t in tasks],
              **({"chat_prompts": {"source": "effideploy/data/chat_prompts.json", "prompts": len(chat_ids),
                                   "prompt_tokens": [len(ids) for ids in chat_ids]}} if chat_ids else {})},
        models=models,
        comparisons=comparisons,
        pareto=pareto(comparisons),
        notes=notes,
        phase_seconds=phases,
        seconds=time.perf_counter() - started,
    )
