"""ONNX Runtime adapter for effideploy's ONNX exports (``exporters/onnx/export.py``): greedy generation with explicit
``prefill`` and ``decode_one_token`` steps over a KV cache the runner owns, gpt-fast style.

The cache is one buffer per layer and per key/value, sized for the prompt plus the tokens to generate. Through IO
binding each buffer is bound as both the layer's past input and its present output; the graph's
GroupQueryAttention sees the same memory on both sides and appends the new token in place, so a decode step copies
no cache and allocates nothing but three tiny int64 arrays. The valid length of the cache is
``attention_mask.shape[1] - sequence``; rows beyond it are scratch.

Token compression (``compress(spec)``, or the export's recorded method) becomes a KV hook:
``kv_hook(past, attentions, prompt_length) -> new_past`` runs once, between prefill and the
first decode step. ``past`` is a list of (key, value) arrays [batch, kv_heads, prompt_length, head_dim] (views of
the runner's buffers on CPU: copy what you keep), ``attentions`` the per-layer attention probabilities of the
prompt [batch, heads, prompt_length, prompt_length] when the export has them (``--attention-outputs``), else None.
It returns the (key, value) pairs to keep, every layer with the same length (one attention_mask serves all
layers). Decoding then continues with ``position_ids`` counting absolute tokens (RoPE positions are unchanged by
eviction) and an ``attention_mask`` as long as the shortened cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from effideploy.errors import EffideployError
from effideploy.runtimes.base import (Capabilities, ContinuationRequest, Generation, Runtime, TokenScores,
                                      by_context, check_requests, scores_from_logits, scores_of,
                                      support_of)
from effideploy.runtimes.onnx_cache import KVCache, Past

MODEL_FILE = "model.onnx"

KVHook = Callable[[Past, "list[np.ndarray] | None", int], Past]

# Logit cells (rows x tokens x vocabulary) one scoring forward may produce: 64 M floats, 256 MB in fp32, so a batch of
# long continuations is split rather than allocated at once.
SCORE_BATCH_CELLS = 64 * 1024 * 1024


class OnnxRuntime(Runtime):
    name = "onnx"
    capabilities = Capabilities(compression_kinds=frozenset({"kv"}), batching=True,
                                weight_formats=("float32", "float16", "int8", "int4"), exporter="onnx")

    @classmethod
    def check_compression(cls, spec, *, attention_outputs: bool | None = None, **_):
        """KV eviction between prefill and decode only; one attention_mask serves every layer, so methods that keep
        different lengths per layer cannot run; attention-ranked methods need a graph with attention outputs."""
        from effideploy.compression import METHODS, parse_spec

        spec = parse_spec(spec)
        method = METHODS.get(spec.method)
        if method.kind in ("llm", "vision"):
            raise EffideployError(f"token compression {spec} prunes tokens inside the forward pass, which an exported ONNX "
                                  "graph cannot do; run it on the torch runtime")
        if method.kind == "kv-dtype":
            raise EffideployError(f"token compression {spec} is vLLM's kv_cache_dtype (emulated on torch); the ONNX runner "
                                  "keeps the graph's KV dtype")
        if getattr(method, "per_layer_lengths", False):
            raise EffideployError(f"token compression {spec} keeps a different number of entries per layer; the ONNX "
                                  "runner feeds one attention_mask to all layers: run it on the torch runtime")
        if method.needs_attention and attention_outputs is False:
            raise EffideployError(f"token compression {spec} needs the prefill attention probabilities: export the ONNX "
                                  "graph with attention_outputs=True")
        return super().check_compression(spec)

    @classmethod
    def export_options(cls, compression) -> dict:
        from effideploy.compression import METHODS, parse_spec

        if compression is not None and METHODS.get(parse_spec(compression).method).needs_attention:
            return {"attention_outputs": True}
        return {}

    @classmethod
    def preload(cls) -> None:
        import onnxruntime  # noqa: F401

    def __init__(self, path, *, providers: list | None = None, threads: int | None = None,
                 kv_hook: KVHook | None = None, session_config: dict[str, str] | None = None,
                 device: str | None = None) -> None:
        """``path``: an export folder (holding model.onnx) or an .onnx file. ``providers``: ONNX Runtime execution
        providers (default: CUDA when this onnxruntime has it, else CPU). ``threads``: intra-op threads.
        ``session_config``: extra session config entries, e.g. {"session.intra_op.allow_spinning": "0"}."""
        import onnxruntime as ort

        path = Path(path)
        model_file = path / MODEL_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise EffideployError(f"{path} holds no ONNX model ({MODEL_FILE}); export one with effideploy export --runtime onnx")
        from effideploy.exporters.manifest import read_export_manifest

        self.path = path
        self.manifest = read_export_manifest(path if path.is_dir() else path.parent)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no per-initializer notes at load
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, str(value))
        if providers is None and device is not None:  # auto | cpu | cuda[:N] (effideploy.device)
            from effideploy.device import onnx_providers

            providers = onnx_providers(device, ort.get_available_providers())
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a broken or foreign file: say which
            raise EffideployError(f"onnxruntime cannot load {model_file}: {str(exc).splitlines()[0]}") from None
        self.threads = threads
        self.kv_hook = kv_hook
        self._last_kv: dict | None = None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.num_layers = sum(name.startswith("past_key_values.") and name.endswith(".key") for name in inputs)
        if not self.num_layers or "attention_mask" not in inputs or "logits" not in outputs:
            raise EffideployError(f"{model_file} is not an effideploy decoder graph (needs input_ids, attention_mask, "
                                  "position_ids, past_key_values.N.key/value -> logits, present.N.key/value)")
        past = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        if past.type not in _NUMPY_TYPES:
            raise EffideployError(f"{model_file}: KV cache type {past.type} is not supported (float32 or float16)")
        self.dtype = _NUMPY_TYPES[past.type]
        self.attention_outputs = [name for name in outputs if name.startswith("attentions.")]
        self.vocab_size = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
        self.context_length = (self.manifest or {}).get("model", {}).get("context_length")
        self._cache: KVCache | None = None
        recorded = (self.manifest or {}).get("token_compression")
        if kv_hook is None and recorded:  # the method and budget the export carries apply unless overridden
            from effideploy.compression.spec import CompressionSpec

            self.compress(CompressionSpec.from_config(recorded))

    # -------------------------------------------------------------------------------------------- steps

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` tokens (the previous one when it fits: rows
        beyond the valid length are never read, so nothing needs clearing)."""
        if self.context_length and capacity > self.context_length:
            raise EffideployError(f"{capacity} tokens exceed the model's context length {self.context_length}")
        if self._cache is None or not self._cache.fits(batch, capacity):
            self._cache = KVCache(self.num_layers, batch, self.kv_heads, capacity, self.head_dim, self.dtype, self.device)
        self._cache.length = 0
        return self._cache

    def prefill(self, input_ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Run prompts [batch, length] into an empty cache; returns the logits of every position [batch, length, V]
        and, when the graph has them, each layer's attention probabilities [batch, heads, length, length]."""
        batch, length = input_ids.shape
        logits = self._output_buffer((batch, length, self.vocab_size))
        binding = self._binding(cache, logits[1])
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
        self._run(binding, input_ids, np.ones((batch, length), dtype=np.int64), positions)
        cache.length = length
        attentions = None
        if self.attention_outputs:
            attentions = [value.numpy() for value in binding.get_outputs()[-len(self.attention_outputs):]]
        return self._read(logits), attentions

    def decode_one_token(self, tokens: np.ndarray, position: int, cache: KVCache) -> np.ndarray:
        """One token per sequence [batch] at absolute ``position``; appends to the cache in place and returns the
        logits [batch, V] (a buffer reused by the next step: copy what you keep)."""
        if cache.decode is None:  # bound once: the buffers do not move, only the three small inputs change
            logits = self._output_buffer((cache.batch, 1, self.vocab_size))
            cache.decode = (self._binding(cache, logits[1]), logits)
        binding, logits = cache.decode
        batch = tokens.shape[0]
        mask = np.ones((batch, cache.length + 1), dtype=np.int64)
        positions = np.full((batch, 1), position, dtype=np.int64)
        self._run(binding, tokens.reshape(batch, 1), mask, positions)
        cache.length += 1
        return self._read(logits)[:, -1]

    # -------------------------------------------------------------------------------------------- generation

    def compress(self, spec) -> None:
        """Attach token compression: a spec (string or CompressionSpec), None to detach, or a raw
        ``kv_hook(past, attentions, prompt_length) -> past`` callable (see the module docstring)."""
        if spec is None or callable(spec):
            self.kv_hook = spec
            return
        from effideploy.compression import make_kv_hook

        self.kv_hook = make_kv_hook(self.check_compression(spec, attention_outputs=bool(self.attention_outputs)))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation, one prompt at a time (bs1 latency)."""
        tokens, prefill_times, decode_times, kept, hook_times = [], [], [], [], []
        start_all = time.perf_counter()
        for prompt in prompts:
            out, prefill_time, steps, extra = self._generate(np.array([prompt], dtype=np.int64), max_new_tokens,
                                                             self.kv_hook)
            tokens.append(out[0])
            prefill_times.append(prefill_time)
            decode_times.append(steps)
            kept.append(extra[0])
            hook_times.append(extra[1])
        if self.kv_hook is not None and prompts:
            self._last_kv = {"prompt_tokens": len(prompts[-1]), "kept_mean": sum(kept) / len(kept)}
        return Generation(tokens=tokens, prefill_seconds=prefill_times, decode_seconds=decode_times,
                          total_seconds=time.perf_counter() - start_all,
                          extra={"kv_length_after_prefill": kept, "kv_hook_seconds": hook_times})

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation of equal-length prompts as one batch (throughput), the KV hook included."""
        if len({len(p) for p in prompts}) != 1:
            raise EffideployError("generate_batch needs prompts of equal length")
        start_all = time.perf_counter()
        out, prefill_time, steps, extra = self._generate(np.array(prompts, dtype=np.int64), max_new_tokens,
                                                         self.kv_hook)
        return Generation(tokens=out, prefill_seconds=[prefill_time] * len(prompts),
                          decode_seconds=[steps] * len(prompts), total_seconds=time.perf_counter() - start_all,
                          extra={"kv_length_after_prefill": [extra[0]] * len(prompts), "kv_hook_seconds": extra[1]})

    def kv_record(self) -> dict | None:
        return self._last_kv if self.kv_hook is not None else None

    def _generate(self, input_ids: np.ndarray, max_new_tokens: int, kv_hook: KVHook | None):
        batch, length = input_ids.shape
        if length < 1 or max_new_tokens < 1:
            raise EffideployError("generation needs a non-empty prompt and max_new_tokens >= 1")
        cache = self.new_cache(batch, length + max_new_tokens)
        start = time.perf_counter()
        logits, attentions = self.prefill(input_ids, cache)
        next_tokens = logits[:, -1].argmax(-1)
        prefill_time = time.perf_counter() - start
        hook_time = 0.0
        if kv_hook is not None:
            start = time.perf_counter()
            cache.replace(kv_hook(cache.past(), attentions, length))
            hook_time = time.perf_counter() - start
        kept = cache.length
        generated, steps = [next_tokens], []
        for step in range(max_new_tokens - 1):
            start = time.perf_counter()
            next_tokens = self.decode_one_token(next_tokens, length + step, cache).argmax(-1)
            steps.append(time.perf_counter() - start)
            generated.append(next_tokens)
        return np.stack(generated, axis=1).tolist(), prefill_time, steps, (kept, hook_time)

    # -------------------------------------------------------------------------------------------- scoring

    def logits(self, sequences: list[list[int]]) -> np.ndarray:
        """Logits of every position [batch, length, vocab] of equal-length sequences, from an empty cache."""
        ids = np.array(sequences, dtype=np.int64)
        batch, length = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()}
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        for index in range(self.num_layers):
            feed[f"past_key_values.{index}.key"] = feed[f"past_key_values.{index}.value"] = empty
        return self.session.run(["logits"], feed)[0]

    def score_windows(self, sequences: list[list[int]], *, top_k: int = 0,
                      support: list[torch.Tensor] | None = None) -> list[TokenScores]:
        """Top-k and support log-probabilities (on request) from the graph's full logits of every position."""
        results = []
        for index, sequence in enumerate(sequences):
            logits = self.logits([sequence])[0].astype(np.float32)
            results.append(scores_from_logits(torch.from_numpy(logits), torch.tensor(sequence), top_k=top_k,
                                              support=support_of(support, index)))
        return results

    def score_continuations(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        """Without a KV hook, the continuations of one context (a multiple-choice item's options, which the callers
        send consecutively) are scored in one full forward of [context + continuation] rows, right-padded to one
        length: attention is causal, so padding after a row's last token cannot change that row's logits. That is
        one graph run per item where teacher forcing took one per continuation token (zero-shot suites: 10-30x
        fewer runs). With a KV hook the context must be compressed before the continuation sees it, so those
        requests go through prefill, the hook, and teacher-forced decode steps."""
        check_requests(requests)
        if self.kv_hook is not None:
            return self._score_through_cache(requests)
        results: list[TokenScores] = []
        for group in by_context(requests, row_budget=SCORE_BATCH_CELLS // max(self.vocab_size, 1)):
            length = max(len(c) + len(t) for c, t in group)
            rows = [list(c) + list(t) + [0] * (length - len(c) - len(t)) for c, t in group]
            logits = self.logits(rows)
            for row, (context, continuation) in zip(logits, group):
                start = len(context) - 1  # the logits at position i predict token i + 1
                picked = row[start:start + len(continuation)].astype(np.float32)
                results.append(scores_of(torch.from_numpy(picked), torch.tensor(continuation)))
        return results

    def _score_through_cache(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        """Each distinct context is prefilled once and the KV hook applied; each continuation is teacher-forced one
        decode step at a time (the graph takes one new token per decode step); the cache's valid length is reset
        to the context's before the next continuation, since rows beyond it are scratch."""
        results, context, last, context_length = [], None, None, 0
        cache = self.new_cache(1, max(len(c) + len(t) for c, t in requests))
        for request_context, continuation in requests:
            if request_context != context:
                context, cache.length = request_context, 0
                logits, attentions = self.prefill(np.array([context], dtype=np.int64), cache)
                last = logits[0, -1].astype(np.float32).copy()
                cache.replace(self.kv_hook(cache.past(), attentions, len(context)))
                context_length = cache.length
            cache.length, rows = context_length, [last]
            for position, token in enumerate(continuation[:-1], start=len(context)):
                step = self.decode_one_token(np.array([token], dtype=np.int64), position, cache)
                rows.append(step[0].astype(np.float32).copy())
            results.append(scores_of(torch.from_numpy(np.stack(rows)), torch.tensor(continuation)))
        return results

    # -------------------------------------------------------------------------------------------- plumbing

    def _output_buffer(self, shape):
        import onnxruntime as ort

        if self.device == "cpu":
            array = np.empty(shape, dtype=self.dtype)
            return array, ort.OrtValue.ortvalue_from_numpy(array)
        return None, ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)

    def _read(self, logits) -> np.ndarray:
        array, value = logits
        return array if array is not None else value.numpy()

    def _binding(self, cache: KVCache, logits):
        binding = self.session.io_binding()
        binding.bind_ortvalue_output("logits", logits)
        for index in range(self.num_layers):
            for kind, buffer in (("key", cache.ort_keys[index]), ("value", cache.ort_values[index])):
                binding.bind_ortvalue_input(f"past_key_values.{index}.{kind}", buffer)
                binding.bind_ortvalue_output(f"present.{index}.{kind}", buffer)
        return binding

    def _run(self, binding, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        # IO binding references CPU inputs without copying: the arrays must stay alive until the run returns.
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        for name in self.attention_outputs:  # their length changes every step: let ORT allocate them afresh
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"runtime": self.name, "engine": f"onnxruntime {ort.__version__}", "path": str(self.path),
                "providers": self.session.get_providers(), "threads": self.threads or "default",
                "dtype": np.dtype(self.dtype).name,
                "quantize": (self.manifest or {}).get("quantize"),
                "kv_cache": "per-layer buffers shared by past and present (IO binding)",
                "attention_outputs": bool(self.attention_outputs)}

    def close(self) -> None:
        self._cache = None
        self.session = None


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

