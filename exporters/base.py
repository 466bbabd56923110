"""What every exporter shares: the one ``ExportResult`` they return and the parity helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportResult:
    """An export folder, as written.

    ``details`` holds what only one exporter has: ONNX ``model_file``, ``model_bytes``, ``dtype``, ``quantize``;
    vLLM ``python_usage``, ``ffn_widths``, ``realigned_blocks`` (the manifest has the rest)."""

    output: Path
    runtime: str  # "onnx" | "vllm"
    files: list[str]  # relative to output
    size_bytes: int  # the whole folder
    source_size_bytes: int
    seconds: dict[str, float]
    parity: dict | None  # None when not verified
    serve_command: str | None = None  # a command line that serves the folder, where the runtime has one
    manifest: dict = field(default_factory=dict, repr=False)
    details: dict = field(default_factory=dict)


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative to it, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def tokenize_prompts(tokenizer, texts, length: int) -> list[list[int]]:
    """The first ``length`` token ids of each text."""
    return [tokenizer(text).input_ids[:length] for text in texts]


def first_mismatch(expected: list[list[int]], got: list[list[int]]) -> tuple[int, int, int | None, int | None] | None:
    """(prompt, position, expected token, got token) of the first difference between two runs' greedy tokens (None
    for a token past the end of a shorter run), or None when they agree."""
    for prompt, (ref, out) in enumerate(zip(expected, got)):
        for position in range(max(len(ref), len(out))):
            a = ref[position] if position < len(ref) else None
            b = out[position] if position < len(out) else None
            if a != b:
                return prompt, position, a, b
    return None


def matching_prefix(expected: list[list[int]], got: list[list[int]]) -> list[int]:
    """How many leading tokens of each prompt's run agree."""
    return [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), len(ref)) for ref, out in zip(expected, got)]
