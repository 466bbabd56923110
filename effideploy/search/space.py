"""The search space: a recipe is a mapping from lever to value; the space is the product of the levers' values.

What each lever does lives in its class (``effideploy.search.levers``); a recipe only holds the values of the levers
it uses (an unset value is left out, so ``Recipe()`` is the dense model) and answers by asking its levers.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from effideploy.search.levers import LEVERS, Depth, FfnSparsity, KvBudget, Lever, WeightQuantization, lever

__all__ = ["Checkpoint", "Depth", "FfnSparsity", "KvBudget", "Lever", "Recipe", "SearchSpace", "WeightQuantization"]


class Recipe(Mapping):
    """One point of the space: lever name -> value, e.g. ``Recipe(ffn_sparsity=0.2, quantize="int8")``."""

    __slots__ = ("_items",)

    def __init__(self, settings: Mapping | None = None, **named) -> None:
        values = {**dict(settings or {}), **named}
        items = []
        for name in LEVERS:  # canonical order, whatever the order given
            if name in values:
                value = lever(name).normalise(values.pop(name))
                if value != LEVERS[name].unset:
                    items.append((name, value))
        if values:
            lever(next(iter(values)))  # an unknown lever: one line naming the levers
        self._items = tuple(items)

    def __getitem__(self, name: str):
        return dict(self._items)[name]

    def __iter__(self):
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self._items == other._items

    def __repr__(self) -> str:
        return f"Recipe({dict(self._items)!r})"

    def get(self, name: str, default=None):
        return dict(self._items).get(name, LEVERS[name].unset if name in LEVERS else default)

    def used(self) -> list[tuple[Lever, object]]:
        """The levers this recipe sets, with their values."""
        return [(LEVERS[name], value) for name, value in self._items]

    def settings(self) -> list[tuple[Lever, object]]:
        """Every lever with its value here (its unset value where the recipe leaves it out)."""
        return [(item, self.get(name)) for name, item in LEVERS.items()]

    @property
    def label(self) -> str:
        structure = [l.fragment(v) for l, v in self.used() if l.structural]
        rest = [l.fragment(v) for l, v in self.used() if not l.structural]
        return "+".join((structure or ["dense"]) + rest)

    @property
    def structure(self) -> "Recipe":
        """What decides the checkpoint (the same checkpoint serves every weight scheme and KV budget)."""
        return Recipe({name: value for name, value in self._items if LEVERS[name].structural})

    @property
    def structural(self) -> bool:
        return bool(self.structure)

    def checkpoint(self, runtime: str) -> "Checkpoint":
        """The checkpoint this recipe runs on ``runtime``: its structure, with FFN widths rounded to the multiple
        every lever's kernels need there (the least common multiple; 1 when no structural lever chooses widths, so
        a depth-only or dense recipe shares one checkpoint with every weight scheme)."""
        import math

        structure = self.structure
        if not any(item.takes_align(value) for item, value in structure.used()):
            return Checkpoint(structure, 1)
        return Checkpoint(structure, math.lcm(*(item.width_multiple(value, runtime) for item, value in self.settings())))

    @property
    def family(self) -> str:
        """Which lever kinds the recipe uses: the report compares the best recipe of each family alone."""
        families = []
        for item, _ in self.used():
            if item.family not in families:
                families.append(item.family)
        return "+".join(families) or "dense"

    @property
    def scheme_name(self) -> str | None:
        return next((n for l, v in self.used() if (n := l.scheme_name(v)) is not None), None)

    @property
    def compression(self) -> str | None:
        return next((c for l, v in self.used() if (c := l.compression(v)) is not None), None)

    def to_dict(self) -> dict:
        """Every lever by name (search.json: unset levers written as their unset value)."""
        return {name: value for name, value in ((n, self.get(n)) for n in LEVERS)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        return cls(data)


@dataclass(frozen=True)
class Checkpoint:
    """What decides a checkpoint: the structural levers' values and the FFN width multiple (``Recipe.checkpoint``)."""

    structure: Recipe
    align: int = 1

    @property
    def name(self) -> str:
        """Its folder in the search's output: the levers' checkpoint names (``cfsp-0.2``, ``cfsp-0.2-align32``,
        ``cfsp-0.2-align32-distil32k`` for a transforming lever's folder beside the pruned one)."""
        return "-".join(item.checkpoint_name(value, self.align) for item, value in self.structure.used())

    def _pruning(self) -> tuple:
        # pruning levers exclude each other (Lever.conflicts): one prunes, transforming ones train its result
        ((item, value),) = self.pruned.structure.used()
        return item, value

    @property
    def pruned(self) -> "Checkpoint":
        """The checkpoint pruning writes, before any transforming lever (itself when there is none)."""
        return Checkpoint(Recipe({l.name: v for l, v in self.structure.used() if not l.transforms}), self.align)

    @property
    def transforms(self) -> list[tuple[Lever, object]]:
        """The transforming levers (recovery) applied to the pruned checkpoint, in order."""
        return [(l, v) for l, v in self.structure.used() if l.transforms]

    def prune_config(self, **calibration):
        item, value = self._pruning()
        return item.prune_config(value, align=self.align, **calibration)

    def prune_flags(self) -> list[str]:
        item, value = self._pruning()
        return item.prune_flags(value, align=self.align)


def conflicting(pairs: list[tuple[Lever, object]]) -> bool:
    """Whether two set levers of a combination exclude each other (each lever says which it excludes), or one
    applies to nothing there."""
    used = [(l, v) for l, v in pairs if v != l.unset]
    return any(a.conflicts(va, b, vb) for a, va in used for b, vb in used if a is not b) or \
        not all(l.applies(v, used) for l, v in used)  # e.g. recovery without a pruning value to train on


@dataclass(frozen=True)
class SearchSpace:
    levers: tuple[Lever, ...] = field(default_factory=lambda: (FfnSparsity(), WeightQuantization(), KvBudget()))

    def recipes(self) -> list[Recipe]:
        """Every combination except the dense model itself (the baseline) and those whose levers exclude each
        other, in a stable order."""
        out = []
        for values in itertools.product(*(item.values for item in self.levers)):
            if conflicting(list(zip(self.levers, values))):
                continue
            recipe = Recipe({item.name: value for item, value in zip(self.levers, values)})
            if recipe and recipe not in out:
                out.append(recipe)
        return out

    def for_runtime(self, runtime: str) -> "SearchSpace":
        return SearchSpace(tuple(item.for_runtime(runtime) for item in self.levers))

    def to_dict(self) -> dict:
        return {item.name: list(item.values) for item in self.levers}
