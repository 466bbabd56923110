"""A short recovery of a pruned SmolLM2-135M: the training loss goes down and the output loads."""

import pytest
import torch

from effideploy.checkpoint.writer import read_provenance
from effideploy.data.text import resolve_text
from effideploy.models.build import ffn_widths, load_model
from effideploy.models.resolve import resolve_model
from effideploy.recovery import RecoveryConfig, recover_checkpoint
from effideploy.recovery.train import training_windows

pytestmark = pytest.mark.smollm2


def mean_loss(folder, windows):
    model = load_model(resolve_model(folder))
    with torch.no_grad():
        return sum(float(model(input_ids=batch, labels=batch).loss) for batch in windows.split(4)) / len(windows.split(4))


def test_short_recovery_of_pruned_smollm2(tmp_path, pruned_smollm2_4x128):
    pruned = pruned_smollm2_4x128[0]  # CFSP 50% from 4 x 128 calibration tokens (tests/conftest.py), read only
    config = RecoveryConfig(steps=6, batch_size=2, seqlen=64, lr=1e-3, warmup=0.0, mean_rank=8)
    windows = training_windows(resolve_model(pruned), resolve_text("wikitext2"), config)
    result = recover_checkpoint(pruned, tmp_path / "recovered", config)

    assert result.log.steps == 6 and result.log.stopped is None
    assert result.plan.rule == "importance" and len(set(result.plan.ranks)) > 1
    assert mean_loss(tmp_path / "recovered", windows) < mean_loss(pruned, windows) - 0.05
    recovered = load_model(resolve_model(tmp_path / "recovered"))
    assert ffn_widths(recovered.config) == ffn_widths(load_model(resolve_model(pruned)).config)
    assert read_provenance(tmp_path / "recovered")["recovery"]["training"]["tokens"] == 6 * 2 * 64
