"""``effideploy eval``: accuracy of a model or checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from effideploy.cli.app import app, echo, set_threads

eval_app = typer.Typer(help="Accuracy of a model or checkpoint.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help="Model or checkpoint (as for prune --model)."),
    text: str = typer.Option("wikitext2", help="'wikitext2' (test split) or a local .txt/.jsonl file."),
    seqlen: int = typer.Option(1024, help="Tokens per window."),
    windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding wikitext-2-raw-v1/."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)."),
) -> None:
    """WikiText-2 test perplexity (windows of --seqlen tokens, as the CFSP reference)."""
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.eval.perplexity import perplexity
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.errors import EffideployError
    from effideploy.models.resolve import check_seqlen, resolve_model
    from effideploy.device import resolve_device
    from effideploy.runtimes.pytorch import TorchRuntime

    set_threads(threads)
    resolve_device(device)  # a missing CUDA device is refused before the model is loaded
    source = resolve_model(model)
    check_seqlen(source.config_dict, seqlen, "--seqlen")
    if windows is not None and windows < 1:
        raise EffideployError(f"--windows must be at least 1, got {windows}")
    spec = resolve_text(text, "test", str(data_dir) if data_dir else None)
    ids = tokenize_text(load_tokenizer(source), load_text(spec))
    result = perplexity(TorchRuntime(model=load_model(source), device=device), consecutive_windows(ids, seqlen, windows))
    echo(f"{source.spec}: perplexity {result.perplexity:.3f} over {result.n_windows} x {seqlen} tokens "
          f"of {Path(spec.path).name} ({result.seconds:.1f} s)")
