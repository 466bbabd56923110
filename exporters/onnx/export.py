"""Export a checkpoint (pruned or dense) for ONNX Runtime: ``model.onnx`` + ``model.onnx.data``, the tokenizer,
``genai_config.json`` (ONNX Runtime GenAI) and ``effideploy_export.json``.

The graph (``exporters/onnx/graph.py``) is one decoder step with a KV cache, exported with
``torch.onnx.export(dynamo=True)``: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value``; outputs ``logits``, ``present.{i}.key/value`` (+ ``attentions.{i}`` with
``attention_outputs``); batch, sequence and past length are dynamic (past may be 0, so prefill and decode share the
graph). Per-block FFN widths are simply the shapes of each block's MatMul weights.

Why not optimum-onnx: its latest release (0.1.0) needs transformers<4.58 and optimum~=2.1, so it cannot share an
environment with vLLM 0.32 / transformers 5.x, which effideploy needs; the export is done with torch's own exporter.

Choices:
- dtype ``float32`` (CPU) or ``float16`` (meant for GPUs; ONNX Runtime 1.32 also runs it on CPU, where the parity
  check runs it). The fp16 graph is exported from an fp16 copy of the model and checked against fp32 PyTorch.
- ``quantize="int8"|"int4"``: 8- or 4-bit weights in blocks of ``block_size`` (default 32) with int8 activations
  per block at run time (ORT's MatMulNBits, ``accuracy_level=4``), by ``quant_method`` "rtn" (round-to-nearest,
  symmetric; the default), "hqq" (ORT's HQQ, 4-bit only) or "gptq" (ORT's GPTQ, 4-bit only, calibrated on
  WikiText-2); see ``exporters/onnx/quant.py``. The quantized graph
  *replaces* the float one: an export folder holds exactly one ``model.onnx``, the one the runtime and GenAI load
  (export twice to keep both). Not ``quantize_dynamic``: its per-tensor activation scales cannot follow SmolLM2's
  activation outliers (on the 50% pruned model 6-12 of 32 greedy tokens matched, max |logit| error 17), while
  block-wise scales kept all 32 (error 3.3) at the same speed (1.5x less CPU per decode token than fp32). The float
  graph is exported and verified first (the strict check proves the export); the quantized graph is then checked
  against transformers with the graph's own dequantized weights (fake-quant: tolerance on the logits and top-1
  agreement, ``checks.check_quantized``), and its distance to the unquantized model (max |logit| difference,
  top-1 and greedy-token agreement) is recorded: that is an accuracy question for the benchmark.
- ``weight_storage`` (every export): the format, the bytes of all initializers and the bytes one decode step
  reads (the MatMul weights with their scales), which the bench uses for size and ideal-speed ratios.
- Parity (on by default): on two prompts, the full-sequence logits of ONNX Runtime must be within 1e-3 of
  transformers (float16: 1% of the largest |logit|), and the greedy tokens of ``PARITY_NEW_TOKENS`` steps through ``OnnxRuntime`` (prefill, then
  decode with the KV cache fed back) must equal transformers' own. A failure raises ``EffideployError`` with the
  numbers and the atomic output folder is discarded.
- ``token_compression``: recorded as {method, budget} for the runtime to apply through ``OnnxRuntime(kv_hook=...)``;
  methods that score tokens by attention (SnapKV, H2O) need ``attention_outputs=True``.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from effideploy import progress
from effideploy.checkpoint.writer import PROVENANCE_FILE, copy_tokenizer, folder_size
from effideploy.errors import EffideployError
from effideploy.exporters.base import ExportResult, folder_files
from effideploy.exporters.manifest import MANIFEST_FILE, manifest_header
from effideploy.exporters.onnx.checks import check_parity, check_quantized
from effideploy.exporters.onnx.gptq import apply_gptq
from effideploy.exporters.onnx.quant import (SCHEMES, calibration_windows, fake_quant_reference,
                                             quantization_settings, quantize_graph, refuse_quantized_source,
                                             storage_format, weight_storage)
from effideploy.exporters.onnx.records import OnnxExportOptions
from effideploy.io import atomic_output_dir, check_output_dir, write_json
from effideploy.models.resolve import ModelSource, resolve_model

MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"
DTYPES = ("float32", "float16")
QUANTIZATIONS = tuple(SCHEMES)


def kept_statistics(source: ModelSource, settings: dict | None):
    """The pruning pass's kept Linear input statistics when ``--quant-method gptq`` can use them (None: ORT's own
    GPTQ runs its calibration pass, 4-bit only)."""
    from effideploy.quantization.hessians import CheckpointHessians

    if settings is None or settings["method"] != "gptq":
        return None
    kept = CheckpointHessians.of(source.path)
    if kept is None and settings["bits"] != 4:
        raise EffideployError(f"--quant-method gptq with {settings['scheme']} needs the statistics of the pruning pass "
                              f"(prune --keep-stats); {source.path} has none, and ONNX Runtime's own GPTQ is 4-bit only")
    return kept


def export_onnx(
    source: ModelSource | str | os.PathLike,
    output: str | os.PathLike,
    options: OnnxExportOptions | None = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
    **fields,
) -> ExportResult:
    """Export ``source`` (a ModelSource or anything ``resolve_model`` takes) as an ONNX Runtime folder at ``output``
    with ``options`` (:class:`OnnxExportOptions`; keyword ``fields`` of it override them)."""
    started = time.perf_counter()
    options = OnnxExportOptions.of(options, fields)
    dtype, quantize, block_size, quant_method = options.dtype, options.quantize, options.block_size, options.quant_method
    opset, attention_outputs, token_compression = options.opset, options.attention_outputs, options.token_compression
    if dtype not in DTYPES:
        raise EffideployError(f"ONNX dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    settings = quantization_settings(quantize, block_size, quant_method, dtype)
    if opset is not None and not (isinstance(opset, int) and 18 <= opset <= 23):
        raise EffideployError(f"opset must be an integer from 18 to 23, got {opset!r}")
    compression = parse_token_compression(token_compression, attention_outputs)
    _require_onnx_packages()
    if settings is not None and not isinstance(source, ModelSource):
        refuse_quantized_source(Path(os.fspath(source)).expanduser())
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if settings is not None:
        refuse_quantized_source(source.path, source.config_dict)
    kept_hessians = kept_statistics(source, settings)
    target = check_output_dir(output, overwrite=overwrite, inputs=(source.path,))

    import torch

    from effideploy.exporters.onnx.graph import export_graph
    from effideploy.models.build import attention_layers, build_config, ffn_widths, load_model

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    with progress.status(f"Loading {source.spec}"):
        reference = load_model(source, dtype=torch.float32)
    timings["load"] = time.perf_counter() - tick
    config = build_config(source.config_dict)
    exported = reference if dtype == "float32" else copy.deepcopy(reference).to(getattr(torch, dtype))

    with atomic_output_dir(target, overwrite=overwrite) as staging:
        # The float graph goes to a scratch folder when it is only the input of quantization.
        float_dir = staging / ".float" if quantize else staging
        float_dir.mkdir(exist_ok=True)
        tick = time.perf_counter()
        with progress.status(f"Exporting {source.spec} to ONNX (torch.onnx.export, dynamo)"):
            graph = export_graph(exported, float_dir / MODEL_FILE, attention_outputs=attention_outputs, opset=opset)
        timings["export"] = time.perf_counter() - tick
        if exported is not reference:
            del exported

        parity = None
        if verify:
            tick = time.perf_counter()
            with progress.status("Parity: ONNX Runtime against transformers"):
                parity = check_parity(float_dir, reference, source, dtype=dtype)
            timings["parity"] = time.perf_counter() - tick
        quantization = None
        if settings is not None:
            tick = time.perf_counter()
            with progress.status(f"Quantizing the MatMul weights to {quantize} ({settings['method']}, MatMulNBits)"):
                if kept_hessians is not None:  # GPTQ from the pruning pass: RTN lays the nodes out, GPTQ rewrites
                    quantization, digests = quantize_graph(float_dir / MODEL_FILE, staging / MODEL_FILE,
                                                           {**settings, "method": "rtn"})
                    quantization.update(apply_gptq(staging / MODEL_FILE, reference, digests, kept_hessians, settings),
                                        method="gptq")
                else:
                    windows = calibration_windows(source, config.vocab_size) if settings["method"] == "gptq" else None
                    quantization, digests = quantize_graph(float_dir / MODEL_FILE, staging / MODEL_FILE, settings,
                                                           calibration=windows)
            shutil.rmtree(float_dir)
            timings["quantize"] = time.perf_counter() - tick
            if verify:
                tick = time.perf_counter()
                with progress.status(f"Parity: the {quantize} graph against transformers with the same weights"):
                    fake = fake_quant_reference(reference, staging / MODEL_FILE, digests)
                    parity.quantized = check_quantized(staging, reference, fake, source, quantize)
                    del fake
                timings["parity_quantized"] = time.perf_counter() - tick

        copy_tokenizer(source.path, staging)
        provenance = source.provenance()
        if provenance is not None:
            write_json(staging / PROVENANCE_FILE, provenance)
        write_json(staging / GENAI_CONFIG_FILE, genai_config(config, source.path))
        model_bytes = sum(p.stat().st_size for p in staging.glob(f"{MODEL_FILE}*"))
        storage = weight_storage(staging / MODEL_FILE, storage_format(settings, dtype))
        timings["total"] = time.perf_counter() - started
        manifest = {
            **manifest_header("onnx", source, provenance),
            "model": model_summary(config, ffn_widths(config)),
            "graph": {
                "file": MODEL_FILE, "external_data": f"{MODEL_FILE}.data", "opset": graph["opset"],
                "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.%d.key",
                           "past_key_values.%d.value"],
                "outputs": ["logits", "present.%d.key", "present.%d.value"]
                           + (["attentions.%d"] if attention_outputs else []),
                "attention": "com.microsoft.GroupQueryAttention (rotary inside, packed QKV, past/present may share a buffer)",
                "fusions": graph["fusions"],
                "attention_outputs": attention_outputs,
                "kv_layers": attention_layers(config),  # KV tensor k belongs to block kv_layers[k]
            },
            "dtype": dtype,
            "quantize": quantization,
            "weight_storage": storage,
            "token_compression": compression,
            "sizes": {"bytes": 0, "model_bytes": model_bytes, "source_bytes": folder_size(source.path)},
            "parity": None if parity is None else parity.to_dict(),
            "genai_config": GENAI_CONFIG_FILE,
            "seconds": timings,
            "environment": _versions(),
        }
        write_json(staging / MANIFEST_FILE, manifest)
        manifest["sizes"]["bytes"] = folder_size(staging)
        write_json(staging / MANIFEST_FILE, manifest)
        files = folder_files(staging)
    return ExportResult(output=target, runtime="onnx", files=files, size_bytes=manifest["sizes"]["bytes"],
                        source_size_bytes=manifest["sizes"]["source_bytes"], seconds=timings, parity=parity,
                        manifest=manifest, details={"model_file": target / MODEL_FILE, "model_bytes": model_bytes,
                                                    "dtype": dtype, "quantize": quantize,
                                                    "weight_storage": storage})


# ---------------------------------------------------------------------------------------------------------- options

def parse_token_compression(spec: dict | str | None, attention_outputs: bool) -> dict | None:
    """The manifest's token_compression section, or the one-line refusal every runtime shares
    (``effideploy.compression.validate_for_runtime``): e.g. methods that need attention probabilities need
    ``attention_outputs``; FastV and PyramidKV cannot run on the ONNX runner."""
    if spec is None:
        return None
    from effideploy.compression import validate_for_runtime
    from effideploy.compression.spec import CompressionSpec

    if isinstance(spec, dict):
        spec = CompressionSpec.from_config(spec)
    return validate_for_runtime(spec, "onnx", attention_outputs=attention_outputs).to_config()


def _require_onnx_packages() -> None:
    import importlib.util

    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            raise EffideployError(f"the ONNX export needs {package}: pip install 'effideploy[onnx]'")


# ---------------------------------------------------------------------------------------------------------- configs

def model_summary(config, widths: list[int]) -> dict:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "architecture": (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0],
        "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim, "vocab_size": config.vocab_size, "context_length": config.max_position_embeddings,
        "ffn_widths": widths,
    }


def genai_config(config, source_path: Path) -> dict:
    """ONNX Runtime GenAI's genai_config.json for the graph: only shapes of the attention and the I/O names are
    needed, since the per-block FFN widths live inside the graph."""
    import json

    from effideploy.models.build import attention_layers

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generation = {}
    if (source_path / "generation_config.json").is_file():
        generation = json.loads((source_path / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", config.eos_token_id)
    pad = generation.get("pad_token_id", config.pad_token_id)
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", config.bos_token_id),
            "context_length": config.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_attention_heads,
                # GenAI loops over the KV tensors: blocks without attention have none (onnx_graph numbers them)
                "num_hidden_layers": len(attention_layers(config)),
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": config.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _versions() -> dict:
    import importlib.metadata

    versions = {}
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions
