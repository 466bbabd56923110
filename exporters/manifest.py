"""The header every export's ``effideploy.json`` manifest starts with (which runtime, from what, when)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import effideploy
from effideploy.checkpoint.writer import PROVENANCE_FILE
from effideploy.errors import EffideployError

MANIFEST_FILE = "effideploy_export.json"
MANIFEST_FORMAT = 1


def manifest_header(runtime: str, source, provenance: dict | None) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "runtime": runtime,
        "effideploy_version": effideploy.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": source.spec, "path": str(source.path), "origin": source.origin,
                   "model_type": source.model_type, "pruned": source.is_pruned_checkpoint},
        "provenance": None if provenance is None else {
            "file": PROVENANCE_FILE, "method": provenance.get("method"),
            "sparsity": provenance.get("sparsity"), "created": provenance.get("created"),
        },
    }


def read_export_manifest(folder) -> dict | None:
    """The folder's effideploy_export.json, or None when it has none (not an export)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EffideployError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise EffideployError(f"{path} is not a JSON object")
    return manifest
