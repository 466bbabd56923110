"""Exporters: turn a checkpoint (pruned or dense) into a folder one runtime serves, looked up by runtime name so that
vLLM, onnxruntime and onnxscript are imported only when their exporter is used.

Every exporter is ``export_<runtime>(source, output, *, overwrite=False, verify=..., dtype=..., **options)`` and
returns an ``effideploy.exporters.base.ExportResult``; it writes ``effideploy_export.json`` into the folder (read it
back with ``effideploy.exporters.manifest.read_export_manifest``) and writes the folder atomically (nothing is left
on failure). Reusing an export that already exists is ``effideploy.bench.artifacts.export_or_reuse`` (keyed by the
source checkpoint's content and the export options).
"""

from effideploy.registry import Registry

EXPORTERS = Registry(
    "runtime",
    {
        "onnx": "effideploy.exporters.onnx:export_onnx",
        "vllm": "effideploy.exporters.vllm:export_vllm",
        "llamacpp": "effideploy.exporters.llamacpp:export_llamacpp",
    },
)


def export(runtime: str, source, output, **options):
    """Export ``source`` for ``runtime`` (see each exporter for its options)."""
    return EXPORTERS.get(runtime)(source, output, **options)
