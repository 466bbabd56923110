"""Exporters: turn a checkpoint (pruned or dense) into a folder one runtime serves, looked up by runtime name so that
vLLM, onnxruntime and onnxscript are imported only when their exporter is used.

Every exporter is ``export_<runtime>(source, output, *, overwrite=False, verify=..., dtype=..., **options)`` and
returns an ``effideploy.exporters.base.ExportResult``; it writes ``effideploy_export.json`` into the folder (read it
back with ``effideploy.exporters.manifest.read_export_manifest``) and writes the folder atomically (nothing is left
on failure).
"""

from effideploy.registry import Registry

EXPORTERS = Registry(
    "runtime",
    {
        "onnx": "effideploy.exporters.onnx:export_onnx",
        "vllm": "effideploy.exporters.vllm:export_vllm",
    },
)


def export(runtime: str, source, output, **options):
    """Export ``source`` for ``runtime`` (see each exporter for its options)."""
    return EXPORTERS.get(runtime)(source, output, **options)


def export_or_reuse(runtime: str, spec: str, target, **options):
    """The folder of an export for ``spec``: ``spec`` itself when it is an export, ``target`` when it already holds
    an export of the same source, else a new export written to ``target`` (benchmark scripts re-run cheaply)."""
    from pathlib import Path

    from effideploy.exporters.manifest import read_export_manifest
    from effideploy.models.resolve import resolve_model

    path, target = Path(spec).expanduser(), Path(target)
    if read_export_manifest(path) is not None:
        return path
    source = resolve_model(spec)
    manifest = read_export_manifest(target)
    if manifest is not None and manifest.get("source", {}).get("path") == str(source.path):
        return target
    print(f"exporting {spec} -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return export(runtime, source, target, overwrite=True, **options).output
