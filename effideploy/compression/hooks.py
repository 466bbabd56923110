"""PyTorch hooks: a compression attaches to a transformers Llama (or the language model of a LLaVA) for one
generate call, as kvpress does with forward hooks, and detaches afterwards; no modeling code is copied.

The first forward of a session with an empty cache is the prefill. What each kind does there:

- ``kv``: after each attention layer's prefill, its cached keys/values are cut to the kept indices (the prefill
  itself attends to everything, so its logits are unchanged; decoding sees the compressed cache).
- ``llm`` (FastV): a hook after layer K-1's attention scores the tokens; pre-hooks on layers K.. shorten the hidden
  states, RoPE tables, position ids and mask to the kept tokens.
- ``vision``: see :mod:`effideploy.compression.vision` (fewer image tokens reach the LLM).
- ``kv-dtype``: every new cache entry is rounded through the storage dtype.

Two things every kind needs: after eviction ``cache.get_seq_length()`` is no longer the next position, so a pre-hook
on the decoder stack passes explicit absolute ``position_ids``; and layers whose cache is shorter than layer 0's
(PyramidKV, FastV) get the mask that transformers sized from layer 0 cut to their own length.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache

from effideploy.compression.attention import RecomputedAttention
from effideploy.compression.methods import gather_tokens
from effideploy.errors import EffideployError


def language_model(model):
    """The decoder stack (LlamaModel) of a causal LM or of a LLaVA."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner


class TorchHooks:
    """``hooks(model, prompt_length)`` factory for ``TorchRuntime.generate(..., hooks=...)``. Each session's prefill
    appends a record to ``records``: ``prompt_tokens`` (as given), ``llm_prompt_tokens`` (what reached the LLM),
    ``kept_per_layer``, ``kv_bytes`` / ``full_kv_bytes`` (the prompt's cache compressed / uncompressed) and
    ``kept_indices`` ({layer: [B, KVH, n]} for KV methods, {k: [B, L'] positions kept from layer k} for FastV)."""

    def __init__(self, spec) -> None:
        from effideploy.compression import build_method
        from effideploy.runtimes.pytorch import TorchRuntime

        self.spec = TorchRuntime.check_compression(spec)
        self.method = build_method(self.spec)
        self.records: list[dict] = []

    def __call__(self, model, prompt_length: int) -> "Session":
        return Session(self, model, prompt_length)


class Session:
    def __init__(self, owner: TorchHooks, model, prompt_length: int) -> None:
        self.owner, self.method, self.model, self.prompt_length = owner, owner.method, model, prompt_length
        self.stack = language_model(model)
        self.layers = list(self.stack.layers)
        self.handles = []
        self.next_position = None  # absolute position of the next token fed to the LLM
        self.prefilling = False
        self.llm_prompt_tokens = 0
        self.candidates = None  # FastV: [B, L] tokens it may drop (image tokens of a VLM)
        self.fastv_keep = self.pruned_inputs = None
        self.kept = {}

    def hook(self, module, *, pre=None, post=None) -> None:
        if pre is not None:
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def __enter__(self):
        removed = [index for index, layer in enumerate(self.layers) if getattr(layer.self_attn, "is_no_op", False)]
        if removed:
            # Their caches hold zero-width entries that only count tokens; eviction bookkeeping assumes every layer
            # holds real keys. The ONNX runner handles such models (its KV tensors exist for attention blocks only).
            raise EffideployError(f"token compression {self.method.spec} on the torch runtime does not support blocks "
                                  f"without attention (blocks {removed} have a no-op attention); use the onnx runtime")
        try:
            self.hook(self.stack, pre=self._stack_pre, post=self._stack_post)
            for layer in self.layers:
                self.hook(layer, pre=self._fit_mask)
            kind = self.method.kind
            if kind == "kv":
                for layer in self.layers:
                    self.hook(layer.self_attn, post=self._evict)
            elif kind == "kv-dtype":
                for layer in self.layers:
                    self.hook(layer.self_attn, post=self._quantize)
            elif kind == "llm":
                k = self.method.k
                if k >= len(self.layers):
                    raise EffideployError(f"token compression {self.method.spec}: k={k} but the model has {len(self.layers)} layers")
                self.hook(self.layers[k - 1].self_attn, post=self._fastv_scores)
                for layer in self.layers[k:]:
                    self.hook(layer, pre=self._fastv_prune)
            from effideploy.compression.vision import attach

            attach(self)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return False

    # --- every kind ----------------------------------------------------------------------------------------------

    def _stack_pre(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise EffideployError(
                f"token compression {self.method.spec} needs a forward with a KV cache (prefill, then decode); a "
                "forward without one (e.g. TorchRuntime.score_windows) cannot be compressed: use TorchRuntime.score_continuations")
        tokens = kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]
        q_len = tokens.shape[1]
        if self.next_position is None:
            self.next_position = cache.get_seq_length()
            self.prefilling = self.next_position == 0
            self.llm_prompt_tokens = q_len
        if kwargs.get("position_ids") is None:
            start = self.next_position
            kwargs["position_ids"] = torch.arange(start, start + q_len, device=tokens.device).unsqueeze(0)
        self.next_position = int(kwargs["position_ids"].max()) + 1
        return args, kwargs

    def _stack_post(self, module, args, kwargs, output):
        if self.prefilling:
            self.prefilling = False
            self.owner.records.append(self._record(kwargs["past_key_values"]))

    def _record(self, cache) -> dict:
        keys = cache.layers[0].keys
        full_element = keys.element_size()
        element = getattr(self.method, "element_size", full_element)
        per_token = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3]  # K and V elements of one token in one layer
        kept = [layer.get_seq_length() for layer in cache.layers]
        return {"spec": str(self.method.spec), "prompt_tokens": self.prompt_length, "llm_prompt_tokens": self.llm_prompt_tokens,
                "kept_per_layer": kept, "kv_bytes": sum(kept) * per_token * element,
                "full_kv_bytes": self.prompt_length * len(kept) * per_token * full_element, "kept_indices": self.kept}

    def _fit_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        if self.prefilling or not isinstance(mask, torch.Tensor) or mask.dim() != 4 or cache is None:
            return None
        # transformers sizes one mask from layer 0's cache; a shorter layer keeps its last columns (every cached
        # entry is visible to the new queries, the causal part among them sits at the end)
        need = cache.layers[module.self_attn.layer_idx].get_seq_length() + _hidden(args, kwargs).shape[1]
        if mask.shape[-1] <= need:
            return None
        kwargs["attention_mask"] = mask[..., -need:]
        return args, kwargs

    # --- kv ------------------------------------------------------------------------------------------------------

    def _evict(self, module, args, kwargs, output):
        if not self.prefilling:
            return
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        batch, kv_heads, length, _ = layer.keys.shape
        stats = RecomputedAttention(module, _hidden(args, kwargs), kwargs["position_embeddings"], layer.keys)
        indices = self.method.keep_indices(stats, batch, kv_heads, length, module.layer_idx, len(self.layers))
        if indices is not None:
            layer.keys, layer.values = gather_tokens(layer.keys, layer.values, indices)
            self.kept[module.layer_idx] = indices

    def _quantize(self, module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        new = _hidden(args, kwargs).shape[1]
        layer.keys[..., -new:, :] = self.method.quantize(layer.keys[..., -new:, :])
        layer.values[..., -new:, :] = self.method.quantize(layer.values[..., -new:, :])

    # --- FastV ---------------------------------------------------------------------------------------------------

    def _fastv_scores(self, module, args, kwargs, output):
        if not self.prefilling:
            return
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        attention = RecomputedAttention(module, _hidden(args, kwargs), kwargs["position_embeddings"], keys)
        scores = attention.window(1)[:, :, 0].mean(1)  # the last token's attention, averaged over heads
        candidates = self.candidates
        if candidates is None:
            candidates = torch.ones_like(scores, dtype=torch.bool)
            candidates[:, -1] = False
        self.fastv_keep = self.method.keep_positions(scores, candidates)
        self.pruned_inputs = None
        if self.fastv_keep is not None:
            self.kept[self.method.k] = self.fastv_keep

    def _fastv_prune(self, module, args, kwargs):
        keep = self.fastv_keep
        if not self.prefilling or keep is None:
            return None
        hidden = _hidden(args, kwargs)
        if self.pruned_inputs is None:  # layer K: shorten its inputs once; layers after it reuse them
            cos, sin = kwargs["position_embeddings"]
            inputs = {"position_embeddings": (_take(cos, keep), _take(sin, keep))}
            if kwargs.get("position_ids") is not None:
                inputs["position_ids"] = _take(kwargs["position_ids"], keep)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                mask = mask.expand(keep.shape[0], -1, -1, -1)
                mask = mask.take_along_dim(keep[:, None, :, None], 2).take_along_dim(keep[:, None, None, :], 3)
                inputs["attention_mask"] = mask
            self.pruned_inputs = inputs
        if hidden.shape[1] != keep.shape[1]:
            hidden = _take(hidden, keep)
            args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        kwargs.update(self.pruned_inputs)
        return args, kwargs


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _take(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows ``keep`` [B, L'] along dim 1 of a [B or 1, L, ...] tensor."""
    tensor = tensor.expand(keep.shape[0], *tensor.shape[1:])
    index = keep.view(*keep.shape, *([1] * (tensor.dim() - 2)))
    return tensor.take_along_dim(index, 1)


def _as_hooks(hooks):
    return hooks if hooks is None or callable(hooks) else TorchHooks(hooks)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, hooks=None, **prefill_inputs) -> list[list[int]]:
    """Greedy generation with an explicit cache (like TorchRuntime), for models TorchRuntime does not drive (LLaVA:
    pass ``pixel_values=``); ``hooks`` is a TorchHooks, a spec, or None."""
    from effideploy.runtimes.pytorch import greedy

    hooks = _as_hooks(hooks)
    with hooks(model, input_ids.shape[1]) if hooks is not None else nullcontext():
        return greedy(model, input_ids, max_new_tokens, **prefill_inputs)[0]


def score_continuation(model, hooks, context: list[int], continuation: list[int]):
    """TokenScores of ``continuation`` given ``context`` (entry t: NLL and argmax of continuation[t]), the context's
    prefill compressed by ``hooks`` (TorchHooks, spec, or None for the full cache), the continuation teacher-forced in
    one forward over the compressed cache (``TorchRuntime.score_continuations`` with compression attached)."""
    from effideploy.runtimes.pytorch import continuation_scores, prefill

    hooks = _as_hooks(hooks)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), hooks(model, len(context)) if hooks is not None else nullcontext():
        last = prefill(model, torch.tensor([context], device=model.device), cache)[0]
        return continuation_scores(model, cache, last, continuation)
