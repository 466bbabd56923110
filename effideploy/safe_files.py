"""Reading every input file so that a bad one gives a one-line ``EffideployError``, never a traceback.

One rule for each kind of input:

* text (calibration / training / evaluation text, policies): :func:`read_text` decodes UTF-8 and names the file and
  the byte offset when it is not UTF-8;
* JSON (``config.json``, ``effideploy.json``, ``effideploy_export.json``, safetensors indexes, task files):
  :func:`read_json` reports a missing file, non-UTF-8 bytes, malformed JSON and (by default) a top level that is not
  an object, each naming the file;
* file names read from an input (an index's ``weight_map``): :func:`member_path` accepts only a plain file name
  inside the folder that named it (no ``/``, ``..``, absolute paths or links leading outside);
* remote code: effideploy never runs a model's own code. :func:`strip_foreign_auto_map` removes every ``auto_map``
  entry except the ones naming the DeciLM code effideploy ships, so that exports and checkpoints never point a
  user's ``trust_remote_code`` at code they do not carry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from effideploy.errors import EffideployError

# The only remote code an effideploy output may name: the DeciLM modules copied from effideploy/checkpoint/remote.
OWN_AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}


def read_bytes(path: str | os.PathLike, *, what: str = "file") -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EffideployError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise EffideployError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise EffideployError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def decode_text(data: bytes, path: str | os.PathLike, *, what: str = "file") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EffideployError(f"{what} {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_text(path: str | os.PathLike, *, what: str = "text file") -> str:
    """The file decoded as UTF-8 (a leading BOM is dropped), or a one-line error naming it."""
    text = decode_text(read_bytes(path, what=what), path, what=what)
    return text[1:] if text.startswith("\ufeff") else text


def parse_json(text: str | bytes, where: str, *, what: str = "JSON file", expect: type | None = dict):
    if isinstance(text, bytes):
        text = decode_text(text, where, what=what)
    try:
        value = json.loads(text)
    except RecursionError:
        raise EffideployError(f"{what} {where} is nested too deeply") from None
    except ValueError as exc:
        message = getattr(exc, "msg", str(exc))
        place = f" (line {exc.lineno} column {exc.colno})" if hasattr(exc, "lineno") else ""
        raise EffideployError(f"{what} {where} is not valid JSON: {message}{place}") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise EffideployError(f"{what} {where} must hold {kind}, not {type(value).__name__}")
    return value


def read_json(path: str | os.PathLike, *, what: str = "JSON file", expect: type | None = dict):
    """The parsed file (an object unless ``expect`` says otherwise), or a one-line error naming it."""
    return parse_json(read_bytes(path, what=what), str(path), what=what, expect=expect)


def read_json_if_exists(path: str | os.PathLike, *, what: str = "JSON file") -> dict | None:
    path = Path(path)
    return read_json(path, what=what) if path.is_file() else None


def member_path(folder: str | os.PathLike, name: object, *, what: str = "file name") -> Path:
    """``folder / name`` when ``name`` (read from an input file) is a plain file name inside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise EffideployError(f"{what} {name!r} in {folder} is not a plain file name inside that folder")
    folder = Path(folder)
    path = folder / name
    try:
        inside = path.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise EffideployError(f"{what} {name!r} in {folder} leads outside that folder")
    return path


def strip_foreign_auto_map(payload: dict) -> dict:
    """``payload`` without the ``auto_map`` entries that name code effideploy does not ship (a copy)."""
    auto_map = payload.get("auto_map")
    if auto_map is None:
        return payload
    payload = dict(payload)
    kept = {key: value for key, value in auto_map.items() if OWN_AUTO_MAP.get(key) == value} \
        if isinstance(auto_map, dict) else {}
    if kept:
        payload["auto_map"] = kept
    else:
        payload.pop("auto_map")
    return payload


def copy_json_without_foreign_code(source: Path, target: Path) -> None:
    """Copy a JSON file (config.json, tokenizer_config.json) dropping foreign ``auto_map`` entries."""
    payload = read_json(source, what=source.name)
    cleaned = strip_foreign_auto_map(payload)
    if cleaned is payload:
        import shutil

        shutil.copy2(source, target)
    else:
        target.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_own_remote_code(folder: str | os.PathLike) -> None:
    """Before a folder is loaded with ``trust_remote_code=True`` (vLLM serving a pruned checkpoint): its
    ``auto_map`` may name only effideploy's DeciLM code, and those files must be byte-identical to the copies
    effideploy ships. Anything else would run code effideploy did not write."""
    folder = Path(folder)
    config = read_json(folder / "config.json", what="model config")
    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        raise EffideployError(f"{folder}/config.json: auto_map must be an object")
    foreign = sorted(f"{key}={value}" for key, value in auto_map.items() if OWN_AUTO_MAP.get(key) != value)
    if foreign:
        raise EffideployError(f"{folder}/config.json names remote code effideploy does not ship ({', '.join(foreign)}); "
                              "refusing to run it")
    shipped = Path(__file__).resolve().parent / "checkpoint" / "remote"
    for module in sorted({value.split(".")[0] for value in auto_map.values()}):
        name = f"{module}.py"
        path = member_path(folder, name, what="remote code file")
        if not path.is_file():
            raise EffideployError(f"{folder} lacks {name}, which its config.json auto_map names")
        if read_bytes(path, what="remote code file") != (shipped / name).read_bytes():
            raise EffideployError(f"{path} differs from the code effideploy ships; refusing to run it "
                                  "(export the checkpoint again with this version)")
