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
    assert pruned["kl_divergence"] > 0 and compressed["kl_divergence"] is None  # second halves: not measured
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
        # the one-forward-per-item path equals teacher forcing through the cache (prefill, then one decode step per
        # token: the path a KV hook takes), and splitting a batch at the cell budget changes nothing
        requests = [(s[:start], s[start:]) for s, start in zip(sequences, starts)]
        runtime.kv_hook = lambda past, attentions, length: [(k.copy(), v.copy()) for k, v in past]
        stepped = runtime.score_continuations(requests)
        runtime.kv_hook = None
        import effideploy.runtimes.onnx as onnx_runtime
        budget, onnx_runtime.SCORE_BATCH_CELLS = onnx_runtime.SCORE_BATCH_CELLS, 10 * runtime.vocab_size
        try:
            split = runtime.score_continuations(requests)
        finally:
            onnx_runtime.SCORE_BATCH_CELLS = budget
        for batched, one_step, alone in zip(shared, stepped, split):
            torch.testing.assert_close(batched.nll, one_step.nll, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batched.nll, alone.nll, atol=1e-4, rtol=1e-4)
            assert torch.equal(batched.argmax, one_step.argmax) and torch.equal(batched.argmax, alone.argmax)


def test_quantized_candidates_are_labelled_and_measured_by_stored_bytes(tmp_path, tiny_model_dir, tiny_pruned_dir):
    """bench --quantize int4: the dense model and the checkpoint exported with int4 weights, compared with the dense
    fp32 model by the bytes stored and read per token (not by parameters, which quantization keeps)."""
    config = BenchConfig(runtime="onnx", dense=str(tiny_model_dir), candidates=(CandidateSpec(model=str(tiny_pruned_dir)),),
                         quantize=("int4",), prompt_tokens=24, new_tokens=4, prompts=1, repeats=1, batch_sizes=(1,),
                         throughput_repeats=0, ppl_windows=1, ppl_seqlen=64, mc_limit=0, memory=False,
                         data_dir=str(DATA), export_root=str(tmp_path / "exports"))
    report = run_bench(config)
    labels = [c.candidate for c in report.comparisons]
    assert labels == ["cfsp-0.5", "dense+int4", "cfsp-0.5+int4"]
    pruned, dense_int4, pruned_int4 = report.comparisons
    assert dense_int4.parameters_removed == 0 and dense_int4.size_reduction > 0.6  # same parameters, 4-bit storage
    assert dense_int4.ideal["decode_speedup_weight_bytes"] > 3 and dense_int4.ideal["decode_speedup_flops"] == 1.0
    assert pruned_int4.size_reduction > dense_int4.size_reduction > pruned.size_reduction > 0
    formats = {m.label: m.weights.format for m in report.models}
    assert formats["dense"] == "float32" and "int4" in formats["dense+int4"]
    assert 0 < dense_int4.loyalty <= 1 and dense_int4.perplexity > 0
    # KL and top-k to dense measured on the int4 graph itself (what ships), not on a fake-quantized PyTorch model
    assert dense_int4.kl_divergence > 0 and 0 < dense_int4.top_k_agreement <= 1
    assert dense_int4.top1_agreement == pytest.approx(dense_int4.loyalty_tokens)
    assert dense_int4.fidelity_source.startswith("onnx runtime artifact, WikiText-2 test window 1 (1 x 64 tokens")


def test_an_export_given_as_a_candidate_gets_its_ideal_and_label(tmp_path, tiny_model_dir, tiny_pruned_dir):
    """A folder the exporter wrote (int8 here) benched as it is: parameters, stored bytes and the ideal ratios come
    from its manifest and source checkpoint, and its label names the recipe."""
    from effideploy.bench.artifacts import export_for

    export = export_for("onnx", str(tiny_pruned_dir), tmp_path / "made", "cand", quantize="int8")
    config = BenchConfig(runtime="onnx", dense=str(tiny_model_dir), candidates=(CandidateSpec(model=str(export)),),
                         prompt_tokens=24, new_tokens=4, prompts=1, repeats=1, batch_sizes=(1,), throughput_repeats=0,
                         ppl_windows=1, ppl_seqlen=64, mc_limit=0, memory=False, data_dir=str(DATA),
                         export_root=str(tmp_path / "exports"))
    (record,) = run_bench(config).comparisons
    assert record.candidate == "cfsp-0.5+int8"
    assert record.ideal is not None and record.ideal["decode_speedup_weight_bytes"] > 4  # pruned and 8-bit
    assert record.size_reduction > 0.6
