"""``effideploy bench --serve`` / ``--endpoint``: the runtime's own server on loopback, GuideLLM's bounded load, the
[serve] SLO's verdict (a passing one and a failing one naming its binding objective), and no process left behind
(after a run, after Ctrl-C, after a server the test started itself)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from effideploy.bench.policy import policy_from_dict
from effideploy.bench.serve import ServedModel, analyse, combine, sign_off, told_apart
from effideploy.bench.serve_policy import serve_from_dict
from effideploy.errors import EffideployError
from tests.conftest import default_sigint
from tests.test_cli import run_cli

LOAD = "concurrency = [1, 2]\nprompt_tokens = 24\noutput_tokens = 6\nmax_requests = 4\nmax_seconds = 20\n"
PASS = '[serve]\n' + LOAD + "ttft_p99_ms = 120000\ntpot_p99_ms = 60000\nmin_goodput_ratio = 0.01\n"
FAIL = '[serve]\n' + LOAD + "ttft_p99_ms = 0.001\ntpot_p99_ms = 60000\n"  # no server answers in a microsecond


def _policy(folder, name, text):
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\n' + text)
    return path


def _survivors(marker) -> list[str]:
    """Processes whose command line names ``marker`` (the test's tmp folder: servers and GuideLLM do)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(str(marker) in part for part in proc.info["cmdline"] or []):
                found.append(f"{proc.pid}: {' '.join(proc.info['cmdline'])[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wiki_dir(folder):
    """A --data-dir whose wiki.test.raw is real WikiText-2 test text (ASCII only, so every decoded window of the
    tiny byte-level tokenizer is a substring of it)."""
    from tests.conftest import WIKI_TEST

    text = WIKI_TEST.read_text()[:40_000] if WIKI_TEST.exists() else "The tower is 324 metres tall . " * 1500
    text = text.encode("ascii", "ignore").decode()
    (folder / "wiki").mkdir()
    (folder / "wiki" / "wiki.test.raw").write_text(text)
    return folder / "wiki", text


def _sent_prompts(raw_report):
    """The prompt of every request GuideLLM sent, from its per-request records (it keeps all by default)."""
    prompts = []
    for benchmark in json.loads(raw_report.read_text())["benchmarks"]:
        for request in benchmark["requests"]["successful"]:
            args = request["request_args"]
            prompts.append((json.loads(args) if isinstance(args, str) else args)["body"]["prompt"])
    return prompts


def _assert_none_survive(marker):
    deadline = time.monotonic() + 15
    while _survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _survivors(marker), _survivors(marker)
    assert not psutil.Process().children(recursive=True)


# ----------------------------------------------------------------------------------------- policy and analysis

def test_serve_table_is_read_and_checked():
    policy = policy_from_dict({"serve": {"concurrency": [1, 4], "ttft_p99_ms": 500, "tpot_p99_ms": 50}})
    assert policy.serve.levels == (1.0, 4.0) and policy.serve.target_level == 4.0 and not policy.thresholds
    assert policy.to_dict()["serve"]["ttft_p99_ms"] == 500
    assert "serve" not in policy_from_dict({"thresholds": {"min_op": 0.9}}).to_dict()  # old reports unchanged
    for raw, fragment in [({"rate": [1], "concurrency": [2], "ttft_p99_ms": 1}, "both concurrency and rate"),
                          ({"concurrency": [1]}, "names no objective"),
                          ({"concurrency": [1], "ttft_p99_ms": 1, "slo": 2}, "unknown [serve] key(s) slo"),
                          ({"concurrency": [1.5], "ttft_p99_ms": 1}, "must be an integer"),
                          ({"concurrency": [1, 2], "ttft_p99_ms": 1, "target": 3}, "target 3 is not one of"),
                          ({"concurrency": [1], "ttft_p99_ms": -1}, "must be positive")]:
        with pytest.raises(EffideployError) as caught:
            serve_from_dict(raw)
        assert fragment in str(caught.value)


def _level(load, ttft, itl, goodput, failed=0):
    def stats(v):
        return {"mean": v, "p50": v, "p90": v, "p99": v}
    return {"load": load, "kind": "concurrency", "requests": {"successful": 10 - failed, "failed": failed,
                                                              "incomplete": 0, "total": 10},
            "ttft_ms": stats(ttft), "itl_ms": stats(itl), "tpot_ms": stats(itl), "e2el_ms": stats(ttft + 10 * itl),
            "requests_per_second": goodput, "output_tokens_per_second": 10 * goodput, "goodput": goodput}


def test_goodput_and_highest_load_meeting_the_slo_name_the_binding_objective():
    policy = policy_from_dict({"serve": {"concurrency": [1, 2, 4], "ttft_p99_ms": 100, "tpot_p99_ms": 20,
                                         "min_goodput_ratio": 0.8, "min_load_ratio": 1.0}})
    dense = ServedModel("dense", "dense", "d", levels=[_level(1, 10, 5, 1.0), _level(2, 50, 10, 2.0), _level(4, 90, 15, 3.5)])
    good = ServedModel("good", "candidate", "g", levels=[_level(1, 8, 4, 1.1), _level(2, 40, 8, 2.1), _level(4, 70, 12, 3.9)])
    slow = ServedModel("slow", "candidate", "s", levels=[_level(1, 20, 8, 1.0), _level(2, 80, 25, 1.0), _level(4, 300, 30, 0.5, failed=2)])
    models = [dense, good, slow]
    summaries = {m.label: analyse(m, policy.serve) for m in models}
    assert summaries["dense"]["max_load_meeting_slo"] == 4 and summaries["slow"]["max_load_meeting_slo"] == 1
    assert slow.levels[1]["missed"] == ["tpot_p99_ms"]
    assert slow.levels[2]["missed"] == ["ttft_p99_ms", "tpot_p99_ms", "max_failed_rate"]
    section = sign_off(policy, models, summaries)
    assert section["candidates"] == {"good": True, "slow": False} and not section["passed"]
    assert summaries["good"]["goodput_ratio"] == pytest.approx(3.9 / 3.5)
    assert summaries["slow"]["load_ratio"] == pytest.approx(0.25)
    assert "slow: ttft_p99_ms" in section["binding"] and "slow: min_load_ratio" in section["binding"]
    assert not any(b.startswith("good") for b in section["binding"])


def test_a_candidate_carrying_load_where_dense_carries_none_passes_the_ratios():
    """dense misses the SLO at the target (goodput 0) and at every load: the ratios are infinite, not "n/a" (which
    failed the one candidate that met the SLO); a candidate with no goodput either still fails them."""
    policy = policy_from_dict({"serve": {"concurrency": [1, 2], "ttft_p99_ms": 100, "min_goodput_ratio": 0.9,
                                         "min_load_ratio": 1.0}})
    # goodput is per request (GuideLLM's records against the objectives): none of a level above the TTFT limit
    dense = ServedModel("dense", "dense", "d", levels=[_level(1, 150, 5, 0.0), _level(2, 300, 5, 0.0)])
    fast = ServedModel("fast", "candidate", "f", levels=[_level(1, 50, 5, 1.2), _level(2, 90, 5, 2.0)])
    slow = ServedModel("slow", "candidate", "s", levels=[_level(1, 200, 5, 0.0), _level(2, 400, 5, 0.0)])
    models = [dense, fast, slow]
    summaries = {m.label: analyse(m, policy.serve) for m in models}
    assert summaries["dense"]["goodput_at_target"] == 0 and summaries["dense"]["max_load_meeting_slo"] is None
    section = sign_off(policy, models, summaries)
    assert section["candidates"] == {"fast": True, "slow": False}
    notes = {c["objective"]: c.get("note") for c in section["checks"] if c["candidate"] == "fast"}
    assert notes["min_goodput_ratio"] == "dense has no goodput at the target"
    assert notes["min_load_ratio"] == "dense meets the SLO at no load"
    assert {"slow: min_goodput_ratio", "slow: min_load_ratio", "slow: ttft_p99_ms"} <= set(section["binding"])
    from effideploy.bench.serve_report import markdown

    text = markdown({"runtime": "vllm", "endpoints": False, "slo": policy.serve.to_dict(), "tokenizer": "t",
                     "prompts": {"source": "synthetic"}, "models": [vars(m) for m in models],
                     "summaries": summaries, "policy": section, "seconds": 1.0})
    assert "| fast | min_goodput_ratio | 0.9 | dense has no goodput at the target | pass |" in text


def test_repeated_sweeps_are_combined_and_a_goodput_ratio_carries_its_spread():
    """[serve] repeats: per level the median of the sweeps' percentiles, the mean goodput, the summed counts; each
    sweep's goodput kept; a ratio to dense with its worst-to-best range, and whether the sweeps tell them apart."""
    policy = policy_from_dict({"serve": {"concurrency": [1, 2], "ttft_p99_ms": 100, "min_goodput_ratio": 0.9,
                                         "repeats": 2}})
    assert policy.serve.repeats == 2 and policy.serve.to_dict()["repeats"] == 2
    one = [_level(1, 10, 5, 1.0), _level(2, 60, 5, 2.0)]
    assert combine([one]) is one  # one sweep: GuideLLM's records untouched
    dense = ServedModel("dense", "dense", "d", levels=combine([one, [_level(1, 20, 5, 1.2), _level(2, 140, 5, 1.6)]]))
    close = ServedModel("close", "candidate", "c",
                        levels=combine([[_level(1, 10, 5, 1.0), _level(2, 90, 5, 1.7)],
                                        [_level(1, 10, 5, 1.0), _level(2, 80, 5, 2.1)]]))
    far = ServedModel("far", "candidate", "f", levels=combine([[_level(1, 10, 5, 1.0), _level(2, 50, 5, 2.5)],
                                                               [_level(1, 10, 5, 1.0), _level(2, 70, 5, 2.7)]]))
    # a sweep in which no request succeeded leaves the level's p99 undefined: it does not meet the SLO
    empty = _level(2, 10, 5, 0.0)
    empty["ttft_ms"] = {"mean": None, "p50": None, "p90": None, "p99": None}
    broken = ServedModel("broken", "candidate", "b", levels=combine([[_level(1, 10, 5, 1.0), _level(2, 10, 5, 2.9)],
                                                                     [_level(1, 10, 5, 1.0), empty]]))
    level = dense.levels[1]
    assert level["ttft_ms"]["p99"] == 100 and level["goodput"] == pytest.approx(1.8)
    assert level["requests"] == {"successful": 20, "failed": 0, "incomplete": 0, "total": 20}
    assert [s["goodput"] for s in level["sweeps"]] == [2.0, 1.6] and level["sweeps"][1]["ttft_ms_p99"] == 140
    models = [dense, close, far, broken]
    summaries = {m.label: analyse(m, policy.serve) for m in models}
    assert summaries["dense"]["max_load_meeting_slo"] == 2 and summaries["dense"]["goodput_sweeps"] == [2.0, 1.6]
    assert broken.levels[1]["ttft_ms"]["p99"] is None and broken.levels[1]["missed"] == ["ttft_p99_ms"]
    section = sign_off(policy, models, summaries)
    assert section["candidates"] == {"close": True, "far": True, "broken": False}
    assert summaries["close"]["goodput_ratio"] == pytest.approx(1.9 / 1.8)
    assert summaries["close"]["goodput_ratio_range"] == pytest.approx([1.7 / 2.0, 2.1 / 1.6])
    assert summaries["close"]["goodput_told_apart"] is False and summaries["far"]["goodput_told_apart"] is True
    assert told_apart([1.0], [2.0]) is None  # one sweep says nothing about the spread
    from effideploy.bench.serve_report import markdown

    text = markdown({"runtime": "vllm", "endpoints": False, "slo": policy.serve.to_dict(), "tokenizer": "t",
                     "prompts": {"source": "synthetic"}, "models": [vars(m) for m in models],
                     "summaries": summaries, "policy": section, "seconds": 1.0})
    assert "| close | 2.00 | 1.90 | 1.70, 2.10 | 1.06 (0.85-1.31, overlaps dense) | 1.00 |" in text
    assert "| far | 2.00 | 2.60 | 2.50, 2.70 | 1.44 (1.25-1.69) | 1.00 |" in text
    assert "| close | min_goodput_ratio | 0.9 | 1.056 (sweeps: 0.850-1.312) | pass |" in text
    assert "swept 2 times" in text
    for raw, fragment in [({"concurrency": [1], "ttft_p99_ms": 1, "repeats": 1.5}, "repeats must be an integer"),
                          ({"concurrency": [1], "ttft_p99_ms": 1, "repeats": 0}, "repeats must be positive")]:
        with pytest.raises(EffideployError) as caught:
            serve_from_dict(raw)
        assert fragment in str(caught.value)


def test_serve_input_errors_are_exit_2(tmp_path, tiny_model_dir):
    from tests.test_cli import assert_one_line_error

    out = tmp_path / "report"
    code, _, err = run_cli("bench", "--candidate-endpoint", "http://127.0.0.1:9/v1", "--output", out)
    assert_one_line_error(code, err, "--candidate-endpoint needs --endpoint")
    code, _, err = run_cli("bench", "--serve", "--runtime", "torch", "--model", tiny_model_dir, "--candidate",
                           tiny_model_dir, "--output", out)
    assert_one_line_error(code, err, "--serve needs a runtime with an OpenAI-compatible server")
    thresholds_only = _policy(tmp_path, "plain", "[thresholds]\nmin_op = 0.9\n")
    code, _, err = run_cli("bench", "--endpoint", "http://127.0.0.1:9/v1", "--policy", thresholds_only, "--output", out)
    assert_one_line_error(code, err, "has no [serve] table")
    code, _, err = run_cli("bench", "--endpoint", "http://127.0.0.1:9/v1", "--serve-prompts", "lorem", "--output", out)
    assert_one_line_error(code, err, "--serve-prompts must be one of wikitext | synthetic")
    code, _, err = run_cli("bench", "--endpoint", "http://127.0.0.1:9/v1", "--data-dir", tmp_path, "--output", out)
    assert_one_line_error(code, err, "wiki.test.raw not found in --data-dir")
    assert not out.exists() and not list(tmp_path.glob(".serve-work-*"))


def test_wikitext_prompts_are_windows_of_the_text_at_the_set_lengths(tmp_path, tiny_model_dir):
    from effideploy.bench.serve_load import scenario
    from effideploy.bench.serve_prompts import prompt_count, write_wikitext_prompts
    from effideploy.bench.serve_servers import Server

    data, text = _wiki_dir(tmp_path)
    slo = serve_from_dict(serve_from_dict_text(PASS))
    info = write_wikitext_prompts(tmp_path / "run", str(tiny_model_dir), slo, data_dir=str(data), seed=3)
    rows = [json.loads(line) for line in (tmp_path / "run" / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == info["count"] == prompt_count(slo) >= slo.max_requests * len(slo.levels)
    assert info["source"] == "wikitext" and info["text"] == str((data / "wiki.test.raw").resolve())
    assert all(row["prompt"] in text and row["output_tokens_count"] == 6 for row in rows)
    assert len({row["prompt"] for row in rows}) > len(rows) // 2  # distinct windows, not one prompt repeated
    assert slo.prompt_tokens - 2 <= info["tokens_min"] <= info["tokens_max"] <= slo.prompt_tokens
    again = write_wikitext_prompts(tmp_path / "again", str(tiny_model_dir), slo, data_dir=str(data), seed=3)
    assert (tmp_path / "again" / "prompts.jsonl").read_text() == (tmp_path / "run" / "prompts.jsonl").read_text()
    assert again == info
    spec = scenario(Server("http://127.0.0.1:9", "m", None), slo, str(tiny_model_dir), tmp_path / "run" / "g.json", info)
    assert spec["spec"]["data"] == [{"kind": "json_file", "path": str(tmp_path / "run" / "prompts.jsonl"),
                                     "load_kwargs": {"split": "train"}}]
    assert scenario(Server("http://127.0.0.1:9", "m", None), slo, "t", tmp_path / "g.json")["spec"]["data"][0]["kind"] \
        == "synthetic_text"


# ------------------------------------------------------------------------------------------- real servers

def _llamacpp_ready():
    from effideploy.bench.serve_load import guidellm_unavailable
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    return llamacpp_unavailable() or guidellm_unavailable()


@pytest.mark.serving
@pytest.mark.llamacpp
@pytest.mark.skipif(_llamacpp_ready() is not None, reason=str(_llamacpp_ready()))
def test_llamacpp_serve_bench_fails_a_strict_slo_passes_a_loose_one_and_leaves_nothing(tmp_path, tiny_model_dir,
                                                                                      tiny_pruned_dir):
    fail = _policy(tmp_path, "strict", FAIL)
    data, text = _wiki_dir(tmp_path)
    code, out, err = run_cli("bench", "--runtime", "llamacpp", "--serve", "--model", tiny_model_dir, "--candidate",
                             tiny_pruned_dir, "--policy", fail, "--output", tmp_path / "report", "--data-dir", data,
                             cwd=tmp_path)
    assert code == 1, out + err
    assert "cfsp-0.5: ttft_p99_ms" in " ".join((out + err).split())  # the binding objective, named
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["kind"] == "serve" and [m["label"] for m in payload["models"]] == ["dense", "cfsp-0.5"]
    for model in payload["models"]:
        assert [level["load"] for level in model["levels"]] == [1.0, 2.0]
        for level in model["levels"]:
            assert level["requests"]["failed"] == 0 and level["requests"]["successful"] >= 1
            assert level["ttft_ms"]["p99"] > 0 and level["itl_ms"]["p50"] is not None and level["requests_per_second"] > 0
    assert (tmp_path / "report" / "latency_vs_load.png").read_bytes()[:4] == b"\x89PNG"
    # the default prompts: WikiText-2 windows from --data-dir, the file kept in raw/, and every request sent one
    assert payload["prompts"]["source"] == "wikitext" and payload["prompts"]["file"] == "raw/prompts.jsonl"
    written = {json.loads(line)["prompt"] for line in (tmp_path / "report" / "raw" / "prompts.jsonl").read_text().splitlines()}
    for model in payload["models"]:
        sent = _sent_prompts(tmp_path / "report" / "raw" / f"guidellm-{model['label']}.json")
        assert len(sent) == sum(level["requests"]["successful"] for level in model["levels"])
        assert all(prompt in written and prompt in text for prompt in sent), sent
    assert "WikiText-2 test windows" in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "report" / "raw" / ".datasets-cache").exists()
    assert "cfsp-0.5" in (tmp_path / "report" / "report.md").read_text()
    assert not list(tmp_path.glob(".serve-work-*"))
    # the same measurements judged by a loose SLO pass (its p99 objectives: goodput is GuideLLM's count under the
    # objectives of the run, here the strict ones, so a goodput ratio is judged in a run of its own: the next test)
    loose = policy_from_dict({"serve": serve_from_dict_text(PASS.replace("min_goodput_ratio = 0.01\n", ""))}, "loose")
    models = [ServedModel(**m) for m in payload["models"]]
    summaries = {m.label: analyse(m, loose.serve) for m in models}
    verdict = sign_off(loose, models, summaries)
    assert verdict["passed"], verdict["checks"]
    assert summaries["cfsp-0.5"]["max_load_meeting_slo"] == 2.0 and summaries["dense"]["max_load_meeting_slo"] == 2.0
    assert summaries["cfsp-0.5"]["load_ratio"] == 1.0
    _assert_none_survive(tmp_path)


def serve_from_dict_text(text):
    import tomllib

    return tomllib.loads(text)["serve"]


@pytest.mark.serving
@pytest.mark.llamacpp
@pytest.mark.skipif(_llamacpp_ready() is not None, reason=str(_llamacpp_ready()))
def test_endpoint_benches_a_server_the_test_runs_and_ctrl_c_stops_a_served_one(tmp_path, tiny_model_dir):
    from effideploy.bench.serve_servers import free_port, server_command, stop, wait_ready
    from effideploy.exporters import EXPORTERS
    from effideploy.models.resolve import resolve_model

    export = tmp_path / "gguf"
    EXPORTERS.get("llamacpp")(resolve_model(tiny_model_dir), export, overwrite=True, verify=False)
    port = free_port()
    server = subprocess.Popen(server_command("llamacpp", export, port, "tiny", 512), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, None, 120)
        url = f"http://127.0.0.1:{port}/v1"
        # one load level (the sweep over levels is the test above's, and goes the same way for an endpoint), swept
        # twice per model: the combined level is made of GuideLLM's two reports
        text = PASS.replace("[1, 2]", "[2]") + "repeats = 2\n"
        code, out, err = run_cli("bench", "--endpoint", url, "--candidate-endpoint", url, "--tokenizer", tiny_model_dir,
                                 "--policy", _policy(tmp_path, "loose", text), "--output",
                                 tmp_path / "report", "--serve-prompts", "synthetic")
        assert code == 0, out + err
        assert "serving policy passed" in out + err
        payload = json.loads((tmp_path / "report" / "report.json").read_text())
        assert payload["endpoints"] and payload["models"][1]["served_model"] == "tiny"
        assert [[level["load"] for level in m["levels"]] for m in payload["models"]] == [[2.0], [2.0]]
        assert payload["policy"]["passed"] and payload["summaries"]["candidate"]["goodput_ratio"] > 0
        from effideploy.bench.serve_load import levels_from

        slo = serve_from_dict(serve_from_dict_text(text))
        for model in payload["models"]:
            raws = [levels_from(json.loads((tmp_path / "report" / "raw" / f"guidellm-{name}.json").read_text()), slo)[0]
                    for name in (model["label"], f"{model['label']}.sweep2")]
            (level,) = model["levels"]
            assert [s["goodput"] for s in level["sweeps"]] == [r["goodput"] for r in raws]
            assert level["requests"]["successful"] == sum(r["requests"]["successful"] for r in raws)
            assert level["goodput"] == pytest.approx(sum(r["goodput"] for r in raws) / 2)
            assert len(model["sweeps"]) == 2
        assert payload["summaries"]["candidate"]["goodput_told_apart"] in (True, False)
        assert "goodput per sweep" in (tmp_path / "report" / "report.md").read_text()
        # synthetic where asked: GuideLLM's own text, no prompts file
        assert payload["prompts"]["source"] == "synthetic" and not (tmp_path / "report" / "raw" / "prompts.jsonl").exists()
        assert _sent_prompts(tmp_path / "report" / "raw" / "guidellm-dense.json")
    finally:
        stop(server)
    # Ctrl-C while the bench's own server is up: the server's process group goes with the bench
    env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0"}
    bench = subprocess.Popen([sys.executable, "-m", "effideploy", "bench", "--runtime", "llamacpp", "--serve", "--model",
                              str(export), "--candidate", str(export), "--output", str(tmp_path / "interrupted")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                             preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not any("llama_cpp.server" in s for s in _survivors(export)):
            assert bench.poll() is None and time.monotonic() < deadline, bench.stdout.read().decode()[-2000:]
            time.sleep(0.3)
        bench.send_signal(signal.SIGINT)
        bench.wait(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode != 0 and not (tmp_path / "interrupted").exists()
    _assert_none_survive(tmp_path)


@pytest.mark.serving
@pytest.mark.vllm
def test_vllm_serve_bench_of_a_model_against_itself(tmp_path, tiny_model_dir):
    pytest.importorskip("vllm")
    from effideploy.bench.serve_load import guidellm_unavailable

    if guidellm_unavailable():
        pytest.skip(guidellm_unavailable())
    from effideploy.exporters.vllm.export import export_vllm

    # An export given as it is (the bench exports checkpoints on the fly in the llama.cpp test above and in
    # test_bench_vllm.py), made without the parity check that tests/exporters/test_vllm.py runs on this model: a vLLM
    # engine in a child process fewer. Inside tmp_path, so that the servers' command lines name it for the check below.
    export = export_vllm(tiny_model_dir, tmp_path / "export", verify=False).output
    code, out, err = run_cli("bench", "--runtime", "vllm", "--serve", "--model", export, "--candidate",
                             export, "--policy", _policy(tmp_path, "loose", PASS.replace("[1, 2]", "[2]")),
                             "--output", tmp_path / "report", cwd=tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert code == 0, out + err
    payload = json.loads((tmp_path / "report" / "report.json").read_text())
    assert payload["runtime"] == "vllm" and payload["policy"]["passed"]
    assert [m["export"] for m in payload["models"]] == [str(export)] * 2  # taken as it is, not exported again
    for model in payload["models"]:
        (level,) = model["levels"]
        assert level["requests"]["failed"] == 0 and level["ttft_ms"]["p99"] > 0 and level["goodput"] > 0
    # the same measurements under a strict SLO fail, naming the binding objective (a vLLM engine start fewer than a
    # second run; the CLI's exit 1 and its message are the llama.cpp test's)
    strict = policy_from_dict({"serve": serve_from_dict_text(FAIL.replace("[1, 2]", "[2]"))}, "strict")
    models = [ServedModel(**m) for m in payload["models"]]
    verdict = sign_off(strict, models, {m.label: analyse(m, strict.serve) for m in models})
    assert not verdict["passed"] and verdict["binding"] == [f"{models[1].label}: ttft_p99_ms"]
    _assert_none_survive(tmp_path)
