"""Weight quantization of a vLLM export in the ``compressed-tensors`` format (``export --runtime vllm --quantize``).

Schemes (both round-to-nearest, symmetric, no calibration data; vLLM 0.32's CPU build has a kernel for each):

* ``w8a8`` (alias ``int8``): int8 weights with one scale per output channel, int8 activations quantized dynamically
  per token by vLLM (format ``int-quantized``; ``CPUInt8ScaledMMLinearKernel``, oneDNN). No width constraint; serves
  in float32 (or bf16/fp16).
* ``w4a16`` (alias ``int4``): int4 weights with one scale per group of ``group_size`` input columns, activations in
  the model dtype (format ``pack-quantized``, eight nibbles per int32; ``CPUWNA16LinearKernel``). That kernel needs
  every Linear's input and output size to be a multiple of 32 and runs only in bfloat16/float16; the group size must
  divide every input size, so every FFN width (down_proj's input) must be a multiple of the group size.

Every Linear of the decoder blocks is quantized; embeddings, norms and ``lm_head`` stay in the export dtype (a tied
``lm_head`` is not stored: vLLM ties it to ``embed_tokens``). All format work is compressed-tensors': the scheme is
its ``W8A8``/``W4A16`` preset, scales come from ``calculate_qparams`` on each weight's min/max (what llm-compressor's
MinMax observer computes), the per-module compressor (``BaseCompressor.compress``) quantizes and packs, and
``ModelCompressor.update_config`` writes config.json's ``quantization_config``. The weights stream one decoder block
at a time (``SafetensorsWeights`` in, ``write_block_shards`` out), so memory holds one block, never the model.
"""

from __future__ import annotations

import math
from pathlib import Path

from effideploy.errors import EffideployError

SCHEMES = ("w8a8", "w4a16")
ALIASES = {"int8": "w8a8", "int4": "w4a16", "w8a8": "w8a8", "w4a16": "w4a16"}
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16"}
FORMATS = {"w8a8": "int-quantized", "w4a16": "pack-quantized"}
DEFAULT_GROUP_SIZE = 128
CPU_WNA16_MULTIPLE = 32  # CPUWNA16LinearKernel: every Linear's input and output size a multiple of 32
HALF_DTYPES = ("bfloat16", "float16")  # what vLLM's CPU W4A16 kernel computes in ("cpu_gemm_wna16" has no fp32)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def resolve_scheme(quantize: str | None) -> str | None:
    """``quantize`` (a scheme or its alias, any case) -> ``"w8a8"``/``"w4a16"``, None for no quantization."""
    if quantize is None or str(quantize).strip().lower() in ("", "none"):
        return None
    scheme = ALIASES.get(str(quantize).strip().lower())
    if scheme is None:
        raise EffideployError(f"unknown --quantize scheme {quantize!r} for vLLM: use w8a8 (alias int8) or w4a16 (alias int4)")
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:  # vLLM brings it; a vLLM-less setup may not have it
        raise EffideployError("--quantize for vLLM writes the compressed-tensors format: pip install compressed-tensors")
    return scheme


def resolve_options(scheme: str | None, group_size: int | None, dtype: str | None) -> tuple[int | None, str]:
    """The group size (w4a16 only) and the export dtype for ``scheme``: w4a16 defaults to bfloat16 and refuses an
    explicit float32 (vLLM's CPU int4 kernel has no fp32 path); everything else defaults to float32."""
    if scheme != "w4a16" and group_size is not None:
        raise EffideployError("--group-size applies only to --quantize w4a16 (int4)")
    if scheme == "w4a16":
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise EffideployError(f"--group-size must be a positive even number, got {group_size!r}")
        if dtype == "float32":
            raise EffideployError("--quantize w4a16 needs --dtype bfloat16 or float16: vLLM's CPU W4A16 kernel "
                                  "(CPUWNA16LinearKernel) has no float32 path")
        return group_size, dtype or "bfloat16"
    return None, dtype or "float32"


def refuse_quantized_source(path: Path, config_dict: dict) -> None:
    """Quantizing what is already quantized would quantize twice (or fail on packed tensors): refused."""
    from effideploy.exporters.manifest import read_export_manifest

    if config_dict.get("quantization_config"):
        method = config_dict["quantization_config"].get("quant_method", "?")
        raise EffideployError(f"{path} is already quantized ({method} quantization_config in config.json); "
                              "export its unquantized source instead")
    try:
        manifest = read_export_manifest(path) or {}
    except EffideployError:
        manifest = {}
    if manifest.get("quantize"):
        raise EffideployError(f"{path} is already a quantized export ({manifest['quantize'].get('scheme', '?')}); "
                              "export its unquantized source instead")


def width_multiple(scheme: str | None, group_size: int | None, tensor_parallel_size: int, align: int | None) -> int:
    """What every FFN width must be a multiple of: per tensor-parallel rank, ``align`` and, for w4a16, the group
    size and the kernel's 32."""
    per_rank = align or 1
    if scheme == "w4a16":
        per_rank = math.lcm(per_rank, group_size, CPU_WNA16_MULTIPLE)
    return tensor_parallel_size * per_rank


def check_widths(config, widths: list[int], scheme: str, group_size: int | None, multiple: int, realign: bool) -> None:
    """w4a16: hidden and attention widths must fit the kernel (no rewrite fixes them); FFN widths that do not are
    refused, naming the blocks, unless ``realign`` (then ``plan_widths`` rounds them down)."""
    if scheme != "w4a16":
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fixed = {"hidden size": config.hidden_size, "attention width (heads x head_dim)": config.num_attention_heads * head_dim,
             "KV width": config.num_key_value_heads * head_dim}
    need = math.lcm(group_size, CPU_WNA16_MULTIPLE)
    if config.hidden_size % group_size:
        raise EffideployError(f"--group-size {group_size} does not divide the hidden size {config.hidden_size}")
    bad = [f"{name} {value}" for name, value in fixed.items()
           if value % CPU_WNA16_MULTIPLE or (name != "KV width" and value % group_size)]
    if bad:
        raise EffideployError(f"w4a16 with group size {group_size} needs multiples of {need} for vLLM's CPU int4 kernel; "
                              f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not (try --group-size 32 or 64, or w8a8)")
    offending = [(i, width) for i, width in enumerate(widths) if width % multiple]
    if offending and not realign:
        listed = ", ".join(f"{i} ({width})" for i, width in offending)
        raise EffideployError(
            f"w4a16 with group size {group_size} needs every FFN width to be a multiple of {multiple} (group size and "
            f"vLLM's CPU int4 kernel's 32{' per rank' if multiple != need else ''}); blocks {listed} are not: pass "
            f"--realign to round them down, or use --group-size 32 or 64")


# ------------------------------------------------------------------------------------------------- compressed-tensors

def quantization_scheme(scheme: str, group_size: int | None):
    """compressed-tensors' preset scheme (``W8A8`` / ``W4A16``) for every Linear, with our group size."""
    from compressed_tensors.quantization import preset_name_to_scheme

    quant = preset_name_to_scheme(PRESETS[scheme], targets=["Linear"])
    if scheme == "w4a16":
        quant.weights.group_size = group_size
    quant.format = FORMATS[scheme]
    return quant


def quantization_config(quant):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    return QuantizationConfig(config_groups={"group_0": quant}, ignore=["lm_head"], format=quant.format,
                              quantization_status=QuantizationStatus.COMPRESSED)


def write_config(folder: Path, quant) -> None:
    """Add compressed-tensors' ``quantization_config`` to ``folder/config.json`` (its own writer)."""
    from compressed_tensors.compressors import ModelCompressor

    ModelCompressor(quantization_config=quantization_config(quant)).update_config(str(folder))


def kept_statistics(checkpoint: Path, scheme: str | None, quant_method: str | None):
    """The pruning pass's kept second moments for ``--quant-method gptq`` (None for rtn); refused without them."""
    from effideploy.quantization.hessians import CheckpointHessians

    if quant_method in (None, "rtn"):
        return None
    if quant_method != "gptq":
        raise EffideployError(f"--quant-method for vLLM must be rtn or gptq, got {quant_method!r}")
    if scheme is None:
        raise EffideployError("--quant-method needs --quantize w8a8|w4a16")
    kept = CheckpointHessians.of(Path(checkpoint))
    if kept is None:
        raise EffideployError(f"--quant-method gptq needs the statistics of the pruning pass (prune --keep-stats); "
                              f"{checkpoint} has none")
    return kept


def quantize_linear(weight, quant, dtype, hessian=None) -> dict:
    """One Linear's weight -> its compressed tensors (local names: ``weight`` int8, or ``weight_packed`` +
    ``weight_shape``; ``weight_scale`` in ``dtype``). Round-to-nearest: symmetric scales from the weight's min/max
    per output channel or per group, computed by compressed-tensors' ``calculate_qparams``."""
    import torch
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    args = quant.weights
    w = weight.float()
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)  # [out, 1]
    elif args.strategy == QuantizationStrategy.GROUP:
        grouped = w.unflatten(-1, (-1, args.group_size))  # [out, in / group, group]
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [out, in / group]
    else:  # pragma: no cover - only the two presets above are built
        raise EffideployError(f"unsupported weight strategy {args.strategy}")
    scale, zero_point = calculate_qparams(lo, hi, args)
    scale = scale.to(dtype)  # stored in the export dtype; quantize with the stored value so q * scale is what serves
    if hessian is not None:  # GPTQ on compressed-tensors' own grid: its codes are w's on-grid values below
        from effideploy.quantization.gptq import compressed_tensors_grid, gptq

        group = args.group_size if args.strategy == QuantizationStrategy.GROUP else w.shape[1]
        result = gptq(w, hessian, compressed_tensors_grid(args, dtype), group)
        w = result.dequantized
        scale = result.scales.to(dtype).reshape(scale.shape)
    compressor = BaseCompressor.get_value_from_registry(quant.format)
    with torch.no_grad():
        local = compressor.compress({"weight": w.to(dtype), "weight_scale": scale, "weight_zero_point": zero_point}, quant)
    return {name: value.contiguous() for name, value in local.items()}


def dequantize_state_dict(tensors: dict, quant) -> dict:
    """The inverse for a parity reference: every compressed module's tensors -> a float32 ``weight`` (q * scale),
    by compressed-tensors' own decompressor; other tensors as they are (float32)."""
    from compressed_tensors.compressors.base import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(quant.format)
    prefixes = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_scale")})
    out = {name: value.float() for name, value in tensors.items() if name.rsplit(".", 1)[0] not in prefixes}
    for prefix in prefixes:
        local = {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")
                 and "." not in name[len(prefix) + 1:]}
        out[prefix + ".weight"] = compressor.decompress(local, quant)["weight"].float()
        if prefix + ".bias" in tensors:  # biases stay unquantized (CFSP's compensation adds them to the FFN)
            out[prefix + ".bias"] = tensors[prefix + ".bias"].float()
    return out


# ---------------------------------------------------------------------------------------------------------- weights

def write_quantized_weights(source: Path, staging: Path, config, realigned: list[dict], quant, dtype: str,
                            hessians=None) -> None:
    """The export's weights, one decoder block at a time: re-aligned blocks narrowed (``realign_block_tensors``),
    every projection quantized, the rest cast to ``dtype``; written in the layout of ``write_block_shards``."""
    import torch

    from effideploy.checkpoint.writer import write_block_shards
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.pruning.realign import realign_block_tensors

    weights = SafetensorsWeights(source)
    target = getattr(torch, dtype)
    n_blocks = config.num_hidden_layers
    changed = {block["index"]: block for block in realigned}

    def cast(value):
        return value.to(target) if value.is_floating_point() else value

    def block(index: int) -> dict:
        prefix = f"model.layers.{index}."
        tensors = {name: weights.get(name) for name in weights.names() if name.startswith(prefix)}
        if index in changed:
            tensors.update(realign_block_tensors(tensors, index, changed[index]["before"], changed[index]["after"]))
        out = {}
        for name, value in tensors.items():
            module = name[len(prefix):].rsplit(".", 1)[0]
            if module in PROJECTIONS and name.endswith(".weight"):
                hessian = hessians.for_module(prefix + module) if hessians is not None else None
                out.update({f"{prefix}{module}.{key}": tensor
                            for key, tensor in quantize_linear(value, quant, target, hessian).items()})
            else:
                out[name] = cast(value)
        return out

    outer = {name: cast(weights.get(name)) for name in weights.names() if not name.startswith("model.layers.")}
    if getattr(config, "tie_word_embeddings", False):
        outer.pop("lm_head.weight", None)  # vLLM ties lm_head to embed_tokens
    write_block_shards(staging, outer, (block(i) for i in range(n_blocks)), n_blocks)


def manifest_section(scheme: str, group_size: int | None, dtype: str, vllm_version: str | None,
                     hessians=None) -> dict:
    from importlib.metadata import version

    method = {"method": "rtn"} if hessians is None else {
        "method": "gptq", "hessians": {"source": "the pruning's calibration pass (prune --keep-stats)", **hessians.meta}}
    return {**method,
        "scheme": scheme, "bits": 8 if scheme == "w8a8" else 4, "group_size": group_size,
        "strategy": "channel" if scheme == "w8a8" else "group", "symmetric": True,
        "activations": "int8 dynamic per token" if scheme == "w8a8" else dtype,
        "format": FORMATS[scheme], "targets": "every Linear of the decoder blocks (not lm_head)",
        "tool": f"compressed-tensors {version('compressed-tensors')}", "vllm_version": vllm_version,
        "kernel_cpu": "CPUInt8ScaledMMLinearKernel" if scheme == "w8a8" else "CPUWNA16LinearKernel",
    }


def storage_format(scheme: str | None, group_size: int | None, dtype: str) -> str:
    if scheme == "w8a8":
        return "w8a8 int8 per channel"
    if scheme == "w4a16":
        return f"w4a16 int4 group {group_size}"
    return dtype


def weight_storage(folder: Path, fmt: str) -> dict:
    """The bench's contract: bytes of every tensor stored (``stored_bytes``) and of those a decode step reads
    (``bytes_per_token``: every projection of the decoder blocks with its scales, plus the lm_head, which is
    ``embed_tokens`` when tied), from the safetensors headers."""
    from effideploy.models.weights import read_header

    entries = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        entries.update({name: entry[4] for name, entry in read_header(path).items()})
    per_token = 0
    for name, nbytes in entries.items():
        if name.startswith("model.layers.") and name.split(".", 3)[3].rsplit(".", 1)[0] in PROJECTIONS:
            per_token += nbytes
    per_token += entries.get("lm_head.weight", entries.get("model.embed_tokens.weight", 0))
    return {"format": fmt, "stored_bytes": sum(entries.values()), "bytes_per_token": per_token,
            "counted": "bytes_per_token: decoder-block projections with their scales + lm_head (embed_tokens if tied)"}
