"""``tune --serve``: the offline-passing shortlist judged under load on the runtime's own server (GuideLLM), the
recommendation the recipe carrying the most load that meets the [serve] objectives; refusals before any work."""

import json
from types import SimpleNamespace

import pytest

from effideploy.search.serve_stage import choose, markdown
from tests.bench.test_serve import LOAD, _assert_none_survive, _llamacpp_ready
from tests.search.test_tune_runtimes import SMALL
from tests.test_cli import assert_one_line_error, run_cli


def _record(label, decode, compression=None):
    return SimpleNamespace(label=label, recipe=SimpleNamespace(compression=compression),
                           measured={"decode_speedup": decode}, serve_failed=None)


def _section(goodput: dict, failing: dict):
    checks = [{"candidate": label, "objective": objective, "passed": False} for label, objectives in failing.items()
              for objective in objectives]
    checks += [{"candidate": label, "objective": "ttft_p99_ms", "passed": True} for label in goodput if label not in failing]
    return {"summaries": {label: {"goodput_at_target": g, "max_load_meeting_slo": 4.0 if g else None}
                          for label, g in goodput.items()},
            "policy": {"checks": checks, "candidates": {label: label not in failing for label in goodput}}}


def test_choose_takes_the_most_goodput_among_those_meeting_the_slo_not_the_fastest_at_batch_1():
    fast, loaded, missing, kv = _record("dense+int8", 2.5), _record("cfsp-0.3+int8", 2.0), _record("cfsp-0.1", 1.1), \
        _record("dense+snapkv", 1.0, compression="snapkv:0.5")
    section = _section({"dense+int8": 1.2, "cfsp-0.3+int8": 1.6, "cfsp-0.1": 2.0},
                       {"cfsp-0.1": ["tpot_p99_ms", "min_goodput_ratio"]})
    assert choose([fast, loaded, missing, kv], section) is loaded
    assert (fast.serve_failed, loaded.serve_failed) == ([], [])
    assert missing.serve_failed == ["tpot_p99_ms", "min_goodput_ratio"]
    assert kv.serve_failed == ["not served (token compression runs in-process only)"]
    # equal goodput: the higher offline decode speedup breaks the tie
    tie = _section({"dense+int8": 1.6, "cfsp-0.3+int8": 1.6}, {})
    assert choose([loaded, fast], tie) is fast
    # every served recipe misses an objective: nothing is recommended
    assert choose([fast, loaded], _section({"dense+int8": 0.0, "cfsp-0.3+int8": 0.1},
                                           {"dense+int8": ["ttft_p99_ms"], "cfsp-0.3+int8": ["ttft_p99_ms"]})) is None


def test_the_under_load_section_says_whether_the_sweeps_tell_the_recommendation_apart():
    """tune --serve ranks by goodput; the report says when the lead is inside the sweeps' spread (or that one sweep
    cannot tell)."""
    def section(repeats, sweeps):
        made = _section({label: sum(v) / len(v) for label, v in sweeps.items()}, {})
        for label, values in sweeps.items():
            made["summaries"][label]["goodput_sweeps"] = values
        made["summaries"]["dense"] = {"goodput_at_target": 1.0, "max_load_meeting_slo": 4.0, "goodput_sweeps": [1.0]}
        return {**made, "runtime": "vllm", "slo": {"kind": "concurrency", "levels": [4.0], "prompt_tokens": 8,
                                                   "output_tokens": 4, "max_requests": 8, "max_seconds": 10.0,
                                                   "target_level": 4.0, "ttft_p99_ms": 100.0, "repeats": repeats},
                "models": [{"label": label} for label in ["dense", *sweeps]]}

    close = "\n".join(markdown(section(2, {"a": [2.0, 2.4], "b": [1.9, 2.1]}), "a"))
    assert "Not told apart by 2 sweeps: `a`'s per-sweep goodput overlaps `b`'s" in close
    assert "| `a` | 4 | 2.20 (2.00, 2.40) |" in close
    apart = "\n".join(markdown(section(2, {"a": [2.5, 2.6], "b": [1.9, 2.1]}), "a"))
    assert "above every other passing recipe's in each of 2 sweeps" in apart
    single = "\n".join(markdown(section(1, {"a": [2.5], "b": [2.1]}), "a"))
    assert "One sweep per model: `a` leads `b` on one run's goodput" in single


def test_tune_serve_refusals_come_before_any_work(tmp_path, tiny_model_dir):
    out = tmp_path / "search"
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "plain"\n[thresholds]\nmin_op = 0.5\n')
    code, _, err = run_cli("tune", "--serve", "--model", tiny_model_dir, "--runtime", "onnx", "--output", out)
    assert_one_line_error(code, err, "--serve needs a runtime with an OpenAI-compatible server (vllm or llamacpp)")
    code, _, err = run_cli("tune", "--serve", "--model", tiny_model_dir, "--runtime", "llamacpp", "--policy", plain,
                           "--output", out)
    assert_one_line_error(code, err, "has no [serve] table")
    serving = tmp_path / "serving.toml"
    serving.write_text('name = "s"\n[serve]\n' + LOAD + "ttft_p99_ms = 1000\n")
    code, _, err = run_cli("tune", "--serve", "--serve-prompts", "lorem", "--model", tiny_model_dir, "--runtime",
                           "llamacpp", "--policy", serving, "--output", out)
    assert_one_line_error(code, err, "--serve-prompts must be one of")
    assert not out.exists()


@pytest.mark.serving
@pytest.mark.llamacpp
@pytest.mark.skipif(_llamacpp_ready() is not None, reason=str(_llamacpp_ready()))
def test_tune_on_llamacpp_serves_the_passing_shortlist_and_recommends_under_load(tmp_path, tiny_model_dir,
                                                                                 tiny_task_dir):
    policy = tmp_path / "serving.toml"
    policy.write_text('name = "serving"\n[thresholds]\nmax_perplexity_increase = 100.0\nmin_decode_speedup = 0.01\n'
                      '[serve]\n' + LOAD + "ttft_p99_ms = 120000\ntpot_p99_ms = 60000\n")
    out = tmp_path / "search"
    code, stdout, stderr = run_cli("tune", "--model", tiny_model_dir, "--policy", policy, "--output", out,
                                   "--runtime", "llamacpp", "--task", tiny_task_dir, "--serve", *SMALL, cwd=tmp_path)
    assert code == 0, stdout + stderr
    search = json.loads((out / "report" / "search.json").read_text())
    serve = search["serve"]
    assert [m["label"] for m in serve["models"]] == ["dense", "dense+q8_0"]  # dense and the one offline-passing recipe
    for model in serve["models"]:
        assert [level["load"] for level in model["levels"]] == [1.0, 2.0]
        assert all(level["requests"]["successful"] >= 1 and level["ttft_ms"]["p99"] > 0 for level in model["levels"])
    assert serve["policy"]["passed"] and serve["policy"]["candidates"] == {"dense+q8_0": True}
    assert search["recommended"] == "dense+q8_0" and search["recipes"][0]["serve_failed"] == []
    assert search["seconds"]["serve"] > 0
    report = (out / "report" / "report.md").read_text()
    assert "## Under load" in report and "it meets every [serve] objective" in report
    assert "under load: pass" in report
    assert json.loads((out / "report" / "serve" / "report.json").read_text())["kind"] == "serve"
    assert not list(out.glob(".serve-work-*"))
    _assert_none_survive(tmp_path)
