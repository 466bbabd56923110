"""Exporters: turn a checkpoint (pruned or dense) into a folder one runtime serves, looked up by runtime name so that
vLLM, onnxruntime and onnxscript are imported only when their exporter is used.

One package per runtime (``onnx/``, ``vllm/``, ``llamacpp/``). Every exporter is
``export_<runtime>(source, output, options=None, *, overwrite=False, verify=..., **fields)``, where ``options`` is
its ``ExportOptions`` dataclass (``EXPORT_OPTIONS``; ``fields`` override single options, as the bench passes them)
and returns an ``effideploy.exporters.base.ExportResult`` whose ``parity`` is the exporter's typed record; it writes
``effideploy_export.json`` into the folder (read it back with ``effideploy.exporters.manifest.read_export_manifest``,
its parity record with ``read_export_parity``) and writes the folder atomically (nothing is left on failure).
Reusing an export that already exists is ``effideploy.bench.artifacts.export_or_reuse`` (keyed by the source
checkpoint's content and the export options).
"""

from effideploy.registry import Registry

EXPORTERS = Registry(
    "runtime",
    {
        "onnx": "effideploy.exporters.onnx.export:export_onnx",
        "vllm": "effideploy.exporters.vllm.export:export_vllm",
        "llamacpp": "effideploy.exporters.llamacpp.export:export_llamacpp",
    },
)
# Each exporter's records module imports nothing heavy: the CLI reads an exporter's options, and the manifest
# reader its parity record, without torch or the runtime's packages.
EXPORT_OPTIONS = Registry(
    "runtime",
    {
        "onnx": "effideploy.exporters.onnx.records:OnnxExportOptions",
        "vllm": "effideploy.exporters.vllm.records:VllmExportOptions",
        "llamacpp": "effideploy.exporters.llamacpp.records:LlamacppExportOptions",
    },
)
PARITY_READERS = Registry(
    "runtime",
    {
        "onnx": "effideploy.exporters.onnx.records:parity_from_manifest",
        "vllm": "effideploy.exporters.vllm.records:parity_from_manifest",
        "llamacpp": "effideploy.exporters.llamacpp.records:parity_from_manifest",
    },
)


def export(runtime: str, source, output, **options):
    """Export ``source`` for ``runtime`` (see each exporter for its options)."""
    return EXPORTERS.get(runtime)(source, output, **options)
