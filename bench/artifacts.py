"""What each bench model opens: a checkpoint as it is, an export given by the user, or an export made (once) from a
checkpoint for the runtime's exporter.

Export-or-reuse, the one rule (the bench, ``effideploy run`` and the benchmark scripts all go through
:func:`export_or_reuse`): an export is reused when it was made from a source checkpoint with the same *content*
(a sha256 over its files) with the same export options by the same effideploy version; anything else exports
afresh. Keys on content, not on paths or modification times, so a re-prune in place is never served a stale export.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import effideploy
from effideploy import progress
from effideploy.bench.config import DENSE_LABEL, BenchConfig, CandidateSpec
from effideploy.bench.results import ExportRecord, ModelResult, Parameters, Size, WeightStorage
from effideploy.errors import EffideployError, OptionError
from effideploy.exporters.manifest import read_export_manifest

CHUNK = 1 << 22


def content_fingerprint(folder: Path) -> str:
    """sha256 over the names and bytes of every regular file in ``folder`` (sorted), 16 hex digits. Computed once
    per folder and file state in a process (a run exports several models from one source checkpoint)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    state = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(Path(folder), state)


@functools.lru_cache(maxsize=64)
def _fingerprint(folder: Path, state: tuple) -> str:
    digest = hashlib.sha256()
    for path in (Path(name) for name, _, _ in state):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def export_key(source_path: Path, runtime: str, options: dict) -> str:
    payload = json.dumps({"source": content_fingerprint(source_path), "runtime": runtime, "options": options,
                          "effideploy": effideploy.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def export_or_reuse(exporter: str, source, root: Path, label: str, options: dict | None = None
                    ) -> tuple[Path, ExportRecord]:
    """The export of ``source`` (a ModelSource) for ``exporter`` with ``options`` under ``root``: reused when one
    with the same key exists there (see the module docstring), else written to ``root/<label>-<exporter>-<key>``."""
    from effideploy.exporters import EXPORTERS

    options = dict(options or {})
    key = export_key(source.path, exporter, options)
    root = Path(root)
    done = [folder for folder in sorted(root.glob(f"*-{exporter}-{key}")) if read_export_manifest(folder) is not None]
    if done:
        return done[0], ExportRecord(path=str(done[0]), reused=True, seconds=0.0)
    target = root / f"{label}-{exporter}-{key}"
    tick = time.perf_counter()
    with progress.status(f"Exporting {label} for {exporter} to {target}"):
        EXPORTERS.get(exporter)(source, target, overwrite=True, **options)
    return target, ExportRecord(path=str(target), reused=False, seconds=time.perf_counter() - tick)


def export_for(exporter: str, spec: str, root, label: str | None = None, **options) -> Path:
    """An export of ``spec`` for ``exporter``: ``spec`` itself when it already is one, else :func:`export_or_reuse`
    under ``root`` (the benchmark scripts re-run cheaply through this)."""
    from effideploy.models.resolve import resolve_model

    path = Path(spec).expanduser()
    if path.is_dir() and read_export_manifest(path) is not None:
        return path
    source = resolve_model(spec)
    return export_or_reuse(exporter, source, Path(root), label or source.path.name, options)[0]


def prepare_candidate(config: BenchConfig, runtime_class, label: str, spec) -> ModelResult:
    """``prepare_model`` for a candidate spec (``config.candidates``' entries): a compression method on the dense
    model's export when it names no model, else its checkpoint (or export), quantized as it asks."""
    kind = "compression" if spec.model is None and spec.compression else "checkpoint"
    return prepare_model(config, runtime_class, label, kind, spec.model or config.dense, spec.compression,
                         spec.quantize, spec.export_options)


def prepare_model(config: BenchConfig, runtime_class, label: str, kind: str, spec: str,
                  compression: str | None = None, quantize: str | None = None,
                  export_options: tuple = ()) -> ModelResult:
    """Resolve ``spec`` for the runtime: a runtime without an exporter reads checkpoints directly; one with an
    exporter takes an export as it is, or exports a checkpoint under ``config.export_root`` (export_or_reuse). A
    compression candidate shares the dense model's export unless its method needs other export options."""
    from effideploy.models.resolve import resolve_model

    exporter = runtime_class.capabilities.exporter
    path = Path(spec).expanduser()
    manifest = read_export_manifest(path) if path.is_dir() else None
    if quantize is not None:
        if exporter is None or quantize not in runtime_class.capabilities.weight_formats:
            formats = [f for f in runtime_class.capabilities.weight_formats if f not in ("float32", "float16", "bfloat16")]
            raise OptionError("quantize", f"{quantize} is not a weight format the {config.runtime} runtime serves"
                                  + (f" (it serves: {', '.join(formats)})" if formats else
                                     " (it runs checkpoints as they are; quantized weights need an exporting runtime)"))
        if manifest is not None:
            raise EffideployError(f"{path} is already an export; --quantize applies to checkpoints")
    if manifest is not None:
        if exporter is None or manifest.get("runtime") != exporter:
            raise EffideployError(f"{path} is an export for {manifest.get('runtime')!r}, not for --runtime {config.runtime}")
        source_path = Path((manifest.get("source") or {}).get("path", ""))
        config_dict = _config_dict(path) or _config_dict(source_path)
        return ModelResult(label, kind, spec, path, source_path if source_path.is_dir() else None, config_dict,
                           compression)
    source = resolve_model(spec)
    if exporter is None:
        return ModelResult(label, kind, spec, source.path, source.path, source.config_dict, compression)
    options = runtime_class.export_options(compression)
    if quantize is not None:
        options["quantize"] = quantize
        options.update(dict(export_options))
    base = DENSE_LABEL if kind == "compression" else label
    suffix = "".join(f"-{k}={v}" for k, v in options.items()).replace(":", "_")
    target, record = export_or_reuse(exporter, source, Path(config.export_root), base + suffix, options)
    return ModelResult(label, kind, spec, target, source.path, source.config_dict, compression, export=record)


def _config_dict(folder: Path) -> dict | None:
    from effideploy.models.resolve import read_config_dict

    return read_config_dict(folder) if (folder / "config.json").is_file() else None


def _amount(record: dict) -> str:
    """What the pruning was asked for, as tune's labels write it: a depth method's sublayer count or parameter
    fraction (drop-attention-0.05, drop-blocks-2), else the FFN sparsity (cfsp-0.2). A depth checkpoint's
    ``ffn_requested`` is the unused default sparsity, not its amount."""
    config = record.get("config") or {}
    if config.get("count") is not None:
        return f"{config['count']:d}"
    if config.get("target_params") is not None:
        return f"{config['target_params']:g}"
    return f"{record['sparsity'].get('ffn_requested', 0):g}"


def candidate_label(spec: CandidateSpec, taken: set[str]) -> str:
    """The candidate's name in the report: given, else method-sparsity from its provenance, else the folder name;
    made unique with #2, #3..."""
    if spec.label:
        label = spec.label
    elif spec.model is None:
        label = DENSE_LABEL + (f"+{spec.compression}" if spec.compression else "")
    else:
        from effideploy.checkpoint.writer import read_provenance

        path = Path(spec.model).expanduser()
        record = read_provenance(path) if path.is_dir() else None
        manifest = read_export_manifest(path) if path.is_dir() else None
        if record is None and manifest and manifest.get("provenance"):
            record = {key: manifest["provenance"].get(key) for key in ("method", "sparsity", "config")}
        if record and record.get("method") and record.get("sparsity"):
            label = f"{record['method']}-{_amount(record)}"
        elif manifest is not None:
            label = "dense"
        else:
            label = path.name or str(spec.model)
        scheme = ((manifest or {}).get("quantize") or {}).get("scheme")
        if scheme:  # what is stored is part of the recipe: cfsp-0.2+int8
            label += f"+{scheme}"
        if spec.compression:
            label += f"+{spec.compression}"
    if spec.quantize and not spec.label:
        label += f"+{spec.quantize}"
    unique, number = label, 2
    while unique in taken:
        unique, number = f"{label}#{number}", number + 1
    taken.add(unique)
    return unique


def describe_model(model: ModelResult) -> None:
    """Parameter counts (from the config alone) and sizes on disk."""
    from effideploy.checkpoint.writer import folder_size
    from effideploy.models.build import attention_layers, build_config, count_parameters, ffn_widths

    if model.config_dict is not None:
        model_config = build_config(model.config_dict)
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        model.parameters = Parameters(
            counts=count_parameters(model_config), ffn_widths=ffn_widths(model_config),
            # blocks whose attention was removed (depth pruning) attend to nothing
            attention_width=len(attention_layers(model_config)) * model_config.num_attention_heads * head_dim,
            max_positions=getattr(model_config, "max_position_embeddings", None))
    weights = None
    if model.checkpoint is not None and model.checkpoint.is_dir():
        weights = sum(p.stat().st_size for p in model.checkpoint.glob("*.safetensors"))
    model.size = Size(checkpoint_weights_bytes=weights, artifact_bytes=folder_size(model.artifact),
                      artifact=str(model.artifact), checkpoint=None if model.checkpoint is None else str(model.checkpoint))
    model.weights = weight_storage(model)


def weight_storage(model: ModelResult) -> WeightStorage | None:
    """The export's record of its stored weights (``weight_storage`` in its manifest), else the safetensors
    checkpoint's: every matmul weight read once per decoded token at the checkpoint's dtype."""
    from effideploy.bench.metrics import matmul_parameters
    from effideploy.models.weights import SafetensorsWeights

    manifest = read_export_manifest(model.artifact) if Path(model.artifact).is_dir() else None
    recorded = (manifest or {}).get("weight_storage")
    if isinstance(recorded, dict) and {"format", "stored_bytes", "bytes_per_token"} <= set(recorded):
        return WeightStorage(str(recorded["format"]), int(recorded["stored_bytes"]), int(recorded["bytes_per_token"]))
    folder = Path(model.artifact) if any(Path(model.artifact).glob("*.safetensors")) else model.checkpoint
    if folder is None or model.parameters is None or not any(Path(folder).glob("*.safetensors")):
        return None
    dtype = SafetensorsWeights(folder).dtype()
    element = dtype.itemsize
    return WeightStorage(format=str(dtype).replace("torch.", ""),
                         stored_bytes=sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")),
                         bytes_per_token=matmul_parameters(model.parameters.counts) * element)


def matmul_parameters_of(folder) -> tuple[int, list[int]]:
    """Weights one decoded token multiplies (bench.metrics.matmul_parameters) and the FFN widths of a checkpoint or
    an export (read from its own config.json, else from its source checkpoint's)."""
    from effideploy.bench.metrics import matmul_parameters
    from effideploy.models.build import build_config, count_parameters, ffn_widths

    folder = Path(folder)
    manifest = read_export_manifest(folder)
    config_dict = _config_dict(folder)
    if config_dict is None and manifest is not None:
        config_dict = _config_dict(Path((manifest.get("source") or {}).get("path", "")))
    if config_dict is None:
        raise EffideployError(f"{folder} has no config.json, nor a source checkpoint that has one")
    model_config = build_config(config_dict)
    return matmul_parameters(count_parameters(model_config)), ffn_widths(model_config)
