"""``effideploy``: a thin command line over the library.

Each command module registers its commands on ``app`` (``effideploy.cli.app``); a command parses its options,
calls one library function and prints a summary. Every user error (``EffideployError``, an expected OS
error) becomes one line on stderr and exit code 2; ``bench --policy`` exits 1 when the policy fails; a bug is one
line and exit 1 (its traceback with EFFIDEPLOY_DEBUG=1). See docs/safety.md.
"""

from __future__ import annotations

import sys

from effideploy.cli.app import app
from effideploy.errors import EffideployError, OptionError

# Importing a command module registers its commands; they import their heavy dependencies lazily.
from effideploy.cli import prune as _prune  # noqa: E402,F401
from effideploy.cli import evaluate as _evaluate  # noqa: E402,F401

for _optional in ("export", "bench", "recover", "run", "tune"):
    try:
        __import__(f"effideploy.cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a command whose module is not written yet
        if _exc.name != f"effideploy.cli.{_optional}":
            raise


DEBUG_ENV = "EFFIDEPLOY_DEBUG"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or _one_line(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason


def main(argv: list[str] | None = None) -> None:
    """The error boundary of every command: a user's or the environment's problem is one ``error: ...`` line and
    exit 2 (``bench --policy`` keeps exit 1 for "policy failed"); Ctrl-C is exit 130; anything else is a bug, shown
    as one line with exit 1, and with its traceback when EFFIDEPLOY_DEBUG=1."""
    import os

    import typer

    try:  # typer >= 0.20 carries its own copy of click
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as click_exceptions

    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        code = app(args=argv, standalone_mode=False)
    except OptionError as exc:  # the library names the parameter; the user typed its flag
        _fail(f"error: {_one_line(exc.as_flag())}", 2, debug)
    except EffideployError as exc:
        _fail(f"error: {_one_line(exc)}", 2, debug)
    except (KeyboardInterrupt, typer.Abort):
        _fail("error: interrupted; nothing was written", 130, debug)
    except click_exceptions.ClickException as exc:  # usage errors: bad option values, unknown options
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help
            exc.show()
            sys.exit(exc.exit_code)
        _fail(f"error: {_one_line(exc.format_message())}", exc.exit_code, False)
    except UnicodeError as exc:
        _fail(f"error: a file is not valid UTF-8 text ({_one_line(exc)})", 2, debug)
    except OSError as exc:  # permissions, a file where a folder is expected, a full disk, ...
        _fail(f"error: {_describe_os_error(exc)}", 2, debug)
    except MemoryError:
        _fail("error: out of memory", 2, debug)
    except Exception as exc:  # noqa: BLE001 - a bug: one line unless debugging
        reason = f"{type(exc).__name__}: {_one_line(exc)}" if str(exc) else type(exc).__name__
        if debug:
            raise
        print(f"error: internal error ({reason[:500]}); this is a bug in effideploy: rerun with "
              f"{DEBUG_ENV}=1 to see the traceback", file=sys.stderr)
        sys.exit(1)
    if code == 130:  # typer turns a KeyboardInterrupt into Exit(130) after the writers have cleaned up
        _fail("error: interrupted; nothing was written", 130, False)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()
    print(message, file=sys.stderr)
    sys.exit(code)


__all__ = ["app", "main"]
