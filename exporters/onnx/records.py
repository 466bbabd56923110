"""The ONNX exporter's typed records: its options (the parameters of ``export_onnx`` and the flags of
``effideploy export --runtime onnx``) and its parity record. Imports nothing heavy: the CLI reads the options'
fields before the exporter (torch, onnx) is imported."""

from __future__ import annotations

from dataclasses import dataclass

from effideploy.exporters.base import ExportOptions, Parity, Record


@dataclass(frozen=True)
class OnnxExportOptions(ExportOptions):
    runtime = "onnx"

    dtype: str = "float32"  # float32 | float16
    quantize: str | None = None  # int8 | int4 (MatMulNBits)
    block_size: int | None = None  # weights per quantization block (default 32)
    quant_method: str | None = None  # rtn | hqq | gptq
    opset: int | None = None  # default: torch's
    attention_outputs: bool = False  # also output attention probabilities (SnapKV / H2O need them)
    token_compression: dict | str | None = None  # recorded for the runner, checked against the graph


@dataclass
class OnnxVsFloat(Record):
    """The quantized graph against the unquantized model: measured, not required (quantization is lossy)."""

    reference: str
    logits_max_abs_diff: float
    top1_agreement: float
    fake_quant_logits_max_abs_diff: float
    token_agreement: float  # greedy tokens
    first_mismatch: list | None = None  # (prompt, position, expected, got); None: the greedy tokens agree


@dataclass
class OnnxQuantizedParity(Parity):
    """The quantized graph against transformers with the graph's own dequantized weights (fake-quant). Required:
    with float activations within ``exact_tolerance`` (the weights are the reference's). Recorded: as shipped (int8
    activations at run time, ONNX Runtime's kernel) the logits' deviation, beside the bound it usually stays within
    (``logits_tolerance``) and the top-1 agreement where the reference decides (``top1_required`` once gated it).
    Manifests written before the exact check have no ``exact_*`` values."""

    logits_max_abs_diff: float
    logits_tolerance: float
    top1_agreement: float  # over all positions
    top1_agreement_decided: float  # where the reference's top-1 margin is decided
    decided_positions: int
    positions: int
    top1_required: float
    vs_float: OnnxVsFloat
    exact_max_abs_diff: float | None = None
    exact_tolerance: float | None = None

    def summary(self) -> str:
        exact = ("" if self.exact_max_abs_diff is None else
                 f"with float activations within {self.exact_max_abs_diff:.2g} (tolerance {self.exact_tolerance:.2g}), ")
        return (f"quantized graph vs fake-quant: {exact}as shipped within {self.logits_max_abs_diff:.2g} "
                f"(usual bound {self.logits_tolerance:.2g}), top-1 {self.top1_agreement:.0%}; vs float32: top-1 "
                f"{self.vs_float.top1_agreement:.0%}, greedy tokens {self.vs_float.token_agreement:.0%}")


@dataclass
class OnnxParity(Parity):
    """The float graph against transformers (strict: logits within tolerance, greedy tokens identical), and the
    quantized graph's check when the export quantizes."""

    dtype: str
    logits_max_abs_diff: float
    logits_tolerance: float
    tokens_match: bool
    quantized: OnnxQuantizedParity | None = None

    def summary(self) -> str:
        verdict = "identical" if self.tokens_match else "DIFFER"
        text = (f"greedy tokens {verdict} over {self.prompts} prompts x {self.new_tokens} tokens, logits within "
                f"{self.logits_max_abs_diff:.2g} (tolerance {self.logits_tolerance:g})")
        return text if self.quantized is None else f"{text}; {self.quantized.summary()}"


def parity_from_manifest(manifest: dict) -> OnnxParity | None:
    """The parity record of a manifest this exporter wrote (None: written with --no-verify)."""
    record = manifest.get("parity")
    return None if record is None else OnnxParity.from_dict(record)
