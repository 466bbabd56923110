"""``effideploy bench``: dense baseline vs candidates on one runtime, a report folder, and an optional policy gate
(exit 0 pass, 1 fail, 2 error)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from effideploy.bench.config import EXPORT_ROOT, BenchConfig
from effideploy.cli.app import DEFAULT_PRUNED, app, check_option_text, default_of, echo, set_threads
from effideploy.errors import EffideployError

DEFAULT_BENCH_OUTPUT = "out/bench"


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise EffideployError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    return sizes


def default_candidate(runtime: str) -> str:
    """The chain ``prune`` -> ``export`` -> ``bench``: out/export-<runtime> when the runtime opens exports and it
    exists, else out/pruned."""
    from effideploy.runtimes import RUNTIMES

    export = Path(f"out/export-{runtime}")
    if RUNTIMES.get(runtime).capabilities.exporter and export.is_dir():
        return str(export)
    if not Path(DEFAULT_PRUNED).is_dir():
        raise EffideployError(f"no candidate given and {DEFAULT_PRUNED} does not exist; run `effideploy prune` first "
                              "or pass --candidate PATH / --token-compression SPEC")
    return DEFAULT_PRUNED


def finish(report, output: Path, policy_path: Optional[Path], policy, overwrite: bool) -> None:
    """Apply the policy, write the report folder, print the verdict; exit 1 when the policy fails."""
    from effideploy.bench.policy import sign_off
    from effideploy.bench.report import write_report

    if policy is not None:
        report.policy = sign_off(policy, report.comparisons)
    target = write_report(report, output, overwrite=overwrite)
    echo(f"[bold]bench[/] {report.config['dense']} on {report.runtime.get('runtime')}: {len(report.comparisons)} "
         f"candidate(s), {report.seconds:.0f} s -> {target}/report.md")
    for record in report.comparisons:
        ppl = record.perplexity_increase
        echo(f"  {record.candidate}: decode {record.decode_speedup:.2f}x, TTFT {record.ttft_speedup:.2f}x"
             + (f", perplexity {ppl * 100:+.1f}%" if ppl is not None else "")
             + f", OP {record.op:.3f}, OL {record.loyalty:.3f}"
             + (f", chat ROUGE-L {record.chat_rouge_l:.3f}" if record.chat_rouge_l is not None else ""))
    if policy is None:
        return
    section = report.policy
    from rich.table import Table

    from effideploy.progress import console

    table = Table(title=f"policy {section['name']} ({section['require']} must pass)")
    for column in ("candidate", "threshold", "limit", "value", "result"):
        table.add_column(column)
    for check in section["checks"]:
        value = "not measured" if check["value"] is None else f"{check['value']:.4g}"
        table.add_row(check["candidate"], check["threshold"], f"{check['limit']:g}", value,
                      "[green]pass[/]" if check["passed"] else "[bold red]FAIL[/]")
    console.print(table)
    if section["passed"]:
        echo("[bold green]policy passed[/]")
        return
    echo(f"[bold red]policy failed[/]: see {target}/report.md")
    raise typer.Exit(1)


@app.command()
def bench(
    candidate: Optional[List[str]] = typer.Option(None, "--candidate", help="Pruned checkpoint or export to compare (repeatable; default out/pruned, or out/export-<runtime>)."),
    token_compression: Optional[List[str]] = typer.Option(None, "--token-compression", help="Dense model + token compression, e.g. snapkv:0.2 (repeatable; torch and onnx; vllm: kv-dtype:fp8)."),
    quantize: Optional[List[str]] = typer.Option(None, "--quantize", help="Also bench the dense model and every checkpoint candidate exported with quantized weights: int8 | int4 (onnx), w8a8 | w4a16 (vllm; int8/int4 too), f16 | q8_0 | q4_k_m | ... (llamacpp) (repeatable)."),
    model: str = typer.Option(default_of(BenchConfig, "dense"), help="Dense baseline (as for prune --model)."),
    runtime: str = typer.Option(default_of(BenchConfig, "runtime"), help="torch | onnx | vllm | llamacpp (onnx/vllm/llamacpp export checkpoints under out/exports when needed)."),
    output: Path = typer.Option(Path(DEFAULT_BENCH_OUTPUT), help="Report folder (report.md, report.json, PNG plots)."),
    policy: Optional[Path] = typer.Option(None, help="Policy TOML file, or default (the packaged bench/policies/default.toml): exit 1 when it fails."),
    prompt_tokens: int = typer.Option(default_of(BenchConfig, "prompt_tokens"), help="Tokens per latency prompt (WikiText-2 test windows)."),
    new_tokens: int = typer.Option(default_of(BenchConfig, "new_tokens"), help="Greedy tokens generated per prompt."),
    prompts: int = typer.Option(default_of(BenchConfig, "prompts"), help="Prompts per latency repeat."),
    repeats: int = typer.Option(default_of(BenchConfig, "repeats"), help="Timed latency repeats, interleaved over the models."),
    warmup: int = typer.Option(default_of(BenchConfig, "warmup"), help="Untimed warm-up generations per model."),
    batch_sizes: str = typer.Option(",".join(map(str, default_of(BenchConfig, "batch_sizes"))), help="Throughput sweep (comma-separated batch sizes; '' skips it)."),
    throughput_repeats: int = typer.Option(default_of(BenchConfig, "throughput_repeats"), help="Timed repeats per batch size (0 skips the sweep)."),
    ppl_windows: int = typer.Option(default_of(BenchConfig, "ppl_windows"), help="WikiText-2 test windows for perplexity and loyalty (40 for the reference figure; 0 skips)."),
    ppl_seqlen: int = typer.Option(default_of(BenchConfig, "ppl_seqlen"), help="Tokens per perplexity window."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="BIG-bench task.json or folder, or a zero-shot task scored in lm-eval's format (acc and acc_norm): boolq | piqa | hellaswag | winogrande | arc_easy | arc_challenge | openbookqa | sciq | zeroshot (the seven) (repeatable; default: every task under shared/data/bigbench)."),
    mc_limit: int = typer.Option(default_of(BenchConfig, "mc_limit"), help="Multiple-choice examples per task (seeded subset; 0 skips, -1 takes all)."),
    seed: int = typer.Option(default_of(BenchConfig, "seed"), help="Seed of the prompt windows and the multiple-choice subset."),
    chat_prompts: int = typer.Option(default_of(BenchConfig, "chat_prompts"), help="Chat fidelity: the first N prompts of the packaged chat set, each answered greedily through the model's chat template by every model and compared with dense's answers (exact match, token F1, ROUGE-L, dense log-likelihood); 0 skips it (docs/accuracy.md)."),
    chat_new_tokens: int = typer.Option(default_of(BenchConfig, "chat_new_tokens"), help="Greedy tokens per chat response at most (a response ends at EOS)."),
    memory: bool = typer.Option(default_of(BenchConfig, "memory"), "--memory/--no-memory", help="Measure peak memory (one extra process per model)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    device: Optional[str] = typer.Option(default_of(BenchConfig, "device"), help="auto | cpu | cuda | cuda:N for the runtime (torch: CUDA when available; onnx: the CUDA execution provider with onnxruntime-gpu; vllm: where its build runs)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/ and bigbench/."),
    overwrite: bool = typer.Option(False, help="Replace an existing report folder."),
    lm_eval_task: Optional[List[str]] = typer.Option(None, "--lm-eval-task", help="Also run this lm-evaluation-harness task on every model's artifact through the runtime (repeatable; needs lm-eval and the task's data; offline: piqa_local, ..., or the tag effideploy_zeroshot)."),
    lm_eval_include: Optional[List[Path]] = typer.Option(None, "--lm-eval-include", help="A folder of your own lm-eval task YAML files (lm-eval's --include_path; repeatable)."),
    lm_eval_limit: int = typer.Option(100, help="Examples per lm-eval task (-1: all); on the shipped tasks the bench's own seeded subset."),
    serve: bool = typer.Option(False, "--serve", help="Bench under load instead: each model behind the runtime's own server (vllm, llamacpp) on 127.0.0.1, driven by GuideLLM at the policy's [serve] load and SLO (docs/serve.md)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Serving bench of a server you run: the dense model's OpenAI-compatible URL (implies --serve; candidates via --candidate-endpoint)."),
    candidate_endpoint: Optional[List[str]] = typer.Option(None, "--candidate-endpoint", help="A candidate's OpenAI-compatible URL (repeatable; with --endpoint)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local tokenizer folder for the serving bench's prompts (default: the dense model's)."),
    serve_prompts: str = typer.Option("wikitext", "--serve-prompts", help="The serving bench's prompts: wikitext (windows of WikiText-2 test text from --data-dir at the [serve] prompt_tokens, drawn with --seed) | synthetic (GuideLLM's synthetic text)."),
) -> None:
    """Dense vs candidates on one runtime: latency, throughput, memory, size, accuracy, OP/OG/OL/OE, Pareto front."""
    from effideploy.bench.config import CandidateSpec
    from effideploy.bench.policy import load_policy
    from effideploy.io import check_output_dir

    from effideploy.runtimes import RUNTIMES

    RUNTIMES.target(runtime)
    loaded_policy = load_policy(policy) if policy is not None else None  # a bad policy fails before measuring
    if serve or endpoint or candidate_endpoint:
        serve_bench(runtime, model, candidate, quantize, endpoint, candidate_endpoint, tokenizer, output, policy,
                    loaded_policy, overwrite, serve_prompts, data_dir, seed)
        return
    for spec in token_compression or []:
        check_option_text(spec, "--token-compression")
    lm_eval = None
    if lm_eval_task:  # a missing lm-eval, task or folder: one line, before any work
        from effideploy.eval.lm_eval_adapter import check_lm_eval, use_include_paths

        for name in lm_eval_task:
            check_option_text(name, "--lm-eval-task")
        use_include_paths(lm_eval_include or [])
        lm_eval = check_lm_eval(lm_eval_task)
    elif lm_eval_include:
        raise EffideployError("--lm-eval-include needs --lm-eval-task (the tasks to run from it)")
    for path in candidate or []:
        check_option_text(path, "--candidate")
    # Every input: --overwrite must never delete a model, a candidate, the policy, a task or the data.
    inputs = [path for path in [model, *(candidate or []), policy, *(task or []), data_dir] if path is not None]
    check_output_dir(output, overwrite=overwrite, inputs=[p for p in inputs if Path(str(p)).expanduser().exists()])
    check_exports_apart(output, EXPORT_ROOT)
    set_threads(threads)
    specs = [CandidateSpec(model=path) for path in candidate or []]
    specs += [CandidateSpec(compression=spec) for spec in token_compression or []]
    for scheme in quantize or []:
        check_option_text(scheme, "--quantize")
    if not specs and not quantize:
        specs = [CandidateSpec(model=default_candidate(runtime))]
    config = BenchConfig(
        runtime=runtime, dense=model, candidates=tuple(specs), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
        prompts=prompts, warmup=warmup, repeats=repeats, batch_sizes=parse_batch_sizes(batch_sizes),
        throughput_repeats=throughput_repeats, ppl_windows=ppl_windows, ppl_seqlen=ppl_seqlen,
        tasks=tuple(str(t) for t in task or []), mc_limit=None if mc_limit < 0 else mc_limit, seed=seed,
        chat_prompts=chat_prompts, chat_new_tokens=chat_new_tokens,
        quantize=tuple(quantize or ()), memory=memory, threads=threads, device=device, data_dir=str(data_dir) if data_dir else None,
    )
    from effideploy.bench.runner import run_bench  # seconds of imports (transformers): after every input check above

    report = run_bench(config)
    if lm_eval is not None:
        report.lm_eval = lm_eval_models(report, lm_eval, list(lm_eval_task), None if lm_eval_limit < 0 else lm_eval_limit,
                                        seed)
    finish(report, output, policy, loaded_policy, overwrite)


def lm_eval_models(report, lm, tasks: list[str], limit, seed: int) -> dict:
    """lm-eval's scores of every benched model, each on its own artifact through the bench's runtime (token
    compression attached as the bench ran it); on the shipped tasks the bench's own seeded items."""
    from effideploy import progress
    from effideploy.eval.lm_eval_adapter import evaluate_runtime_artifact, seeded_samples
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model

    samples = seeded_samples(tasks, limit, seed)
    tokenizer = load_tokenizer(resolve_model(report.config["dense"]))
    runtime = report.runtime.get("runtime")
    scores = {}
    for model in report.models:
        with progress.status(f"lm-eval {', '.join(tasks)} on {model.label}"):
            scores[model.label] = evaluate_runtime_artifact(lm, runtime, str(model.artifact), tokenizer, tasks, limit,
                                                            compression=model.compression, samples=samples)
    return {"tasks": tasks, "limit": limit, "samples": samples, "models": scores}


def check_exports_apart(output: Path, exports: str) -> None:
    """The report folder is written last, staged and renamed over ``output``: exports made inside it (``--output
    out`` beside the default ``out/exports``) would make it exist by then and the run fail after all its work, and
    ``--overwrite`` would replace them with the report. One line before any work instead."""
    from effideploy.io import overlaps

    if overlaps(output, exports):
        raise EffideployError(f"--output {output} overlaps the folder bench exports candidates to ({exports}); "
                              "choose another --output, e.g. out/bench")


def serve_bench(runtime, model, candidate, quantize, endpoint, candidate_endpoint, tokenizer, output: Path,
                policy_path, policy, overwrite: bool, prompts: str = "wikitext", data_dir: Optional[Path] = None,
                seed: int = 0) -> None:
    """``bench --serve`` / ``--endpoint``: the serving bench (bench/serve.py); exit 1 naming the binding objective."""
    from effideploy.bench.config import CandidateSpec
    from effideploy.bench.serve_policy import ServeSLO
    from effideploy.bench.serve_prompts import check_source
    from effideploy.io import check_output_dir

    # Every input check comes before bench.serve's imports (GuideLLM, transformers: seconds), so bad input is one
    # line at once.
    check_source(prompts)
    if prompts == "wikitext":  # a missing wiki.test.raw fails here, before any export, folder or server
        from effideploy.data.text import resolve_text

        resolve_text("wikitext2", "test", str(data_dir) if data_dir else None)
    if candidate_endpoint and not endpoint:
        raise EffideployError("--candidate-endpoint needs --endpoint (the dense model's server)")
    if endpoint and (candidate or quantize):
        raise EffideployError("--endpoint benches servers you run: give candidates as --candidate-endpoint URL, "
                              "not --candidate / --quantize")
    if policy is not None and policy.serve is None:
        raise EffideployError(f"policy {policy_path} has no [serve] table: the serving bench checks only [serve] "
                              "(see docs/serve.md)")
    for url in [endpoint, *(candidate_endpoint or [])]:
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise EffideployError(f"--endpoint / --candidate-endpoint must be an http(s) URL, got {url!r}")
    if not endpoint:
        from effideploy.runtimes import require_server

        require_server(runtime)
    inputs = [p for p in [model, *(candidate or []), policy_path, tokenizer, data_dir] if p is not None]
    check_output_dir(output, overwrite=overwrite, inputs=[p for p in inputs if Path(str(p)).expanduser().exists()])
    if not endpoint:
        check_exports_apart(output, EXPORT_ROOT)
    from effideploy.bench.serve import ServedModel, discard, prepare_served, run_serve, sign_off, tokenizer_folder, work_folder
    from effideploy.bench.serve_report import write_serve_report

    slo = policy.serve if policy is not None else ServeSLO()
    if endpoint:
        models = [ServedModel("dense", "dense", endpoint)]
        models += [ServedModel(f"candidate-{i}" if len(candidate_endpoint) > 1 else "candidate", "candidate", url)
                   for i, url in enumerate(candidate_endpoint or [], 1)]
    else:
        specs = [CandidateSpec(model=path) for path in candidate or []]
        if not specs and not quantize:
            specs = [CandidateSpec(model=default_candidate(runtime))]
        models = prepare_served(runtime, model, specs, quantize or [], EXPORT_ROOT)
    folder = str(tokenizer) if tokenizer is not None else tokenizer_folder(model if endpoint else models[0].spec)
    work = work_folder(output)
    section = run_serve(runtime, models, slo, tokenizer=folder, work=work, endpoints=bool(endpoint), prompts=prompts,
                        data_dir=str(data_dir) if data_dir else None, seed=seed)
    if policy is not None:
        section["policy"] = sign_off(policy, models, section["summaries"])
    target = write_serve_report(section, output, work, overwrite=overwrite)
    discard(work)
    echo(f"[bold]bench --serve[/] {len(models) - 1} candidate(s), {section['seconds']:.0f} s -> {target}/report.md")
    for served in models:
        summary = section["summaries"][served.label]
        best = summary["max_load_meeting_slo"]
        echo(f"  {served.label}: highest {slo.kind} meeting the SLO {'none' if best is None else f'{best:g}'}, "
             f"goodput at {slo.target_level:g}: {summary['goodput_at_target'] or 0:.2f} req/s")
    if policy is None:
        return
    verdict = section["policy"]
    if verdict["passed"]:
        echo("[bold green]serving policy passed[/]")
        return
    echo(f"[bold red]serving policy failed[/]: {'; '.join(verdict['binding'])} (see {target}/report.md)")
    raise typer.Exit(1)
