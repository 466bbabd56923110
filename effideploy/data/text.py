"""Calibration and evaluation text.

``wikitext2`` names the WikiText-2 (raw) files: ``wiki.valid.raw`` for calibration and recovery (the train split is
not shipped here) and ``wiki.test.raw`` for perplexity. They are looked up in ``--data-dir``, then
``$EFFIDEPLOY_DATA_DIR``, then ``shared/data`` beside or above the working directory and the source tree, and
only then on the ``datasets`` hub. Any other value is a local ``.txt`` file (used as is) or ``.jsonl`` file (the
``"text"`` field of each line, joined by blank lines).

Windows are drawn exactly like the CFSP/SparseGPT reference: ``random.seed(seed)``, then for each window
``i = random.randint(0, n_tokens - seqlen - 1)`` over the tokenized text, so a seed selects the same windows as the
reference code does.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from effideploy.errors import EffideployError
from effideploy.safe_files import read_text

WIKITEXT_FILES = {"calibration": "wiki.valid.raw", "test": "wiki.test.raw", "validation": "wiki.valid.raw"}
WIKITEXT_FOLDER = "wikitext-2-raw-v1"
DATA_ENV = "EFFIDEPLOY_DATA_DIR"


@dataclass(frozen=True)
class TextSpec:
    """What text was used, recorded in provenance so a run can be reproduced."""

    name: str  # "wikitext2" or a file path
    path: str  # the file actually read ("hub:..." when downloaded)
    split: str


def _candidate_data_dirs(data_dir: str | None) -> list[Path]:
    if data_dir:  # an explicit folder is the only place looked at
        return [Path(data_dir)]
    candidates = []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        for up in (base, *base.parents[:2]):
            candidates.append(up / "shared" / "data")
    return candidates


def resolve_text(name: str, split: str = "calibration", data_dir: str | None = None) -> TextSpec:
    if name.lower() in ("wikitext2", "wikitext-2", "wikitext"):
        filename = WIKITEXT_FILES[split]
        for folder in _candidate_data_dirs(data_dir):
            for path in (folder / filename, folder / WIKITEXT_FOLDER / filename):
                if path.is_file():
                    return TextSpec(name="wikitext2", path=str(path.resolve()), split=split)
        if data_dir:
            raise EffideployError(f"{filename} not found in --data-dir {data_dir} (nor in {data_dir}/{WIKITEXT_FOLDER})")
        return TextSpec(name="wikitext2", path=f"hub:wikitext/wikitext-2-raw-v1/{split}", split=split)
    path = Path(name).expanduser()
    if not path.is_file():
        raise EffideployError(f"text source {name!r} not found: give 'wikitext2' or a .txt/.jsonl file")
    if path.suffix not in (".txt", ".jsonl", ".raw"):
        raise EffideployError(f"text file {path} must be .txt, .raw or .jsonl")
    return TextSpec(name=str(path), path=str(path.resolve()), split=split)


def load_text(spec: TextSpec) -> str:
    if spec.path.startswith("hub:"):
        return _load_hub_wikitext(spec.split)
    path = Path(spec.path)
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(read_text(path, what="text file").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EffideployError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EffideployError(f"{path}:{number}: each line needs a string field \"text\"")
            texts.append(record["text"])
        return "\n\n".join(texts)
    return read_text(path, what="text file")


def _load_hub_wikitext(split: str) -> str:
    try:
        from datasets import load_dataset  # optional: only where a network exists

        hub_split = {"calibration": "train", "validation": "validation", "test": "test"}[split]
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"]
    except Exception as exc:  # noqa: BLE001 - missing package, no network: the same advice
        raise EffideployError(
            f"WikiText-2 not found locally and not downloadable ({type(exc).__name__}); "
            f"point --data-dir or ${DATA_ENV} at a folder with {WIKITEXT_FOLDER}/"
        ) from None
    return "".join(rows)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor (no special tokens added between documents)."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


def sample_windows(token_ids: torch.Tensor, n_windows: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n_windows`` random windows of ``seqlen`` tokens, drawn as the CFSP reference draws them."""
    n_tokens = int(token_ids.numel())
    if n_windows < 1 or seqlen < 2:
        raise EffideployError(f"need at least one window of at least 2 tokens (got {n_windows} x {seqlen})")
    if n_tokens < seqlen + 1:
        raise EffideployError(
            f"calibration text has {n_tokens} tokens, shorter than one window of {seqlen} (+1) tokens; "
            "give more text or a smaller --calib-seqlen"
        )
    rng = random.Random(seed)  # the same Mersenne Twister stream as random.seed(seed) + random.randint
    starts = [rng.randint(0, n_tokens - seqlen - 1) for _ in range(n_windows)]
    return torch.stack([token_ids[start : start + seqlen] for start in starts])


def consecutive_windows(token_ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of the text (perplexity evaluation)."""
    count = int(token_ids.numel()) // seqlen
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise EffideployError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    return token_ids[: count * seqlen].view(count, seqlen)
