"""Recovery fine-tuning after pruning: LoRA whose per-block rank follows CFSP's block importance, merged back.

- ``RecoveryConfig``: every option, validated up front.
- ``recover_checkpoint(source, output, config)``: train, merge and write a checkpoint in the same format.
- ``prune_and_recover(source, prune_config, output, config, calibration=...)``: ``prune --recover``.
- ``effideploy.recovery.ranks``: the rank arithmetic (importance -> integer ranks under a parameter budget).
- ``effideploy.recovery.lora``: the steps on their own (``plan_ranks``, ``attach_lora``, ``train_lora``,
  ``merge_lora``), for callers that hold a model in memory; ``effideploy.recovery.train``: the training loop.

peft is imported only when training starts, so the config and the rank arithmetic work without it.
"""

from effideploy.recovery.config import RecoveryConfig, RecoveryWarning
from effideploy.recovery.ranks import allocate_ranks, block_ranks


# The two entry points import torch and peft on first call, not on `import effideploy.recovery`.
def recover_checkpoint(source, output, config, **options):
    """Train LoRA on ``source`` with per-block ranks, merge it and write ``output`` (see ``lora.recover_checkpoint``)."""
    from effideploy.recovery.lora import recover_checkpoint as run

    return run(source, output, config, **options)


def prune_and_recover(source, prune_config, output, config, **options):
    """Prune ``source`` and recover it into ``output``; only the recovered checkpoint is kept."""
    from effideploy.recovery.lora import prune_and_recover as run

    return run(source, prune_config, output, config, **options)


__all__ = ["RecoveryConfig", "RecoveryWarning", "allocate_ranks", "block_ranks", "prune_and_recover",
           "recover_checkpoint"]
