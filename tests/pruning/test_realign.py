"""Tensor-parallel re-alignment of FFN widths: which widths are refused or rounded, which channels are kept, and
the config and provenance of the result (the vLLM export writes them; tests/exporters/test_vllm.py)."""

from __future__ import annotations

import pytest
import torch

from effideploy.checkpoint.config import pruned_config
from effideploy.errors import EffideployError
from effideploy.models.build import build_config, count_parameters, ffn_widths
from effideploy.pruning.realign import (
    changed_blocks,
    kept_channels,
    plan_widths,
    realign_block_tensors,
    realigned_config,
    realigned_provenance,
)
from tests.conftest import tiny_llama_config

WIDTHS = [256, 201, 97, 150]  # two widths not even, none a multiple of 7 (the tiny pruned checkpoint of test_vllm)


def tiny_config():
    return tiny_llama_config()  # 2 attention heads, 1 KV head


def test_widths_that_divide_pass_unchanged():
    assert plan_widths(tiny_config(), [256, 128, 64, 192], 2, 64) == [256, 128, 64, 192]


def test_refusal_names_only_the_blocks_that_do_not_divide():
    with pytest.raises(EffideployError, match=r"multiples of 2 for vLLM; blocks 1 \(201\), 2 \(97\) are not"):
        plan_widths(tiny_config(), WIDTHS, 2, 2)


def test_refusal_lists_every_offending_block_and_the_heads_on_one_line():
    with pytest.raises(EffideployError) as error:
        plan_widths(tiny_config(), WIDTHS, 7, 7)
    message = str(error.value)
    assert "\n" not in message
    offending = ", ".join(f"{i} ({w})" for i, w in enumerate(WIDTHS) if w % 7)
    assert f"blocks {offending} are not" in message and "--realign" in message
    assert "2 attention heads do not split over 7 ranks" in message
    with pytest.raises(EffideployError, match="2 attention heads do not split over 7 ranks"):  # realign cannot help
        plan_widths(tiny_config(), [7 * 30] * 4, 7, 7, realign=True)


def test_align_is_named_in_the_refusal():
    with pytest.raises(EffideployError, match=r"multiples of 64 \(tensor parallel size 2 x align 32\)"):
        plan_widths(tiny_config(), WIDTHS, 2, 64)


def test_realign_rounds_down_and_refuses_blocks_narrower_than_the_multiple():
    assert plan_widths(tiny_config(), WIDTHS, 2, 64, realign=True) == [256, 192, 64, 128]
    with pytest.raises(EffideployError, match=r"blocks 2 \(97\) have fewer than 128 FFN channels"):
        plan_widths(tiny_config(), WIDTHS, 2, 128, realign=True)


def test_changed_blocks_lists_only_the_widths_that_change():
    assert changed_blocks(WIDTHS, [256, 192, 64, 128]) == [
        {"index": 1, "before": 201, "after": 192}, {"index": 2, "before": 97, "after": 64},
        {"index": 3, "before": 150, "after": 128}]


def test_realigned_block_keeps_the_strongest_down_proj_columns():
    generator = torch.Generator().manual_seed(0)
    prefix = "model.layers.1.mlp."
    tensors = {prefix + "gate_proj.weight": torch.randn(201, 128, generator=generator),
               prefix + "up_proj.weight": torch.randn(201, 128, generator=generator),
               prefix + "down_proj.weight": torch.randn(128, 201, generator=generator),
               "model.layers.1.self_attn.q_proj.weight": torch.randn(128, 128, generator=generator)}
    out = realign_block_tensors(tensors, 1, 201, 192)
    assert sorted(out) == sorted(name for name in tensors if name.startswith(prefix))
    kept = tensors[prefix + "down_proj.weight"].norm(dim=0).topk(192).indices.sort().values
    assert torch.equal(kept_channels(tensors[prefix + "down_proj.weight"], 192), kept)
    torch.testing.assert_close(out[prefix + "down_proj.weight"], tensors[prefix + "down_proj.weight"][:, kept], rtol=0, atol=0)
    for name in ("gate_proj.weight", "up_proj.weight"):
        torch.testing.assert_close(out[prefix + name], tensors[prefix + name][kept], rtol=0, atol=0)


def test_realigned_config_and_provenance_describe_the_new_widths():
    config_dict = pruned_config(tiny_config(), WIDTHS, mlp_bias=False).to_dict()
    new_widths = [256, 192, 64, 128]
    new_config = realigned_config(config_dict, new_widths)
    assert ffn_widths(build_config(new_config)) == new_widths and new_config["intermediate_size"] == 256
    assert [b["ffn"]["intermediate_size"] for b in config_dict["block_configs"]] == WIDTHS  # input untouched

    before = count_parameters(build_config(config_dict))
    provenance = {"blocks": [{"index": i, "full_width": 256, "kept_width": w} for i, w in enumerate(WIDTHS)],
                  "sparsity": {"ffn_actual": 1 - sum(WIDTHS) / 1024},
                  "parameters": {"before": before, "after": before}}
    realigned = changed_blocks(WIDTHS, new_widths)
    record = realigned_provenance(provenance, new_config, realigned, 64)
    assert [b["kept_width"] for b in record["blocks"]] == new_widths
    assert record["sparsity"]["ffn_actual"] == pytest.approx(1 - sum(new_widths) / 1024)
    assert record["parameters"]["after"] == count_parameters(build_config(new_config))
    assert record["sparsity"]["parameters_removed"] == pytest.approx(
        1 - record["parameters"]["after"]["total"] / before["total"])
    assert record["export_realign"]["blocks"] == realigned and record["export_realign"]["multiple"] == 64
    assert [b["kept_width"] for b in provenance["blocks"]] == WIDTHS  # input untouched


def test_a_dense_config_realigns_to_one_width():
    config_dict = tiny_config().to_dict()
    assert realigned_config(config_dict, [192] * 4)["intermediate_size"] == 192
