"""``effideploy export``: a checkpoint as a folder one runtime serves (vLLM, ONNX Runtime or llama.cpp), parity-checked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from effideploy.cli.app import DEFAULT_PRUNED, app, check_option_text, echo, set_threads
from effideploy.errors import EffideployError


@app.command("export")
def export(
    checkpoint: str = typer.Argument(DEFAULT_PRUNED, help="Checkpoint folder (or any model prune --model takes, e.g. 'llama' for the dense baseline)."),
    runtime: str = typer.Option(..., help="vllm | onnx | llamacpp"),
    output: Optional[Path] = typer.Option(None, help="Output folder (default: out/export-<runtime>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help="Parity check against transformers (default: on; vLLM: when vLLM is installed)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype (default float32; vLLM --quantize w4a16: bfloat16): float32 | float16 (ONNX), float32 | bfloat16 | float16 (vLLM)."),
    quantize: Optional[str] = typer.Option(
        None, help="ONNX: int8 | int4 weights (MatMulNBits, int8 compute on CPU). vLLM: w8a8 (alias int8: int8 "
                   "weights per channel, int8 dynamic per-token activations) or w4a16 (alias int4: int4 weights in "
                   "groups of --group-size, served in bfloat16/float16), written in the compressed-tensors format. "
                   "llamacpp: the GGUF type, made by llama.cpp's quantizer: f32 | f16 (default) | bf16 | q8_0 | q6_k | "
                   "q5_k_m | q4_k_m | q4_0 | ... (k-quants need rows of 256; others fall back, listed in the manifest)."),
    block_size: Optional[int] = typer.Option(None, help="ONNX: weights per quantization block, a power of two >= 16 (default 32)."),
    quant_method: Optional[str] = typer.Option(None, help="rtn (round-to-nearest, default) | gptq (from the statistics `prune --keep-stats` kept; on ONNX without them: ORT's GPTQ, int4) | hqq (ONNX int4)."),
    group_size: Optional[int] = typer.Option(None, help="vLLM --quantize w4a16: input columns per int4 scale (default 128; every FFN width must be a multiple of it)."),
    attention_outputs: bool = typer.Option(False, help="ONNX: also output each layer's attention probabilities (for KV compression)."),
    opset: Optional[int] = typer.Option(None, help="ONNX: opset version (default: torch's)."),
    token_compression: Optional[str] = typer.Option(
        None, help="Record a token-compression method for the runner, e.g. streamingllm:0.2 (ONNX; snapkv/h2o need "
                   "--attention-outputs) or kv-dtype:fp8 (vLLM, the only one it runs)."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM: tensor-parallel ranks the export must split over."),
    realign: bool = typer.Option(False, help="vLLM: round FFN widths down to what --tensor-parallel-size needs. llamacpp: to multiples of 256 (k-quants)."),
    align: Optional[int] = typer.Option(None, help="vLLM: also require widths divisible by this per rank (kernels)."),
    kv_cache_dtype: Optional[str] = typer.Option(None, help="vLLM: KV-cache dtype (auto | fp8 | fp8_e4m3 | fp8_e5m2)."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
) -> None:
    """Export a pruned (or dense) checkpoint for vLLM, ONNX Runtime or llama.cpp (GGUF) and check it against transformers."""
    from effideploy.exporters import EXPORT_OPTIONS, EXPORTERS

    options_class = EXPORT_OPTIONS.get(runtime)  # an unknown runtime fails here, before any work
    # An empty text option would pass as "given" and mean each exporter's default (--quantize "": f16 on llama.cpp,
    # no quantization elsewhere), which is not what anyone typing it meant.
    for value, flag in ((token_compression, "--token-compression"), (quantize, "--quantize"), (dtype, "--dtype"),
                        (quant_method, "--quant-method"), (kv_cache_dtype, "--kv-cache-dtype")):
        check_option_text(value, flag)
    # Each flag with the value that means "not given" here; a given flag must be a field of this runtime's options
    # (exporters/<runtime>/records.py), else it is refused by name. Unset flags leave the exporter's own defaults.
    flags = {"dtype": (dtype, None), "token_compression": (token_compression, None), "quantize": (quantize, None),
             "block_size": (block_size, None), "quant_method": (quant_method, None),
             "attention_outputs": (attention_outputs, False), "opset": (opset, None),
             "tensor_parallel_size": (tensor_parallel_size, 1), "realign": (realign, False), "align": (align, None),
             "kv_cache_dtype": (kv_cache_dtype, None), "group_size": (group_size, None)}
    accepted = {item.name for item in dataclasses.fields(options_class)}
    given = {name: value for name, (value, unset) in flags.items() if value != unset}
    foreign = [f"--{name.replace('_', '-')}" for name in given if name not in accepted]
    if foreign:
        raise EffideployError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to --runtime {runtime}")
    options = options_class(**given)
    if checkpoint == DEFAULT_PRUNED and not Path(checkpoint).exists():
        raise EffideployError(f"no checkpoint at {DEFAULT_PRUNED}: run effideploy prune first, or give a CHECKPOINT")
    set_threads(threads)
    target = output or Path(f"out/export-{runtime}")
    exporter = EXPORTERS.get(runtime)
    # verify: None leaves each exporter's default (vLLM / llama.cpp: check when the runtime is installed)
    result = exporter(checkpoint, target, options, overwrite=overwrite,
                      **({} if verify is None else {"verify": verify}))
    parity = "not checked (--no-verify)" if result.parity is None else result.parity.summary()
    echo(f"[bold green]exported[/] {checkpoint} for {runtime} -> {result.output}")
    echo(f"  {len(result.files)} files, {_size(result.size_bytes)}; parity: {parity}; "
         f"{result.seconds.get('total', 0.0):.1f} s")
    if result.serve_command:
        echo(f"  serve it with: {result.serve_command}")


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
