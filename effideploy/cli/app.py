"""The Typer application and helpers shared by the command modules."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(
    help="Prune a dense LLaMA-family model (CFSP), recover it, export it to vLLM / ONNX Runtime and sign it off.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_PRUNED = "out/pruned"


def echo(message: str) -> None:
    from effideploy.progress import console

    console.print(message, highlight=False)


def set_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    if threads < 1:
        from effideploy.errors import EffideployError

        raise EffideployError(f"--threads must be at least 1, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def default_of(config_class, name: str):
    """The default of a config dataclass field: the one place a default is written (the CLI shows it)."""
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(config_class)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def check_option_text(value: Optional[str], option: str) -> None:
    """An option given as text must say something: ``--token-compression ""`` is refused, not ignored."""
    if value is not None and not str(value).strip():
        from effideploy.errors import EffideployError

        raise EffideployError(f"{option} is empty; give a value or leave the option out")


def check_output_against_inputs(output, overwrite: bool, *inputs) -> None:
    """The output-folder policy (effideploy.io.check_output_dir) against every input given on the command line
    that names a file or folder (model aliases, hub ids and 'wikitext2' are not paths and are skipped)."""
    from pathlib import Path

    from effideploy.io import check_output_dir

    paths = [value for value in inputs if value is not None and Path(str(value)).expanduser().exists()]
    check_output_dir(output, overwrite=overwrite, inputs=paths)
