"""The recovery lever: its values and labels, the combinations it applies to, its refusals before any work, and tune
with ``--recover distil:...`` on a tiny model: the recovered checkpoint beside the pruned one, its
provenance, its distillation KL to the dense model on held-out text below the pruned one's, its training cost in
search.json, its reuse by content, and the commands reproduce.sh runs to rebuild it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from effideploy.search.recovery_lever import Recovery
from effideploy.search.search import RecipeRecord, SearchConfig
from effideploy.search.space import Checkpoint, Depth, FfnSparsity, Recipe, SearchSpace, WeightQuantization
from tests.conftest import DATA, WIKI_TEST
from tests.search.test_tune import TINY, policy, run
from tests.test_safety import snapshot

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
# The PyTorch runtime: the recovered checkpoint is what the test is about, and ONNX exports would double its time.
SEARCH = ["--runtime", "torch", "--depth", "none", "--kv", "none", "--calib-samples", "4", "--calib-seqlen", "64",
          "--screen-windows", "2", "--screen-seqlen", "64", "--repeats", "1", "--ppl-windows", "1",
          "--ppl-seqlen", "64", "--prompt-tokens", "24", "--new-tokens", "4", "--mc-limit", "2", "--chat-prompts", "0",
          "--no-memory", "--threads", "1", "--data-dir", str(DATA)]


def test_values_labels_and_checkpoint_names():
    assert Recovery().normalise("Distil:32k") == "distil:32768" and Recovery().normalise(None) is None
    recipe = Recipe(ffn_sparsity=0.3, recovery="distil:32768", quantize="int8")
    assert recipe.label == "cfsp-0.3+distil32k+int8" and recipe.family == "pruning+quantization"
    assert Recipe(ffn_sparsity=0.3, recovery="lora:1000").label == "cfsp-0.3+lora1000"
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # search.json round trip
    checkpoint = Checkpoint(recipe.structure, 32)
    assert checkpoint.name == "cfsp-0.3-align32-distil32k" and checkpoint.pruned.name == "cfsp-0.3-align32"
    assert checkpoint.prune_config().sparsity == 0.3 and checkpoint.pruned.transforms == []
    assert [item.name for item, _ in checkpoint.transforms] == ["recovery"]
    config = Recovery().recovery_config("distil:32768", "teacher", None)
    assert (config.steps, config.tokens, config.teacher, config.distill_weight) == (64, 32768, "teacher", 1.0)
    assert config.data == "wikitext2" and Recovery().recovery_config("lora:1024", "t", None).teacher is None


def test_recovery_applies_only_on_top_of_ffn_pruning():
    space = SearchSpace((FfnSparsity(values=(0.0, 0.3)), Depth(values=(None, "drop-blocks:1")),
                         Recovery(values=(None, "distil:1024")), WeightQuantization(values=(None,))))
    labels = [r.label for r in space.recipes()]
    # no dense+distil (the dense model given the same training is a control, not a candidate), no depth+distil
    assert labels == ["drop-blocks-1", "cfsp-0.3", "cfsp-0.3+distil1k"]
    Recovery.check_space(space)
    with pytest.raises(Exception, match="recovery trains a pruned checkpoint"):
        Recovery.check_space(SearchSpace((FfnSparsity(values=(0.0,)), Recovery(values=(None, "distil:1024")),
                                          WeightQuantization(values=(None, "int8")))))


@pytest.mark.parametrize("args, fragment", [
    (["--recover", "distil"], "give METHOD:TOKENS"),
    (["--recover", "finetune:4096"], "give METHOD:TOKENS"),
    (["--recover", "distil:abc"], "a whole number of training tokens"),
    (["--recover", "distil:100"], "at least one step of 2 x 256 = 512 tokens"),
    (["--recover", "none,distil:4096", "--sparsities", "0"], "give an FFN sparsity above 0"),
])
def test_a_bad_recovery_is_refused_in_one_line_before_any_work(tmp_path, tiny_model_dir, capsys, args, fragment):
    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    before = snapshot(tmp_path)
    code, captured = run(capsys, "tune", "--model", tiny_model_dir, "--policy", easy, "--output", tmp_path / "s",
                         *TINY, *args)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --recover "), captured.err
    assert fragment in lines[0], lines[0]
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()


def test_reproduce_sh_prunes_then_recovers_with_the_same_options(tmp_path):
    from effideploy.search.recommend import REBUILT_CHECKPOINT, REBUILT_PRUNED, reproduce_commands, reproduce_script
    from tests.search.test_tune_outputs import run_script

    config = SearchConfig(model=str(tmp_path / "dense model"), runtime="onnx", output=str(tmp_path / "out"),
                          data_dir=str(DATA))
    record = RecipeRecord(recipe=Recipe(ffn_sparsity=0.25, recovery="distil:8192", quantize="int8"),
                          checkpoint=str(tmp_path / "out" / "x"), features=None)
    script = tmp_path / "reproduce.sh"
    script.write_text(reproduce_script(reproduce_commands(config, record)))
    prune, recover, export = run_script(script, tmp_path)
    assert prune[0] == "prune" and prune[prune.index("--output") + 1] == REBUILT_PRUNED
    assert prune[prune.index("--align") + 1] == "32"  # int8 on ONNX Runtime: MatMulNBits-friendly widths
    assert recover == ["recover", REBUILT_PRUNED, "--steps", "16", "--batch-size", "2", "--seqlen", "256", "--data",
                       "wikitext2", "--teacher", config.model, "--distill-weight", "1", "--data-dir", str(DATA),
                       "--output", REBUILT_CHECKPOINT]
    assert export[:2] == ["export", REBUILT_CHECKPOINT]


def held_out_kl(folder: Path, dense, windows) -> float:
    """Mean per-token KL(dense || model) on WikiText-2 test windows (no training text)."""
    import torch
    import torch.nn.functional as F

    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model

    model = load_model(resolve_model(str(folder))).eval()
    with torch.no_grad():
        p, q = dense(windows).logits.log_softmax(-1), model(windows).logits.log_softmax(-1)
    return float(F.kl_div(q.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean"))


@needs_peft
def test_tune_with_distillation_recovery(tmp_path, tiny_model_dir, tiny_task_dir, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from effideploy.checkpoint.writer import read_provenance
    from effideploy.data.text import TextSpec, load_text, sample_windows, tokenize_text
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.models.resolve import resolve_model
    from tests.search.test_tune_onnx import loose_policy, tune

    out = tmp_path / "search"
    code = tune("--model", tiny_model_dir, "--policy", loose_policy(tmp_path), "--output", out, "--task",
                tiny_task_dir, *SEARCH, "--sparsities", "0.5", "--quantize", "none", "--recover", "none,distil:16k",
                "--shortlist", "1")
    assert code == 0
    pruned, recovered = out / "cfsp-0.5", out / "cfsp-0.5-distil16k"
    assert pruned.is_dir() and recovered.is_dir()
    # the provenance: pruning kept, the recovery added (importance ranks, tokens, the dense teacher, the text)
    record = read_provenance(recovered)
    assert record["config"] == read_provenance(pruned)["config"]
    recovery, training = record["recovery"], record["recovery"]["training"]
    assert recovery["rule"] == "importance" and len(recovery["blocks"]) == 4
    assert len({b["rank"] for b in recovery["blocks"]}) > 1  # ranks follow the block importance
    assert training["tokens"] == 16384 and training["steps"] == 32
    assert training["teacher"]["path"] == str(Path(tiny_model_dir)) and training["teacher"]["distill_weight"] == 1.0
    assert training["data"]["path"].endswith("wiki.valid.raw")
    # merged weights that differ from the pruned ones, same tensors
    before = {k: v for f in sorted(pruned.glob("*.safetensors")) for k, v in load_file(f).items()}
    after = {k: v for f in sorted(recovered.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    # distillation lowered the KL to the dense model on held-out text (WikiText-2 test, never trained on)
    dense_source = resolve_model(str(tiny_model_dir))
    ids = tokenize_text(load_tokenizer(dense_source), load_text(TextSpec("test", str(WIKI_TEST), "test")))
    windows = sample_windows(ids[-20000:], 8, 128, seed=7)
    dense = load_model(dense_source).eval()
    assert held_out_kl(recovered, dense, windows) < 0.98 * held_out_kl(pruned, dense, windows)
    # search.json: the recipe with its training cost, the run's recovery seconds
    data = json.loads((out / "report" / "search.json").read_text())
    by_label = {r["label"]: r for r in data["recipes"]}
    assert set(by_label) == {"cfsp-0.5", "cfsp-0.5+distil16k"}
    entry = by_label["cfsp-0.5+distil16k"]
    assert entry["checkpoint"] == str(recovered) and entry["recipe"]["recovery"] == "distil:16384"
    assert entry["recovery"]["seconds"] == training["seconds"] > 0 and entry["recovery"]["tokens"] == 16384
    assert entry["recovery"]["teacher"] == str(Path(tiny_model_dir))
    assert data["seconds"]["recovery"] > 0 and "recovery" not in by_label["cfsp-0.5"]
    assert by_label["cfsp-0.5+distil16k"]["screen"]["kl"] < by_label["cfsp-0.5"]["screen"]["kl"]

    # reused by content: a second prune stage trains nothing and keeps the folder
    import effideploy.recovery as recovery_module
    from effideploy.data.text import resolve_text
    from effideploy.search.stages import prune_all

    monkeypatch.setattr(recovery_module, "recover_checkpoint", lambda *a, **k: pytest.fail("trained again"))
    config = SearchConfig(model=str(tiny_model_dir), output=str(out), calib_samples=4, calib_seqlen=64,
                          data_dir=str(DATA))
    checkpoint = Recipe(ffn_sparsity=0.5, recovery="distil:16384").checkpoint("torch")
    folders, _ = prune_all(config, dense_source, [checkpoint], resolve_text("wikitext2", "calibration", str(DATA)))
    assert folders[checkpoint] == recovered and read_provenance(recovered)["recovery"]["created"] == \
        recovery["created"]
