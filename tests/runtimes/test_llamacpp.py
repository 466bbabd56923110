"""The llama.cpp runtime adapter against the transformers one, on the tiny pruned model's float32 GGUF (deci)."""

from __future__ import annotations

import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.runtimes.llamacpp import llamacpp_unavailable
from tests.exporters.test_vllm import write_tiny_pruned

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(llamacpp_unavailable() is not None, reason=str(llamacpp_unavailable()))]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_tokenizer):
    return write_tiny_pruned(tmp_path_factory.mktemp("tiny-pruned"), tiny_tokenizer)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, pruned_dir):
    from effideploy.exporters.llamacpp.export import export_llamacpp

    return export_llamacpp(pruned_dir, tmp_path_factory.mktemp("gguf") / "f32", quantize="f32", verify=False).output


@pytest.fixture(scope="module")
def runtime(gguf_dir):
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    with LlamaCppRuntime(gguf_dir, n_ctx=256, kv_cache_type="f32", flash_attn="off", threads=2,
                         max_batch=2) as engine:
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
    # three prompts with max_batch 2: one group of two sequences in one context, then one alone
    batch = runtime.generate_batch(prompts, 8)
    assert batch.tokens == runtime.generate(prompts, 8).tokens
    assert [len(steps) for steps in batch.decode_seconds] == [7] * len(prompts)
    assert batch.prefill_seconds[0] == batch.prefill_seconds[1]


def test_scores_match_transformers(runtime, reference, prompts):
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, reference.generate(prompts, 6).tokens)]
    got, expected = runtime.score_windows(sequences), reference.score_windows(sequences)
    for a, b in zip(got, expected):
        assert torch.allclose(a.nll, b.nll, atol=1e-4)  # float32 throughout (f32 GGUF, f32 KV, no flash attention)
        assert torch.equal(a.argmax, b.argmax)


def test_topk_and_support_logprobs_match_transformers(runtime, reference, prompts):
    """The bench's fidelity inputs (bench/fidelity.py): llama.cpp's full logits give the same top-k and support
    log-probabilities as transformers' log_softmax."""
    from effideploy.bench.fidelity import KL_SUPPORT

    sequences = [prompt + tokens for prompt, tokens in zip(prompts, reference.generate(prompts, 6).tokens)]
    expected = reference.score_windows(sequences, top_k=KL_SUPPORT)
    got = runtime.score_windows(sequences, top_k=KL_SUPPORT, support=[e.top_ids for e in expected])
    for a, b in zip(got, expected):
        assert torch.equal(a.top_ids[:, :5], b.top_ids[:, :5])
        torch.testing.assert_close(a.top_logprobs, b.top_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.support_logprobs, b.top_logprobs, atol=1e-4, rtol=0)


def test_continuations_share_the_context_and_equal_window_scores(runtime, reference, prompts):
    context = prompts[0]
    requests = [(context, [40, 41, 42]), (context, [7]), (prompts[1], [90, 91])]
    got = runtime.score_continuations(requests)
    expected = reference.score_continuations(requests)
    for a, b in zip(got, expected):
        assert a.nll.shape == b.nll.shape
        assert torch.allclose(a.nll, b.nll, atol=1e-4)


def test_describe_names_the_engine_threads_and_type(runtime):
    described = runtime.describe()
    assert described["runtime"] == "llamacpp" and described["threads"] == 2
    assert described["architecture"] == "deci" and described["gguf_type"] == "f32"
    # llama.cpp's extra CPU buffers (weight repacking) stay on except on AMX CPUs, where decoding in them crashed
    assert described["extra_buffers"] is (not torch.cpu._is_amx_tile_supported())


def test_refusals(runtime, gguf_dir, tmp_path):
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    with pytest.raises(EffideployError, match="exceeds n_ctx 256"):
        runtime.generate([[1] * 250], 10)
    with pytest.raises(EffideployError, match="outside the vocabulary"):
        runtime.generate([[1, 100000]], 2)
    with pytest.raises(EffideployError, match="not available on llama.cpp"):
        LlamaCppRuntime.check_compression("snapkv:0.2")
    with pytest.raises(EffideployError, match="kv_cache_type must be one of"):
        LlamaCppRuntime(gguf_dir, kv_cache_type="q2")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(EffideployError, match="llama.cpp cannot load"):
        LlamaCppRuntime(tmp_path / "broken.gguf")
