"""The vLLM runtime adapter against the transformers one, on one shared in-process engine (started once)."""

from __future__ import annotations

import pytest
import torch

from effideploy.errors import EffideployError
from tests.exporters.test_vllm import write_tiny_pruned

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from effideploy.runtimes.vllm import VllmRuntime  # noqa: E402  (needs vllm)

SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op while an engine is open


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_tokenizer):
    return write_tiny_pruned(tmp_path_factory.mktemp("tiny-pruned"), tiny_tokenizer)


@pytest.fixture(scope="module")
def runtime(pruned_dir):
    with VllmRuntime(pruned_dir, max_model_len=256) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(pruned_dir):
    from effideploy.runtimes.pytorch import TorchRuntime

    return TorchRuntime(pruned_dir)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["The history of the city begins in the early medieval period", "In physics, energy",
             "The album was recorded over three weeks in the summer and received"]
    return [tiny_tokenizer(text).input_ids for text in texts]


def test_generate_is_token_identical_to_transformers_and_times_every_token(runtime, reference, prompts):
    result = runtime.generate(prompts, 12)
    assert result.tokens == reference.generate(prompts, 12).tokens
    assert len(result.prefill_seconds) == len(prompts) and all(t > 0 for t in result.prefill_seconds)
    assert [len(steps) for steps in result.decode_seconds] == [11] * len(prompts)
    assert all(t > 0 for steps in result.decode_seconds for t in steps)
    assert result.total_seconds >= sum(result.prefill_seconds) + sum(map(sum, result.decode_seconds))


def test_generate_batch_gives_the_same_tokens_for_prompts_of_different_lengths(runtime, prompts):
    batch = runtime.generate_batch(prompts, 8)
    assert batch.tokens == runtime.generate(prompts, 8).tokens
    assert [len(steps) for steps in batch.decode_seconds] == [7] * len(prompts)


def test_score_matches_transformers(runtime, reference, prompts):
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, reference.generate(prompts, 6).tokens)]
    for got, expected in zip(runtime.score_windows(sequences), reference.score_windows(sequences)):
        assert torch.equal(got.argmax, expected.argmax)
        torch.testing.assert_close(got.nll, expected.nll, atol=1e-3, rtol=1e-4)


def test_topk_and_support_logprobs_match_transformers(runtime, reference, prompts):
    """The bench's fidelity inputs (bench/fidelity.py) from vLLM's prompt_logprobs: the top-k (k up to its
    max_logprobs) equal transformers' log_softmax; support ids inside its top max_logprobs read exactly."""
    from effideploy.bench.fidelity import KL_SUPPORT, TOP_K

    assert runtime.max_logprobs() >= KL_SUPPORT
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, reference.generate(prompts, 6).tokens)]
    expected = reference.score_windows(sequences, top_k=KL_SUPPORT)
    dense = runtime.score_windows(sequences, top_k=KL_SUPPORT)
    candidate = runtime.score_windows(sequences, top_k=TOP_K, support=[e.top_ids for e in expected])
    for a, c, b in zip(dense, candidate, expected):
        assert torch.equal(a.top_ids[:, :TOP_K], b.top_ids[:, :TOP_K]) and torch.equal(c.top_ids, b.top_ids[:, :TOP_K])
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(c.support_logprobs, b.top_logprobs, atol=1e-3, rtol=1e-4)
    with pytest.raises(EffideployError, match="max_logprobs"):
        runtime.score_windows(sequences[:1], top_k=runtime.max_logprobs() + 1)


def test_a_fresh_engine_logs_no_chat_template_traceback(tiny_model_dir, capfd):
    """vLLM's chat-template warmup fails without a tokenizer (the adapter feeds ids) and logged a traceback at every
    engine start; the adapter drops that one record."""
    from effideploy.runtimes.vllm import VllmRuntime

    engine = VllmRuntime(tiny_model_dir, max_model_len=256, threads=1)
    try:
        assert engine.generate([[1, 2, 3]], 2).tokens
    finally:
        engine.close()
    captured = capfd.readouterr()
    log = captured.out + captured.err  # vLLM's handler writes to stdout
    assert "Chat template warmup failed" not in log and "Traceback" not in log


def test_describe_names_the_engine_and_its_settings(runtime, pruned_dir):
    info = runtime.describe()
    assert info["runtime"] == "vllm" and info["engine"].startswith(f"vLLM {vllm.__version__}")
    assert info["dtype"] == "float32" and info["kv_cache_dtype"] == "auto" and info["max_model_len"] == 256
    assert info["path"] == str(pruned_dir) and info["prefix_caching"] is False


def test_too_long_requests_are_refused_in_one_line(runtime, prompts):
    with pytest.raises(EffideployError, match="exceeds max_model_len 256"):
        runtime.generate([prompts[0] * 40], 4)
    with pytest.raises(EffideployError, match="at least 2 tokens"):
        runtime.score_windows([[5]])


def test_engines_coexist_and_close_frees_them_so_others_start(runtime, tiny_model_dir, prompts):
    """Runs last in this module. Two engines in one process (as bench keeps the dense and pruned models open):
    closing one leaves the other working; after both are closed a new one starts."""
    from effideploy.runtimes.pytorch import TorchRuntime

    dense_tokens = TorchRuntime(tiny_model_dir).generate(prompts[:1], 4).tokens
    pruned_tokens = runtime.generate(prompts[:1], 4).tokens
    with VllmRuntime(tiny_model_dir, max_model_len=128) as second:
        assert second.generate(prompts[:1], 4).tokens == dense_tokens
    assert runtime.generate(prompts[:1], 4).tokens == pruned_tokens
    runtime.close()
    runtime.close()  # idempotent
    assert torch.set_num_threads is SET_NUM_THREADS
    with pytest.raises(EffideployError, match="closed"):
        runtime.generate(prompts[:1], 4)
    with VllmRuntime(tiny_model_dir, max_model_len=128) as third:
        assert third.generate(prompts[:1], 4).tokens == dense_tokens


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(EffideployError, match="config.json is missing"):
        VllmRuntime(tmp_path)
