"""What ``tune`` writes and what it refuses before writing (issue 20): reproduce.sh quoting, the output policy of
``tune --output``, the ``recommended`` link, feasibility refusals before any work, and Ctrl-C's message."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effideploy.cli import main
from effideploy.io import OUTPUT_MARKER
from effideploy.search.recommend import reproduce_argv, reproduce_commands, reproduce_script
from effideploy.search.search import RecipeRecord, SearchConfig
from effideploy.search.space import Recipe
from effideploy.search.workspace import LINK_NAME, LINK_RECORD, apply_link, guarded, open_workspace, plan_link
from tests.conftest import default_sigint
from tests.search.test_tune import HOSTILE, TINY, policy, run
from tests.test_safety import snapshot




# ------------------------------------------------------------------------------------------------ reproduce.sh

def stub_effideploy(folder: Path) -> tuple[Path, Path]:
    """A stand-in ``effideploy`` that appends its argv (JSON, one call a line) to a log file."""
    bin_dir, log = folder / "bin", folder / "calls.jsonl"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "effideploy"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


def run_script(script: Path, folder: Path) -> list[list[str]]:
    """Run ``script`` with the stub first on PATH, from an empty folder; the stub's recorded calls."""
    bin_dir, log = stub_effideploy(folder)
    cwd = folder / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_no_pwned(*roots: Path) -> None:
    for root in roots:
        assert not [p for p in Path(root).rglob("PWNED*")], f"a generated command ran a substitution under {root}"


@pytest.mark.parametrize("runtime, recipe", [
    ("onnx", Recipe(ffn_sparsity=0.25, quantize="int8", kv="snapkv:0.5")),  # prune + export with every option
    ("onnx", Recipe(kv="streamingllm:0.5")),  # the dense model with a KV budget: an export, not a comment
    ("torch", Recipe(kv="snapkv:0.5")),  # nothing to build on torch: the command that runs the recipe
])
def test_reproduce_sh_passes_every_path_as_one_literal_argument(tmp_path, runtime, recipe):
    model = tmp_path / HOSTILE
    data = tmp_path / "data $(touch PWNED)"
    config = SearchConfig(model=str(model), runtime=runtime, output=str(tmp_path / "out"), data_dir=str(data))
    record = RecipeRecord(recipe=recipe, checkpoint=str(tmp_path / "out" / "cfsp-0.25"), features=None)
    script = tmp_path / "reproduce.sh"
    script.write_text(reproduce_script(reproduce_commands(config, record)))
    calls = [["effideploy", *argv] for argv in run_script(script, tmp_path)]
    assert calls and calls == reproduce_argv(config, record)  # every command ran, each argument intact
    assert [a for call in calls for a in call].count(str(model)) == 1  # the model path: one argument, exactly
    if recipe.structural:
        assert calls[0][1:4] == ["prune", "--model", str(model)] and str(data) in calls[0]
    if runtime == "onnx":
        export = calls[-1]
        assert export[1] == "export" and export[export.index("--token-compression") + 1] == recipe["kv"]
        if recipe["kv"].startswith("snapkv"):
            assert "--attention-outputs" in export  # the export fact SnapKV needs on ONNX Runtime
    else:
        assert calls == [["effideploy", "bench", "--runtime", "torch", "--model", str(model),
                          "--token-compression", recipe["kv"]]]
    assert_no_pwned(tmp_path, Path.cwd())


# ------------------------------------------------------------------------------------------- the recommended link

def test_the_link_is_made_only_inside_the_output_and_only_replaces_its_own(tmp_path):
    out = open_workspace(tmp_path / "search")
    first, second = out / "exports" / "a", out / "exports" / "b"
    first.mkdir(parents=True), second.mkdir()
    plan = plan_link(out, first)
    assert plan["linked"] and plan["target"] == os.path.join("exports", "a")
    apply_link(out, plan)
    assert os.readlink(out / LINK_NAME) == os.path.join("exports", "a")
    apply_link(out, plan_link(out, second))  # effideploy's own link is replaced
    assert os.readlink(out / LINK_NAME) == os.path.join("exports", "b")
    # never at the input model (or anything outside the output)
    outside = plan_link(out, tmp_path / "model")
    assert not outside["linked"] and "not inside the output" in outside["reason"]
    apply_link(out, outside)
    assert not os.path.lexists(out / LINK_NAME)  # the stale recommendation is gone, nothing points outside
    # nothing recommended: effideploy's link is removed
    apply_link(out, plan_link(out, first))
    apply_link(out, plan_link(out, None))
    assert not os.path.lexists(out / LINK_NAME) and not (out / LINK_RECORD).exists()


@pytest.mark.parametrize("kind", ["file", "folder", "foreign link", "retargeted link"])
def test_a_users_recommended_entry_is_never_touched(tmp_path, kind):
    out = open_workspace(tmp_path / "search")
    artifact = out / "exports" / "a"
    artifact.mkdir(parents=True)
    link = out / LINK_NAME
    if kind == "file":
        link.write_text("my notes")
    elif kind == "folder":
        link.mkdir()
        (link / "mine.txt").write_text("mine")
    elif kind == "foreign link":
        os.symlink(tmp_path, link)
    else:  # effideploy made it, then the user pointed it elsewhere: no longer effideploy's
        apply_link(out, plan_link(out, artifact))
        link.unlink()
        os.symlink("../elsewhere", link)
    before = snapshot(tmp_path)
    for artifact_or_none in (artifact, None):
        plan = plan_link(out, artifact_or_none)
        assert not plan["linked"]
        apply_link(out, plan)
        assert snapshot(tmp_path) == before
    assert "effideploy did not make" in plan_link(out, artifact)["reason"]


# ----------------------------------------------------------------------------------- the output policy, up front

@pytest.mark.parametrize("where", ["the model", "around the model", "inside the model", "a foreign folder",
                                   "around the policy"])
def test_tune_output_obeys_the_output_policy_before_any_work(tmp_path, tiny_model_dir, capsys, where):
    import shutil

    model = tmp_path / "work" / "model"
    shutil.copytree(tiny_model_dir, model)
    easy = policy(tmp_path / "work", "easy", min_decode_speedup=0.01)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    output = {"the model": model, "around the model": tmp_path / "work", "inside the model": model / "search",
              "a foreign folder": tmp_path / "mine", "around the policy": tmp_path / "work"}[where]
    model_arg = model
    if where == "around the policy":  # the model elsewhere: only the policy lies inside the output
        model_arg = tiny_model_dir
    before = snapshot(tmp_path)
    code, captured = run(capsys, "tune", "--model", model_arg, "--policy", easy, "--output", output, *TINY)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert ("not written by effideploy" if where == "a foreign folder" else "overlaps the input") in lines[0]
    assert snapshot(tmp_path) == before


def test_a_search_folder_of_an_earlier_version_is_reused_and_still_held_to_the_policy(tmp_path):
    from effideploy.errors import EffideployError
    from effideploy.search.workspace import check_workspace

    legacy = tmp_path / "search"  # what tune wrote before the folder itself carried the marker
    (legacy / "report").mkdir(parents=True)
    (legacy / "report" / OUTPUT_MARKER).write_text("")
    (legacy / "report" / "search.json").write_text("{}")
    (legacy / "model").mkdir()
    assert check_workspace(legacy, [tmp_path / "elsewhere"]) == legacy.resolve()
    with pytest.raises(EffideployError, match="overlaps the input"):
        check_workspace(legacy, [legacy / "model"])
    assert open_workspace(legacy) == legacy.resolve() and (legacy / OUTPUT_MARKER).is_file()
    (tmp_path / "mine").mkdir()
    with pytest.raises(EffideployError, match="not written by effideploy"):
        check_workspace(tmp_path / "mine")


# ------------------------------------------------------------------------------ feasibility, before any work

@pytest.mark.parametrize("runtime, options, fragment", [
    ("llamacpp", ["--kv", "snapkv:0.5"], r"--kv snapkv:0.5 cannot run on the llamacpp runtime: .*not available on llama.cpp"),
    ("onnx", ["--kv", "none,kv-dtype:fp8"], r"--kv kv-dtype:fp8 cannot run on the onnx runtime: .*kv_cache_dtype"),
    ("onnx", ["--kv", "pyramidkv:0.5"], r"--kv pyramidkv:0.5 cannot run on the onnx runtime: .*per layer"),
    ("torch", ["--quantize", "none,int4"], r"--quantize int4: the torch runtime does not serve these weights"),
    ("torch", ["--ppl-seqlen", "100000"], r"--ppl-seqlen 100000 exceeds the model's max_position_embeddings"),
    ("torch", ["--prompt-tokens", "500", "--new-tokens", "100"], r"--prompt-tokens \+ --new-tokens 600 exceeds"),
    ("torch", ["--chat-prompts", "-1"], r"--chat-prompts must be 0 \(off\) or more, got -1"),
])
def test_an_infeasible_recipe_is_refused_in_one_line_before_any_work(tmp_path, tiny_model_dir, capsys, runtime,
                                                                     options, fragment):
    import re

    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    before = snapshot(tmp_path)
    tick = time.perf_counter()
    # the TINY options first: the ones under test come later and win
    code, captured = run(capsys, "tune", "--model", tiny_model_dir, "--policy", easy, "--output", tmp_path / "s",
                         *TINY, "--runtime", runtime, *options)
    seconds = time.perf_counter() - tick
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(fragment, lines[0]), lines[0]
    assert seconds < 20, f"refused only after {seconds:.0f} s"  # no calibration, no screen, no export
    assert snapshot(tmp_path) == before and not (tmp_path / "s").exists()


def test_the_default_weight_schemes_leave_out_what_the_runtime_cannot_serve():
    from effideploy.search.feasibility import servable_default
    from effideploy.search.space import WeightQuantization

    default = WeightQuantization().values
    assert servable_default(WeightQuantization(), "onnx") == (default, [])
    kept, left_out = servable_default(WeightQuantization(), "torch")  # torch reads checkpoints as they are: float weights only
    assert kept == (None,) and len(left_out) == 2 and all("torch runtime does not serve" in r for r in left_out)
    kept, left_out = servable_default(WeightQuantization(), "llamacpp")  # the generic names as llama.cpp's exporter names them
    assert kept == (None, "q8_0", "q4_k_m") and left_out == []


# -------------------------------------------------------------------------------------------------- Ctrl-C

def test_an_interrupt_before_any_result_leaves_nothing_and_says_so(tmp_path, capsys):
    target = tmp_path / "new" / "search"
    with pytest.raises(SystemExit) as exit_info, guarded(target):
        open_workspace(target)
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []  # the folder and the parent it created are gone


INTERRUPT_AT_THE_COST_MODEL = """
import pathlib, sys, time
import effideploy.bench.runner as runner

def blocked(config):  # the cost model's timing run: say so, then wait for Ctrl-C
    pathlib.Path(sys.argv[1]).write_text("cost model")
    time.sleep(300)

runner.run_bench = blocked
from effideploy.cli import main
main(sys.argv[2:])
"""


def test_ctrl_c_during_the_cost_model_says_what_stays_where(tmp_path, tiny_model_dir, tiny_task_dir):
    import signal

    easy = policy(tmp_path, "easy", min_decode_speedup=0.01)
    out, ready = tmp_path / "runs" / "search", tmp_path / "ready"
    args = [sys.executable, "-c", INTERRUPT_AT_THE_COST_MODEL, str(ready), "tune", "--model", str(tiny_model_dir),
            "--policy", str(easy), "--output", str(out), "--task", str(tiny_task_dir), *map(str, TINY)]
    env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), process.communicate(timeout=30)[1]
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert process.returncode == 130 and len(errors) == 1, err
    assert "nothing was written" not in errors[0]
    assert errors[0].startswith(f"error: interrupted before this run's report was written; {out.resolve()} keeps")
    kept = errors[0].split("for the next run to reuse: ", 1)[1].split(", ")
    # the message names exactly what is there: the finished checkpoints and the screen cache
    assert kept == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert {"cfsp-0.25", "cfsp-0.5", "screen.json"} <= set(kept) and "report" not in kept
    assert all((out / name / OUTPUT_MARKER).is_file() for name in ("cfsp-0.25", "cfsp-0.5"))
    # no scratch or staging folder left behind anywhere
    assert not [p for p in (tmp_path / "runs").rglob(".*") if p.name not in (OUTPUT_MARKER, LINK_RECORD)]
