"""Structured FFN pruning: CFSP and baselines, written as physically smaller checkpoints.

``PruneConfig`` (its defaults are the CLI's) imports nothing heavy; the engine (torch, transformers) is imported on
first use of ``prune_``, ``prune_checkpoint``, ``calibrate_source`` or ``plan_pruning``.
"""

from effideploy.pruning.config import PruneConfig
from effideploy.pruning.methods import METHODS

_ENGINE = ("calibrate_source", "plan_pruning", "prune_", "prune_checkpoint")


def __getattr__(name: str):
    if name in _ENGINE:
        from effideploy.pruning import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'effideploy.pruning' has no attribute {name!r}")


__all__ = ["METHODS", "PruneConfig", "calibrate_source", "plan_pruning", "prune_", "prune_checkpoint"]
