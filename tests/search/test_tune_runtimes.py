"""``tune`` on llama.cpp and vLLM on a tiny model, each screening and costing its own weight schemes: the generic
int8 becomes the runtime's scheme (q8_0, w8a8), the screen rounds as that runtime stores, the cost model's bytes are
that scheme's, and the bench exports it. Kept as small as tune allows (one quantized recipe, tiny windows)."""

import json

import pytest

from tests.conftest import DATA
from tests.kernels import require_vllm_kernel
from tests.search.test_tune_onnx import loose_policy, tune

SMALL = ["--depth", "none", "--calib-samples", "4", "--calib-seqlen", "64", "--screen-windows", "2", "--screen-seqlen", "64",
         "--repeats", "1", "--ppl-windows", "1", "--ppl-seqlen", "64", "--prompt-tokens", "16", "--new-tokens", "4",
         "--mc-limit", "3", "--no-memory", "--threads", "1", "--data-dir", str(DATA), "--sparsities", "0",
         "--quantize", "none,int8", "--shortlist", "1"]


def run(tmp_path, model, task, runtime, scheme):
    out = tmp_path / "search"
    assert tune("--model", model, "--policy", loose_policy(tmp_path), "--output", out, "--runtime", runtime,
                "--task", task, *SMALL) == 0
    data = json.loads((out / "report" / "search.json").read_text())
    (record,) = data["recipes"]
    assert record["label"] == f"dense+{scheme}" and record["scheme"]["name"] == scheme
    assert record["stage"] == "benched" and data["recommended"] == record["label"]
    return data, record


@pytest.mark.llamacpp
def test_tune_on_llamacpp_screens_and_costs_q8_0(tmp_path, tiny_model_dir, tiny_task_dir):
    from effideploy.exporters.manifest import read_export_manifest
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    if llamacpp_unavailable():
        pytest.skip(llamacpp_unavailable())
    data, record = run(tmp_path, tiny_model_dir, tiny_task_dir, "llamacpp", "q8_0")
    manifest = read_export_manifest(data["artifact"])
    assert manifest["gguf_type"] == "q8_0"
    # the cost model's bytes are the GGUF file's matrices (the tied embedding is the output head, read once)
    assert record["features"]["stored_bytes"] == pytest.approx(manifest["weight_storage"]["stored_bytes"], rel=0.02)


@pytest.mark.vllm
def test_tune_on_vllm_screens_and_costs_w8a8(tmp_path, tiny_model_dir, tiny_task_dir):
    require_vllm_kernel(scheme="w8a8")  # float32 W8A8 does not run on AMX CPUs (runtimes/vllm_kernels.py)
    data, record = run(tmp_path, tiny_model_dir, tiny_task_dir, "vllm", "w8a8")
    bench = json.loads((tmp_path / "search" / "report" / "bench" / "report.json").read_text())
    assert record["screen"]["kl"] > 0  # activations and weights quantized in the screen
    assert record["measured"]["perplexity_increase"] == pytest.approx(record["screen"]["perplexity_increase"], abs=0.1)
    assert bench["models"]
