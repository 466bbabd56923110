"""The export manifest ``effideploy_export.json``: the header every export's manifest starts with (which runtime,
from what, when), its reader, and the reader of its parity record as the exporter's typed record."""

from __future__ import annotations

import datetime
from pathlib import Path

import effideploy
from effideploy.checkpoint.writer import PROVENANCE_FILE, source_record

MANIFEST_FILE = "effideploy_export.json"
MANIFEST_FORMAT = 1


def manifest_header(runtime: str, source, provenance: dict | None) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "runtime": runtime,
        "effideploy_version": effideploy.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {**source_record(source), "pruned": source.is_pruned_checkpoint},
        "provenance": None if provenance is None else {
            "file": PROVENANCE_FILE, "method": provenance.get("method"),
            "sparsity": provenance.get("sparsity"), "created": provenance.get("created"),
            # a depth method's amount (the label of an export benched as a candidate: drop-attention-0.05)
            "config": {key: (provenance.get("config") or {}).get(key) for key in ("count", "target_params")},
        },
    }


def read_export_manifest(folder) -> dict | None:
    """The folder's effideploy_export.json, or None when it has none (not an export)."""
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(Path(folder) / MANIFEST_FILE, what="export manifest")


def read_export_parity(folder):
    """The parity record of the export in ``folder`` as its exporter's typed record (``exporters/<runtime>/records.py``),
    or None when the folder is not an export or its parity was not checked."""
    from effideploy.exporters import PARITY_READERS

    manifest = read_export_manifest(folder)
    return None if manifest is None else PARITY_READERS.get(manifest["runtime"])(manifest)
