"""The llama.cpp exporter's typed records: its options (the parameters of ``export_llamacpp`` and the flags of
``effideploy export --runtime llamacpp``) and its parity record (the float32 GGUF against transformers, then the
typed GGUF against both). Imports nothing heavy: the CLI reads the options' fields before the exporter is imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from effideploy.exporters.base import ExportOptions, Parity, Record


@dataclass(frozen=True)
class LlamacppExportOptions(ExportOptions):
    runtime = "llamacpp"

    quantize: str | None = None  # the GGUF type (f16 by default, q8_0, q4_k_m, ...)
    dtype: str | None = None  # float32 / float16: f32 / f16 (an alias of --quantize)
    realign: bool = False  # FFN widths down to multiples of 256 (k-quants)
    token_compression: str | None = None  # refused: llama.cpp keeps every token's KV
    threads: int | None = None  # llama.cpp threads for the quantizer and the parity runs


@dataclass
class GgufVsFloat32(Record):
    """The typed GGUF's teacher-forced logits against the float32 GGUF's: lossy by design, recorded."""

    positions: int
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    sequences: str


@dataclass
class GgufTypeCheck(Record):
    """The typed GGUF (f16, q8_0, q4_k_m, ...): greedy tokens against transformers' (f16/bf16: required within the
    half-precision gap, ``criterion``), logits against the float32 GGUF (recorded)."""

    type: str
    tokens_identical_to_transformers: bool
    matching_prefix_tokens: list[int]
    vs_float32_gguf: GgufVsFloat32
    first_mismatch: list | None = None
    teacher_forced_max_logit_gap: float | None = None
    criterion: str | None = None

    def summary(self) -> str:
        same = ("identical" if self.tokens_identical_to_transformers
                else f"agree for the first {self.matching_prefix_tokens} tokens")
        return (f"{self.type}: greedy tokens {same}, teacher-forced top-1 {self.vs_float32_gguf.top1_agreement:.1%} "
                f"vs the float32 GGUF, max |logit diff| {self.vs_float32_gguf.max_abs_logit_diff:.2g}")


@dataclass
class LlamacppParity(Parity):
    """Greedy tokens of the float32 GGUF in llama.cpp == transformers' (required), and the typed GGUF's check."""

    text: str
    match: bool
    checked: str  # which file the strict check ran on ("float32 GGUF")
    seconds: dict[str, float] = field(default_factory=dict)
    gguf_type_check: GgufTypeCheck | None = None

    def summary(self) -> str:
        text = (f"greedy tokens {'identical' if self.match else 'DIFFER'} over {self.prompts} prompts x "
                f"{self.new_tokens} tokens ({self.checked})")
        return text if self.gguf_type_check is None else f"{text}; {self.gguf_type_check.summary()}"


def parity_from_manifest(manifest: dict) -> LlamacppParity | None:
    """The parity record of a manifest this exporter wrote (None: written with --no-verify)."""
    record = manifest.get("parity")
    return None if record is None else LlamacppParity.from_dict(record)
