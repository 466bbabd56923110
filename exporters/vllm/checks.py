"""Checks of a vLLM export: static (``check_export_folder``: the config builds, vLLM's DeciLM reader accepts every
block, every FFN tensor has its block's width) and parity (``check_parity``: greedy tokens of the export in stock vLLM,
run in a child process by ``effideploy.exporters.vllm.parity``, against transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from effideploy import progress
from effideploy.checkpoint.config import REMOTE_FILES
from effideploy.errors import EffideployError, ParityError
from effideploy.exporters.base import first_mismatch, matching_prefix, parity_prompts, require_near_top_logit
from effideploy.exporters.vllm.records import KvCacheCheck, VllmParity
from effideploy.io import write_json
from effideploy.models.resolve import resolve_model

PARITY_NEW_TOKENS = 16
PARITY_TIMEOUT_S = 1800
# Quantized exports: the reference applies the stored integers and scales exactly, so what remains is kernel
# arithmetic (int8 GEMM accumulation, per-token activation rounding ties, bf16 activations in W4A16 against an fp32
# reference). That flips the top-1 only at near-ties: 64/64 (W8A8 fp32) and 63/64 (W4A16 bf16) on the tiny models;
# a wrong layout (packing, scale shape or order) leaves next to no agreement. 0.95 tolerates a few near-ties per
# ~140 positions and still fails any real defect.
QUANTIZED_TOP1_AGREEMENT = 0.95
# ... counted where the reference's top-1 is decided: its margin over the runner-up exceeds this share of the
# sequence's largest |logit| (as the ONNX check counts). A pruned SmolLM2 has many near-ties: over all positions
# W4A16 (bf16 against an fp32 reference) agreed at 93.6% and dense W8A8 at 90.1%, each mismatch a near-tie.
QUANTIZED_DECIDED_MARGIN = 0.02



# ----------------------------------------------------------------------------------------------------------- static

def check_export_folder(folder: str | os.PathLike) -> list[int]:
    """Static checks of a vLLM export (or a pruned checkpoint): the config builds, vLLM's DeciLM reader accepts every
    block, and each FFN tensor's shape matches its block's width. Returns the FFN widths."""
    from effideploy.models.build import build_config, ffn_widths
    from effideploy.models.resolve import read_config_dict

    folder = Path(folder)
    config_dict = read_config_dict(folder)
    try:
        config = build_config(config_dict)
    except (ValueError, TypeError) as exc:
        raise EffideployError(f"{folder}/config.json is not a valid checkpoint config: {exc}") from None
    if config.hidden_act != "silu":
        raise EffideployError(f"vLLM's Llama MLP supports only silu, not {config.hidden_act!r}")
    if config_dict.get("model_type") == "nemotron-nas":
        missing = [name for name in REMOTE_FILES if not (folder / name).is_file()]
        if missing or "AutoConfig" not in config_dict.get("auto_map", {}):
            raise EffideployError(f"{folder} lacks the config code vLLM loads with trust_remote_code ({', '.join(missing) or 'auto_map'})")
        check_no_op_layout(config.block_configs)
        for index, block in enumerate(config.block_configs):
            if block.attention.no_op:
                continue
            if config.num_attention_heads // block.attention.n_heads_in_group != config.num_key_value_heads:
                raise EffideployError(f"block {index}: n_heads_in_group does not match num_key_value_heads")
    widths = ffn_widths(config)
    shapes = _tensor_shapes(folder)
    hidden = config.hidden_size
    if "model.embed_tokens.weight" not in shapes:
        raise EffideployError(f"{folder}: model.embed_tokens.weight is missing")
    for index, width in enumerate(widths):
        if not width:  # a no-op FFN has no tensors
            continue
        prefix = f"model.layers.{index}.mlp."
        expected = {"gate_proj.weight": [width, hidden], "up_proj.weight": [width, hidden], "down_proj.weight": [hidden, width]}
        for name, shape in expected.items():
            actual = shapes.get(prefix + name)
            packed = shapes.get(prefix + name.replace(".weight", ".weight_packed"))
            if actual is None and packed is not None:  # compressed-tensors pack-quantized: 32 // 4 = 8 nibbles per int32
                actual = [packed[0], packed[1] * 8]
            if actual != shape:
                raise EffideployError(
                    f"block {index}: {prefix + name} has shape {actual}, but config.json says {shape}"
                )
    return widths


def check_no_op_layout(block_configs) -> None:
    """Refuse the no-op layout vLLM's ``DeciModel`` mishandles: its residual stream starts as None and is created
    by the first attention, so a block with a no-op attention and a real FFN before any attention hands its FFN
    norm a residual of None (the fused add-norm then returns one tensor where two are unpacked). Depth pruning
    never writes it (``effideploy.pruning.depth``)."""
    for index, block in enumerate(block_configs):
        if not block.attention.no_op:
            return
        if not block.ffn.no_op:
            raise EffideployError(
                f"block {index} has a no-op attention but an FFN and no attention before it, a layout vLLM's "
                "nemotron-nas decoder mishandles (its residual starts at the first attention); keep that attention "
                "or drop the block")
    raise EffideployError("every block has a no-op attention: vLLM's nemotron-nas decoder needs one attention")


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes



# ---------------------------------------------------------------------------------------------------------- parity

def check_parity(folder: Path, *, dtype: str = "float32", kv_cache_dtype: str | None = None) -> VllmParity:
    """Greedy tokens of ``folder`` in vLLM (a subprocess) against transformers (fp32) on the same prompts.

    float32: the tokens must be identical. bfloat16/float16: half-precision kernels round differently, so greedy
    paths may part at a near-tie; then every token vLLM picked must be, given vLLM's own prefix (teacher forcing),
    transformers' top-1 or within ``base.HALF_PRECISION_LOGIT_GAP`` of its logit. Raises at the first failure."""
    import torch

    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.runtimes.pytorch import TorchRuntime

    source = resolve_model(folder)
    prompts, text = parity_prompts(load_tokenizer(folder))
    tick = time.perf_counter()
    with progress.status("Parity: greedy tokens in transformers"):
        model = load_model(source, dtype=torch.float32)
        reference = TorchRuntime(model=model).generate(prompts, PARITY_NEW_TOKENS).tokens
    transformers_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    with progress.status("Parity: loading the export in vLLM"):
        runs = vllm_greedy(folder, prompts, PARITY_NEW_TOKENS, dtype=dtype,
                           kv_cache_dtypes=["auto"] + ([kv_cache_dtype] if kv_cache_dtype else []))
    tokens = runs["auto"]["tokens"]
    mismatch = first_mismatch(reference, tokens)
    result = VllmParity(
        prompts=len(prompts), prompt_tokens=[len(p) for p in prompts], new_tokens=PARITY_NEW_TOKENS,
        text=text, dtype=dtype, match=mismatch is None,
        reference=f"transformers {__import__('transformers').__version__} (float32, greedy)",
        tensor_parallel_size_checked=1,
        seconds={"transformers": transformers_seconds, "vllm": time.perf_counter() - tick,
                 "vllm_engine_start": runs["auto"]["start_seconds"]},
    )
    if mismatch is not None and dtype == "float32":
        prompt, position, expected, got = mismatch
        raise ParityError(f"vLLM parity failed: prompt {prompt}, generated token {position}: vLLM gave {got}, "
                              f"transformers (float32) gave {expected}; the export was not kept")
    if mismatch is not None:
        result.first_mismatch, result.teacher_forced_max_logit_gap, result.criterion = require_near_top_logit(
            model, prompts, tokens, mismatch, runtime="vLLM", kind=dtype)
    if kv_cache_dtype:
        # Lossy by design, so recorded rather than required: how many leading tokens survive the 8-bit cache.
        fp8 = runs[kv_cache_dtype]["tokens"]
        result.kv_cache = KvCacheCheck(kv_cache_dtype=kv_cache_dtype, identical=first_mismatch(reference, fp8) is None,
                                       matching_prefix_tokens=matching_prefix(reference, fp8))
    return result


def _logits(model, sequences: list[list[int]]) -> list:
    """Next-token logits (float32) at every position but the last, per sequence."""
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).logits[0, :-1].float() for s in sequences]


def vllm_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int, *, dtype: str,
                kv_cache_dtypes: list[str]) -> dict[str, dict]:
    """Greedy tokens from stock vLLM in a child process (``effideploy.exporters.vllm.parity``), per KV dtype."""
    max_len = max(map(len, prompts)) + max_new_tokens + 8
    return _vllm_child(folder, {"prompts": prompts, "max_new_tokens": max_new_tokens, "dtype": dtype,
                                "kv_cache_dtypes": kv_cache_dtypes, "max_model_len": max_len})


def vllm_scores(folder: Path, sequences: list[list[int]], *, dtype: str) -> dict:
    """Teacher-forced scores of ``sequences`` in stock vLLM (child process): per sequence the log-probability of
    each next token (``logprobs``) and vLLM's argmax (``argmax``) at every position after the first."""
    return _vllm_child(folder, {"sequences": sequences, "dtype": dtype, "kv_cache_dtypes": ["auto"],
                                "max_model_len": max(map(len, sequences)) + 8})["auto"]


def _vllm_child(folder: Path, payload: dict) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="effideploy-vllm-parity-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        write_json(request, {"path": str(folder), **payload, "result": str(result)})
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            done = subprocess.run([sys.executable, "-m", "effideploy.exporters.vllm.parity", str(request)],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=PARITY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise EffideployError(f"vLLM parity check did not finish within {PARITY_TIMEOUT_S} s") from None
        if result.is_file():
            payload = json.loads(result.read_text())
            if "error" in payload:
                raise EffideployError(f"vLLM cannot serve the export: {payload['error']}")
            return payload["runs"]
        tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise EffideployError(f"the vLLM parity process failed (exit {done.returncode}): {tail[0].strip()}")
