"""The export manifest ``effideploy_export.json``: the header every export's manifest starts with (which runtime,
from what, when) and the one reader of it."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import effideploy
from effideploy.checkpoint.writer import PROVENANCE_FILE, source_record
from effideploy.errors import EffideployError

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
        },
    }


def read_export_manifest(folder: str | os.PathLike) -> dict | None:
    """The ``effideploy_export.json`` of an export folder; None when ``folder`` has none (not an export). A manifest
    that is not a JSON object raises EffideployError with a one-line message."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EffideployError(f"{path} is not valid JSON ({exc}); export the model again") from None
    if not isinstance(manifest, dict):
        raise EffideployError(f"{path} is not an export manifest (a JSON object); export the model again")
    return manifest
