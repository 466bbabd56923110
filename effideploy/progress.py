"""Rich progress bars for every step that takes more than a second, silent when not on a terminal or in tests.

One switch for all of them: ``EFFIDEPLOY_PROGRESS=0`` (or stderr not a terminal) silences effideploy's bars and,
through :func:`quiet_libraries`, those the libraries it calls draw themselves (transformers, huggingface_hub, and
plain tqdm, which transformers' GGUF reader uses directly)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)


def enabled() -> bool:
    if os.environ.get("EFFIDEPLOY_PROGRESS") == "0":
        return False
    return sys.stderr.isatty() or os.environ.get("EFFIDEPLOY_PROGRESS") == "1"


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (a plain loop when progress is off)."""
    if not enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


class Bar:
    """A manually advanced bar with a status field (e.g. the training loss)."""

    def __init__(self, description: str, total: int | None) -> None:
        self._progress = _progress() if enabled() else None
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, advance=steps, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While inside: no library progress bar when effideploy's own are off. tqdm reads its ``TQDM_DISABLE``
    environment variable only when it is first imported, so its constructor is wrapped instead, and restored."""
    if enabled():
        yield
        return
    from tqdm import std
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - transformers depends on it
        pass
    descriptor = vars(std.tqdm)["__init__"]  # restored as it was (tqdm defines it as a partialmethod)
    original = std.tqdm.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = descriptor


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a step of unknown length (loading a model, writing files)."""
    if not enabled():
        yield
        return
    with console.status(message):
        yield
