"""The recovery lever: a pruned checkpoint trained back towards the dense model before it is quantized.

Its own module because ``levers.py`` holds the four levers it grew up with; ``levers.LEVERS`` registers it after
the pruning levers, so a recipe reads ``cfsp-0.3+distil32k+int8`` (prune, recover, then quantize at export).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from effideploy.errors import OptionError
from effideploy.search.levers import Lever

RECOVERY_METHODS = ("distil", "lora")
# Windows of the training loop: 2 x 256 tokens a step, the shape of the recovery evidence (docs/recovery.md), so a
# budget of N tokens is N // 512 optimizer steps.
BATCH_SIZE = 2
SEQLEN = 256
TOKENS_PER_STEP = BATCH_SIZE * SEQLEN
# Pure KL to the dense model (weight 1.0), not the recover command's default 0.5: what the search's policy measures
# is fidelity to the dense model (KL, loyalty, top-k agreement), and the cross-entropy term on WikiText-2 would also
# adapt the model to the domain the bench's perplexity is measured on, a gain the dense model would get from the
# same training (the control), not recovered fidelity.
DISTILL_WEIGHT = 1.0


def _tokens_text(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


@dataclass(frozen=True)
class Recovery(Lever):
    """Recovery fine-tuning of the pruned checkpoint (``effideploy.recovery``: LoRA with ranks from CFSP's block
    importance, merged into the weights; None: no recovery). A value is ``METHOD:TOKENS``: ``distil`` (KL on the
    dense source model's logits, no cross-entropy) or ``lora`` (the plain next-token loss), and a budget of training
    tokens (``32768`` or ``32k``), trained as ``TOKENS // 512`` steps of 2 x 256-token windows.

    Training text: WikiText-2 **validation** (``wiki.valid.raw`` under ``--data-dir``), the text calibration reads;
    never ``wiki.test.raw``, which the screen and the final bench evaluate on, and never a task's items. It is general
    encyclopaedic prose, and with ``distil`` the target is the dense model's own next-token distribution on it, not
    the text itself, so what is learnt is the dense model's behaviour rather than the corpus.

    It applies only on top of a pruning lever that changes the model (FFN sparsity): the dense model given the same
    training is a control for the evidence, not a candidate. Checkpoints with removed blocks or attention are
    excluded (LoRA recovery does not handle them: ``recovery.lora.block_shapes``, ``prune --recover``)."""

    values: tuple = (None,)
    name: ClassVar[str] = "recovery"
    # A recovered checkpoint is still "pruning" in the report's comparison (pruning only, with or without recovery).
    family: ClassVar[str] = "pruning"
    structural: ClassVar[bool] = True  # part of the checkpoint: the recovered folder beside the pruned one
    transforms: ClassVar[bool] = True
    unset: ClassVar[Any] = None

    @staticmethod
    def parse(value) -> tuple[str, int]:
        method, _, amount = str(value).strip().lower().partition(":")
        if method not in RECOVERY_METHODS or not amount:
            raise OptionError("recover", f"{value!r}: give METHOD:TOKENS with METHOD one of "
                                         f"{', '.join(RECOVERY_METHODS)} (e.g. distil:32768 or distil:32k) or none")
        match = re.fullmatch(r"(\d+)(k?)", amount.strip())
        if match is None:
            raise OptionError("recover", f"{value!r}: the budget must be a whole number of training tokens (or "
                                         f"thousands of 1024 with k), got {amount!r}")
        tokens = int(match.group(1)) * (1024 if match.group(2) else 1)
        if tokens < TOKENS_PER_STEP:
            raise OptionError("recover", f"{value!r}: the budget is at least one step of {BATCH_SIZE} x {SEQLEN} = "
                                         f"{TOKENS_PER_STEP} tokens")
        return method, tokens

    def normalise(self, value):
        if value is None:
            return None
        method, tokens = self.parse(value)
        return f"{method}:{tokens}"

    def fragment(self, value) -> str:
        method, tokens = self.parse(value)
        return method + _tokens_text(tokens)

    def checkpoint_name(self, value, align: int = 1) -> str:
        return self.fragment(value)  # appended to the pruned checkpoint's name: cfsp-0.3-align32-distil32k

    # ------------------------------------------------------------------ which combinations
    def applies(self, value, used: list) -> bool:
        return value is None or any(item.structural and not item.transforms for item, _ in used)

    def conflicts(self, value, other: Lever, other_value) -> bool:
        return value is not None and other.name == "depth" and other_value is not None

    def check_runtime(self, value, runtime_class, runtime: str) -> None:
        import importlib.util

        if value is not None and importlib.util.find_spec("peft") is None:
            raise OptionError("recover", f"{value}: recovery needs peft: pip install 'effideploy[recover]'")

    def check_model(self, value, runtime: str, config_dict: dict) -> None:
        from effideploy.errors import EffideployError
        from effideploy.models.resolve import check_seqlen

        if value is None:
            return
        try:
            check_seqlen(config_dict, SEQLEN, "its training window")
        except EffideployError as exc:
            raise OptionError("recover", f"{value}: {exc}") from None

    @staticmethod
    def check_space(space) -> None:
        """Refuse recovery values that no recipe of ``space`` can use (no pruning lever value to train on)."""
        recovery = next((item for item in space.levers if isinstance(item, Recovery)), None)
        asked = [v for v in (recovery.values if recovery else ()) if v is not None]
        if asked and not any(r.get("recovery") is not None for r in space.recipes()):
            raise OptionError("recover", f"{asked[0]}: recovery trains a pruned checkpoint; give an FFN sparsity "
                                         "above 0 (--sparsities) to recover (depth checkpoints are not recovered)")

    # ------------------------------------------------------------------ the checkpoint
    def recovery_config(self, value, teacher: str, data_dir: str | None):
        """The ``RecoveryConfig`` of ``value``: every other field at the default ``effideploy recover`` has, so
        ``rebuild_argv`` rebuilds the same checkpoint."""
        from effideploy.recovery import RecoveryConfig

        method, tokens = self.parse(value)
        distil = {"teacher": teacher, "distill_weight": DISTILL_WEIGHT} if method == "distil" else {}
        return RecoveryConfig(steps=tokens // TOKENS_PER_STEP, batch_size=BATCH_SIZE, seqlen=SEQLEN,
                              data="wikitext2", data_dir=data_dir, **distil)

    def transform(self, value, pruned, folder, *, dense, data_dir, overwrite: bool) -> None:
        from effideploy import progress
        from effideploy.bench.artifacts import content_fingerprint
        from effideploy.checkpoint.writer import read_provenance
        from effideploy.cli.recover import run_with_warnings
        from effideploy.recovery import recover_checkpoint

        config = self.recovery_config(value, str(dense.path), data_dir)
        # Reused by content: the same pruned weights, the same teacher weights and the same options.
        label = f"{pruned} (content {content_fingerprint(Path(pruned))})" + (
            f", teacher content {content_fingerprint(Path(dense.path))}" if config.teacher else "")
        wanted = {k: v for k, v in config.to_dict().items() if k != "compute_dtype"}  # resolved when training
        record = (read_provenance(folder) or {}).get("recovery") if Path(folder).is_dir() else None
        if record and not overwrite and record.get("input") == label and \
                {k: v for k, v in record.get("config", {}).items() if k != "compute_dtype"} == wanted:
            progress.console.print(f"reusing {folder} (same pruned checkpoint, teacher and recovery options)",
                                   highlight=False)
            return
        method = "distil" if config.teacher else "lora"
        progress.console.print(f"recovering {Path(pruned).name} -> {Path(folder).name}: {method} on "
                               f"{config.steps} steps x {BATCH_SIZE} x {SEQLEN} tokens of WikiText-2 validation",
                               highlight=False)
        run_with_warnings(recover_checkpoint, Path(pruned), folder, config, overwrite=True, input_label=label)

    def rebuild_argv(self, value, pruned: str, output: str, config) -> list[str]:
        recovery = self.recovery_config(value, config.model, config.data_dir)
        argv = ["effideploy", "recover", pruned, "--steps", str(recovery.steps), "--batch-size",
                str(recovery.batch_size), "--seqlen", str(recovery.seqlen), "--data", recovery.data]
        if recovery.teacher is not None:
            argv += ["--teacher", recovery.teacher, "--distill-weight", f"{recovery.distill_weight:g}"]
        return argv + (["--data-dir", config.data_dir] if config.data_dir else []) + ["--output", output]

    def record_fields(self, value, checkpoint: str) -> dict:
        """The training this recipe cost, from its checkpoint's provenance (also when the checkpoint was reused)."""
        from effideploy.checkpoint.writer import read_provenance

        if value is None:
            return {}
        record = (read_provenance(checkpoint) or {}).get("recovery") or {}
        training = record.get("training") or {}
        teacher = training.get("teacher") or {}
        return {"recovery": {"value": value, "tokens": training.get("tokens"), "steps": training.get("steps"),
                             "seconds": training.get("seconds"), "rule": record.get("rule"),
                             "ranks": [b["rank"] for b in record.get("blocks", [])],
                             "teacher": teacher.get("model"), "distill_weight": teacher.get("distill_weight"),
                             "text": (training.get("data") or {}).get("path")}}
