"""The serving bench's prompts: windows of WikiText-2 test text (the default), or GuideLLM's synthetic text.

``wikitext``: ``count`` windows of ``prompt_tokens`` tokens of ``wiki.test.raw`` (``--data-dir``, then the places
bench looks for it), tokenized with the model's own tokenizer and drawn as the in-process bench draws its latency
prompts (``sample_windows``, seeded), each decoded back to text. The windows go to ``prompts.jsonl`` in the run's
folder (``raw/`` of the report), one ``{"prompt": ..., "output_tokens_count": N}`` a line, which GuideLLM reads as a
``json_file`` data set: ``prompt`` is its text column and ``output_tokens_count`` its per-request output length (it
sends ``max_tokens`` = N with ``ignore_eos``, as for synthetic text). A decoded window re-tokenizes to about
``prompt_tokens`` tokens (a byte-level BPE merges across a window's edges differently); a window that comes back
longer is cut back to ``prompt_tokens`` tokens, and the lengths are recorded.

``synthetic``: GuideLLM's own synthetic text of exactly ``prompt_tokens`` tokens (no file).
"""

from __future__ import annotations

import json
from pathlib import Path

from effideploy.errors import EffideployError

SOURCES = ("wikitext", "synthetic")
PROMPTS_FILE = "prompts.jsonl"


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise EffideployError(f"--serve-prompts must be one of {' | '.join(SOURCES)}, got {source!r}")
    return source


def prompt_count(slo) -> int:
    """Enough distinct prompts for every level's requests (GuideLLM stops a level when its data runs out), plus a
    margin for the requests a concurrent profile has queued when the level's bound is reached."""
    return slo.max_requests * len(slo.levels) + 2 * int(max(slo.levels))


def _fit(tokenizer, ids: list[int], length: int) -> tuple[str, int]:
    text = tokenizer.decode(ids)
    for _ in range(3):
        again = tokenizer(text, add_special_tokens=False).input_ids
        if len(again) <= length:
            return text, len(again)
        text = tokenizer.decode(again[:length])
    return text, len(tokenizer(text, add_special_tokens=False).input_ids)


def write_wikitext_prompts(folder: Path, tokenizer_dir: str, slo, *, data_dir: str | None = None,
                           seed: int = 0) -> dict:
    """``folder/prompts.jsonl`` from WikiText-2 test windows; returns what the report records of it."""
    from effideploy.data.text import load_text, resolve_text, sample_windows, tokenize_text
    from effideploy.models.build import load_tokenizer

    spec = resolve_text("wikitext2", "test", data_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenize_text(tokenizer, load_text(spec))
    count = prompt_count(slo)
    windows = sample_windows(ids, count, slo.prompt_tokens, seed).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PROMPTS_FILE
    lengths = []
    with open(path, "w") as handle:
        for window in windows:
            text, length = _fit(tokenizer, window, slo.prompt_tokens)
            lengths.append(length)
            handle.write(json.dumps({"prompt": text, "output_tokens_count": slo.output_tokens}) + "\n")
    return {"source": "wikitext", "text": spec.path, "file": f"raw/{PROMPTS_FILE}", "count": count, "seed": seed,
            "prompt_tokens": slo.prompt_tokens, "output_tokens": slo.output_tokens,
            "tokens_min": min(lengths), "tokens_max": max(lengths), "tokens_mean": sum(lengths) / len(lengths)}


def synthetic_prompts(slo) -> dict:
    return {"source": "synthetic", "prompt_tokens": slo.prompt_tokens, "output_tokens": slo.output_tokens}


def guidellm_data(prompts: dict, folder: Path, slo) -> dict:
    """GuideLLM's ``data`` entry for the prompts."""
    if prompts["source"] == "synthetic":
        return {"kind": "synthetic_text", "prompt_tokens": slo.prompt_tokens, "output_tokens": slo.output_tokens}
    # load_dataset("json") returns a DatasetDict unless a split is named; a file's one split is "train"
    return {"kind": "json_file", "path": str(folder / PROMPTS_FILE), "load_kwargs": {"split": "train"}}
