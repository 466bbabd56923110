"""``effideploy bench`` and ``effideploy run`` through the real command line on tiny models: report files, a model
against itself (OL = OP = 1), and the policy gate's exit codes (0 pass, 1 fail, 2 error)."""

import json

import pytest

from effideploy.errors import EffideployError
from tests.bench.conftest import TINY_BENCH_ARGS
from tests.conftest import DATA
from tests.test_cli import assert_one_line_error, run_cli


def write_policy(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def self_bench(tmp_path_factory, tiny_model_dir, tiny_pruned_dir, tiny_task_dir):
    """dense vs (itself, its pruned copy) with memory, gated by a policy that only the self-candidate can pass."""
    folder = tmp_path_factory.mktemp("bench")
    policy = write_policy(folder / "gate.toml", 'require = "any"\n[thresholds]\nmin_loyalty = 1.0\nmin_op = 0.999\n'
                                                "max_perplexity_increase = 0.0\nmax_peak_memory_mb = 100000\n")
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--candidate", tiny_pruned_dir,
                             "--task", tiny_task_dir, "--output", folder / "report", "--policy", policy, *TINY_BENCH_ARGS)
    return code, out + err, folder / "report"


def test_bench_writes_the_report_folder(self_bench):
    code, log, report = self_bench
    assert code == 0, log
    assert sorted(p.name for p in report.iterdir()) == [".effideploy-output", "latency.png", "pareto.png", "report.json", "report.md", "speedup.png", "throughput.png"]
    for name in ("pareto.png", "latency.png", "speedup.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((report / "report.json").read_text())
    assert payload["schema_version"] == 1
    assert [m["label"] for m in payload["models"]] == ["dense", payload["models"][1]["label"], "cfsp-0.5"]
    for model in payload["models"]:
        latency = model["latency"]
        assert len(latency["ttft_s"]) == 2 * 2 and len(latency["tpot_s"]) == 2 * 2 * 3  # repeats x prompts (x steps)
        assert set(model["throughput"]) == {"1", "2"}
        assert model["memory"]["peak_rss_mb"] >= model["memory"]["baseline_rss_mb"] > 0
        assert model["tasks"]["toy"]["n"] == 5 and len(model["perplexity"]["window_mean_nll"]) == 2
    assert payload["environment"]["versions"]["torch"] and payload["runtime"]["runtime"] == "torch"
    assert {"memory", "latency", "throughput", "perplexity", "multiple choice"} <= set(payload["phase_seconds"])
    text = (report / "report.md").read_text()
    for heading in ("## Verdict", "## Latency", "## Throughput", "## Measured against ideal", "## Memory and size",
                    "## Accuracy", "## EffiVLM-Bench metrics", "## Pareto front", "## Policy"):
        assert heading in text
    assert "decode FLOPs removed" in text and "weight bytes/token removed" in text  # the ideal beside the measured
    assert "## Candidate against dense on the same items" in text and " (5) |" in text  # acc ± SE (items)
    assert all(c["task_accuracy"]["toy"]["n"] == 5 for c in payload["comparisons"])


def test_a_model_against_itself_has_loyalty_and_op_one(self_bench):
    _, _, report = self_bench
    same, pruned = json.loads((report / "report.json").read_text())["comparisons"]
    assert same["loyalty"] == 1.0 and same["op"] == pytest.approx(1.0) and same["og"] == pytest.approx(0.0)
    assert same["perplexity_increase"] == pytest.approx(0.0, abs=1e-9) and same["generation_match"] == 1.0
    assert same["size_reduction"] == 0.0
    toy = same["task_accuracy"]["toy"]  # the same answers on the same items: no difference, within noise
    assert toy["drop"] == 0.0 and toy["dense_only"] == toy["candidate_only"] == 0 and toy["within_noise"] is True
    assert same["loyalty_stderr"] == 0.0 and same["loyalty_units"] == {"tokens": 2, "choices": 5}
    assert pruned["size_reduction"] > 0 and pruned["ideal"]["decode_speedup_flops"] > 1
    assert pruned["loyalty"] < 1.0


def test_policy_pass_is_exit_0_and_recorded(self_bench):
    code, log, report = self_bench
    policy = json.loads((report / "report.json").read_text())["policy"]
    assert code == 0 and policy["passed"] is True and policy["require"] == "any"
    assert list(policy["candidates"].values()) == [True, False]  # the pruned copy is not identical to dense
    assert "policy passed" in log


def test_policy_fail_is_exit_1_and_the_report_is_still_written(tmp_path, tiny_model_dir):
    policy = write_policy(tmp_path / "strict.toml", "[thresholds]\nmin_decode_speedup = 1000\n")
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--output", tmp_path / "r",
                             "--policy", policy, "--no-memory", "--mc-limit", "0", *TINY_BENCH_ARGS)
    assert code == 1, out + err
    assert "policy failed" in out + err
    payload = json.loads((tmp_path / "r" / "report.json").read_text())
    assert payload["policy"]["passed"] is False and payload["policy"]["checks"][0]["passed"] is False


@pytest.mark.parametrize("policy_text, fragment", [
    ("[thresholds]\nmin_speed = 2\n", "unknown threshold 'min_speed'"),
    ("[thresholds\n", "not valid TOML"),
])
def test_bad_policy_is_exit_2_before_measuring(tmp_path, tiny_model_dir, policy_text, fragment):
    policy = write_policy(tmp_path / "bad.toml", policy_text)
    code, _, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--output", tmp_path / "r",
                           "--policy", policy)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


def test_bench_input_errors_are_exit_2(tmp_path, tiny_model_dir):
    code, _, err = run_cli("bench", "--model", tiny_model_dir, cwd=tmp_path)
    assert_one_line_error(code, err, "run `effideploy prune` first")
    code, _, err = run_cli("bench", "--runtime", "tensorrt", "--candidate", tiny_model_dir)
    assert_one_line_error(code, err, "unknown runtime 'tensorrt'")
    code, _, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tmp_path / "missing", "--output", tmp_path / "r",
                           "--no-memory", *TINY_BENCH_ARGS)
    assert_one_line_error(code, err, "not found")
    (tmp_path / "r").mkdir()
    code, _, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--output", tmp_path / "r")
    assert_one_line_error(code, err, "already exists; pass --overwrite")



@pytest.mark.parametrize("serve", [[], ["--serve", "--runtime", "llamacpp"]])
def test_an_output_holding_the_exports_folder_is_refused_before_any_export(tmp_path, tiny_model_dir, serve):
    """`--output out` beside the default out/exports: once failed at its end, after every export and server run."""
    for output in ("out", "out/exports/report"):  # holding it, inside it
        code, _, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--quantize", "int8",
                               *serve, "--output", output, "--overwrite", cwd=tmp_path)
        assert_one_line_error(code, err, "overlaps the folder bench exports candidates to (out/exports)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_prunes_from_one_calibration_pass_and_reuses_checkpoints(tmp_path, tiny_model_dir, monkeypatch):
    from effideploy.bench import pipeline
    from effideploy.pruning import engine

    calls = []
    original = engine.calibrate_source
    monkeypatch.setattr("effideploy.pruning.calibrate_source", lambda *a, **k: calls.append(1) or original(*a, **k))
    options = dict(prompt_tokens=24, new_tokens=4, prompts=1, repeats=1, batch_sizes=(1,), throughput_repeats=0,
                   ppl_windows=1, ppl_seqlen=64, mc_limit=0, memory=False, data_dir=str(DATA))
    kwargs = dict(model=str(tiny_model_dir), sparsities=(0.25, 0.5), output=tmp_path / "run",
                  prune_options={"calib_samples": 4, "calib_seqlen": 64}, bench_options=options)
    result, report = pipeline.run_pipeline(**kwargs)
    payload = result.to_dict()
    assert len(calls) == 1 and report == tmp_path / "run" / "report"
    assert [c["candidate"] for c in payload["comparisons"]] == ["cfsp-0.25", "cfsp-0.5"]
    assert (tmp_path / "run" / "cfsp-0.25" / "effideploy.json").is_file()
    payload = pipeline.run_pipeline(**kwargs)[0].to_dict()  # same options: nothing is pruned again
    assert len(calls) == 1 and payload["pipeline"]["reused"] == ["0.25", "0.5"]
    assert "export" not in payload["pipeline"]["seconds"] and payload["pipeline"]["total_seconds"] > 0  # torch: none
    monkeypatch.setattr(engine, "pruning_code_fingerprint", lambda: "other code")
    with pytest.raises(EffideployError, match="from other pruning code; pass --overwrite"):
        pipeline.run_pipeline(**kwargs)


def test_run_command_end_to_end(tmp_path, tiny_model_dir, tiny_task_dir):
    code, out, err = run_cli("run", "--model", tiny_model_dir, "--sparsities", "0.5", "--quick", "--no-memory",
                             "--ppl-windows", "1", "--mc-limit", "2", "--repeats", "1", "--data-dir", DATA,
                             "--output", tmp_path / "run")
    assert code == 0, out + err
    report = tmp_path / "run" / "report"
    assert (report / "report.md").is_file() and (report / "pareto.png").is_file()
    payload = json.loads((report / "report.json").read_text())
    assert payload["pipeline"]["sparsities"] == [0.5] and payload["comparisons"][0]["candidate"] == "cfsp-0.5"
