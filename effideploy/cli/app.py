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
    if threads:
        import torch

        torch.set_num_threads(threads)


def default_of(config_class, name: str):
    """The default of a config dataclass field: the one place a default is written (the CLI shows it)."""
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(config_class)}[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default
