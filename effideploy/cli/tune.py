"""``effideploy tune``: the recipe search. The fastest recipe (FFN sparsity or depth x weight quantization x KV budget) that
passes a policy on one runtime, with the evidence; exit 0 with a recommendation, 1 when none passes (the binding
threshold named), 2 on an error."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from effideploy.cli.app import app, check_option_text, default_of, echo, set_threads
from effideploy.errors import EffideployError
from effideploy.runtimes import RUNTIMES
from effideploy.search.search import SearchConfig

from effideploy.bench.policy import DEFAULT_POLICY  # "default": the packaged policy, read from any folder


def _values(text: str, option: str, convert) -> tuple:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(convert(part))
        except ValueError:
            raise EffideployError(f"{option} must be a comma-separated list, got {text!r}") from None
    if not out:
        raise EffideployError(f"{option} needs at least one value")
    return tuple(out)


@app.command("tune")
def tune(
    model: str = typer.Option(default_of(SearchConfig, "model"), help="Dense model (default: the embedded SmolLM2-135M)."),
    runtime: str = typer.Option(default_of(SearchConfig, "runtime"), help=" | ".join(RUNTIMES.names())),
    policy: Path = typer.Option(Path(DEFAULT_POLICY), help="Policy TOML the recommended recipe must pass."),
    output: Path = typer.Option(Path(default_of(SearchConfig, "output")), help="Folder for checkpoints, exports, screen cache, report/ and the recommended link: new, or one effideploy wrote; never an input's folder or inside one."),
    sparsities: str = typer.Option("0,0.1,0.2,0.3", help="FFN sparsities (CFSP; 0 = keep the FFN), comma-separated."),
    depth: Optional[str] = typer.Option(None, help="Depth: METHOD:AMOUNT with METHOD drop-blocks | drop-attention | cfsp-joint and AMOUNT a fraction of the parameters (or, for drop-*, a number of sublayers), or none; comma-separated (default: none,drop-attention:0.05). Not combined with --sparsities (one pruning method per checkpoint)."),
    quantize: Optional[str] = typer.Option(None, help="Weight schemes (none = float), comma-separated (default: none,int8,int4, less what the runtime does not serve)."),
    kv: str = typer.Option("none", help="KV budgets: token-compression specs (e.g. snapkv:0.5) or none, comma-separated."),
    recover: str = typer.Option("none", help="Recovery after pruning: METHOD:TOKENS with METHOD distil (KL to the dense model) | lora (LM loss) and a budget of training tokens of WikiText-2 validation (e.g. distil:32768 or distil:32k), or none; comma-separated (default: none: minutes per checkpoint on a CPU). Only on top of --sparsities above 0."),
    calib_samples: int = typer.Option(default_of(SearchConfig, "calib_samples"), help="Calibration windows (one pass for every sparsity)."),
    calib_seqlen: int = typer.Option(default_of(SearchConfig, "calib_seqlen"), help="Tokens per calibration window."),
    screen_windows: int = typer.Option(default_of(SearchConfig, "screen_windows"), help="Held-out windows of the PyTorch quality screen."),
    screen_seqlen: int = typer.Option(default_of(SearchConfig, "screen_seqlen"), help="Tokens per screen window."),
    shortlist: int = typer.Option(default_of(SearchConfig, "shortlist"), help="Recipes predicted to pass that are benched for real (plus the best quantization-only and pruning-only)."),
    repeats: int = typer.Option(default_of(SearchConfig, "repeats"), help="Timed latency repeats of the final bench."),
    ppl_windows: int = typer.Option(default_of(SearchConfig, "ppl_windows"), help="WikiText-2 test windows of the final bench."),
    ppl_seqlen: int = typer.Option(default_of(SearchConfig, "ppl_seqlen"), help="Tokens per perplexity window of the final bench."),
    prompt_tokens: int = typer.Option(default_of(SearchConfig, "prompt_tokens"), help="Tokens per latency prompt."),
    new_tokens: int = typer.Option(default_of(SearchConfig, "new_tokens"), help="Greedy tokens generated per prompt."),
    mc_limit: int = typer.Option(default_of(SearchConfig, "mc_limit"), help="Multiple-choice examples per task (0 skips)."),
    chat_prompts: int = typer.Option(default_of(SearchConfig, "chat_prompts"), help="Chat prompts the final bench answers through the model's chat template, candidate against dense (0 skips)."),
    task: Optional[List[Path]] = typer.Option(None, "--task", help="BIG-bench task.json or folder, or a zero-shot task scored in lm-eval's format: boolq | piqa | hellaswag | winogrande | arc_easy | arc_challenge | openbookqa | sciq | zeroshot (the seven) (repeatable; default: the tasks the dense SmolLM2 is competent on)."),
    lm_eval_task: Optional[List[str]] = typer.Option(None, "--lm-eval-task", help="Also run this lm-evaluation-harness task on the dense and recommended models (repeatable; needs lm-eval and the task's data; offline: piqa_local, ..., or the tag effideploy_zeroshot)."),
    lm_eval_include: Optional[List[Path]] = typer.Option(None, "--lm-eval-include", help="A folder of your own lm-eval task YAML files (lm-eval's --include_path; repeatable)."),
    lm_eval_limit: int = typer.Option(100, help="Examples per lm-eval task (-1: all)."),
    memory: bool = typer.Option(default_of(SearchConfig, "memory"), "--memory/--no-memory", help="Measure peak memory in the final bench."),
    serve: bool = typer.Option(False, "--serve", help="Also judge the recipes that pass the thresholds under load: dense and each behind the runtime's own server (vllm, llamacpp), driven by GuideLLM at the policy's [serve] load; the recommendation is the one meeting the [serve] objectives with the highest goodput at the target load (docs/serve.md)."),
    serve_prompts: str = typer.Option(default_of(SearchConfig, "serve_prompts"), "--serve-prompts", help="--serve's prompts: wikitext (WikiText-2 test windows) | synthetic (GuideLLM's)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per model."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/ and bigbench/."),
    overwrite: bool = typer.Option(False, help="Prune and screen again (otherwise reused when the options match)."),
) -> None:
    """Recipe search: prune once, screen every recipe, fit a speed cost model, bench the promising ones, recommend."""
    from effideploy.bench.policy import load_policy
    from effideploy.search.feasibility import check_recipes, resolve_space, servable_default
    from effideploy.search.report import verdict_lines, write_search_report
    from effideploy.search.search import run_search
    from effideploy.search.space import Depth, FfnSparsity, KvBudget, SearchSpace, WeightQuantization
    from effideploy.search.recovery_lever import Recovery
    from effideploy.search.workspace import check_workspace, guarded

    # Everything that can be refused is refused here, before any work and before anything is written.
    RUNTIMES.target(runtime)
    loaded = load_policy(policy)
    for value, option in [*((t, "--lm-eval-task") for t in lm_eval_task or []), (kv, "--kv"), (quantize, "--quantize"),
                          (depth, "--depth"), (recover, "--recover")]:
        check_option_text(value, option)
    if quantize is None:
        schemes, left_out = servable_default(WeightQuantization(), runtime)
        for reason in left_out:
            echo(f"note: the default --quantize leaves out {reason}")
    else:
        schemes = _values(quantize, "--quantize", str)
    depths = Depth.default_values if depth is None else _values(depth, "--depth", str)
    recovery = Recovery(values=_values(recover, "--recover", str))  # a bad value: one line, before any work
    space = SearchSpace((FfnSparsity(values=_values(sparsities, "--sparsities", float)), Depth(values=depths),
                         recovery, WeightQuantization(values=schemes), KvBudget(values=_values(kv, "--kv", str))))
    Recovery.check_space(space)  # recovery values with no pruned checkpoint to train
    space = resolve_space(space, runtime)  # int8 / int4 named as this runtime's exporter names them
    check_recipes(space.recipes(), runtime)
    if lm_eval_include:
        from effideploy.eval.lm_eval_adapter import use_include_paths

        use_include_paths(lm_eval_include)  # a missing folder is refused here, before any work
    if serve:
        from effideploy.bench.serve_prompts import check_source
        from effideploy.search.serve_stage import check_serve

        check_serve(runtime, loaded, policy)  # no [serve] table, no server, no GuideLLM: one line, before any work
        check_source(serve_prompts)
    check_workspace(output, [model, policy, data_dir, *(task or [])])
    set_threads(threads)
    config = SearchConfig(model=model, runtime=runtime, output=str(output), space=space, calib_samples=calib_samples,
                          calib_seqlen=calib_seqlen, screen_windows=screen_windows, screen_seqlen=screen_seqlen,
                          shortlist=shortlist, repeats=repeats, ppl_windows=ppl_windows, ppl_seqlen=ppl_seqlen,
                          prompt_tokens=prompt_tokens, new_tokens=new_tokens, mc_limit=mc_limit, chat_prompts=chat_prompts,
                          tasks=tuple(str(t) for t in task or ()), memory=memory, threads=threads,
                          data_dir=str(data_dir) if data_dir else None, lm_eval_tasks=tuple(lm_eval_task or ()),
                          lm_eval_limit=None if lm_eval_limit < 0 else lm_eval_limit, serve=serve,
                          serve_prompts=serve_prompts, overwrite=overwrite)
    with guarded(output):  # Ctrl-C names what stays in the output folder; a failure before any result leaves none
        result = run_search(config, loaded)
        target = write_search_report(result, output / "report")
    echo(f"[bold]tune[/] {len(result.records)} recipes, {result.seconds['total']:.0f} s -> {target}/report.md")
    for line in verdict_lines(result)[:2]:
        echo(line.replace("**", ""))
    if result.recommended is None:
        raise typer.Exit(1)
