"""The recipe search end to end on a tiny model (PyTorch runtime: no export), and its parts on hand-made inputs."""

import json
import os
import shutil
from pathlib import Path

import pytest

from effideploy.cli import main
from tests.conftest import DATA

TINY = ["--runtime", "torch", "--sparsities", "0,0.25,0.5", "--depth", "none", "--quantize", "none", "--kv", "none,snapkv:0.5",
        "--calib-samples", "4", "--calib-seqlen", "64", "--screen-windows", "2", "--screen-seqlen", "64",
        "--shortlist", "2", "--repeats", "2", "--ppl-windows", "2", "--ppl-seqlen", "64", "--prompt-tokens", "24",
        "--new-tokens", "4", "--mc-limit", "5", "--no-memory", "--threads", "1", "--data-dir", str(DATA)]


# A model folder named to break an unquoted shell command, or to run one: reproduce.sh must pass it as one argument.
HOSTILE = "tiny model $(touch PWNED) `touch PWNED` 'q\" ; touch PWNED"


def policy(tmp_path, name, **thresholds):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\n[thresholds]\n' + "".join(f"{k} = {v}\n" for k, v in thresholds.items()))
    return path


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr()


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model_dir, tiny_task_dir):
    """One search under an easy policy, of a model in a hostile-named folder; the later tests reuse its checkpoints
    and screen."""
    tmp = tmp_path_factory.mktemp("tune")
    model = Path(shutil.copytree(tiny_model_dir, tmp / HOSTILE))
    easy = policy(tmp, "easy", max_perplexity_increase=100.0, min_decode_speedup=0.01, max_kl_divergence=50.0)
    out = tmp / "search"
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--model", str(model), "--policy", str(easy), "--output", str(out),
              "--task", str(tiny_task_dir), *TINY])
    return exit_info.value.code, out, model, easy


def test_search_recommends_a_recipe_that_passes_an_easy_policy(searched):
    code, out, _, _ = searched
    assert code == 0
    data = json.loads((out / "report" / "search.json").read_text())
    labels = {r["label"] for r in data["recipes"]}
    assert labels == {"cfsp-0.25", "cfsp-0.5", "dense+snapkv:0.5", "cfsp-0.25+snapkv:0.5", "cfsp-0.5+snapkv:0.5"}
    recommended = next(r for r in data["recipes"] if r["label"] == data["recommended"])
    assert recommended["stage"] == "benched" and recommended["failed"] == []
    benched = [r for r in data["recipes"] if r["failed"] == []]
    # the fastest benched recipe that passes
    assert recommended["measured"]["decode_speedup"] == max(r["measured"]["decode_speedup"] for r in benched)
    # every recipe was screened: KL and top-k where the full distributions are scored, not under KV compression
    measured_fidelity = 0
    for record in data["recipes"]:
        screen = record["screen"]
        assert screen["perplexity"] > 0 and 0 <= screen["top1_agreement"] <= 1
        assert (screen["kl"] is None) == (record["recipe"]["kv"] is not None)
        if screen["kl"] is not None:
            assert screen["kl"] >= 0 and 0 <= screen["top_k_agreement"] <= 1
        assert record["predicted"]["decode_speedup"] > 0
        if record["stage"] == "benched" and record["recipe"]["kv"] is None:  # measured on the artifact; screen kept
            measured = record["measured"]
            assert measured["kl_divergence"] >= 0 and "runtime artifact" in measured["fidelity_source"]
            assert measured["kl_divergence_predicted"] == screen["kl"]
            assert measured["top_k_agreement_predicted"] == screen["top_k_agreement"]
            measured_fidelity += 1
    assert measured_fidelity
    # the cost model's predictions are set beside the measurements of every timed recipe
    assert data["cost_check"] and all(c["decode_measured"] > 0 and c["decode_predicted"] > 0 for c in data["cost_check"])
    report = (out / "report" / "report.md").read_text()
    assert report.splitlines()[2].startswith(f"**Verdict: ship `{data['recommended']}`**")
    assert "## Cost model" in report and "decode predicted" in report
    assert (out / "report" / "bench" / "report.json").is_file()
    assert (out / "screen.json").is_file() and (out / ".effideploy-output").is_file()
    # the link is inside the output, effideploy's, and points at the artifact, which lies inside the output too
    # (on torch a dense recipe's artifact is the input model itself: then nothing is linked, and the report says so)
    artifact = Path(data["artifact"]).resolve()
    inside = out.resolve() in artifact.parents
    assert data["link"]["linked"] == inside and (out / "recommended").is_symlink() == inside
    if inside:
        assert (out / "recommended").resolve() == artifact
        assert f"linked as `{out.resolve() / 'recommended'}`" in report
    else:
        assert "not linked: the artifact" in report


def test_reproduce_sh_passes_the_hostile_model_path_as_one_argument(searched, tmp_path):
    from tests.search.test_tune_outputs import assert_no_pwned, run_script

    _, out, model, _ = searched
    calls = run_script(out / "report" / "reproduce.sh", tmp_path)
    assert calls and all(call[0] in ("prune", "export", "bench") for call in calls)
    assert [call[call.index("--model") + 1] for call in calls if "--model" in call][:1] == [str(model)]
    assert_no_pwned(tmp_path, model.parent, Path.cwd())


def test_an_impossible_policy_exits_1_naming_the_binding_threshold(searched, tmp_path, tiny_task_dir, capsys):
    _, out, model, _ = searched
    impossible = policy(tmp_path, "impossible", max_perplexity_increase=100.0, min_decode_speedup=100.0)
    code, captured = run(capsys, "tune", "--model", model, "--policy", impossible, "--output", out,
                         "--task", tiny_task_dir, *TINY)
    assert code == 1
    said = " ".join(captured.err.split())  # progress and verdict go to stderr (rich wraps lines)
    assert "no recipe passes policy `impossible`" in said and "Binding threshold(s): min_decode_speedup" in said
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["recommended"] is None and data["binding"]["thresholds"] == ["min_decode_speedup"]
    assert not os.path.lexists(out / "recommended")  # effideploy's stale link is gone with the recommendation
    assert "reusing" in said  # the second run reused the checkpoints


def test_a_users_folder_named_recommended_is_left_alone_and_the_report_says_so(searched, tiny_task_dir, capsys):
    from tests.search.test_tune_outputs import snapshot

    _, out, model, easy = searched
    mine = out / "recommended"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    code, _ = run(capsys, "tune", "--model", model, "--policy", easy, "--output", out, "--task", tiny_task_dir, *TINY)
    assert code == 0 and snapshot(mine) == before
    data = json.loads((out / "report" / "search.json").read_text())
    assert data["link"]["linked"] is False and "is a folder effideploy did not make" in data["link"]["reason"]
    report = " ".join((out / "report" / "report.md").read_text().split())
    assert "not linked: " in report and "linked as" not in report
    shutil.rmtree(mine)


def test_a_quantization_the_runtime_cannot_serve_is_one_line(tmp_path, tiny_model_dir, capsys):
    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    code, captured = run(capsys, "tune", "--model", tiny_model_dir, "--policy", easy, "--output", tmp_path / "s",
                         "--runtime", "torch", "--quantize", "none,int8")
    assert code == 2 and captured.err.startswith("error:") and "int8" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_lm_eval_task_without_lm_eval_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    code, captured = run(capsys, "tune", "--model", tiny_model_dir, "--policy", easy, "--output", tmp_path / "s",
                         "--lm-eval-task", "hellaswag", *TINY)
    assert code == 2 and "lm-evaluation-harness" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def tune_with_one_failing_export(searched, tiny_task_dir, capsys, monkeypatch, final_bench: bool):
    """Rerun the search with the first recipe exported for the final bench (``final_bench``) or for the cost
    model's timing run (no perplexity windows) failing its parity check; returns (captured, search.json, label)."""
    from effideploy.bench import artifacts
    from effideploy.errors import ParityError

    _, out, model, easy = searched
    real, dropped = artifacts.prepare_model, []

    def failing(config, runtime_class, label, *args, **kwargs):
        if bool(config.ppl_windows) == final_bench and label != "dense" and (not dropped or label == dropped[0]):
            dropped[:1] = [label]
            raise ParityError(f"test parity failed for {label}; the export was not kept")
        return real(config, runtime_class, label, *args, **kwargs)

    monkeypatch.setattr(artifacts, "prepare_model", failing)
    code, captured = run(capsys, "tune", "--model", model, "--policy", easy, "--output", out,
                         "--task", tiny_task_dir, *TINY)
    assert code == 0, captured.err
    data = json.loads((out / "report" / "search.json").read_text())
    first = dropped[0]
    record = next(r for r in data["recipes"] if r["label"] == first)
    assert record["stage"] == "export failed" and "test parity failed" in record["export_error"]
    assert data["recommended"] not in (None, first)
    assert first not in [r["label"] for r in data["recipes"] if r["stage"] == "benched"]
    return captured, data, first


def test_a_cost_model_recipe_whose_export_fails_parity_is_dropped_and_the_model_fitted_without_it(
        searched, tiny_task_dir, capsys, monkeypatch):
    """The cost model's timing run exports its recipes too; one failing parity there stopped the search. It is
    dropped from the fit (the next recipe of its kind timed instead) and from the shortlist, and the search ends
    with a verdict."""
    captured, data, first = tune_with_one_failing_export(searched, tiny_task_dir, capsys, monkeypatch, False)
    # the most pruned float recipe was its only other point; the next most pruned one took its place
    assert first == "cfsp-0.5" and data["cost_model"]["fitted_on"] == ["dense", "cfsp-0.25"]
    assert f"{first}: its export failed its parity check, dropped from the cost model" in " ".join(captured.err.split())


def test_a_recipe_whose_export_fails_parity_is_dropped_and_the_next_benched(searched, tiny_task_dir, capsys,
                                                                             monkeypatch):
    """One shortlisted export failing its parity check (ONNX int4 of a pruned model did, under `--policy loose`)
    once stopped the whole search with exit 2 after every stage; the recipe is recorded and the search goes on."""
    captured, data, first = tune_with_one_failing_export(searched, tiny_task_dir, capsys, monkeypatch, True)
    record = next(r for r in data["recipes"] if r["label"] == first)
    assert record["failed"] is None  # no final-bench verdict
    benched = [r["label"] for r in data["recipes"] if r["stage"] == "benched"]
    assert len(benched) >= 2  # the next recipe took its place
    assert f"{first}: its export failed its parity check, dropped from the shortlist" in " ".join(captured.err.split())
    out = searched[1]
    assert f"`{first}`" in (out / "report" / "report.md").read_text().split("export failed its parity check")[0]
