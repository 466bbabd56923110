"""``tune --output``: the search's own folder, under the output policy of ``effideploy.io``.

The folder holds what a later run reuses (checkpoints named by their structural lever, ``cfsp-0.2/``,
``drop-attention-0.05/``; ``exports/``, ``screen.json``), the report
(``report/``, written atomically) and the ``recommended`` link. It is never replaced, only written into, so it is
held to the policy as a whole:

* it may not equal, contain or lie inside an input (the model, the policy, a task, the data folder);
* it is either new (created, with :data:`effideploy.io.OUTPUT_MARKER`, when writing starts) or a folder effideploy
  wrote (the marker, or the ``report/`` of an earlier version's search): tune writes into nobody else's folder;
* the ``recommended`` link lives inside it and is created or replaced only when it is effideploy's own: a symlink
  whose target text is the one recorded in :data:`LINK_RECORD` when it was made. A file, a folder or any other
  link of that name is left untouched and the report says it was not linked. The link only ever points inside the
  folder (never at the input model);
* a run that fails before it wrote anything leaves no folder behind; Ctrl-C says what stays, and where.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.io import OUTPUT_MARKER, check_output_dir, is_effideploy_output

LINK_NAME = "recommended"
LINK_RECORD = ".effideploy-recommended-link"  # the target text of the link effideploy made
OWN_FILES = (OUTPUT_MARKER, LINK_RECORD)  # bookkeeping, not results


def _is_legacy_workspace(folder: Path) -> bool:
    """A search folder of a version before the marker: its report is effideploy's and holds search.json."""
    return (not folder.is_symlink() and folder.is_dir() and not (folder / OUTPUT_MARKER).is_file()
            and is_effideploy_output(folder / "report") and (folder / "report" / "search.json").is_file())


def check_workspace(output: str | os.PathLike, inputs=()) -> Path:
    """The policy above, before any work; nothing is created. Returns the resolved folder."""
    target = Path(output).expanduser().resolve()
    inputs = [p for p in inputs if p is not None and Path(str(p)).expanduser().exists()]
    if _is_legacy_workspace(target):
        # check_output_dir would refuse it for the missing marker; its report is held to the policy instead, and
        # no input may lie inside the folder itself.
        check_output_dir(target / "report", overwrite=True, inputs=inputs)
        for source in inputs:
            if target in Path(source).expanduser().resolve().parents:
                raise EffideployError(f"output {target} overlaps the input {Path(source).expanduser().resolve()}; "
                                      "choose another --output")
        return target
    return check_output_dir(target, overwrite=True, inputs=inputs)


def open_workspace(output: str | os.PathLike) -> Path:
    """Create the folder (and missing parents, with the umask) when writing starts, and mark it as effideploy's."""
    target = Path(output).expanduser().resolve()
    os.makedirs(target, exist_ok=True)
    marker = target / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text("written by effideploy tune; it writes into this folder on every run\n")
    return target


def results_in(folder: Path) -> list[str]:
    """What a run keeps in the folder for the next one (bookkeeping and scratch left out), sorted."""
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError:
        return []
    return [n for n in names if n not in OWN_FILES and not n.startswith(".")]


@contextlib.contextmanager
def guarded(output: str | os.PathLike) -> Iterator[None]:
    """On any failure: a folder this run created and left without results is removed again (with the parents it
    created). On Ctrl-C: one honest ``error:`` line (what stays, and where) and exit 130."""
    target = Path(output).expanduser().resolve()
    missing = []
    path = target
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    try:
        yield
    except BaseException as exc:
        if missing and target.is_dir() and not target.is_symlink() and not results_in(target):
            for name in OWN_FILES:
                with contextlib.suppress(OSError):
                    (target / name).unlink()
            for path in missing:  # deepest first; only while empty
                with contextlib.suppress(OSError):
                    path.rmdir()
        if isinstance(exc, KeyboardInterrupt):
            raise SystemExit(_interrupted(target)) from None
        raise


def _interrupted(target: Path) -> int:
    import sys

    kept = results_in(target) if target.is_dir() else []
    if kept:
        message = (f"error: interrupted before this run's report was written; {target} keeps what is there, for "
                   f"the next run to reuse: {', '.join(kept)}")
    else:
        message = "error: interrupted; nothing was written"
    print(message, file=sys.stderr)
    return 130


# ----------------------------------------------------------------------------------------- the recommended link

def _own_link_text(link: Path, record: Path) -> str | None:
    """The target text of ``link`` when effideploy made it (it matches the record), else None."""
    if not link.is_symlink() or not record.is_file() or record.is_symlink():
        return None
    try:
        text = os.readlink(link)
        return text if text == record.read_text() else None
    except (OSError, UnicodeError):
        return None


def plan_link(output: str | os.PathLike, artifact) -> dict:
    """What :func:`apply_link` will do, decided before the report is written so that the report says what is true:
    ``{"linked": True, "path", "target"}``, or ``{"linked": False, "reason"}`` (``remove``: drop effideploy's stale
    link)."""
    folder = Path(output).expanduser().resolve()
    link, record = folder / LINK_NAME, folder / LINK_RECORD
    ours = _own_link_text(link, record) is not None
    taken = os.path.lexists(link) and not ours
    plan = {"linked": False, "path": str(link), "remove": ours}
    if artifact is None:
        return {**plan, "reason": "no recipe is recommended"}
    if taken:
        kind = "link" if link.is_symlink() else "folder" if link.is_dir() else "file"
        return {**plan, "remove": False, "reason": f"{link} is a {kind} effideploy did not make; left untouched"}
    resolved = Path(artifact).expanduser().resolve()
    if folder not in resolved.parents:
        return {**plan, "reason": f"the artifact {resolved} is not inside the output folder (the runtime reads the "
                                  "input model as it is); nothing to link"}
    return {"linked": True, "path": str(link), "target": os.path.relpath(resolved, folder)}


def apply_link(output: str | os.PathLike, plan: dict) -> None:
    """Create or replace effideploy's link (atomically: a new link renamed over the old one), or remove it."""
    folder = Path(output).expanduser().resolve()
    link, record = folder / LINK_NAME, folder / LINK_RECORD
    if not plan["linked"]:
        if plan.get("remove") and _own_link_text(link, record) is not None:
            link.unlink()
            record.unlink()
        return
    if os.path.lexists(link) and _own_link_text(link, record) is None:  # appeared since the plan: not ours
        raise EffideployError(f"{link} appeared while this run was working and effideploy did not make it; "
                              "left untouched, report not written")
    fresh = folder / f".{LINK_NAME}.link-{os.getpid()}-{secrets.token_hex(4)}"
    os.symlink(plan["target"], fresh)
    try:
        os.replace(fresh, link)
    except BaseException:
        with contextlib.suppress(OSError):
            fresh.unlink()
        raise
    record.write_text(plan["target"])
