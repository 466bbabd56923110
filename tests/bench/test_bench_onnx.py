"""The bench on ONNX Runtime: checkpoints are exported on the fly (dense included), and a token-compression
candidate runs through the runtime's kv_hook."""

import importlib.util

import pytest

from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.runner import run_bench
from tests.conftest import DATA

pytestmark = [pytest.mark.onnx, pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs onnx, onnxruntime and onnxscript")]


def test_onnx_bench_exports_and_compares(tmp_path, tiny_model_dir, tiny_pruned_dir, tiny_task_dir):
    config = BenchConfig(runtime="onnx", dense=str(tiny_model_dir),
                         candidates=(CandidateSpec(model=str(tiny_pruned_dir)), CandidateSpec(compression="streamingllm:1.0")),
                         prompt_tokens=24, new_tokens=4, prompts=1, repeats=1, batch_sizes=(2,), throughput_repeats=1,
                         ppl_windows=1, ppl_seqlen=64, tasks=(str(tiny_task_dir),), memory=False, data_dir=str(DATA),
                         export_root=str(tmp_path / "exports"))
    payload = run_bench(config).to_dict()
    assert payload["runtime"]["runtime"] == "onnx"
    exports = sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "exports").iterdir())
    assert exports == ["cfsp-0.5", "dense"]  # the compression candidate shares the dense export
    assert [m["export"]["reused"] for m in payload["models"]] == [False, False, True]
    assert payload["phase_seconds"]["export"] >= sum(m["export"]["seconds"] for m in payload["models"]) > 0
    pruned, compressed = payload["comparisons"]
    assert pruned["size_reduction"] > 0 and pruned["loyalty"] < 1
    # streamingllm at budget 1.0 keeps every entry: identical to dense on the same positions
    assert compressed["loyalty"] == 1.0 and compressed["perplexity_scope"] == "second_half"
    assert compressed["perplexity_increase"] == pytest.approx(0.0, abs=1e-4)
    assert set(payload["models"][2]["throughput"]) == {"2"}  # ONNX Runtime batches run the kv_hook too


def test_shared_prompt_scoring_on_onnx_equals_scoring_whole_sequences(tmp_path, tiny_model_dir):
    import torch

    from effideploy.exporters import export
    from effideploy.runtimes import open_runtime

    export("onnx", str(tiny_model_dir), tmp_path / "onnx")
    with open_runtime("onnx", tmp_path / "onnx") as runtime:
        prompt = [5, 17, 33, 2, 90, 41]
        sequences = [prompt + [7], prompt + [8, 9, 10], [3, 4, 11, 12]]
        starts = [6, 6, 2]
        shared = runtime.score_continuations([(s[:start], s[start:]) for s, start in zip(sequences, starts)])
        for scores, whole, start in zip(shared, runtime.score_windows(sequences), starts):
            torch.testing.assert_close(scores.nll, whole.nll[start - 1 :], atol=1e-4, rtol=1e-4)
            assert torch.equal(scores.argmax, whole.argmax[start - 1 :])
