"""The search's model-building stages: one calibration pass and a checkpoint per structural variant
(``prune_all``), the PyTorch quality screen of every recipe, cached by checkpoint content (``screen_all``), and the
exports of the cost model's and the shortlist's recipes before their benches (``export_or_drop``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from effideploy import progress
from effideploy.search.screen import ScreenResult

if TYPE_CHECKING:
    from effideploy.search.search import RecipeRecord, SearchConfig
    from effideploy.search.space import Checkpoint

SCREEN_CACHE = "screen.json"


def prune_all(config: SearchConfig, source, checkpoints: list[Checkpoint], text,
              timings: dict | None = None) -> tuple[dict[Checkpoint, Path], float]:
    """One folder per checkpoint (structural levers' values and FFN width multiple; an empty structure is the dense
    model itself), each from its lever's pruning configuration, one calibration pass for all those not reusable;
    then a checkpoint with a transforming lever (recovery) from its pruned one, into a folder beside it, its time
    added to ``timings`` under the lever's name (the returned seconds are the pruning's)."""
    from effideploy.bench.pipeline import _reusable
    from effideploy.pruning import calibrate_source, prune_checkpoint
    from effideploy.pruning.engine import needs_gram

    output = Path(config.output).expanduser()
    calibration = {"calib_samples": config.calib_samples, "calib_seqlen": config.calib_seqlen}
    folders, todo = {}, []
    for checkpoint in dict.fromkeys(c.pruned for c in checkpoints):  # each pruned one once, transformed or not
        if not checkpoint.structure:
            folders[checkpoint] = source.path
            continue
        prune_config = checkpoint.prune_config(**calibration)
        folder = output / checkpoint.name  # cfsp-0.2: pipeline.checkpoint_folder's name, reused
        folders[checkpoint] = folder
        if folder.exists() and not config.overwrite and _reusable(folder, source, prune_config):
            progress.console.print(f"reusing {folder} (same source and options)", highlight=False)
            continue
        todo.append((prune_config, folder))
    tick = time.perf_counter()
    if todo:
        # One pass serves every method: it always measures the sublayer statistics the depth methods rank by,
        # and the second moments when any method's compensation (CFSP's lstsq) needs them.
        gram = [c for c, _ in todo if needs_gram(c)]
        with progress.status(f"Calibrating ({config.calib_samples} x {config.calib_seqlen} tokens, one pass)"):
            stats = calibrate_source(source, (gram or [todo[0][0]])[0], text, gram=bool(gram))
        for prune_config, folder in progress.track(todo, "Pruning"):
            prune_checkpoint(source, prune_config, folder, calibration=text, overwrite=True, stats=stats)
    seconds = time.perf_counter() - tick
    for checkpoint in (c for c in checkpoints if c.transforms):
        folder = output / checkpoint.name  # beside its pruned folder: cfsp-0.2-align32-distil32k
        ((item, value),) = checkpoint.transforms  # one transforming lever (recovery) at present
        started = time.perf_counter()
        item.transform(value, folders[checkpoint.pruned], folder, dense=source, data_dir=config.data_dir,
                       overwrite=config.overwrite)
        folders[checkpoint] = folder
        if timings is not None:
            timings[item.name] = timings.get(item.name, 0.0) + time.perf_counter() - started
    return folders, seconds


def bench_tokens(config: SearchConfig) -> int:
    """How many leading tokens of WikiText-2 test the final bench's perplexity windows read (consecutive, from the
    start: ``effideploy.bench.runner``)."""
    return config.ppl_windows * config.ppl_seqlen if config.ppl_windows else 0


def screen_windows(ids, config: SearchConfig):
    """The screen's windows: held out from calibration (the test split; calibration reads the validation split)
    and from the final bench's perplexity windows (drawn only from the tokens after them), so the screen's estimate
    and the bench's measurement are two samples, not one."""
    from effideploy.data.text import sample_windows
    from effideploy.errors import EffideployError

    skip = bench_tokens(config)
    if int(ids.numel()) - skip < config.screen_seqlen + 1:
        raise EffideployError(f"WikiText-2 test has {int(ids.numel())} tokens: after the bench's {skip} perplexity "
                              f"tokens, fewer than one screen window of {config.screen_seqlen} remain; lower "
                              "--ppl-windows, --ppl-seqlen or --screen-seqlen")
    return sample_windows(ids[skip:], config.screen_windows, config.screen_seqlen, seed=1234)


def screen_all(config: SearchConfig, records: list[RecipeRecord], tokenizer) -> float:
    """Screen every recipe (cached in output/screen.json by checkpoint content and screen settings)."""
    import copy

    import torch

    from effideploy.bench.artifacts import content_fingerprint
    from effideploy.data.text import load_text, resolve_text, tokenize_text
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.quantization.schemes import apply_scheme
    from effideploy.search.screen import Screener

    tick = time.perf_counter()
    cache_path = Path(config.output).expanduser() / SCREEN_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() and not config.overwrite else {}
    # the reference is the dense model as the runtime stores float weights (float32, or llama.cpp's f16), as the
    # bench's dense model is
    dense_record = next((r for r in records if r.recipe == type(r.recipe)()), records[0])
    settings = {"windows": config.screen_windows, "seqlen": config.screen_seqlen, "after": bench_tokens(config),
                "reference": dense_record.scheme.key()}
    keys = {}
    for record in records:
        keys[record.label] = json.dumps({"checkpoint": content_fingerprint(Path(record.checkpoint)),
                                         "recipe": record.recipe.to_dict(), "scheme": record.scheme.key(),
                                         **settings}, sort_keys=True)
    todo = [r for r in records if keys[r.label] not in cache]
    for record in records:
        if record not in todo:
            record.screen = ScreenResult(**{k: v for k, v in cache[keys[record.label]].items()
                                            if k != "perplexity_increase"})
    if todo:
        ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test", config.data_dir)))
        windows = screen_windows(ids, config)
        with torch.no_grad():
            dense = apply_scheme(load_model(resolve_model(dense_record.checkpoint)), dense_record.scheme)
            screener = Screener(dense, windows)
            del dense
            by_checkpoint: dict[str, list[RecipeRecord]] = {}
            for record in todo:
                by_checkpoint.setdefault(record.checkpoint, []).append(record)
            for checkpoint, group in by_checkpoint.items():
                base = load_model(resolve_model(checkpoint))
                for record in group:
                    # each tensor rounded as the runtime's exporter stores it (W8A8: activations per token too)
                    model = apply_scheme(copy.deepcopy(base), record.scheme) if record.scheme.changes_weights \
                        else base
                    record.screen = screener.screen(model, record.recipe.compression, record.label)
                    cache[keys[record.label]] = record.screen.to_dict()
                    del model
                del base
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    return time.perf_counter() - tick


def export_or_drop(bench_config, records: list[RecipeRecord], purpose: str) -> list[RecipeRecord]:
    """Export (or reuse) each record's artifact as ``bench_config``'s bench will ask for it, so that one whose
    export fails its parity check is dropped with the reason (``record.export_error``) instead of stopping the run
    after every other stage (``purpose`` names what it is dropped from: "the shortlist", "the cost model"): that
    artifact was not kept, and the bench then reuses the others' by content. Returns the records that failed here."""
    from effideploy.bench.artifacts import prepare_candidate
    from effideploy.errors import ParityError
    from effideploy.runtimes import RUNTIMES
    from effideploy.search.selection import candidate_spec

    runtime_class = RUNTIMES.get(bench_config.runtime)
    failed = []
    for record in records:
        try:
            prepare_candidate(bench_config, runtime_class, record.label, candidate_spec(record))
        except ParityError as exc:
            record.stage, record.export_error = "export failed", str(exc)
            failed.append(record)
            progress.console.print(f"{record.label}: its export failed its parity check, dropped from {purpose} "
                                   f"({exc})", highlight=False)
    return failed

