"""llama.cpp runtime: a GGUF file (``effideploy export --runtime llamacpp``, or any llama/deci GGUF) through
llama-cpp-python's bindings of llama.cpp's C API.

The adapter drives the C API itself (``llama_decode`` over a ``llama_batch``, ``llama_get_logits_ith``, the KV
memory's ``seq_rm``) rather than the high-level ``Llama`` class: it needs the logits of every position only when
scoring (the class fixes that at construction, and computing them during generation would inflate the prefill
time), several sequences in one context for batched generation (``n_seq_max``), and greedy argmax on the raw
logits (what the other runtimes do; no sampler chain).

Timings are wall-clock around ``llama_decode`` plus reading the logits of the token to choose (the decode is
synchronous on CPU): ``prefill_seconds`` is the prompt's decode and the first token's choice, each
``decode_seconds`` entry one single-token decode. ``threads`` sets llama.cpp's ``n_threads`` and
``n_threads_batch`` (default: half the logical CPUs, as llama-cpp-python's ``Llama`` does).

If llama-cpp-python is not installed or its native library does not load, ``llamacpp_unavailable()`` gives the
reason and opening the runtime is a one-line error with it (scripts/setup.sh builds it from source).
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from pathlib import Path

import numpy as np
import torch

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import read_export_manifest
from effideploy.runtimes.base import Capabilities, ContinuationRequest, Generation, Runtime, TokenScores, check_prompts, check_requests

INSTALL_HINT = "scripts/setup.sh builds it (pip install llama-cpp-python==0.3.36: a C/C++ build with cmake)"
DEFAULT_CONTEXT = 2048
# llama.cpp's default KV cache is f16; the export's parity check uses f32 so that only the weights differ.
# llama.cpp's CPU flash attention rounds Q and the softmax'd weights to f16 (NLL differences of ~1e-2 against an fp32
# reference on the tiny model, 4e-6 without it): "auto" (its default) for measuring, "off" for exact parity.
FLASH_ATTN = {"auto": "LLAMA_FLASH_ATTN_TYPE_AUTO", "on": "LLAMA_FLASH_ATTN_TYPE_ENABLED",
              "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}
KV_CACHE_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32", "q8_0": "GGML_TYPE_Q8_0"}


@functools.lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux /proc/cpuinfo; False where it cannot be read)."""
    try:
        return any(line.startswith("flags") and " amx_tile" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def llamacpp_unavailable() -> str | None:
    """None when llama-cpp-python imports and its native library loads, else the reason (one line)."""
    try:
        import llama_cpp  # noqa: F401 - loads libllama
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc}); {INSTALL_HINT}"
    except (OSError, RuntimeError) as exc:  # the wheel is there but libllama does not load on this machine
        text = str(exc).strip().splitlines()
        return f"llama-cpp-python's native library does not load ({text[-1] if text else type(exc).__name__}); {INSTALL_HINT}"
    return None


def _import_llamacpp():
    reason = llamacpp_unavailable()
    if reason:
        raise EffideployError(f"the llamacpp runtime is unavailable: {reason}")
    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        # llama.cpp logs every load and context creation to stderr; keep its errors, to quote them in ours.
        @llama_cpp.llama_log_callback
        def _log(level, text, _user):
            if level == GGML_LOG_LEVEL_ERROR:
                LAST_ERRORS.append(text.decode("utf-8", errors="replace").strip())
                del LAST_ERRORS[:-5]

        _LOG_CALLBACK = _log
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


GGML_LOG_LEVEL_ERROR = 4  # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
LAST_ERRORS: list[str] = []
_LOG_CALLBACK = None  # the ctypes callback must outlive every llama.cpp call


def _last_error() -> str:
    """llama.cpp's reason: its "error loading model: ..." line (the cause), else its last error line."""
    for line in LAST_ERRORS:
        if "error loading model:" in line:
            return " ".join(line.split("error loading model:", 1)[1].split())
    return next((line for line in reversed(LAST_ERRORS) if line), "")


def gguf_path_of(path) -> Path:
    """The GGUF file of an export folder (its manifest's ``gguf_file``, else its only .gguf), or ``path`` itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise EffideployError(f"{path} is not a .gguf file")
        return path
    if not path.is_dir():
        raise EffideployError(f"{path} does not exist")
    manifest = read_export_manifest(path) or {}
    if manifest.get("gguf_file"):
        return path / manifest["gguf_file"]
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise EffideployError(f"{path} holds {len(files)} .gguf files; give the file, or an effideploy llamacpp export")
    return files[0]


class LlamaCppRuntime(Runtime):
    """``path``: a .gguf file or an export folder. ``n_ctx``: KV positions (per sequence; the context holds
    ``n_ctx * max_batch`` so batched generation fits). ``max_batch``: sequences ``generate_batch`` runs together. ``kv_cache_type``: f16 (llama.cpp's default), f32 or q8_0. ``flash_attn``: auto (llama.cpp's default) | on | off;
    ``kv_cache_type="f32", flash_attn="off"`` computes in float32 throughout (the export's parity check)."""

    name = "llamacpp"
    capabilities = Capabilities(compression_kinds=frozenset(), batching=True,
                                weight_formats=("float32", "float16", "f32", "f16", "bf16", "q8_0", "q6_k", "q5_0",
                                                "q5_1", "q5_k_s", "q5_k_m", "q4_0", "q4_1", "q4_k_s", "q4_k_m",
                                                "q3_k_s", "q3_k_m", "q3_k_l", "q2_k", "int8"),
                                exporter="llamacpp", server=True)

    def __init__(self, path, *, threads: int | None = None, n_ctx: int = DEFAULT_CONTEXT, n_batch: int = 512,
                 max_batch: int = 8, kv_cache_type: str = "f16", flash_attn: str = "auto") -> None:
        self.model = self.ctx = None
        self._batch = None
        if kv_cache_type not in KV_CACHE_TYPES:
            raise EffideployError(f"kv_cache_type must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache_type!r}")
        if flash_attn not in FLASH_ATTN:
            raise EffideployError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        llama_cpp = _import_llamacpp()
        self._lib = llama_cpp
        self.path = gguf_path_of(path)
        if not self.path.is_file():
            raise EffideployError(f"{self.path} does not exist")
        self.threads = threads
        self.n_ctx = int(n_ctx)
        self.max_batch = int(max_batch)
        self.n_batch = int(max(n_batch, self.max_batch))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0  # CPU: the runtime this adapter measures
        # On CPUs with AMX tiles llama.cpp moves q8_0 / K-quant weights into its AMX buffer, and decoding these
        # GGUFs there crashed the process (a segfault in llama_decode on a Xeon with amx_int8, where the same tests
        # pass on AVX2 and AVX-512 EPYCs). The plain CPU buffer is what every other x86 machine uses; elsewhere the
        # extra buffers (weight repacking) stay on, as a user's llama.cpp has them.
        self.extra_buffers = model_params.use_extra_bufts = not cpu_has_amx()
        LAST_ERRORS.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self.model:
            self.model = None
            raise EffideployError(f"llama.cpp cannot load {self.path}: {_last_error() or 'not a GGUF model it reads'}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.max_batch
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.max_batch
        params.kv_unified = True  # one KV buffer: a sequence may use any free cell, so n_ctx is not split per sequence
        params.no_perf = True
        params.type_k = params.type_v = getattr(llama_cpp, KV_CACHE_TYPES[kv_cache_type])
        self.kv_cache_type = kv_cache_type
        params.flash_attn_type = getattr(llama_cpp, FLASH_ATTN[flash_attn])
        self.flash_attn = flash_attn
        # llama-cpp-python's Llama default (half the logical CPUs, i.e. the physical cores with SMT); the C API's own
        # default is a fixed 4, which oversubscribes small machines.
        params.n_threads = params.n_threads_batch = int(threads or max(os.cpu_count() // 2, 1))
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            self.ctx = None
            self.close()
            raise EffideployError(f"llama.cpp cannot create a context for {self.path} (n_ctx {params.n_ctx})")
        self.n_threads = llama_cpp.llama_n_threads(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.max_batch)
        self.manifest = read_export_manifest(self.path.parent) or {}

    # ------------------------------------------------------------------------------------------ declarations

    @classmethod
    def check_compression(cls, spec, **_):
        from effideploy.compression import parse_spec

        spec = parse_spec(spec)
        raise EffideployError(f"token compression {spec} is not available on llama.cpp (effideploy attaches no KV "
                              "eviction or token pruning to it); run it on the torch or onnx runtime")

    @classmethod
    def context_options(cls, tokens: int) -> dict:
        return {"n_ctx": int(tokens)}

    @classmethod
    def preload(cls) -> None:
        _import_llamacpp()

    # ------------------------------------------------------------------------------------------ llama.cpp calls

    def _check_open(self) -> None:
        if self.ctx is None:
            raise EffideployError(f"the llamacpp runtime for {self.path} is closed")

    def _clear(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries (at most n_batch)."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for j, (token, position, sequence, logits) in enumerate(entries):
            batch.token[j] = token
            batch.pos[j] = position
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = sequence
            batch.logits[j] = logits
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise EffideployError(f"llama_decode failed with status {status} (context of {self.n_ctx} positions per "
                                  f"sequence; open the runtime with a larger n_ctx)")

    def _logits_row(self, index: int) -> np.ndarray:
        pointer = self._lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def _feed(self, tokens: list[int], start: int, sequence: int, *, all_logits: bool) -> np.ndarray:
        """Decode ``tokens`` at positions ``start``.. of ``sequence`` in chunks of n_batch; returns the logits of
        every token ([n, V]) when ``all_logits``, else of the last one ([1, V])."""
        rows = []
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset:offset + self.n_batch]
            last_chunk = offset + self.n_batch >= len(tokens)
            self._decode([(token, start + offset + k, sequence, all_logits or (last_chunk and k == len(chunk) - 1))
                          for k, token in enumerate(chunk)])
            if all_logits:  # every token asked for logits: llama_get_logits holds them in batch order
                pointer = self._lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(len(chunk) * self.n_vocab,))
                            .reshape(len(chunk), self.n_vocab).copy())
            elif last_chunk:
                rows.append(self._logits_row(len(chunk) - 1)[None])
        return np.concatenate(rows)

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        self._check_open()
        check_prompts(prompts, max_new_tokens, context=self.n_ctx, context_name="n_ctx", vocab_size=self.n_vocab)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Greedy generation, one prompt at a time (bs1 latency)."""
        self._check_lengths(prompts, max_new_tokens)
        tokens, prefill, decode = [], [], []
        start_all = time.perf_counter()
        for prompt in prompts:
            self._clear()
            tick = time.perf_counter()
            token = int(self._feed(list(prompt), 0, 0, all_logits=False)[-1].argmax())
            prefill.append(time.perf_counter() - tick)
            out, steps = [token], []
            for step in range(1, max_new_tokens):
                tick = time.perf_counter()
                token = int(self._feed([token], len(prompt) + step - 1, 0, all_logits=False)[-1].argmax())
                steps.append(time.perf_counter() - tick)
                out.append(token)
            tokens.append(out)
            decode.append(steps)
        return Generation(tokens=tokens, prefill_seconds=prefill, decode_seconds=decode,
                          total_seconds=time.perf_counter() - start_all, extra={"timing": "llama_decode wall clock"})

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> Generation:
        """Prompts as separate sequences of one context, decoded together: all prompts in one (chunked) prefill
        batch, then one ``llama_decode`` per step holding every sequence's next token (up to ``max_batch`` at a
        time). Each prompt's ``prefill_seconds`` is the batch's prefill."""
        self._check_lengths(prompts, max_new_tokens)
        start_all = time.perf_counter()
        tokens, prefill, decode = [], [], []
        for first in range(0, len(prompts), self.max_batch):
            group = [list(p) for p in prompts[first:first + self.max_batch]]
            self._clear()
            tick = time.perf_counter()
            entries = [(token, position, sequence, position == len(prompt) - 1)
                       for sequence, prompt in enumerate(group) for position, token in enumerate(prompt)]
            chosen = [0] * len(group)
            for offset in range(0, len(entries), self.n_batch):
                chunk = entries[offset:offset + self.n_batch]
                self._decode(chunk)
                for k, (_, _, sequence, wants) in enumerate(chunk):
                    if wants:
                        chosen[sequence] = int(self._logits_row(k).argmax())
            seconds = time.perf_counter() - tick
            out = [[token] for token in chosen]
            steps: list[list[float]] = [[] for _ in group]
            for step in range(1, max_new_tokens):
                tick = time.perf_counter()
                self._decode([(out[s][-1], len(group[s]) + step - 1, s, True) for s in range(len(group))])
                for s in range(len(group)):
                    out[s].append(int(self._logits_row(s).argmax()))
                elapsed = time.perf_counter() - tick
                for s in range(len(group)):
                    steps[s].append(elapsed)
            tokens += out
            prefill += [seconds] * len(group)
            decode += steps
        return Generation(tokens=tokens, prefill_seconds=prefill, decode_seconds=decode,
                          total_seconds=time.perf_counter() - start_all,
                          extra={"timing": "llama_decode wall clock", "sequences_per_batch": self.max_batch})

    def logits(self, sequence: list[int]) -> torch.Tensor:
        """Float32 next-token logits at every position of ``sequence`` but the last ([L-1, V])."""
        self._check_open()
        if len(sequence) > self.n_ctx:
            raise EffideployError(f"a sequence of {len(sequence)} tokens exceeds n_ctx {self.n_ctx}")
        self._clear()
        return torch.from_numpy(self._feed(list(sequence), 0, 0, all_logits=True)[:-1])

    def score_windows(self, sequences: list[list[int]], *, top_k: int = 0,
                      support: list[torch.Tensor] | None = None) -> list[TokenScores]:
        """Top-k and support log-probabilities (on request) from llama.cpp's full logits of every position (the
        scoring decode asks for logits at all positions)."""
        from effideploy.runtimes.base import scores_of, support_of

        results = []
        for index, sequence in enumerate(sequences):
            if len(sequence) < 2:
                raise EffideployError(f"sequence {index} needs at least 2 tokens to be scored")
            results.append(scores_of(self.logits(sequence), torch.tensor(sequence[1:], dtype=torch.int64),
                                     top_k=top_k, support=support_of(support, index)))
        return results

    def score_continuations(self, requests: list[ContinuationRequest]) -> list[TokenScores]:
        """Consecutive requests with the same context prefill it once: the continuation is decoded after it and its
        KV entries removed before the next continuation."""
        from effideploy.runtimes.base import scores_of

        check_requests(requests)
        self._check_open()
        results, current, last_logits = [], None, None
        for context, continuation in requests:
            if len(context) + len(continuation) > self.n_ctx:
                raise EffideployError(f"a request of {len(context) + len(continuation)} tokens exceeds n_ctx {self.n_ctx}")
            if context != current:
                self._clear()
                last_logits = self._feed(list(context), 0, 0, all_logits=False)[-1:]
                current = list(context)
            else:
                self._lib.llama_memory_seq_rm(self.memory, 0, len(context), -1)
            rows = [last_logits]
            if len(continuation) > 1:
                rows.append(self._feed(list(continuation[:-1]), len(context), 0, all_logits=True))
            logits = torch.from_numpy(np.concatenate(rows))
            results.append(scores_of(logits, torch.tensor(continuation, dtype=torch.int64)))
        return results

    def describe(self) -> dict:
        from effideploy.exporters.llamacpp.export import llamacpp_version

        return {"runtime": self.name, "engine": f"llama.cpp via llama-cpp-python {llamacpp_version()} (CPU, C API)",
                "threads": self.n_threads if self.ctx is not None else self.threads, "n_ctx": self.n_ctx,
                "max_batch": self.max_batch, "kv_cache_type": self.kv_cache_type, "flash_attn": self.flash_attn,
                "gguf": str(self.path), "gguf_type": self.manifest.get("gguf_type"),
                "architecture": self.manifest.get("architecture"), "extra_buffers": self.extra_buffers,
                "system": self._lib.llama_print_system_info().decode(errors="replace").strip()}

    def close(self) -> None:
        """Free the batch, context and model; the runtime is unusable afterwards."""
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            self._lib.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            self._lib.llama_model_free(self.model)
            self.model = None
