"""The search space: a recipe is one value per lever; a lever is one small class.

A lever says what values it takes, how a value changes a recipe, and how it changes what the cost model reads
(weight bytes read per decoded token, prefill FLOPs, KV bytes). Adding a lever (e.g. dropping blocks or attention
once those pruning methods land) is one class here and one entry in ``LEVERS``; a structural lever (one that changes
the checkpoint) also names the pruning options it needs in ``prune_options``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from effideploy.errors import OptionError


@dataclass(frozen=True)
class Recipe:
    """One point of the space. ``sparsity`` 0: the dense checkpoint; ``quantize`` None: float weights; ``kv`` None:
    the full KV cache (else a token-compression spec, e.g. ``snapkv:0.5``)."""

    sparsity: float = 0.0
    quantize: str | None = None
    kv: str | None = None

    @property
    def label(self) -> str:
        label = "dense" if self.sparsity == 0 else f"cfsp-{self.sparsity:g}"
        return label + (f"+{self.quantize}" if self.quantize else "") + (f"+{self.kv}" if self.kv else "")

    @property
    def structural_key(self) -> float:
        """What decides the checkpoint (the same checkpoint serves every quantization and KV budget)."""
        return self.sparsity

    @property
    def family(self) -> str:
        """Which lever kinds the recipe uses: the report compares the best of each family."""
        parts = [name for name, used in (("pruning", self.sparsity > 0), ("quantization", self.quantize is not None),
                                         ("kv", self.kv is not None)) if used]
        return "+".join(parts) or "dense"


@dataclass(frozen=True)
class Lever:
    name: str = ""
    values: tuple = ()

    def apply(self, recipe: Recipe, value) -> Recipe:
        raise NotImplementedError


@dataclass(frozen=True)
class FfnSparsity(Lever):
    """CFSP FFN channel pruning at these sparsities (0: keep the dense FFN); one calibration pass serves all."""

    name: str = "ffn_sparsity"
    values: tuple = (0.0, 0.1, 0.2, 0.3)

    def __post_init__(self) -> None:
        for value in self.values:
            if not 0.0 <= value < 1.0:
                raise OptionError("sparsities", f"must be in [0, 1), got {value}")

    def apply(self, recipe: Recipe, value) -> Recipe:
        return replace(recipe, sparsity=float(value))


@dataclass(frozen=True)
class WeightQuantization(Lever):
    """Weight quantization at export (None: float weights). A value is a scheme the runtime's exporter declares
    (``effideploy.quantization.schemes``), or the search's generic ``int8`` / ``int4``, which
    ``feasibility.resolve_space`` maps onto that runtime's own scheme (ONNX int8, vLLM w8a8, llama.cpp q8_0, ...)."""

    name: str = "quantize"
    values: tuple = (None, "int8", "int4")

    def __post_init__(self) -> None:
        for value in self.values:
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError("quantize", f"a scheme is a name, got {value!r}")

    def apply(self, recipe: Recipe, value) -> Recipe:
        return replace(recipe, quantize=value)


@dataclass(frozen=True)
class KvBudget(Lever):
    """Token compression of the prompt's KV cache (None: keep every entry)."""

    name: str = "kv"
    values: tuple = (None,)

    def __post_init__(self) -> None:
        from effideploy.compression.spec import parse_spec

        for value in self.values:
            if value is not None:
                parse_spec(value)  # a bad spec fails before any work

    def apply(self, recipe: Recipe, value) -> Recipe:
        return replace(recipe, kv=value)


@dataclass(frozen=True)
class SearchSpace:
    levers: tuple[Lever, ...] = field(default_factory=lambda: (FfnSparsity(), WeightQuantization(), KvBudget()))

    def recipes(self) -> list[Recipe]:
        """Every combination except the dense model itself (the baseline), in a stable order."""
        out = []
        for values in itertools.product(*(lever.values for lever in self.levers)):
            recipe = Recipe()
            for lever, value in zip(self.levers, values):
                recipe = lever.apply(recipe, value)
            if recipe != Recipe() and recipe not in out:
                out.append(recipe)
        return out

    def to_dict(self) -> dict:
        return {lever.name: list(lever.values) for lever in self.levers}
