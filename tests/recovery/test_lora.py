"""Adapters on a tiny model pruned in memory: ranks as planned, training, merging, the non-finite-loss guard."""

import pytest
import torch

from effideploy.pruning import PruneConfig, prune_
from effideploy.recovery import RecoveryConfig
from effideploy.recovery import lora, train
from effideploy.recovery.config import LINEAR_TARGETS
from effideploy.recovery.lora import attach_lora, block_shapes, lora_ranks, merge_lora, plan_ranks, train_lora
from effideploy.recovery.ranks import rank_cost
from tests.conftest import tiny_llama

WINDOWS = torch.randint(3, 384, (24, 32), generator=torch.Generator().manual_seed(0))


def pruned_model():
    model = tiny_llama()
    plan = prune_(model, PruneConfig(sparsity=0.5, calib_samples=6, calib_seqlen=32), WINDOWS[:6])
    provenance = {"blocks": [{"importance": block.importance} for block in plan.blocks]}
    return model, plan, provenance


def config(**overrides):
    values = dict(steps=6, batch_size=2, seqlen=32, lr=1e-2, warmup=0.0, mean_rank=4)
    values.update(overrides)
    return RecoveryConfig(**values)


def mean_loss(model, windows):
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)


def test_adapters_have_the_planned_rank_per_block_and_cost():
    model, prune_plan, provenance = pruned_model()
    plan = plan_ranks(model, provenance, config())
    assert plan.rule == "importance" and plan.fallback is None
    assert plan.costs == [896 + 3 * (128 + width) for width in prune_plan.widths]  # q,k,v,o + gate,up,down
    assert len(set(plan.ranks)) > 1
    peft_model = attach_lora(model, plan.ranks, config())
    assert lora_ranks(peft_model) == [dict.fromkeys(LINEAR_TARGETS, rank) for rank in plan.ranks]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == plan.parameters <= plan.budget
    assert plan.budget == 4 * sum(plan.costs)


def test_importance_ranks_favour_the_blocks_with_larger_angular_distance():
    model, prune_plan, provenance = pruned_model()
    plan = plan_ranks(model, provenance, config())
    importance = [block.importance for block in prune_plan.blocks]
    assert plan.ranks[importance.index(max(importance))] == max(plan.ranks)
    assert plan.ranks[importance.index(min(importance))] == min(plan.ranks)
    uniform = plan_ranks(model, provenance, config(uniform=True))
    assert max(uniform.ranks) - min(uniform.ranks) <= 1 and uniform.rule == "uniform"
    assert uniform.budget == plan.budget


def test_a_few_steps_reduce_the_loss_and_merging_keeps_the_outputs():
    model, _, provenance = pruned_model()
    cfg = config(steps=8)
    windows = WINDOWS[: cfg.windows]
    before = mean_loss(model, windows)
    peft_model = attach_lora(model, plan_ranks(model, provenance, cfg).ranks, cfg)
    log = train_lora(peft_model, windows, cfg)
    assert log.steps == 8 and len(log.loss) == 8 and log.stopped is None
    after = mean_loss(peft_model, windows)
    assert after < before - 0.05
    b_weights = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert all(p.abs().max() > 0 for p in b_weights)  # the adapters really changed the model
    with torch.no_grad():
        unmerged = peft_model(input_ids=WINDOWS[-4:]).logits
        merged_model = merge_lora(peft_model)
        merged = merged_model(input_ids=WINDOWS[-4:]).logits
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_distillation_pulls_the_student_towards_the_teacher():
    teacher = tiny_llama()
    model, _, provenance = pruned_model()
    cfg = config(steps=8, distill_weight=1.0)
    windows = WINDOWS[: cfg.windows]

    def kl_to_teacher(student):
        with torch.no_grad():
            return float(train.training_loss(student, windows, teacher, cfg)[0])

    before = kl_to_teacher(model)
    peft_model = attach_lora(model, plan_ranks(model, provenance, cfg).ranks, cfg)
    log = train_lora(peft_model, windows, cfg, teacher=teacher)
    assert log.steps == 8
    assert kl_to_teacher(peft_model) < before
    assert all(not p.requires_grad for p in teacher.parameters())


def test_non_finite_loss_stops_and_keeps_the_adapters_of_the_last_finite_loss(monkeypatch):
    model, _, provenance = pruned_model()
    cfg = config(steps=8)
    peft_model = attach_lora(model, plan_ranks(model, provenance, cfg).ranks, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    seen = []
    real_loss = train.training_loss

    def loss_that_breaks_at_step_4(*args):
        seen.append([p.detach().clone() for p in params])
        loss, cross_entropy = real_loss(*args)
        return (loss * float("nan"), cross_entropy) if len(seen) == 4 else (loss, cross_entropy)

    monkeypatch.setattr(train, "training_loss", loss_that_breaks_at_step_4)
    log = train_lora(peft_model, WINDOWS[: cfg.windows], cfg)
    assert log.stopped == "non-finite loss at step 4"
    assert len(log.loss) == 3 and log.steps == 2  # the adapters of step 3 contain 2 updates
    for param, good, bad in zip(params, seen[2], seen[3]):
        assert torch.equal(param, good)
    assert any(not torch.equal(good, bad) for good, bad in zip(seen[2], seen[3]))


def test_block_shapes_read_the_pruned_widths():
    model, prune_plan, _ = pruned_model()
    shapes = block_shapes(model, ("gate_proj", "down_proj"))
    assert shapes == [{"gate_proj": (128, w), "down_proj": (w, 128)} for w in prune_plan.widths]
    assert [rank_cost(s) for s in shapes] == [2 * (128 + w) for w in prune_plan.widths]


@pytest.mark.parametrize("provenance", [None, {"method": "mag-sp", "blocks": [{"importance": None}] * 4},
                                        {"blocks": [{"importance": 0.1}] * 3}])
def test_without_usable_importance_ranks_are_uniform_with_a_warning(provenance):
    model, _, _ = pruned_model()
    with pytest.warns(lora.RecoveryWarning, match="using uniform LoRA ranks"):
        plan = plan_ranks(model, provenance, config())
    assert plan.rule == "uniform" and "uniform" in plan.fallback
    assert max(plan.ranks) - min(plan.ranks) <= 1


def test_rank_patterns_tell_block_1_from_block_11():
    model = tiny_llama(num_hidden_layers=12)
    ranks = list(range(1, 13))
    peft_model = attach_lora(model, ranks, config())
    assert [set(block.values()) for block in lora_ranks(peft_model)] == [{rank} for rank in ranks]
