"""Token compression: fewer tokens in the LLM or fewer entries in its KV cache, orthogonal to parameter pruning
(EffiVLM-Bench). A method and its budget are a spec string ``method:budget[,name=value...]``:

- KV cache after prefill (budget = fraction of the prompt's entries kept per layer, 10% of it the recent window):
  ``streamingllm``, ``h2o``, ``snapkv``, ``pyramidkv``, ``random``;
- inside the LLM: ``fastv:k=2,r=0.5`` (r = fraction of candidate tokens kept);
- LLaVA image tokens: ``visionzip:0.25``, ``prumerge+:0.25`` (and FastV on image tokens);
- KV storage dtype: ``kv-dtype:fp8`` (the only one vLLM runs).

Entry points: :func:`parse_spec`; a runtime attaches a spec with ``Runtime.compress(spec)``
(:func:`torch_hooks` and :func:`make_kv_hook` build what the PyTorch and ONNX Runtime adapters attach), :func:`validate_for_runtime`, :func:`score_continuation`, and the KV memory
accounting in :mod:`effideploy.compression.memory`.
"""

from __future__ import annotations

from effideploy.compression.spec import CompressionSpec, parse_spec
from effideploy.registry import Registry

METHODS = Registry("token compression method", {
    "streamingllm": "effideploy.compression.methods:StreamingLLM",
    "h2o": "effideploy.compression.methods:H2O",
    "snapkv": "effideploy.compression.methods:SnapKV",
    "pyramidkv": "effideploy.compression.methods:PyramidKV",
    "random": "effideploy.compression.methods:RandomKV",
    "fastv": "effideploy.compression.methods:FastV",
    "visionzip": "effideploy.compression.methods:VisionZip",
    "prumerge+": "effideploy.compression.methods:PruMergePlus",
    "kv-dtype": "effideploy.compression.methods:KVDtype",
})

__all__ = ["METHODS", "CompressionSpec", "parse_spec", "build_method", "torch_hooks", "make_kv_hook",
           "validate_for_runtime", "vllm_kv_cache_dtype", "score_continuation", "generate", "kv_memory"]


def build_method(spec):
    spec = parse_spec(spec)
    return METHODS.get(spec.method)(spec)


def validate_for_runtime(spec, runtime: str, **export_facts) -> CompressionSpec:
    """The spec, or a one-line EffideployError when ``runtime`` cannot run it: each runtime adapter declares what it
    runs (``Runtime.check_compression``); ``export_facts`` describe the artifact (e.g. ``attention_outputs``)."""
    from effideploy.runtimes import RUNTIMES

    return RUNTIMES.get(str(runtime).lower()).check_compression(spec, **export_facts)


def vllm_kv_cache_dtype(spec) -> str:
    """vLLM's ``kv_cache_dtype`` for a kv-dtype spec (after validate_for_runtime(spec, "vllm"))."""
    spec = validate_for_runtime(spec, "vllm")
    return str(spec.option("dtype", "fp8"))


def torch_hooks(spec):
    """A ``hooks(model, prompt_length)`` factory for ``TorchRuntime.generate(..., hooks=...)``; its ``records`` list
    gets one entry per prompt (KV entries kept per layer, compressed and full KV bytes)."""
    from effideploy.compression.hooks import TorchHooks

    return TorchHooks(spec)


def make_kv_hook(spec):
    from effideploy.compression.onnx import make_kv_hook as make

    return make(spec)


def score_continuation(model, spec_or_hooks, context, continuation):
    from effideploy.compression.hooks import score_continuation as score

    return score(model, spec_or_hooks, context, continuation)


def generate(model, input_ids, max_new_tokens, *, hooks=None, **prefill_inputs):
    from effideploy.compression.hooks import generate as run

    return run(model, input_ids, max_new_tokens, hooks=hooks, **prefill_inputs)


def kv_memory(spec, config, prompt_len, dtype=None):
    import torch

    from effideploy.compression.memory import kv_memory as memory

    return memory(spec, config, prompt_len, dtype or torch.float32)
