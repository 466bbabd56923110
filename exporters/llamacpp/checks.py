"""Parity of a GGUF export, run in-process through the llamacpp runtime adapter (llama.cpp is a library here, not an
engine with process-wide state).

- ``check_f32_parity``: greedy tokens of the float32 GGUF against transformers (float32) on the parity prompts (the
  vLLM export's prompts, ``base.parity_prompts``: WikiText-2 test paragraphs): identical, else EffideployError with
  the first mismatch. This checks the layout (names, RoPE permutation, per-layer widths and heads, tied output)
  before anything is quantized.
- ``check_quantized``: the quantized (or f16/bf16) GGUF's greedy tokens against transformers', and its teacher-forced
  logits on the same sequences (prompt + transformers' greedy continuation) against the float32 GGUF's: top-1
  agreement and logit error. f16/bf16 must give identical tokens, or tokens each within HALF_PRECISION_LOGIT_GAP of
  transformers' top logit given the same prefix; quantized types are lossy by design, so theirs is recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from effideploy import progress
from effideploy.errors import EffideployError, ParityError
from effideploy.exporters.base import (HALF_PRECISION_LOGIT_GAP, first_mismatch, matching_prefix, parity_prompts,
                                       require_near_top_logit)
from effideploy.exporters.llamacpp.records import GgufTypeCheck, GgufVsFloat32, LlamacppParity

PARITY_NEW_TOKENS = 16


def _reference_model(source, realigned: list[dict] | None, realigned_config: dict | None):
    """transformers float32 model of the source, with FFN widths cut as the export cut them (``realigned``)."""
    from effideploy.models.build import build_config, load_model, model_class

    model = load_model(source, dtype=torch.float32)
    if not realigned:
        return model
    from effideploy.pruning.realign import realign_block_tensors

    state = model.state_dict()
    for block in realigned:
        state.update(realign_block_tensors(state, block["index"], block["before"], block["after"]))
    config = build_config(realigned_config)
    narrowed = model_class(config)(config)
    narrowed.load_state_dict(state)
    return narrowed.eval()


def check_f32_parity(path: Path, source, *, realigned: list[dict] | None = None, realigned_config: dict | None = None,
                     threads: int | None = None) -> tuple[LlamacppParity, list[list[int]], list[list[int]]]:
    """Greedy tokens of the float32 GGUF ``path`` == transformers' (float32). Returns the parity record, transformers'
    tokens and the prompts."""
    from effideploy.models.build import load_tokenizer
    from effideploy.runtimes.llamacpp import LlamaCppRuntime
    from effideploy.runtimes.pytorch import TorchRuntime

    prompts, text = parity_prompts(load_tokenizer(source.path))
    tick = time.perf_counter()
    with progress.status("Parity: greedy tokens in transformers"):
        model = _reference_model(source, realigned, realigned_config)
        reference = TorchRuntime(model=model).generate(prompts, PARITY_NEW_TOKENS).tokens
        del model
    transformers_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    with progress.status("Parity: greedy tokens of the float32 GGUF in llama.cpp"):
        with LlamaCppRuntime(path, threads=threads, n_ctx=_context(prompts), kv_cache_type="f32", flash_attn="off") as runtime:
            tokens = runtime.generate(prompts, PARITY_NEW_TOKENS).tokens
    mismatch = first_mismatch(reference, tokens)
    if mismatch is not None:
        prompt, position, expected, got = mismatch
        raise ParityError(f"llama.cpp parity failed (float32 GGUF): prompt {prompt}, generated token {position}: "
                              f"llama.cpp gave {got}, transformers (float32) gave {expected}; the export was not kept")
    record = LlamacppParity(prompts=len(prompts), prompt_tokens=[len(p) for p in prompts], new_tokens=PARITY_NEW_TOKENS,
                            text=text, match=True, checked="float32 GGUF",
                            reference=f"transformers {__import__('transformers').__version__} (float32, greedy)",
                            seconds={"transformers": transformers_seconds, "llamacpp": time.perf_counter() - tick})
    return record, reference, prompts


def check_quantized(path: Path, base: Path, kind: str, reference: list[list[int]], prompts: list[list[int]], source, *,
                    realigned: list[dict] | None = None, realigned_config: dict | None = None,
                    threads: int | None = None) -> GgufTypeCheck:
    """The ``kind`` GGUF ``path`` against transformers' greedy tokens and the float32 GGUF ``base``'s logits."""
    from effideploy.exporters.llamacpp.export import HALF_TYPES
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    sequences = [prompt + tokens for prompt, tokens in zip(prompts, reference)]
    n_ctx = _context(prompts)
    with progress.status("Parity: the float32 GGUF's logits"):
        with LlamaCppRuntime(base, threads=threads, n_ctx=n_ctx, kv_cache_type="f32", flash_attn="off") as runtime:
            dense = [runtime.logits(sequence) for sequence in sequences]
    with progress.status(f"Parity: the {kind} GGUF in llama.cpp"):
        with LlamaCppRuntime(path, threads=threads, n_ctx=n_ctx, kv_cache_type="f32", flash_attn="off") as runtime:
            tokens = runtime.generate(prompts, PARITY_NEW_TOKENS).tokens
            quantized = [runtime.logits(sequence) for sequence in sequences]
    mismatch = first_mismatch(reference, tokens)
    agree = sum(int((q.argmax(-1) == d.argmax(-1)).sum()) for q, d in zip(quantized, dense))
    positions = sum(len(d) for d in dense)
    errors = torch.cat([(q - d).abs().flatten() for q, d in zip(quantized, dense)])
    record = GgufTypeCheck(
        type=kind, tokens_identical_to_transformers=mismatch is None,
        matching_prefix_tokens=matching_prefix(reference, tokens),
        vs_float32_gguf=GgufVsFloat32(positions=positions, top1_agreement=agree / positions,
                                      max_abs_logit_diff=float(errors.max()), mean_abs_logit_diff=float(errors.mean()),
                                      sequences="parity prompts + transformers' greedy continuation, teacher-forced"),
    )
    if kind in HALF_TYPES and mismatch is not None:
        model = _reference_model(source, realigned, realigned_config)
        record.first_mismatch, record.teacher_forced_max_logit_gap, record.criterion = require_near_top_logit(
            model, prompts, tokens, mismatch, runtime="llama.cpp", kind=kind, tolerance=HALF_PRECISION_LOGIT_GAP)
    return record


def _context(prompts: list[list[int]]) -> int:
    return max(map(len, prompts)) + PARITY_NEW_TOKENS + 16
