"""The vLLM exporter's typed records: its options (the parameters of ``export_vllm`` and the flags of
``effideploy export --runtime vllm``) and its two parity records, unquantized (greedy tokens) and quantized
(teacher-forced, tolerance-based). Imports nothing heavy: the CLI reads the options' fields before the exporter is
imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from effideploy.exporters.base import ExportOptions, Parity, Record


@dataclass(frozen=True)
class VllmExportOptions(ExportOptions):
    runtime = "vllm"

    dtype: str | None = None  # float32 (default) | bfloat16 | float16; w4a16: bfloat16
    quantize: str | None = None  # w8a8 (int8) | w4a16 (int4), compressed-tensors
    group_size: int | None = None  # w4a16: input columns per int4 scale (default 128)
    quant_method: str | None = None  # rtn | gptq (from prune --keep-stats)
    tensor_parallel_size: int = 1  # ranks every FFN width must split over
    realign: bool = False  # round widths down to what the ranks (and align) need
    align: int | None = None  # a further multiple per rank (kernels)
    kv_cache_dtype: str | None = None  # auto | fp8 | fp8_e4m3 | fp8_e5m2
    token_compression: str | None = None  # kv-dtype:fp8, the one method vLLM runs


@dataclass
class KvCacheCheck(Record):
    """The same prompts with an fp8 KV cache: lossy by design, so recorded, not required."""

    kv_cache_dtype: str
    identical: bool
    matching_prefix_tokens: list[int]  # per prompt


@dataclass
class VllmParity(Parity):
    """Greedy tokens of the export in stock vLLM against transformers: identical (float32), or where half-precision
    paths part, every vLLM token within the half-precision gap of transformers' top logit (``criterion``)."""

    text: str  # which text the prompts are from
    dtype: str
    match: bool  # the greedy tokens are identical
    tensor_parallel_size_checked: int
    seconds: dict[str, float] = field(default_factory=dict)
    first_mismatch: list | None = None  # half precision: (prompt, position, expected, got)
    teacher_forced_max_logit_gap: float | None = None
    criterion: str | None = None  # set when the tokens are not identical but passed
    kv_cache: KvCacheCheck | None = None

    def summary(self) -> str:
        verdict = "identical" if self.match else self.criterion
        return f"greedy tokens {verdict} over {self.prompts} prompts x {self.new_tokens} tokens"


@dataclass
class VsUnquantized(Record):
    """vLLM's scores of the quantized export against the unquantized source: informational."""

    top1_agreement: float
    max_abs_logit_diff: float
    max_abs_logprob_diff: float
    note: str = ""


@dataclass
class VllmQuantizedParity(Parity):
    """vLLM's teacher-forced scores of a quantized export against a reference built from its stored integers and
    scales: top-1 agreement >= ``top1_tolerance`` where the reference decides."""

    text: str
    dtype: str
    positions: int
    decided_positions: int
    top1_agreement_all_positions: float
    top1_agreement: float  # over the decided positions (the criterion)
    top1_tolerance: float
    max_abs_logprob_diff: float
    criterion: str
    match: bool
    vs_unquantized: VsUnquantized
    tensor_parallel_size_checked: int
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        dense = self.vs_unquantized
        return (f"teacher-forced top-1 {self.top1_agreement:.1%} vs the fake-quant reference (tolerance "
                f">= {self.top1_tolerance:.0%}) over {self.positions} positions, max |log-prob diff| "
                f"{self.max_abs_logprob_diff:.2g}; vs unquantized: top-1 {dense.top1_agreement:.1%}, "
                f"max |logit diff| {dense.max_abs_logit_diff:.2g}")


def parity_from_manifest(manifest: dict) -> VllmParity | VllmQuantizedParity | None:
    """The parity record of a vLLM export's manifest: which check ran follows from its ``quantize`` section."""
    record = manifest.get("parity")
    if record is None:
        return None
    return (VllmQuantizedParity if manifest.get("quantize") else VllmParity).from_dict(record)
