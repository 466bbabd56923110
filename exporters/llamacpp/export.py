"""Export a checkpoint (pruned or dense) as a GGUF file for llama.cpp, quantized by llama.cpp's own quantizer.

``effideploy export CKPT --runtime llamacpp --quantize q4_k_m`` writes ``OUT/model-q4_k_m.gguf`` and the manifest;
``python -m llama_cpp.server --model OUT/model-q4_k_m.gguf`` (or ``llama-server -m ...``) serves it, with no
effideploy in the serving environment.

Steps: (1) the float32 GGUF is written with the ``gguf`` package (``effideploy.exporters.llamacpp.gguf``: ``deci``
for pruned checkpoints with per-layer FFN widths and head counts, ``llama`` for dense ones, tokenizer and chat
template carried over); (2) where llama-cpp-python is installed, that file's greedy tokens must equal transformers'
(float32) on the parity prompts, else nothing is written; (3) every other type (f16, bf16, q8_0, q4_k_m, ...) is made
from it by ``llama_model_quantize``, i.e. exactly what ``llama-quantize`` gives llama.cpp users; (4) the result's greedy
tokens are compared with transformers' again (f16/bf16: identical, or every differing choice within the half-precision
logit gap of transformers' top logit, teacher-forced), and its teacher-forced logits with the float32 GGUF's: top-1
agreement and logit error are recorded (quantization is lossy by design, so these are not required).

K-quants (q2_k .. q6_k and the _s/_m/_l mixes) pack rows of 256 weights: a matrix whose input width is not a
multiple of 256 gets llama.cpp's fallback type (q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, q2_K/q3_K -> q4_0; F16 where
even 32 does not divide it). The manifest lists which tensors needed it and the type every tensor got (read back
from the file). ``realign=True`` rounds FFN widths down to multiples of 256 first (dropping the channels with the
smallest down_proj column norm, as the vLLM export does; a block narrower than 256 keeps its width), so ffn_down
keeps the k-quant; the hidden size, which
every other matrix reads, cannot be realigned (SmolLM2's 576 is not a multiple of 256).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from effideploy import progress
from effideploy.checkpoint.writer import PROVENANCE_FILE, folder_size
from effideploy.errors import EffideployError
from effideploy.exporters.base import ExportResult, folder_files
from effideploy.exporters.llamacpp.gguf import GGUF_FILE, plan_of, read_gguf_summary, write_gguf
from effideploy.exporters.llamacpp.records import LlamacppExportOptions
from effideploy.exporters.llamacpp.schemes import GgufType
from effideploy.exporters.manifest import MANIFEST_FILE, manifest_header
from effideploy.io import atomic_output_dir, check_output_dir, write_json
from effideploy.models.resolve import ModelSource, resolve_model

# effideploy name -> llama.cpp's LLAMA_FTYPE_* (llama.h), the names llama-quantize takes, lower-cased.
QUANT_TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16", "int8": "q8_0"}
DEFAULT_TYPE = "f16"  # what convert_hf_to_gguf.py writes by default and llama.cpp users start from
HALF_TYPES = ("f16", "bf16")
K_QUANT_ROW = 256  # QK_K: weights per k-quant super-block
BLOCK_ROW = 32  # QK4_0 / QK8_0: weights per legacy-quant block
DEFAULT_CONTEXT = 2048


def resolve_type(quantize: str | None, dtype: str | None) -> str:
    """``--quantize`` / ``--dtype`` -> one GGUF type name of QUANT_TYPES (default f16)."""
    if quantize is not None and dtype is not None and dtype not in ("float32",):
        raise EffideployError("give the GGUF type with --quantize (f32, f16, q8_0, q4_k_m, ...), not both it and --dtype")
    wanted = quantize or dtype or DEFAULT_TYPE
    name = ALIASES.get(str(wanted).lower(), str(wanted).lower())
    if name not in QUANT_TYPES:
        raise EffideployError(f"--quantize {wanted!r} is not a GGUF type effideploy writes; choose one of "
                              f"{', '.join(QUANT_TYPES)}")
    return name


def is_k_quant(name: str) -> bool:
    return "_k" in name


def export_llamacpp(
    source: ModelSource | str | os.PathLike,
    output: str | os.PathLike,
    options: LlamacppExportOptions | None = None,
    *,
    overwrite: bool = False,
    verify: bool | None = None,
    **fields,
) -> ExportResult:
    """Write ``source`` as ``output/model-<type>.gguf`` (see the module docstring), with ``options``
    (:class:`LlamacppExportOptions`; keyword ``fields`` of it override them).

    quantize: a GGUF type (QUANT_TYPES; default f16; ``dtype`` float32/float16 are f32/f16). realign: round FFN
    widths down to multiples of 256 for k-quants. verify: None checks parity when llama-cpp-python is importable;
    True requires it; False skips it. token_compression: refused (llama.cpp keeps every token's KV)."""
    started = time.perf_counter()
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    options = LlamacppExportOptions.of(options, fields)
    quantize, dtype, realign = options.quantize, options.dtype, options.realign
    token_compression, threads = options.token_compression, options.threads

    kind = resolve_type(quantize, dtype)
    if realign and not is_k_quant(kind):
        raise EffideployError(f"--realign applies to k-quants (rows of {K_QUANT_ROW}); {kind} needs none")
    if token_compression and token_compression.strip().lower() != "none":
        raise EffideployError(f"token compression {token_compression!r} is not available on llama.cpp (it keeps every "
                              "token's KV); run it on the torch or onnx runtime")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EffideployError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if source.config_dict.get("quantization_config"):
        raise EffideployError(f"{source.path} holds quantized weights ({source.config_dict['quantization_config'].get('quant_method', '?')}); "
                              "export the unquantized checkpoint and let --quantize do it")
    reason = llamacpp_unavailable()
    if reason and kind != "f32":
        raise EffideployError(f"--quantize {kind} runs llama.cpp's quantizer, but the llamacpp runtime is unavailable: {reason}")
    if verify and reason:
        raise EffideployError(f"the parity check needs llama-cpp-python: {reason}; pass --no-verify to skip it")
    verify = (reason is None) if verify is None else bool(verify)
    target = check_output_dir(output, overwrite=overwrite, inputs=(source.path,))

    from effideploy.models.build import build_config, ffn_widths
    from effideploy.pruning import realign as width_realign

    config_dict = source.config_dict
    plan_of(config_dict)  # refuses what llama.cpp's llama/deci graphs cannot run, before any work
    config = build_config(config_dict)
    widths = ffn_widths(config)
    new_widths, realigned = widths, []
    if realign:
        # a block narrower than 256 keeps its width (llama.cpp's fallback type serves it) rather than losing its FFN
        new_widths = [w - w % K_QUANT_ROW if w >= K_QUANT_ROW else w for w in widths]
        realigned = width_realign.changed_blocks(widths, new_widths)
    narrowed = {"realigned": realigned, "realigned_config": (
        width_realign.realigned_config(dict(config_dict), new_widths) if realigned else None)}
    provenance = source.provenance()
    timings: dict[str, float] = {}
    gguf_name = GGUF_FILE.format(type=kind)
    name = Path(str(source.spec)).name or "model"

    with atomic_output_dir(target, overwrite=overwrite) as staging:
        tick = time.perf_counter()
        base = staging / GGUF_FILE.format(type="f32")
        with progress.status(f"Writing the GGUF of {source.spec}"):
            section = write_gguf(source.path, config_dict, base, dtype="float32", name=name,
                                 widths=new_widths if realigned else None, realigned=realigned)
        timings["write"] = time.perf_counter() - tick
        parity = None
        reference = prompts = None
        if verify:
            from effideploy.exporters.llamacpp.checks import check_f32_parity

            tick = time.perf_counter()
            parity, reference, prompts = check_f32_parity(base, source, threads=threads, **narrowed)
            timings["parity_f32"] = time.perf_counter() - tick
        final = staging / gguf_name
        if kind != "f32":
            tick = time.perf_counter()
            with progress.status(f"Quantizing to {kind} with llama.cpp"):
                quantize_gguf(base, final, kind, threads=threads)
            timings["quantize"] = time.perf_counter() - tick
            if verify:
                from effideploy.exporters.llamacpp.checks import check_quantized

                tick = time.perf_counter()
                parity.gguf_type_check = check_quantized(final, base, kind, reference, prompts, source,
                                                         threads=threads, **narrowed)
                timings["parity_quantized"] = time.perf_counter() - tick
            base.unlink()
        summary = read_gguf_summary(final)
        types = type_report(summary, kind)
        if provenance is not None:
            if realigned:
                provenance = width_realign.realigned_provenance(provenance, narrowed["realigned_config"], realigned,
                                                                K_QUANT_ROW)
            write_json(staging / PROVENANCE_FILE, provenance)
        serve = serve_command(target / gguf_name)
        timings["total"] = time.perf_counter() - started
        files = folder_files(staging) + [MANIFEST_FILE]
        weights_bytes = final.stat().st_size
        manifest = {
            **manifest_header("llamacpp", source, provenance),
            "architecture": section["architecture"],
            "gguf_file": gguf_name,
            "gguf_type": kind,
            # as the other exporters record it: a quantized export names its scheme (bench labels it cfsp-0.2+q8_0)
            "quantize": {"scheme": kind} if GgufType(kind).quantizes else None,
            "gguf": {key: value for key, value in section.items() if key != "tokenizer"},
            "tokenizer": section["tokenizer"],
            "ffn_widths": new_widths,
            "realign": None if not realigned else {"multiple": K_QUANT_ROW, "criterion": width_realign.CRITERION,
                                                    "blocks": realigned},
            "tensor_types": types,
            "quantizer": None if kind == "f32" else f"llama.cpp llama_model_quantize ({llamacpp_version()}) from the float32 GGUF",
            "sizes": {"bytes": folder_size(staging), "counted": f"every file but {MANIFEST_FILE}",
                      "source_bytes": folder_size(source.path), "weights_bytes": weights_bytes},
            "weight_storage": {"format": f"gguf-{kind}", "stored_bytes": weights_bytes,
                               # every matrix is read once per decoded token (a tied embedding as the output layer)
                               "bytes_per_token": weights_bytes},
            "parity": None if parity is None else parity.to_dict(),
            "serve_command": serve,
            "python_usage": f"llama_cpp.Llama(model_path={str(target / gguf_name)!r})",
            "llama_cpp_python_version": llamacpp_version(),
            "seconds": timings,
        }
        write_json(staging / MANIFEST_FILE, manifest)
        size = folder_size(staging)
    return ExportResult(output=target, runtime="llamacpp", files=files, size_bytes=size,
                        source_size_bytes=manifest["sizes"]["source_bytes"], seconds=timings, parity=parity,
                        serve_command=serve, manifest=manifest,
                        details={"gguf_file": gguf_name, "gguf_type": kind, "architecture": section["architecture"],
                                 "ffn_widths": new_widths, "realigned_blocks": realigned, "tensor_types": types})


def type_report(summary: dict, kind: str) -> dict:
    """The storage type of every tensor (counts and names) and the matrices whose rows do not fit the type's blocks
    (256 weights for k-quants, 32 for q4_0..q8_0), with the type llama.cpp's fallback gave each."""
    report = {"counts": summary["tensor_types"], "tensors": summary["tensors_by_type"]}
    block = K_QUANT_ROW if is_k_quant(kind) else BLOCK_ROW if kind.startswith("q") else None
    if block is not None:
        report["block"] = block
        report["fallback"] = {name: kept for name, (row, kept, dims) in sorted(summary["rows"].items())
                              if dims == 2 and row % block}
        report["fallback_rule"] = ("llama.cpp tensor_type_fallback: rows not a multiple of 256 take q4_K->q5_0, "
                                   "q5_K->q5_1, q6_K->q8_0, q2_K/q3_K->q4_0; rows not a multiple of 32 take F16")
    if is_k_quant(kind):
        kquant = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
        report["k_quant_tensors"] = sum(n for t, n in summary["tensor_types"].items() if t in kquant)
    return report


def quantize_gguf(source: Path, target: Path, kind: str, *, threads: int | None = None) -> None:
    """``llama_model_quantize`` (llama.cpp's quantizer, as ``llama-quantize`` runs it) from ``source`` to ``target``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[kind])
    params.nthread = int(threads or 0)  # 0: hardware concurrency
    with _quiet_native():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise EffideployError(f"llama.cpp could not quantize {source.name} to {kind} (status {status})")


class _quiet_native:
    """Silence llama.cpp's own stderr lines (per-tensor progress) around a native call."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)


def serve_command(gguf_path: Path) -> str:
    """llama-cpp-python's OpenAI-compatible server for the file (``llama-server -m FILE`` serves it as well)."""
    return f"python -m llama_cpp.server --model {shlex.quote(str(gguf_path))} --host 127.0.0.1 --port 8000"


def llamacpp_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None
