"""The ONNX Runtime adapter on tiny exports: greedy tokens equal PyTorch's, prefill + decode steps reproduce the
full-sequence logits, dynamic batch/lengths work, and the KV hook can evict tokens (positions stay absolute)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from effideploy.errors import EffideployError
from tests.conftest import tiny_llama
from tests.exporters.test_onnx import exported, pruned_checkpoint

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.onnx

PROMPTS = [[5, 17, 99, 230, 41, 8, 77, 150, 12, 3, 64, 200, 31], [300, 2, 45, 9, 180, 66, 21]]


@pytest.fixture(params=["dense", "pruned"])
def case(request, tmp_path_factory, tiny_model_dir, calib_file):
    """(ONNX runtime, the same model in transformers) for the dense and the CFSP-pruned tiny model."""
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.onnx import OnnxRuntime

    result = exported(request.param, tmp_path_factory, tiny_model_dir, calib_file)
    source = tiny_model_dir if request.param == "dense" else pruned_checkpoint(tmp_path_factory, tiny_model_dir, calib_file)
    with OnnxRuntime(result.output, threads=2) as runtime:
        yield runtime, load_model(resolve_model(source))


@pytest.fixture
def dense_runtime(tmp_path_factory, tiny_model_dir, calib_file):
    from effideploy.runtimes.onnx import OnnxRuntime

    with OnnxRuntime(exported("dense", tmp_path_factory, tiny_model_dir, calib_file).output) as runtime:
        yield runtime


def test_greedy_tokens_equal_pytorch(case):
    from effideploy.runtimes.pytorch import TorchRuntime

    runtime, model = case
    reference = TorchRuntime(model=model)
    generation = runtime.generate(PROMPTS, 12)
    assert generation.tokens == reference.generate(PROMPTS, 12).tokens
    assert len(generation.prefill_seconds) == 2 and all(len(steps) == 11 for steps in generation.decode_seconds)
    batch = [PROMPTS[0], PROMPTS[0][::-1]]
    assert runtime.generate_batch(batch, 10).tokens == reference.generate_batch(batch, 10).tokens


def test_prefill_then_decode_steps_equal_the_full_sequence(case):
    runtime, model = case
    sequence = PROMPTS[0] + PROMPTS[1]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([sequence])).logits[0].numpy()
    prompt_length = 6
    cache = runtime.new_cache(1, len(sequence))
    logits, attentions = runtime.prefill(np.array([sequence[:prompt_length]]), cache)
    assert attentions is None and cache.length == prompt_length
    np.testing.assert_allclose(logits[0], expected[:prompt_length], atol=1e-4, rtol=0)
    for position in range(prompt_length, len(sequence)):  # teacher-forced: feed the true next token
        step = runtime.decode_one_token(np.array([sequence[position]]), position, cache)
        np.testing.assert_allclose(step[0], expected[position], atol=1e-4, rtol=0)
    assert cache.length == len(sequence)


@pytest.mark.parametrize("batch, length", [(2, 5), (2, 13), (3, 1)])
def test_dynamic_batch_and_length(case, batch, length):
    runtime, model = case
    ids = torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(runtime.logits(ids.tolist()), expected, atol=1e-4, rtol=0)


def test_score_equals_pytorch(case):
    from effideploy.runtimes.pytorch import TorchRuntime

    runtime, model = case
    got, expected = runtime.score_windows(PROMPTS), TorchRuntime(model=model).score_windows(PROMPTS)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.nll, b.nll, atol=1e-4, rtol=0)
        assert torch.equal(a.argmax, b.argmax)


def evicted_reference(model, prompt: list[int], keep: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of transformers after keeping only ``keep`` of the prompt's KV entries (absolute positions)."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        evicted = DynamicCache(config=model.config)
        for index, layer in enumerate(cache.layers):
            evicted.update(layer.keys[:, :, keep], layer.values[:, :, keep], index)
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        for step in range(new_tokens - 1):
            mask = torch.ones(1, evicted.get_seq_length() + 1, dtype=torch.long)
            logits = model(input_ids=token, past_key_values=evicted, attention_mask=mask, use_cache=True,
                           position_ids=torch.tensor([[len(prompt) + step]])).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
    return tokens


def generate_with(runtime, hook, prompts, new_tokens):
    """Generation with a raw kv_hook attached for this call only (the runtime fixture is shared)."""
    runtime.compress(hook)
    try:
        return runtime.generate(prompts, new_tokens)
    finally:
        runtime.compress(None)


def test_kv_hook_evicts_and_decoding_continues_at_absolute_positions(dense_runtime):
    prompt = PROMPTS[0]
    keep = [0, 1] + list(range(len(prompt) - 5, len(prompt)))  # sinks + recent window
    calls = []

    def hook(past, attentions, prompt_length):
        calls.append(([k.shape for k, _ in past], attentions, prompt_length))
        return [(k[:, :, keep].copy(), v[:, :, keep].copy()) for k, v in past]

    generation = generate_with(dense_runtime, hook, [prompt], 10)
    assert calls == [([(1, 1, len(prompt), 64)] * 4, None, len(prompt))]
    assert generation.extra["kv_length_after_prefill"] == [len(keep)]
    assert generation.tokens[0] == evicted_reference(tiny_llama(), prompt, keep, 10)
    # Without the hook the same runtime gives the unevicted tokens again (the cache is reset per prompt).
    from effideploy.runtimes.pytorch import TorchRuntime

    assert dense_runtime.generate([prompt], 10).tokens == TorchRuntime(model=tiny_llama()).generate([prompt], 10).tokens


def test_kv_hook_may_return_slices_of_its_views(dense_runtime):
    prompt = PROMPTS[0]
    generation = generate_with(dense_runtime, lambda past, _, n: [(k[:, :, -6:], v[:, :, -6:]) for k, v in past], [prompt], 8)
    keep = list(range(len(prompt) - 6, len(prompt)))
    assert generation.tokens[0] == evicted_reference(tiny_llama(), prompt, keep, 8)


@pytest.mark.parametrize("hook, message", [
    (lambda past, _, n: past[:-1], "returned 3 layers; the model has 4"),
    (lambda past, _, n: [(k[:, :, : 3 + i], v[:, :, : 3 + i]) for i, (k, v) in enumerate(past)], "layers of different lengths"),
    (lambda past, _, n: [(k[:, :, :0], v[:, :, :0]) for k, v in past], "a cache of 0 tokens"),
])
def test_bad_kv_hook_results_are_refused(dense_runtime, hook, message):
    with pytest.raises(EffideployError, match=message):
        generate_with(dense_runtime, hook, [PROMPTS[0]], 4)


def test_attention_outputs_reach_the_hook_and_equal_eager_attention(tmp_path_factory, tiny_model_dir, calib_file):
    from effideploy.runtimes.onnx import OnnxRuntime

    result = exported("attentions", tmp_path_factory, tiny_model_dir, calib_file)
    assert result.parity.tokens_match
    prompt = PROMPTS[1]
    model = tiny_llama()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([prompt]), output_attentions=True).attentions
    seen = []
    with OnnxRuntime(result.output) as runtime:
        generation = generate_with(runtime, lambda past, attentions, n: seen.append(attentions) or past, [prompt], 6)
    (attentions,) = seen
    assert len(attentions) == 4
    for got, want in zip(attentions, expected):
        assert got.shape == (1, 2, len(prompt), len(prompt))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    from effideploy.runtimes.pytorch import TorchRuntime

    assert generation.tokens == TorchRuntime(model=tiny_llama()).generate([prompt], 6).tokens


def test_plain_export_has_no_attention_outputs(dense_runtime):
    assert dense_runtime.attention_outputs == []
    assert dense_runtime.describe()["attention_outputs"] is False


def test_context_length_is_enforced(dense_runtime):
    with pytest.raises(EffideployError, match="exceed the model's context length 512"):
        dense_runtime.generate([list(range(3, 503))], 20)


def test_a_folder_without_a_model_is_refused(tmp_path):
    from effideploy.runtimes.onnx import OnnxRuntime

    with pytest.raises(EffideployError, match="holds no ONNX model"):
        OnnxRuntime(tmp_path)


def test_describe_names_engine_and_settings(dense_runtime):
    description = dense_runtime.describe()
    assert description["runtime"] == "onnx" and description["engine"].startswith("onnxruntime ")
    assert description["providers"] == ["CPUExecutionProvider"] and description["dtype"] == "float32"
