"""Progress for every step that takes more than a second: rich bars on a terminal, plain timestamped lines elsewhere.

Three modes, one switch (``EFFIDEPLOY_PROGRESS``): bars when stderr is a terminal (or ``=1``); plain lines when it is
not (a CI log, ``> run.log 2>&1``, or ``=plain``): a line when a step starts and when it ends with its seconds, and a
line at most every 30 s in between for a long loop, so a 40-minute ``tune`` in a log file says where it is; nothing at
all with ``=0`` (the tests, which read stderr for one-line errors). Library bars (transformers, huggingface_hub, and
plain tqdm, which transformers' GGUF reader uses directly) are drawn only in bar mode: :func:`quiet_libraries`
silences them otherwise, since ``\r``-redrawn bars fill a log file."""

from __future__ import annotations

import contextlib
import os
import sys
import time
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


PLAIN_EVERY_S = 30.0  # a plain-mode loop reports at most this often


def mode() -> str:
    """``bars``, ``plain`` or ``off`` (see the module's docstring)."""
    setting = os.environ.get("EFFIDEPLOY_PROGRESS")
    if setting == "0":
        return "off"
    if setting == "1" or (setting != "plain" and sys.stderr.isatty()):
        return "bars"
    return "plain"


def enabled() -> bool:
    """Whether rich bars are drawn."""
    return mode() == "bars"


def _line(text: str) -> None:
    # print, not console.print: rich would wrap a long path and colour what a log file shows as escape codes
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class _Plain:
    """Plain-mode lines for one step: its start, then progress at most every PLAIN_EVERY_S, then its end."""

    def __init__(self, description: str, total: int | None) -> None:
        self.description, self.total, self.done, self.status = description, total, 0, ""
        self.start = self.last = time.monotonic()
        _line(f"{description} ..." + (f" (0/{total})" if total else ""))

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        self.done += steps
        self.status = self.status if status is None else status
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            _line(f"{self.description}: {self.done}{of}, {now - self.start:.0f} s" + (f", {self.status}" if self.status else ""))

    def close(self) -> None:
        extra = f", {self.status}" if self.status else ""
        _line(f"{self.description}: done in {time.monotonic() - self.start:.1f} s{extra}")


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
    current = mode()
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if current != "bars":
        plain = _Plain(description, total) if current == "plain" else None
        for item in items:
            yield item
            if plain is not None:
                plain.advance()
        if plain is not None:
            plain.close()
        return
    with _progress() as progress:
        task = progress.add_task(description, total=total, status="")
        for item in items:
            yield item
            progress.advance(task)


class Bar:
    """A manually advanced bar with a status field (e.g. the training loss)."""

    def __init__(self, description: str, total: int | None) -> None:
        current = mode()
        self._progress = _progress() if current == "bars" else None
        self._plain = _Plain(description, total) if current == "plain" else None
        self._task = None
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, status="")

    def advance(self, steps: int = 1, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {} if status is None else {"status": status}
            self._progress.update(self._task, advance=steps, **fields)
        elif self._plain is not None:
            self._plain.advance(steps, status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._plain is not None:
            self._plain.close()
            self._plain = None

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
    """A spinner for a step of unknown length (loading a model, writing files); in plain mode a line at its start
    and one with its seconds at its end (none when it fails: the error line follows)."""
    current = mode()
    if current == "off":
        yield
        return
    if current == "plain":
        start = time.monotonic()
        _line(f"{message} ...")
        yield
        _line(f"{message}: done in {time.monotonic() - start:.1f} s")
        return
    with console.status(message):
        yield
