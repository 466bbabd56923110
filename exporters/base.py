"""What every exporter shares: the one ``ExportResult`` they return, the typed records behind it (export options,
parity) and the parity helpers (token comparison; the prompts and the half-precision criterion the vLLM and GGUF
checks share, so no exporter package imports another)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from effideploy.errors import EffideployError, OptionError, ParityError


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


# ------------------------------------------------------------------ prompts and criteria the vLLM and GGUF checks share

PARITY_PROMPTS, PARITY_PROMPT_TOKENS = 3, 32
HALF_PRECISION_LOGIT_GAP = 0.5  # bf16 keeps ~3 significant digits: logits of ~10-30 move by tenths through 30 layers
FALLBACK_TEXTS = (  # parity prompts when WikiText is not available locally
    "The history of the city begins in the early medieval period, when a small settlement grew around a river crossing.",
    "In physics, the conservation of energy states that the total energy of an isolated system remains constant over time.",
    "The album was recorded over three weeks in the summer and received positive reviews from most music critics.",
)


def parity_prompts(tokenizer, count: int = PARITY_PROMPTS, length: int = PARITY_PROMPT_TOKENS) -> tuple[list[list[int]], str]:
    """``count`` prompts of ``length`` tokens: the starts of WikiText-2 test paragraphs spread over the file (fixed
    English sentences where WikiText is not available locally), and the name of the text used."""
    texts, name = list(FALLBACK_TEXTS), "built-in sentences"
    try:
        from effideploy.data.text import resolve_text

        spec = resolve_text("wikitext2", "test")
        if not spec.path.startswith("hub:"):
            paragraphs = [line.strip() for line in Path(spec.path).read_text().splitlines()
                          if len(line.strip()) > 400 and not line.strip().startswith("=")]
            if len(paragraphs) >= count:
                texts = [paragraphs[i * (len(paragraphs) - 1) // max(count - 1, 1)] for i in range(count)]
                name = f"{Path(spec.path).name} (WikiText-2 test)"
    except EffideployError:
        pass
    return tokenize_prompts(tokenizer, texts[:count], length), name


def require_near_top_logit(model, prompts, tokens, mismatch, *, runtime: str, kind: str,
                           tolerance: float = HALF_PRECISION_LOGIT_GAP) -> tuple[tuple, float, str]:
    """Half-precision parity when the greedy tokens differ: every token ``runtime`` chose must be within
    ``tolerance`` of transformers' top logit, teacher-forced on the same tokens. Returns what the parity record
    keeps (the first mismatch, the largest gap, the criterion met); raises (the export is not kept) at the first
    token that is not."""
    gaps = teacher_forced_gaps(model, prompts, tokens)
    for prompt, row in enumerate(gaps):
        for position, gap in enumerate(row):
            if gap > tolerance:
                raise ParityError(
                    f"{runtime} parity failed ({kind}): prompt {prompt}, generated token {position}: {runtime} chose "
                    f"{tokens[prompt][position]}, {gap:.2f} below transformers' top logit (tolerance {tolerance}); the "
                    "export was not kept")
    return mismatch, max(map(max, gaps)), f"{kind}: {runtime}'s tokens within {tolerance} of transformers' top logit"


def teacher_forced_gaps(model, prompts: list[list[int]], generated: list[list[int]]) -> list[list[float]]:
    """For each generated token: the model's top logit minus the token's logit, given the prompt and the tokens
    generated before it (0 where the token is the model's own greedy choice)."""
    import torch

    gaps = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, generated):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
            chosen = logits.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            gaps.append((logits.max(-1).values - chosen).tolist())
    return gaps
