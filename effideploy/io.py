"""Writing outputs so that nothing is lost: one output-folder policy for every command.

* An output never equals, contains or lies inside an input (:func:`check_output_dir` with ``inputs=``).
* An existing output is replaced only with ``--overwrite`` and only when effideploy wrote it: it carries
  :data:`OUTPUT_MARKER` (written by :func:`atomic_output_dir`) or, from older versions, a checkpoint's
  ``effideploy.json`` + ``config.json``, an export's ``effideploy_export.json`` or a report's ``report.json`` +
  ``report.md``. Any other folder is refused by name.
* Work happens in a staging folder ``.NAME.partial-PID-RANDOM`` beside the target, renamed into place when complete,
  under an exclusive lock on the parent folder that re-checks the target: a run that finishes later never silently
  replaces another run's output (without ``--overwrite`` it fails and says so). A crash, a Ctrl-C or a failed check
  leaves the target untouched (absent, or the previous version when overwriting) and never touches an input.
* Parent folders are created only when writing starts and removed again when the run fails and they are empty.
* Folders are created with the user's umask (not 0700).
* Scratch folders left by a killed run (``.NAME.partial-PID-*``, ``.NAME.old-PID-*``, ``.NAME.pruned-PID-*``,
  ``.effideploy-gram-PID-*``) are removed by the next run writing beside them when that PID is no longer alive;
  ones whose owner cannot be told are reported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from effideploy.errors import EffideployError

OUTPUT_MARKER = ".effideploy-output"
# Folders written by versions before the marker: each kind is recognised by the files it always holds.
LEGACY_MARKERS = (("effideploy.json", "config.json"), ("effideploy_export.json",), ("report.json", "report.md"))
SCRATCH_KINDS = ("partial", "old", "pruned")
GRAM_PREFIX = ".effideploy-gram-"
_PID_NAME = re.compile(r"-(\d+)-[0-9a-z_]+$")


def is_effideploy_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder effideploy wrote (and may therefore replace with ``--overwrite``)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / OUTPUT_MARKER).is_file():
        return True
    return any(all((folder / name).is_file() for name in names) for names in LEGACY_MARKERS)


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two folders are the same, or one lies inside the other (paths resolved)."""
    first, second = _resolve(a), _resolve(b)
    return first == second or first in second.parents or second in first.parents


def check_output_dir(output: str | os.PathLike, *, overwrite: bool,
                     inputs: tuple[str | os.PathLike, ...] | list = ()) -> Path:
    """Validate an output folder before any work starts (nothing is created), so a long run does not fail at the end.

    ``inputs``: every file or folder the run reads; none may equal, contain or lie inside the output.
    Returns the resolved target.
    """
    target = _resolve(output)
    for source in inputs:
        if source is None:
            continue
        source_path = _resolve(source)
        if overlaps(target, source_path):
            raise EffideployError(f"output {target} overlaps the input {source_path}; choose another --output")
    if target == Path(target.anchor):
        raise EffideployError(f"output {target} is not a folder effideploy may write; choose a new folder")
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise EffideployError(f"output {target} exists and is not a directory")
        if not overwrite:
            raise EffideployError(f"output {target} already exists; pass --overwrite to replace it")
        if not is_effideploy_output(target):
            raise EffideployError(f"output {target} exists and was not written by effideploy (no {OUTPUT_MARKER}); "
                                  "refusing to replace it: choose another --output or remove it yourself")
    existing = _nearest_existing(target.parent)
    if not existing.is_dir():
        raise EffideployError(f"cannot create output {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EffideployError(f"cannot create output {target}: {existing} is not writable")
    if existing == target.parent:
        clean_stale_scratch(target.parent)
    return target


# ----------------------------------------------------------------------------------------------- scratch folders

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _scratch_owner(entry: Path) -> int | None:
    match = _PID_NAME.search(entry.name)
    return int(match.group(1)) if match else None


def _is_scratch(name: str) -> bool:
    if name.startswith(GRAM_PREFIX):
        return True
    return name.startswith(".") and any(f".{kind}-" in name for kind in SCRATCH_KINDS)


def clean_stale_scratch(parent: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Remove scratch folders in ``parent`` whose writing process is dead; report (on stderr) the ones whose owner
    is unknown. Returns (removed, reported)."""
    removed, reported = [], []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed, reported
    for entry in entries:
        if not _is_scratch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = _scratch_owner(entry)
        if pid is None:
            reported.append(entry)
        elif not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if reported:
        names = ", ".join(entry.name for entry in reported[:3]) + (" ..." if len(reported) > 3 else "")
        print(f"warning: {parent} holds scratch folders left by an earlier run ({names}); "
              "remove them when no effideploy run is writing there", file=sys.stderr)
    return removed, reported


def _make_dir(path: Path) -> Path:
    os.mkdir(path, 0o777)  # the umask applies (tempfile.mkdtemp would force 0700)
    return path


def _new_scratch(parent: Path, stem: str) -> Path:
    for _ in range(100):
        try:
            return _make_dir(parent / f"{stem}-{os.getpid()}-{secrets.token_hex(4)}")
        except FileExistsError:
            continue
    raise EffideployError(f"cannot create a scratch folder in {parent}")


@contextlib.contextmanager
def _parents(target: Path) -> Iterator[None]:
    """Create ``target``'s missing parents; on failure remove those that are still empty."""
    missing = []
    path = target.parent
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    try:
        for path in reversed(missing):
            _make_dir(path)
        yield
    except BaseException:
        for path in missing:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


@contextlib.contextmanager
def scratch_dir(output: str | os.PathLike, kind: str) -> Iterator[Path]:
    """A temporary folder beside ``output`` (``.effideploy-gram-PID-*`` for ``kind="gram"``, else
    ``.NAME.KIND-PID-*``), removed on exit; a later run removes it if this process is killed."""
    target = _resolve(output)
    with _parents(target):
        stem = GRAM_PREFIX.rstrip("-") if kind == "gram" else f".{target.name}.{kind}"
        scratch = _new_scratch(target.parent, stem)
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on the directory: no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, *, overwrite: bool,
                      inputs: tuple[str | os.PathLike, ...] | list = ()) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes ``output``, on any exception it is deleted.

    The policy of :func:`check_output_dir` is applied again at the start and, under a lock on the parent folder,
    at the final rename: an output that appeared meanwhile is replaced only with ``overwrite`` and only when
    effideploy wrote it; otherwise this run's result is discarded with an error.
    """
    target = check_output_dir(output, overwrite=overwrite, inputs=inputs)
    with _parents(target):
        staging = _new_scratch(target.parent, f".{target.name}.partial")
        try:
            (staging / OUTPUT_MARKER).write_text("written by effideploy; --overwrite may replace this folder\n")
            yield staging
            _publish(staging, target, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    with _locked(target.parent):
        if os.path.lexists(target):
            if not overwrite:
                raise EffideployError(f"output {target} was created by another run while this one was working; "
                                      "this run's result was discarded (pass --overwrite to replace it)")
            if target.is_symlink() or not is_effideploy_output(target):
                raise EffideployError(f"output {target} appeared meanwhile and was not written by effideploy; "
                                      "this run's result was discarded")
            # Move the old version aside first so that the rename below is the only moment of change.
            retired = _new_scratch(target.parent, f".{target.name}.old")
            os.replace(target, retired / target.name)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(retired / target.name, target)
                shutil.rmtree(retired, ignore_errors=True)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            try:
                os.rename(staging, target)
            except OSError as exc:  # an empty folder created by someone else meanwhile is not replaced either
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise EffideployError(f"output {target} appeared while this run was working; "
                                          "this run's result was discarded") from None
                raise


def write_json(path: str | os.PathLike, payload: object) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
