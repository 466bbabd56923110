"""The PyTorch hooks on tiny random Llamas: budget-1.0 identity, compressed cache shapes, and decoding after eviction
against a reference that masks the evicted keys in one full-attention forward at absolute positions."""

import pytest
import torch
from transformers import DynamicCache

from effideploy.compression import build_method, kv_memory, score_continuation, torch_hooks
from effideploy.compression.hooks import language_model
from effideploy.errors import EffideployError
from effideploy.runtimes.pytorch import TorchRuntime
from tests.conftest import tiny_llama

KV_SPECS = ["streamingllm:0.3", "h2o:0.3", "snapkv:0.3", "pyramidkv:0.3", "random:0.3"]
ALL_METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "random"]


@pytest.fixture(scope="module")
def gqa_model():
    return tiny_llama(num_attention_heads=4, num_key_value_heads=2)  # 2 query heads per KV head


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 384, (48,), generator=torch.Generator().manual_seed(0)).tolist()


def compressed(model, hooks):
    runtime = TorchRuntime(model=model)
    runtime.compress(hooks)
    return runtime


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def plain_tokens(gqa_model, prompt):
    return TorchRuntime(model=gqa_model).generate([prompt], 10).tokens


@pytest.mark.parametrize("spec", [f"{m}:1.0" for m in ALL_METHODS] + ["fastv:k=2,r=1.0", "fastv:k=1,r=1.0"])
def test_budget_one_generates_exactly_the_uncompressed_tokens(gqa_model, prompt, plain_tokens, spec):
    hooks = torch_hooks(spec)
    assert compressed(gqa_model, hooks).generate([prompt], 10).tokens == plain_tokens
    assert hooks.records[0]["kept_per_layer"] == [len(prompt)] * 4
    assert no_hooks_left(gqa_model)


def test_budget_one_keeps_the_cache_bit_for_bit(gqa_model, prompt):
    caches = []
    for hooks in (None, torch_hooks("snapkv:1.0")):
        cache = DynamicCache(config=gqa_model.config)
        with hooks(gqa_model, len(prompt)) if hooks else torch.no_grad():
            with torch.no_grad():
                gqa_model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        caches.append(cache)
    for full, kept in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(full.keys, kept.keys) and torch.equal(full.values, kept.values)


@pytest.mark.parametrize("spec", KV_SPECS)
def test_compressed_cache_shapes(gqa_model, prompt, spec):
    hooks = torch_hooks(spec)
    cache = DynamicCache(config=gqa_model.config)
    with hooks(gqa_model, len(prompt)), torch.no_grad():
        gqa_model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    method = build_method(spec)
    for index, layer in enumerate(cache.layers):
        expected = method.kept_length(len(prompt), index, 4)
        assert layer.keys.shape == layer.values.shape == (1, 2, expected, 32)
        indices = hooks.records[0]["kept_indices"][index][0]
        assert indices.shape == (2, expected)
        assert torch.equal(indices[:, -1], torch.tensor([len(prompt) - 1] * 2))  # the recent window survives
    record = hooks.records[0]
    assert record["kv_bytes"] == kv_memory(spec, gqa_model.config, len(prompt))["compressed_bytes"]
    assert record["full_kv_bytes"] == kv_memory(spec, gqa_model.config, len(prompt))["full_bytes"]


def masked_reference(model, ids: list[int], layer_masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of one cache-less forward in which layer i attends through ``layer_masks[i]`` [heads, S, S]."""
    handles = []
    for layer in language_model(model).layers:
        mask = layer_masks.get(layer.self_attn.layer_idx)
        if mask is not None:
            def swap(module, args, kwargs, mask=mask):
                return args, {**kwargs, "attention_mask": mask[None]}
            handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()


def eviction_masks(model, prompt_len: int, total: int, kept: dict) -> dict:
    """Prompt rows attend causally to everything; later rows only to the kept prompt keys of their KV head."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    masks = {}
    for layer, indices in kept.items():
        allowed = torch.zeros(indices.shape[1], prompt_len, dtype=torch.bool).scatter_(1, indices[0], True)
        mask = causal.repeat(config.num_attention_heads, 1, 1)
        mask[:, prompt_len:, :prompt_len] = allowed.repeat_interleave(groups, 0)[:, None, :]
        masks[layer] = mask
    return masks


@pytest.mark.parametrize("spec", KV_SPECS)
def test_decoding_after_eviction_matches_masked_full_attention(gqa_model, prompt, spec):
    continuation = torch.randint(3, 384, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    hooks = torch_hooks(spec)
    scores = score_continuation(gqa_model, hooks, prompt, continuation)
    L = len(prompt)
    masks = eviction_masks(gqa_model, L, L + len(continuation), hooks.records[0]["kept_indices"])
    reference = masked_reference(gqa_model, prompt + continuation, masks)[L - 1: L + len(continuation) - 1]
    expected_nll = -torch.log_softmax(reference, -1).gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)
    torch.testing.assert_close(scores.nll, expected_nll, atol=1e-4, rtol=1e-4)
    full = score_continuation(gqa_model, None, prompt, continuation)
    assert not torch.allclose(full.nll[1:], scores.nll[1:], atol=1e-3)  # the eviction did change the decode

    # the runtime's token-by-token decode agrees with the reference's greedy choice at every step
    generated = compressed(gqa_model, hooks).generate([prompt], 6).tokens[0]
    masks = eviction_masks(gqa_model, L, L + 5, hooks.records[1]["kept_indices"])
    reference = masked_reference(gqa_model, prompt + generated[:-1], masks)
    assert reference[L - 1:].argmax(-1).tolist() == generated


def test_fastv_matches_masking_the_pruned_tokens_from_layer_k(gqa_model, prompt):
    k, continuation = 2, torch.randint(3, 384, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    hooks = torch_hooks(f"fastv:k={k},r=0.25")
    scores = score_continuation(gqa_model, hooks, prompt, continuation)
    L, total = len(prompt), len(prompt) + len(continuation)
    keep = hooks.records[0]["kept_indices"][k][0]
    assert len(keep) == 1 + int(0.25 * (L - 1)) and keep[-1] == L - 1
    assert hooks.records[0]["kept_per_layer"] == [L] * k + [len(keep)] * (4 - k)
    visible = torch.zeros(total, dtype=torch.bool)
    visible[keep], visible[L:] = True, True
    # from layer k on nobody sees a pruned token (each still sees itself, so its unused row stays finite)
    mask = torch.ones(total, total, dtype=torch.bool).tril() & (visible[None, :] | torch.eye(total, dtype=torch.bool))
    masks = {layer: mask.repeat(4, 1, 1) for layer in range(k, 4)}
    reference = masked_reference(gqa_model, prompt + continuation, masks)[L - 1: total - 1]
    torch.testing.assert_close(scores.argmax, reference.argmax(-1))
    expected_nll = -torch.log_softmax(reference, -1).gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)
    torch.testing.assert_close(scores.nll, expected_nll, atol=1e-4, rtol=1e-4)
    generated = compressed(gqa_model, hooks).generate([prompt], 5).tokens[0]
    masks = {layer: mask[: L + 4, : L + 4].repeat(4, 1, 1) for layer in range(k, 4)}
    assert masked_reference(gqa_model, prompt + generated[:-1], masks)[L - 1:].argmax(-1).tolist() == generated


def test_fastv_on_a_tiny_llama_shortens_the_layers_from_k(prompt):
    model = tiny_llama()
    seen = []
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]),
                                                         with_kwargs=True) for layer in model.model.layers]
    hooks = torch_hooks("fastv:k=1,r=0.5")
    tokens = compressed(model, hooks).generate([prompt], 4).tokens[0]
    for handle in handles:
        handle.remove()
    kept = 1 + int(0.5 * (len(prompt) - 1))
    assert seen[:4] == [len(prompt), kept, kept, kept]  # prefill: layer 0 full, layers 1-3 pruned
    assert seen[4:] == [1] * 12 and len(tokens) == 4
    assert hooks.records[0]["kept_per_layer"] == [len(prompt)] + [kept] * 3
    assert hooks.records[0]["kv_bytes"] == kv_memory("fastv:k=1,r=0.5", model.config, len(prompt))["compressed_bytes"]


def test_fastv_k_beyond_the_model_is_refused(gqa_model, prompt):
    with pytest.raises(EffideployError, match="k=4 but the model has 4 layers"):
        compressed(gqa_model, torch_hooks("fastv:k=4,r=0.5")).generate([prompt], 2)
    assert no_hooks_left(gqa_model)


def test_eager_attention_masks_are_cut_per_layer(prompt):
    """Eager attention gets a 4D mask sized from layer 0; PyramidKV's shorter layers must still decode."""
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    model.config._attn_implementation = "eager"
    continuation = [5, 6, 7, 8]
    eager = score_continuation(model, "pyramidkv:0.3", prompt, continuation)
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(eager.nll, score_continuation(model, "pyramidkv:0.3", prompt, continuation).nll,
                               atol=1e-4, rtol=1e-4)


def test_cacheless_forward_is_refused(gqa_model, prompt):
    runtime = TorchRuntime(model=gqa_model)
    with pytest.raises(EffideployError, match="score_continuation"):
        with torch_hooks("snapkv:0.5")(gqa_model, len(prompt)):
            runtime.score_windows([prompt])


def test_kv_dtype_stores_fp8_values(gqa_model, prompt):
    hooks = torch_hooks("kv-dtype:fp8")
    cache = DynamicCache(config=gqa_model.config)
    method = build_method("kv-dtype:fp8")
    with hooks(gqa_model, len(prompt)), torch.no_grad():
        gqa_model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        gqa_model(input_ids=torch.tensor([[9]]), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == len(prompt) + 1
        assert torch.equal(method.quantize(layer.keys), layer.keys) and torch.equal(method.quantize(layer.values), layer.values)
    assert hooks.records[0]["kv_bytes"] * 4 == hooks.records[0]["full_kv_bytes"]  # fp8 against fp32
