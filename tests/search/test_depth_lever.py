"""The open recipe and the depth lever: a recipe is {lever: value} and round-trips through search.json; structural
levers exclude each other; the depth lever's checkpoint is the one ``effideploy prune --method drop-attention`` writes,
from the calibration pass every structural variant shares; tune with the depth lever end to end on ONNX Runtime;
bad ``--depth`` values refused in one line before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from effideploy.cli import main
from effideploy.search.cost import Features
from effideploy.search.search import RecipeRecord
from effideploy.search.space import Checkpoint, Depth, FfnSparsity, KvBudget, Recipe, SearchSpace, WeightQuantization
from tests.conftest import DATA
from tests.search.test_tune import policy, run
from tests.test_safety import snapshot

CALIB = ["--calib-samples", "4", "--calib-seqlen", "64", "--data-dir", str(DATA)]


def test_a_recipe_round_trips_through_search_json():
    for recipe in (Recipe(), Recipe(ffn_sparsity=0.25, quantize="int8", kv="snapkv:0.5"),
                   Recipe(depth="drop-attention:0.05", quantize="int4"), Recipe(depth="Drop-Blocks:2")):
        record = RecipeRecord(recipe=recipe, checkpoint=".", features=Features(1.0, 0.0, 0.0, 1.0))
        written = json.loads(json.dumps(record.to_dict()))
        assert set(written["recipe"]) == {"ffn_sparsity", "depth", "recovery", "quantize", "kv"}  # every lever
        back = Recipe.from_dict(written["recipe"])
        assert back == recipe and hash(back) == hash(recipe) and written["label"] == back.label
    assert Recipe(depth="drop-blocks:2").label == "drop-blocks-2" and Recipe(depth="drop-blocks:2.0") == Recipe(
        depth="drop-blocks:2")
    assert Recipe(ffn_sparsity=0, kv=None) == Recipe() and Recipe().label == "dense"


def test_structural_levers_exclude_each_other_and_attention_removal_excludes_a_kv_budget():
    space = SearchSpace((FfnSparsity(values=(0.0, 0.2)), Depth(values=(None, "drop-attention:1", "drop-blocks:1")),
                         WeightQuantization(values=(None,)), KvBudget(values=(None, "snapkv:0.5"))))
    labels = [r.label for r in space.recipes()]
    assert labels == ["dense+snapkv:0.5", "drop-attention-1", "drop-blocks-1", "drop-blocks-1+snapkv:0.5",
                      "cfsp-0.2", "cfsp-0.2+snapkv:0.5"]
    assert {r.family for r in space.recipes() if r.structural} == {"pruning", "pruning+kv"}


def test_the_depth_lever_checkpoint_is_what_prune_drop_attention_writes(tmp_path, tiny_model_dir, monkeypatch):
    """One calibration pass serves a CFSP and a depth checkpoint; the depth one has the structure (and the tensors)
    of a direct ``effideploy prune --method drop-attention --count 1``."""
    import effideploy.pruning as pruning
    from effideploy.checkpoint.writer import read_provenance
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.search.search import SearchConfig
    from effideploy.search.stages import prune_all
    from safetensors.torch import load_file

    passes = []
    calibrate = pruning.calibrate_source
    monkeypatch.setattr(pruning, "calibrate_source", lambda *a, **k: passes.append(k) or calibrate(*a, **k))
    config = SearchConfig(model=str(tiny_model_dir), output=str(tmp_path / "search"), calib_samples=4,
                          calib_seqlen=64, data_dir=str(DATA))
    structures = [Checkpoint(Recipe()), Checkpoint(Recipe(ffn_sparsity=0.25), 32),
                  Checkpoint(Recipe(depth="drop-attention:1"))]
    folders, _ = prune_all(config, resolve_model(str(tiny_model_dir)), structures,
                           resolve_text("wikitext2", "calibration", str(DATA)))
    assert len(passes) == 1 and passes[0]["gram"] is True  # CFSP's lstsq needs the second moments
    lever_folder = folders[Checkpoint(Recipe(depth="drop-attention:1"))]
    assert lever_folder.name == "drop-attention-1" and folders[Checkpoint(Recipe())] == resolve_model(str(tiny_model_dir)).path
    # a width multiple is part of the checkpoint: its folder says so and every kept FFN width is a multiple of it
    aligned = folders[Checkpoint(Recipe(ffn_sparsity=0.25), 32)]
    blocks = json.loads((aligned / "config.json").read_text())["block_configs"]
    widths = [block["ffn"]["intermediate_size"] for block in blocks]
    assert aligned.name == "cfsp-0.25-align32" and widths and all(w % 32 == 0 for w in widths)

    direct = tmp_path / "direct"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", str(tiny_model_dir), "--method", "drop-attention", "--count", "1", *CALIB,
              "--output", str(direct)])
    assert exit_info.value.code in (0, None)
    ours, theirs = read_provenance(lever_folder), read_provenance(direct)
    assert ours["structure"] == theirs["structure"] and ours["structure"]["no_op_attention"]  # one attention gone
    assert json.loads((lever_folder / "config.json").read_text())["block_configs"] == \
        json.loads((direct / "config.json").read_text())["block_configs"]
    mine = {k: v for f in sorted(lever_folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    other = {k: v for f in sorted(direct.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert mine.keys() == other.keys() and all((mine[k] == other[k]).all() for k in mine)


@pytest.mark.onnx
@pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxruntime", "onnxscript")),
                    reason="needs onnx, onnxruntime and onnxscript")
def test_tune_with_the_depth_lever_on_onnx_runtime(tmp_path, tiny_model_dir, tiny_task_dir):
    from tests.search.test_tune_onnx import SMALL, loose_policy, tune
    from tests.search.test_tune_outputs import run_script

    out = tmp_path / "search"
    code = tune("--model", tiny_model_dir, "--policy", loose_policy(tmp_path), "--output", out, "--task",
                tiny_task_dir, *SMALL, "--sparsities", "0", "--depth", "none,drop-attention:1", "--quantize", "none",
                "--shortlist", "1", "--ppl-windows", "1", "--mc-limit", "2")
    assert code == 0
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["schema_version"] == 2
    (record,) = data["recipes"]
    assert record["label"] == "drop-attention-1" and record["family"] == "pruning"
    assert Recipe.from_dict(record["recipe"]) == Recipe(depth="drop-attention:1")
    # the cost model read the checkpoint's structure: fewer KV layers, fewer attention FLOPs than dense
    config = json.loads((Path(record["checkpoint"]) / "config.json").read_text())
    assert sum(b["attention"].get("no_op", False) for b in config["block_configs"]) == 1
    from effideploy.models.resolve import read_config_dict
    from effideploy.quantization.schemes import fitted_scheme
    from effideploy.search.cost import recipe_features

    def features(config_dict):  # --prompt-tokens 24 --new-tokens 4, float32 weights as ONNX Runtime stores them
        return recipe_features(Recipe(), config_dict, 24, 4, fitted_scheme("onnx", None, config_dict))

    dense = features(read_config_dict(Path(tiny_model_dir)))
    assert record["features"]["decode_bytes"] == pytest.approx(features(config).decode_bytes)
    one_attention = (2 * 128 * 128 + 2 * 128 * 64) * 4  # q, o [128, 128] and k, v [64, 128] in float32
    one_kv_layer = 2 * 1 * 64 * 4 * (24 + 4 / 2)  # keys and values of 1 KV head of 64 over the prompt and half the new
    assert dense.decode_bytes - record["features"]["decode_bytes"] == pytest.approx(one_attention + one_kv_layer)
    assert record["features"]["prefill_flops_float"] < dense.prefill_flops_float
    assert data["cost_model"]["fitted_on"] == ["dense", "drop-attention-1"]
    assert record["stage"] == "benched" and record["measured"]["decode_speedup"] > 0
    assert data["recommended"] == "drop-attention-1"
    calls = run_script(out / "report" / "reproduce.sh", tmp_path / "script")
    assert calls[0][:1] == ["prune"] and calls[0][calls[0].index("--method") + 1] == "drop-attention"
    assert calls[0][calls[0].index("--count") + 1] == "1" and calls[1][0] == "export"


@pytest.mark.parametrize("value, fragment", [
    ("drop-foo:0.1", "give METHOD:AMOUNT"),
    ("drop-attention:abc", "the amount must be a number"),
    ("cfsp-joint:3", "a fraction of the parameters in (0, 1)"),
    ("drop-attention:9", "9 is more than the 3 sublayers"),
    ("drop-attention:0.9", "drop-attention can remove at most"),  # the tiny model's attentions are ~30% of it
])
def test_a_bad_depth_is_refused_in_one_line_before_any_work(tmp_path, tiny_model_dir, capsys, value, fragment):
    from tests.search.test_tune import TINY

    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    before = snapshot(tmp_path)
    code, captured = run(capsys, "tune", "--model", tiny_model_dir, "--policy", easy, "--output", tmp_path / "s",
                         *TINY, "--sparsities", "0", "--kv", "none", "--depth", f"none,{value}")
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --depth "), captured.err
    assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()
