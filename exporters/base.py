"""What every exporter shares: the one ``ExportResult`` they return, the typed records behind it (export options,
parity) and the parity helpers."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from effideploy.errors import OptionError


@dataclass
class ExportResult:
    """An export folder, as written.

    ``details`` holds what only one exporter has: ONNX ``model_file``, ``model_bytes``, ``dtype``, ``quantize``;
    vLLM ``python_usage``, ``ffn_widths``, ``realigned_blocks`` (the manifest has the rest)."""

    output: Path
    runtime: str  # "onnx" | "vllm" | "llamacpp"
    files: list[str]  # relative to output
    size_bytes: int  # the whole folder
    source_size_bytes: int
    seconds: dict[str, float]
    parity: Parity | None  # None when not verified
    serve_command: str | None = None  # a command line that serves the folder, where the runtime has one
    manifest: dict = field(default_factory=dict, repr=False)
    details: dict = field(default_factory=dict)


class Record:
    """A typed record that is JSON only in the manifest: ``to_dict()`` where it is written, ``from_dict()`` where
    it is read back. Fields that are None are left out of the JSON (absent means not measured or not applicable),
    and a field whose type is itself a Record is read back as one."""

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        values = {}
        for item in dataclasses.fields(cls):
            if item.name in data:
                nested = _record_type(hints[item.name])
                value = data[item.name]
                values[item.name] = nested.from_dict(value) if nested is not None and value is not None else value
        return cls(**values)


def _record_type(hint) -> type | None:
    """The Record class a field holds (``X`` or ``X | None``), else None."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, Record):
            return candidate
    return None


def _plain(value):
    if isinstance(value, Record):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)
                if getattr(value, item.name) is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class Parity(Record):
    """What every parity check records: the prompts it ran and what it compared against. Each exporter's record
    adds its own criteria and knows how to say them in one line (``summary()``, printed by ``effideploy export``).
    A failed check raises, so a record that exists describes an export that passed."""

    prompts: int
    prompt_tokens: list[int]
    new_tokens: int
    reference: str

    def summary(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ExportOptions:
    """What one exporter takes besides the source, the output, ``overwrite`` and ``verify``: one subclass per
    exporter, whose fields are its parameters (the CLI offers a flag for a runtime only where its options have the
    field). ``runtime`` is the name the exporter is registered under."""

    runtime: typing.ClassVar[str] = ""

    @classmethod
    def of(cls, options: ExportOptions | None, overrides: dict):
        """``options`` (default: every default) with ``overrides`` (keyword arguments of the export call, as the
        bench passes its option dicts) applied; a name this exporter does not take is refused by name."""
        names = {item.name for item in dataclasses.fields(cls)}
        for name in overrides:
            if name not in names:
                raise OptionError(name, f"does not apply to --runtime {cls.runtime}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"{cls.runtime} export options must be {cls.__name__}, got {type(options).__name__}")
        return dataclasses.replace(options or cls(), **overrides)


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
