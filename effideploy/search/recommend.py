"""The recommended recipe as something to ship: the artifact the target runtime opens, written inside the search's
output folder, and the plain-CLI commands that rebuild it (``report/reproduce.sh``).

The bench runs a KV budget by attaching token compression to the model's export at run time; shipping that export
alone would drop the KV budget. So on a runtime with an exporter the recommended artifact is the export made with
every option of the recipe (weights, the KV method recorded for the runner, the export facts the method needs):
reused when the bench already made it, exported once otherwise. On a runtime without an exporter the artifact is the
checkpoint the runtime reads (the input model itself for a dense recipe: see ``workspace.plan_link``).

Every generated command is an argument list joined by one quoting rule, ``shlex.join``: a path or spec holding
spaces, ``$(...)``, backticks or quotes reaches the command as one literal argument and never runs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effideploy.search.search import RecipeRecord, SearchConfig

REBUILT_CHECKPOINT = "out/recommended-checkpoint"
REBUILT_PRUNED = "out/recommended-pruned"  # the pruned checkpoint a transforming lever (recovery) trains
REBUILT_EXPORT = "out/recommended"


def export_options(config: SearchConfig, record: RecipeRecord) -> dict | None:
    """The exporter options that build the recipe's artifact (None: the runtime reads checkpoints)."""
    from effideploy.runtimes import RUNTIMES

    runtime_class = RUNTIMES.get(config.runtime)
    if runtime_class.capabilities.exporter is None:
        return None
    options = {}
    for lever, value in record.recipe.settings():  # e.g. the scheme's quantize and group size, the KV method
        options.update(lever.export_options(value, runtime_class, record))
    return options


def recommended_artifact(config: SearchConfig, record: RecipeRecord, measured_artifact) -> Path:
    """The artifact to ship (see the module docstring); ``measured_artifact``: what the bench opened."""
    from effideploy.bench.artifacts import export_or_reuse
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes import RUNTIMES

    options = export_options(config, record)
    if options is None:
        return Path(measured_artifact)
    source = resolve_model(record.checkpoint if record.recipe.structural else config.model)
    exporter = RUNTIMES.get(config.runtime).capabilities.exporter
    root = Path(config.output).expanduser() / "exports"
    return export_or_reuse(exporter, source, root, "recommended", options)[0]


def _flags(options: dict) -> list[str]:
    """Exporter keyword options as ``effideploy export`` flags (its flags are the keywords, dashed)."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (None, False):
            out += [flag, str(value)]
    return out


def reproduce_argv(config: SearchConfig, record: RecipeRecord) -> list[list[str]]:
    """The commands that rebuild the recommended artifact, as argument lists."""
    recipe, commands, model = record.recipe, [], config.model
    if recipe.structural:  # one pruning lever at most (Lever.conflicts), then any transforming one (recovery)
        checkpoint = recipe.checkpoint(config.runtime)
        pruned = REBUILT_PRUNED if checkpoint.transforms else REBUILT_CHECKPOINT
        commands.append(["effideploy", "prune", "--model", model, *checkpoint.prune_flags(),
                         "--calib-samples", str(config.calib_samples), "--calib-seqlen", str(config.calib_seqlen)]
                        + (["--data-dir", config.data_dir] if config.data_dir else []) + ["--output", pruned])
        for item, value in checkpoint.transforms:
            commands.append(item.rebuild_argv(value, pruned, REBUILT_CHECKPOINT, config))
        model = REBUILT_CHECKPOINT
    options = export_options(config, record)
    if options is not None:
        commands.append(["effideploy", "export", model, "--runtime", config.runtime, *_flags(options),
                         "--output", REBUILT_EXPORT])
    elif recipe.compression is not None and not recipe.structural:
        # Nothing to build: the runtime reads the model as it is and applies the KV budget when it runs it; this
        # command runs and measures exactly that.
        commands.append(["effideploy", "bench", "--runtime", config.runtime, "--model", model,
                         "--token-compression", recipe.compression])
    return commands


def reproduce_commands(config: SearchConfig, record: RecipeRecord) -> list[str]:
    """:func:`reproduce_argv`, each command quoted by the one rule (``shlex.join``)."""
    lines = [shlex.join(argv) for argv in reproduce_argv(config, record)]
    recipe = record.recipe
    if recipe.compression is not None and export_options(config, record) is None and recipe.structural:
        lines.append("# " + shlex.join(["the", config.runtime, "runtime applies token compression", recipe.compression,
                                        "to", REBUILT_CHECKPOINT, "when it runs it"]))
    return lines


def reproduce_script(lines: list[str]) -> str:
    return "#!/usr/bin/env bash\n# Rebuild the recommended recipe.\nset -euo pipefail\n" + "\n".join(lines) + "\n"
