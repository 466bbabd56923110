"""Weight quantization of the ONNX graph (ORT's ``MatMulNBits``), the PyTorch reference that applies the same
quantization, and the stored-weight accounting every ONNX export records (``weight_storage``).

- Schemes: ``int8`` (8-bit) and ``int4`` (4-bit) weights in blocks of ``block_size`` (default 32) along the input
  dimension, one fp32 scale per block, with ``accuracy_level`` 4 (activations quantized to int8 per block at run
  time, int8 kernels on CPU). Methods: ``rtn`` (ORT's round-to-nearest, symmetric, zero point implied: 8 for 4-bit,
  128 for 8-bit) and ``hqq`` (ORT's HQQ quantizer, 4-bit only: asymmetric, float zero points optimised per block
  by a proximal solver; no calibration data; ONNX Runtime computes with float zero points in fp32, not int8) and
  ``gptq`` (ORT's GPTQ, 4-bit only, symmetric like rtn: each weight is rounded column by
  column compensating the error with the inverse Hessian of its input, collected by running GPTQ_WINDOWS
  WikiText-2 windows through the float graph with an empty KV cache). Every MatMul with a constant weight is quantized, including the
  output head: with tied embeddings the graph computes it from the embedding table through a Transpose, which is
  materialised as its own [hidden, vocab] initializer first so that it is quantized too (the Gather of the
  embedding keeps the float table: a decode step reads one row of it).
- The fake-quant reference: the quantized graph's MatMulNBits initializers (packed B, scales, zero points) are read
  back and dequantized as the kernel defines them, and loaded into a copy of the transformers model; only the
  run-time int8 activation rounding of accuracy_level 4 then separates it from ONNX Runtime.

Longer than the ~350 lines a module here aims at, for a reason: the three methods, the reader of MatMulNBits'
packed layout and the storage accounting must agree on one node/initializer naming; split it when a fourth method
or a second weight-only operator lands.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import warnings
from pathlib import Path

from effideploy.errors import EffideployError

SCHEMES = {"int8": 8, "int4": 4}
METHODS = ("rtn", "hqq", "gptq")
# GPTQ calibration: WikiText-2 windows (the pruning's calibration text), fed through the float graph.
GPTQ_WINDOWS = 8
GPTQ_SEQLEN = 128
DEFAULT_BLOCK_SIZE = 32
DEFAULT_METHOD = "rtn"
ACCURACY_LEVEL = 4
OP = "com.microsoft.MatMulNBits"


def quantization_settings(quantize: str | None, block_size: int | None, quant_method: str | None,
                          dtype: str) -> dict | None:
    """The validated settings of ``--quantize/--block-size/--quant-method``, or None without quantization; a
    one-line EffideployError for anything ONNX Runtime's MatMulNBits cannot take."""
    if quantize is None:
        if block_size is not None or quant_method is not None:
            raise EffideployError("--block-size and --quant-method need --quantize int8|int4")
        return None
    if quantize not in SCHEMES:
        raise EffideployError(f"--quantize must be one of {', '.join(SCHEMES)}, got {quantize!r}")
    if dtype != "float32":
        raise EffideployError(f"{quantize} quantization starts from the float32 graph; use --dtype float32 with "
                              f"--quantize {quantize}")
    block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if type(block) is not int or block < 16 or block & (block - 1):
        raise EffideployError(f"--block-size must be a power of two >= 16 (MatMulNBits), got {block_size!r}")
    method = DEFAULT_METHOD if quant_method is None else quant_method
    if method not in METHODS:
        raise EffideployError(f"--quant-method must be one of {', '.join(METHODS)}, got {quant_method!r}")
    bits = SCHEMES[quantize]
    if method == "hqq" and bits != 4:
        raise EffideployError(f"--quant-method {method} is 4-bit only (ONNX Runtime's {method.upper()} quantizer); use "
                              "--quantize int4")
    return {"scheme": quantize, "bits": bits, "block_size": block, "method": method, "symmetric": method != "hqq",
            "accuracy_level": ACCURACY_LEVEL, "op": OP}


def refuse_quantized_source(path: Path, config_dict: dict | None = None) -> None:
    """A source that is already an export (an ONNX folder, a quantized manifest) or a quantized checkpoint
    (``quantization_config`` in config.json) is not quantized again."""
    from effideploy.exporters.manifest import read_export_manifest

    path = Path(path)
    if not path.is_dir():
        return
    if (path / "model.onnx").exists():
        raise EffideployError(f"{path} is an ONNX export; quantize from the checkpoint it was exported from")
    try:
        manifest = read_export_manifest(path)
    except EffideployError:
        manifest = None
    if isinstance(manifest, dict) and manifest.get("quantize"):
        raise EffideployError(f"{path} is already quantized ({_scheme_text(manifest['quantize'])}); quantize from the "
                              "unquantized checkpoint")
    if config_dict is not None and config_dict.get("quantization_config"):
        method = (config_dict["quantization_config"] or {}).get("quant_method", "quantized") \
            if isinstance(config_dict["quantization_config"], dict) else "quantized"
        raise EffideployError(f"{path} is already quantized ({method} quantization_config in config.json); quantize "
                              "from the unquantized checkpoint")


def _scheme_text(record) -> str:
    return record.get("scheme", "quantized") if isinstance(record, dict) else str(record)


def storage_format(settings: dict | None, dtype: str) -> str:
    if settings is None:
        return dtype
    return f"{settings['scheme']} MatMulNBits block {settings['block_size']} ({settings['method']})"


# ---------------------------------------------------------------------------------------------------- quantization

def quantize_graph(float_model: Path, output_model: Path, settings: dict,
                   calibration: list[list[int]] | None = None) -> tuple[dict, dict[str, str]]:
    """Quantize every constant-weight MatMul of ``float_model`` into ``output_model`` (external data).
    ``calibration``: token-id windows GPTQ runs through the float graph (its only data).

    Returns the manifest's ``quantize`` record and {MatMulNBits node name: digest of the float [K, N] weight it
    replaced}, which ``fake_quant_reference`` uses to find each weight's module."""
    import onnx
    import onnxruntime

    # Importing ORT's quantizer calls logging.basicConfig(level=INFO): every later INFO record of the process (the
    # ONNX exporter's passes among them) would go to stderr. The root logger is put back as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)
    root.handlers[:], root.level = handlers, level

    model = onnx.load(str(float_model))
    _materialize_transposed_weights(model)
    initializers = {init.name: init for init in model.graph.initializer}
    digests = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            weight = onnx.numpy_helper.to_array(initializers[node.input[1]])
            digests[f"{node.name}_Q{settings['bits']}"] = _digest(weight)

    extra = {}
    if settings["method"] == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=settings["block_size"], bits=settings["bits"])
    elif settings["method"] == "gptq":
        from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig

        if not calibration:
            raise EffideployError("--quant-method gptq needs calibration text")
        config = GPTQWeightOnlyQuantConfig(calibration_data_reader=_GraphFeeds(model, calibration))
        # Symmetric: ORT 1.32's GPTQ packs asymmetric 4-bit zero points across rows, wrong (or failing) whenever
        # a weight has an odd number of blocks, as pruned widths often do; symmetric weights carry none.
        extra = {"block_size": settings["block_size"], "is_symmetric": True, "accuracy_level": ACCURACY_LEVEL}
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=settings["block_size"], is_symmetric=True,
                                              accuracy_level=ACCURACY_LEVEL, bits=settings["bits"])
    loggers = [logging.getLogger(name) for name in ("onnxruntime.quantization.matmul_nbits_quantizer",
                                                     "onnxruntime.quantization")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            quantizer = MatMulNBitsQuantizer(model, algo_config=config, **extra)
            with contextlib.redirect_stdout(io.StringIO()):  # GPTQ prints a progress bar
                quantizer.process()
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        quantized = quantizer.model.model
        quantized_nodes = 0
        for node in quantized.graph.node:
            if node.op_type == "MatMulNBits":
                quantized_nodes += 1
                # ORT's HQQ quantizer writes no accuracy_level: set the same one as RTN (int8 compute on CPU).
                for attribute in list(node.attribute):
                    if attribute.name == "accuracy_level":
                        node.attribute.remove(attribute)
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", ACCURACY_LEVEL))
        if quantized_nodes == 0:
            raise EffideployError("quantization found no MatMul with a constant weight; the export was not kept")
        onnx.save_model(quantized, str(output_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{Path(output_model).name}.data", size_threshold=1024)
    record = {**settings, "quantized_matmuls": quantized_nodes,
              "tool": f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer"
                      + {"hqq": " (HQQWeightOnlyQuantConfig)", "gptq": " (GPTQWeightOnlyQuantConfig)"}.get(
                          settings["method"], "")}
    if calibration:
        record["calibration"] = {"windows": len(calibration), "tokens": len(calibration[0]),
                                 "text": "wikitext2 (calibration split), seed 0"}
    return record, {name: digest for name, digest in digests.items()}


class _GraphFeeds:
    """GPTQ's calibration reader: each window as the decoder graph's inputs, with an empty KV cache."""

    def __init__(self, model, windows: list[list[int]]) -> None:
        import numpy as np

        self.windows, self.index = windows, 0
        self.past = {}
        for value in model.graph.input:
            if value.name.startswith("past_key_values."):
                dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
                self.past[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)

    def get_next(self):
        import numpy as np

        if self.index >= len(self.windows):
            return None
        ids = np.asarray([self.windows[self.index]], dtype=np.int64)
        self.index += 1
        return {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **self.past}

    def __iter__(self):
        return iter(self.get_next, None)


def calibration_windows(source, vocab_size: int) -> list[list[int]]:
    """GPTQ_WINDOWS windows of GPTQ_SEQLEN tokens of WikiText-2 (calibration split), as the pruning draws them;
    seeded random ids when the checkpoint has no usable tokenizer."""
    import numpy as np

    try:
        from effideploy.data.text import load_text, resolve_text, sample_windows, tokenize_text
        from effideploy.models.build import load_tokenizer

        ids = tokenize_text(load_tokenizer(source), load_text(resolve_text("wikitext2"))[:200_000])
        if int(ids.max()) < vocab_size:
            return sample_windows(ids, GPTQ_WINDOWS, GPTQ_SEQLEN, seed=0).tolist()
    except Exception:  # noqa: BLE001 - no tokenizer or text: random ids still calibrate the graph's statistics
        pass
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab_size, size=(GPTQ_WINDOWS, GPTQ_SEQLEN)).tolist()


def _materialize_transposed_weights(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer (a tied output head) -> MatMul(x, W^T) with W^T stored, so the
    quantizer sees a constant weight. Returns how many were rewritten."""
    import onnx

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        producer = producers.get(node.input[1])
        if producer is None or producer.op_type != "Transpose" or producer.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
        array = onnx.numpy_helper.to_array(initializers[producer.input[0]])
        if array.ndim != 2 or perm != [1, 0]:
            continue
        transposed = onnx.numpy_helper.from_array(array.T.copy(), name=f"{producer.input[0]}.transposed")
        model.graph.initializer.append(transposed)
        node.input[1] = transposed.name
        if consumers.get(producer.output[0], 0) == 1:
            model.graph.node.remove(producer)
        rewritten += 1
    return rewritten


def _digest(array) -> str:
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(str(array.shape).encode() + array.tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------- dequantization

def dequantize_matmul_nbits(packed, scales, zero_points, *, K: int, N: int, bits: int, block_size: int):
    """The float [K, N] weight a MatMulNBits node multiplies by, as the contrib op defines it: B is [N, blocks,
    blob] uint8 (two 4-bit values per byte, low nibble first), one scale per (column, block); zero points either
    absent (2^(bits-1)), packed uint8 like B, or floats of the scales' type; w = (q - zero_point) * scale."""
    import numpy as np

    blocks = (K + block_size - 1) // block_size
    packed = np.asarray(packed, dtype=np.uint8).reshape(N, blocks, -1)
    if bits == 4:
        q = np.empty((N, blocks, packed.shape[-1] * 2), dtype=np.float32)
        q[..., 0::2], q[..., 1::2] = packed & 0x0F, packed >> 4
    elif bits == 8:
        q = packed.astype(np.float32)
    else:
        raise EffideployError(f"MatMulNBits with {bits} bits is not supported here")
    scales = np.asarray(scales, dtype=np.float32).reshape(N, blocks)
    if zero_points is None:
        zero = np.full((N, blocks), 2 ** (bits - 1), dtype=np.float32)
    elif np.asarray(zero_points).dtype == np.uint8:
        zp = np.asarray(zero_points).reshape(N, -1)
        if bits == 4:
            unpacked = np.empty((N, zp.shape[1] * 2), dtype=np.float32)
            unpacked[:, 0::2], unpacked[:, 1::2] = zp & 0x0F, zp >> 4
            zero = unpacked[:, :blocks]
        else:
            zero = zp[:, :blocks].astype(np.float32)
    else:
        zero = np.asarray(zero_points, dtype=np.float32).reshape(N, blocks)
    weight = (q - zero[..., None]) * scales[..., None]
    return weight.reshape(N, -1)[:, :K].T.copy()


def dequantized_weights(model_path: Path) -> dict[str, "object"]:
    """{node name: dequantized float [K, N] weight} of every MatMulNBits node of a saved graph."""
    import onnx

    model = onnx.load(str(model_path))
    arrays = {init.name: init for init in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inputs = [onnx.numpy_helper.to_array(arrays[name]) if name else None for name in node.input[1:4]]
        inputs += [None] * (3 - len(inputs))
        weights[node.name] = dequantize_matmul_nbits(
            inputs[0], inputs[1], inputs[2], K=attributes["K"], N=attributes["N"], bits=attributes.get("bits", 4),
            block_size=attributes["block_size"])
    return weights


def fake_quant_reference(reference, quantized_model: Path, digests: dict[str, str]):
    """A copy of ``reference`` (transformers, fp32) whose Linear weights are the quantized graph's dequantized
    MatMulNBits weights; the output head is untied from the embedding (the graph quantizes only the head)."""
    import torch

    weights = dequantized_weights(quantized_model)
    model = copy.deepcopy(reference)
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is \
            model.get_input_embeddings().weight:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    targets = linear_targets(model)
    missing = []
    for name, weight in weights.items():
        modules = [module for _, module in targets.get(digests.get(name, ""), ())] or None
        if modules is None:
            missing.append(name)
            continue
        rows = torch.from_numpy(weight).T
        start = 0
        for module in modules:
            stop = start + module.out_features
            module.weight.data.copy_(rows[start:stop])
            start = stop
    if missing:
        raise EffideployError(f"fake-quant reference: {len(missing)} quantized weights (e.g. {missing[0]}) have no "
                              "matching module in the transformers model; the export was not kept")
    return model


def linear_targets(model) -> dict[str, list[tuple[str, "object"]]]:
    """{digest of a float [K, N] graph weight: the (name, Linear) modules it holds, in row order}: one Linear, or
    q/k/v_proj when the exporter packed them into one MatMul."""
    import torch

    targets: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            targets.setdefault(_digest(module.weight.detach().T.numpy()), [(name, module)])
        attention = [(f"{name}.{part}", getattr(module, part, None)) for part in ("q_proj", "k_proj", "v_proj")]
        if all(isinstance(p, torch.nn.Linear) for _, p in attention):
            packed = torch.cat([p.weight.detach() for _, p in attention]).T.numpy()
            targets.setdefault(_digest(packed), attention)
    return targets


# ---------------------------------------------------------------------------------------------------- storage

def weight_storage(model_path: Path, fmt: str) -> dict:
    """Bytes of every initializer of the graph (``stored_bytes``) and of those a decode step reads in full
    (``bytes_per_token``): the weights of every MatMul / MatMulNBits (with scales and zero points), including a
    weight reached through a Transpose of an initializer. The embedding Gather reads one row per token, so its
    table is not counted unless a MatMul reads the same tensor (then it counts once)."""
    import numpy as np
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {init.name: _stored_size(init, np) for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    read: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMul":
            names = [node.input[1]]
        elif node.op_type == "MatMulNBits":
            names = list(node.input[1:4])
        else:
            continue
        for name in names:
            producer = producers.get(name)
            if name not in sizes and producer is not None and producer.op_type == "Transpose":
                name = producer.input[0]
            if name in sizes:
                read.add(name)
    return {"format": fmt, "stored_bytes": int(sum(sizes.values())),
            "bytes_per_token": int(sum(sizes[name] for name in read))}


def _stored_size(init, np) -> int:
    import onnx

    if init.data_location == onnx.TensorProto.EXTERNAL:
        entries = {entry.key: entry.value for entry in init.external_data}
        if "length" in entries:
            return int(entries["length"])
    if init.raw_data:
        return len(init.raw_data)
    return int(onnx.numpy_helper.to_array(init).nbytes)
