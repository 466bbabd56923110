"""The search's levers: one class each, owning everything the lever does.

A lever knows its values and how each is written (label fragment, family), the checkpoint it needs (a structural
lever gives a ``PruneConfig``), what the runtime must serve (checked before any work), how the screen applies it (a
weight scheme's name, a token-compression spec, or its checkpoint), what it adds to the bench's ``CandidateSpec`` and
to the export, and how it changes the cost model's inputs. The stages only iterate over ``LEVERS``; adding a lever is
one class here, its entry in ``LEVERS`` and its ``tune`` option.

A lever's ``unset`` value is "not used" (0 sparsity, float weights, full KV cache, full depth): a recipe leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from effideploy.errors import EffideployError, OptionError

if TYPE_CHECKING:
    from effideploy.search.cost import CostInputs

# The lever families the report sets the recommended recipe against (the best recipe using that family alone).
FAMILY_TEXT = {"quantization": "quantization only (the dense model quantized)", "pruning": "pruning only (float weights)"}


@dataclass(frozen=True)
class Lever:
    values: tuple = ()

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    structural: ClassVar[bool] = False  # changes the checkpoint (one pruning pass per value)
    # a structural lever that trains the pruned checkpoint (recovery) instead of pruning the dense model: its
    # checkpoint is the pruned one, then ``transform`` into a folder beside it
    transforms: ClassVar[bool] = False
    unset: ClassVar[Any] = None
    # which recipes using this lever alone the cost model times: "each" value (every kernel has its own speed),
    # the "most" reduced one (structure only changes bytes and FLOPs, which the fit reads), or none
    timed: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.normalise(v) for v in self.values))

    def normalise(self, value):
        """The canonical value (a bad one raises a one-line OptionError naming the option)."""
        return value

    def fragment(self, value) -> str:
        return str(value)

    # ------------------------------------------------------------------ the checkpoint (structural levers)
    def prune_config(self, value, align: int = 1, **calibration):
        return None

    def takes_align(self, value) -> bool:
        """Whether this value's checkpoint has FFN widths chosen by pruning, which ``align`` then rounds."""
        return False

    def checkpoint_name(self, value, align: int = 1) -> str:
        return self.fragment(value) + (f"-align{align}" if align > 1 else "")

    def prune_flags(self, value, align: int = 1) -> list[str]:
        return []

    def width_multiple(self, value, runtime: str) -> int:
        """The FFN width multiple this value needs on ``runtime`` (its kernels' blocks; 1: any width)."""
        return 1

    def transform(self, value, pruned, folder, *, dense, data_dir, overwrite: bool) -> None:
        """Write ``folder`` from the pruned checkpoint ``pruned`` (``transforms`` levers only; reused if it may)."""
        raise NotImplementedError(self.name)

    def rebuild_argv(self, value, pruned: str, output: str, config) -> list[str]:
        """The CLI command that does ``transform`` (reproduce.sh)."""
        return []

    def record_fields(self, value, checkpoint: str) -> dict:
        """What this value adds to its recipe's record in search.json (e.g. the training it cost)."""
        return {}

    # ------------------------------------------------------------------ before any work
    def for_runtime(self, runtime: str) -> "Lever":
        """This lever with its values named as ``runtime`` names them."""
        return self

    def check_runtime(self, value, runtime_class, runtime: str) -> None:
        """A one-line OptionError when ``runtime`` cannot serve ``value``."""

    def check_model(self, value, runtime: str, config_dict: dict) -> None:
        """A one-line OptionError when ``value`` cannot apply to the dense model's shapes."""

    def conflicts(self, value, other: "Lever", other_value) -> bool:
        # Two structural levers are two pruning methods: composing them would prune an already pruned checkpoint,
        # which prune_checkpoint refuses (its statistics describe the dense model); cfsp-joint is the method that
        # splits one target between width and depth, so FFN sparsity and depth exclude each other. A transforming
        # lever trains a pruned checkpoint and says itself which it excludes.
        return (self.structural and other.structural and other.name != self.name
                and not (self.transforms or other.transforms))

    def applies(self, value, used: list) -> bool:
        """Whether ``value`` means anything among the (lever, value) pairs ``used`` of a combination."""
        return True

    # ------------------------------------------------------------------ the screen
    def scheme_name(self, value) -> str | None:
        """The weight scheme the screen rounds with and the export stores (None: this lever sets none)."""
        return None

    def compression(self, value) -> str | None:
        """The token-compression spec the screen and the bench attach (None: none)."""
        return None

    # ------------------------------------------------------------------ bench, export, cost model
    def candidate_fields(self, value, record) -> dict:
        """``CandidateSpec`` fields (``export_options`` as a dict) for ``record``."""
        return {}

    def export_options(self, value, runtime_class, record) -> dict:
        """Exporter options that build this lever's part of the shipped artifact."""
        return {}

    def cost_inputs(self, value, inputs: CostInputs) -> CostInputs:
        return inputs


def _number_text(value) -> str:
    return f"{value:g}"


def _align_flags(align: int) -> list[str]:
    return ["--align", str(align)] if align > 1 else []


@dataclass(frozen=True)
class FfnSparsity(Lever):
    """CFSP FFN channel pruning at these sparsities (0: keep the dense FFN); one calibration pass serves all."""

    values: tuple = (0.0, 0.1, 0.2, 0.3)
    name: ClassVar[str] = "ffn_sparsity"
    family: ClassVar[str] = "pruning"
    structural: ClassVar[bool] = True
    unset: ClassVar[Any] = 0.0
    timed: ClassVar[str | None] = "most"

    def normalise(self, value):
        value = float(value or 0.0)
        if not 0.0 <= value < 1.0:
            raise OptionError("sparsities", f"must be in [0, 1), got {value}")
        return value

    def fragment(self, value) -> str:
        return f"cfsp-{value:g}"

    def prune_config(self, value, align: int = 1, **calibration):
        from effideploy.pruning import PruneConfig

        return PruneConfig(method="cfsp", sparsity=value, align=align, **calibration)

    def takes_align(self, value) -> bool:
        return True

    def prune_flags(self, value, align: int = 1) -> list[str]:
        return ["--method", "cfsp", "--sparsity", _number_text(value)] + _align_flags(align)

    def candidate_fields(self, value, record) -> dict:
        return {"model": record.checkpoint} if value else {}


DEPTH_METHODS = ("drop-blocks", "drop-attention", "cfsp-joint")


@dataclass(frozen=True)
class Depth(Lever):
    """Removing blocks or attention sublayers (``effideploy.pruning.depth``), one value a ``METHOD:AMOUNT``: the
    method one of ``DEPTH_METHODS``, the amount a fraction of all parameters to remove (``--target-params``) or, for
    drop-blocks / drop-attention, a whole number of sublayers (``--count``)."""

    values: tuple = (None,)
    name: ClassVar[str] = "depth"
    family: ClassVar[str] = "pruning"
    structural: ClassVar[bool] = True
    timed: ClassVar[str | None] = "most"
    # In the default space on every runtime: ONNX Runtime and vLLM run dropped blocks and no-op attention
    # (tests/exporters/test_depth_exports.py), llama.cpp as ``deci`` with per-layer head counts (0 heads: no
    # attention tensors), PyTorch through the checkpoint's modeling code. One small value: SmolLM2's 30 attentions
    # are 0.66% of its parameters each, so 5% removes 8 of them (KV cache -27%) for one more checkpoint and screen.
    default_values: ClassVar[tuple] = (None, "drop-attention:0.05")

    @staticmethod
    def parse(value: str) -> tuple[str, float | int]:
        method, _, amount = str(value).strip().lower().partition(":")
        if method not in DEPTH_METHODS or not amount:
            raise OptionError("depth", f"{value!r}: give METHOD:AMOUNT with METHOD one of {', '.join(DEPTH_METHODS)}"
                                       " (e.g. drop-attention:0.1) or none")
        try:
            number = float(amount)
        except ValueError:
            raise OptionError("depth", f"{value!r}: the amount must be a number, got {amount!r}") from None
        if 0.0 < number < 1.0:
            return method, number
        if number >= 1 and number == int(number) and method != "cfsp-joint":
            return method, int(number)
        raise OptionError("depth", f"{value!r}: the amount is a fraction of the parameters in (0, 1)"
                                   + ("" if method == "cfsp-joint" else " or a whole number of sublayers"))

    def normalise(self, value):
        if value is None:
            return None
        method, amount = self.parse(value)
        return f"{method}:{amount:g}"

    def fragment(self, value) -> str:
        return value.replace(":", "-")

    def _target(self, value) -> dict:
        method, amount = self.parse(value)
        return {"method": method, "count" if isinstance(amount, int) else "target_params": amount}

    def prune_config(self, value, align: int = 1, **calibration):
        from effideploy.pruning import PruneConfig

        aligned = {"align": align} if self.takes_align(value) else {}
        return PruneConfig(**self._target(value), **aligned, **calibration)

    def takes_align(self, value) -> bool:
        return self.parse(value)[0] == "cfsp-joint"  # the other two keep every kept block's widths

    def prune_flags(self, value, align: int = 1) -> list[str]:
        target = self._target(value)
        size = "count" if "count" in target else "target_params"
        return (["--method", target["method"], "--" + size.replace("_", "-"), _number_text(target[size])]
                + (_align_flags(align) if self.takes_align(value) else []))

    def check_model(self, value, runtime: str, config_dict: dict) -> None:
        """A target the method cannot reach, refused before the calibration pass (the methods never remove the first
        block's attention, nor every block)."""
        from effideploy.models.build import build_config, count_parameters

        method, amount = self.parse(value)
        config = build_config(config_dict)
        blocks, counts = config.num_hidden_layers, count_parameters(config)
        if isinstance(amount, int):
            if amount > blocks - 1:
                raise OptionError("depth", f"{value}: {amount} is more than the {blocks - 1} sublayers that can be "
                                           f"removed from {blocks} blocks")
            return
        if method == "cfsp-joint":
            return
        per_block = counts["attention"] / blocks if method == "drop-attention" else \
            (counts["attention"] + counts["ffn"] + counts["norms"] - config.hidden_size) / blocks
        reachable = per_block * (blocks - 1) / counts["total"]
        if amount > reachable:
            raise OptionError("depth", f"{value}: {method} can remove at most {reachable:.3f} of this model's "
                                       "parameters")

    def conflicts(self, value, other: Lever, other_value) -> bool:
        # The screen runs a KV budget in PyTorch, whose eviction refuses blocks without attention; only dropped
        # blocks (a shorter stack of whole blocks) combine with one.
        attention_may_go = value is not None and not value.startswith("drop-blocks")
        return super().conflicts(value, other, other_value) or (
            attention_may_go and other.compression(other_value) is not None)

    def candidate_fields(self, value, record) -> dict:
        return {"model": record.checkpoint} if value else {}


@dataclass(frozen=True)
class WeightQuantization(Lever):
    """Weight quantization at export (None: float weights). A value is a scheme the runtime's exporter declares
    (``effideploy.quantization.schemes``), or the search's generic ``int8`` / ``int4``, which ``for_runtime`` maps
    onto that runtime's own scheme (ONNX int8, vLLM w8a8, llama.cpp q8_0, ...)."""

    values: tuple = (None, "int8", "int4")
    name: ClassVar[str] = "quantize"
    family: ClassVar[str] = "quantization"
    timed: ClassVar[str | None] = "each"

    def normalise(self, value):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise OptionError("quantize", f"a scheme is a name, got {value!r}")
        return value

    def for_runtime(self, runtime: str) -> Lever:
        from effideploy.quantization.schemes import resolve_values
        from effideploy.runtimes import RUNTIMES

        if RUNTIMES.get(runtime).capabilities.exporter is None:
            return self  # check_runtime then refuses any quantized value
        return replace(self, values=resolve_values(self.values, runtime))

    def check_runtime(self, value, runtime_class, runtime: str) -> None:
        if value is None:
            return
        capabilities, name = runtime_class.capabilities, value
        if capabilities.exporter is not None:
            from effideploy.quantization.schemes import declaration

            name = declaration(runtime).resolve(value).name  # unknown: one line naming the schemes
        if capabilities.exporter is None or name not in capabilities.weight_formats:
            served = [f for f in capabilities.weight_formats if f not in ("float32", "float16", "bfloat16")]
            raise OptionError("quantize", f"{value}: the {runtime} runtime does not serve these weights"
                              + (f" (it serves: {', '.join(served)})" if served else
                                 " (it runs checkpoints as they are: float weights only)"))
        try:
            runtime_class.check_here(scheme=name)  # declared, but is there a kernel on this machine?
        except EffideployError as exc:
            raise OptionError("quantize", f"{value} cannot run on the {runtime} runtime here: {exc}") from None

    def check_model(self, value, runtime: str, config_dict: dict) -> None:
        from effideploy.quantization.schemes import fitted_scheme

        if value is None:
            return
        try:
            fitted_scheme(runtime, value, config_dict)  # e.g. no w4a16 group divides the dense shapes
        except EffideployError as exc:
            raise OptionError("quantize", f"{value} on the {runtime} runtime: {exc}") from None

    def scheme_name(self, value) -> str | None:
        return value

    def width_multiple(self, value, runtime: str) -> int:
        # Kernels want whole blocks along the FFN width (down_proj's rows): a width that is not a multiple leaves
        # llama.cpp's down projections in F16 and pads MatMulNBits' last block, so pruning for this scheme rounds
        # to it (CFSP rounds the per-block budgets, then picks and compensates the channels of the rounded width).
        from effideploy.quantization.schemes import declaration

        try:
            return declaration(runtime).resolve(value).ffn_multiple
        except EffideployError:
            return 1  # an unknown scheme is refused by check_runtime, with its own message

    def candidate_fields(self, value, record) -> dict:
        # every recipe's weights are stored by its fitted scheme (float ones too: llama.cpp's f16)
        options = dict(record.scheme.export_options()) if record.scheme is not None else {}
        return {"quantize": options.pop("quantize", value), "export_options": options}

    def export_options(self, value, runtime_class, record) -> dict:
        if value is None:
            return {}
        return record.scheme.export_options() if record.scheme is not None else {"quantize": value}


@dataclass(frozen=True)
class KvBudget(Lever):
    """Token compression of the prompt's KV cache (None: keep every entry)."""

    values: tuple = (None,)
    name: ClassVar[str] = "kv"
    family: ClassVar[str] = "kv"

    def normalise(self, value):
        from effideploy.compression.spec import parse_spec

        if value is not None:
            parse_spec(value)  # a bad spec fails before any work
        return value

    def check_runtime(self, value, runtime_class, runtime: str) -> None:
        if value is None:
            return
        try:
            runtime_class.check_compression(value, **runtime_class.export_options(value))
            runtime_class.check_here(compression=value)  # e.g. an fp8 KV cache without AVX-512
        except EffideployError as exc:
            raise OptionError("kv", f"{value} cannot run on the {runtime} runtime: {exc}") from None

    def compression(self, value) -> str | None:
        return value

    def candidate_fields(self, value, record) -> dict:
        return {"compression": value}

    def export_options(self, value, runtime_class, record) -> dict:
        options = dict(runtime_class.export_options(value))
        if value is not None:
            options.setdefault("token_compression", value)
        return options

    def cost_inputs(self, value, inputs: CostInputs) -> CostInputs:
        from effideploy.compression.spec import parse_spec

        if value is None:
            return inputs
        ratio = getattr(parse_spec(value), "ratio", None)  # the fraction of the prompt's entries kept
        if isinstance(ratio, float) and 0 < ratio <= 1:
            return replace(inputs, kv_prompt_tokens=inputs.kv_prompt_tokens * ratio)
        return inputs


# Every lever, in label order: structural ones first (they name the checkpoint), then weights, then the KV budget.
# Recovery (recovery_lever.py: this module's size) follows the pruning levers it trains on: cfsp-0.3+distil32k+int8.
from effideploy.search.recovery_lever import Recovery  # noqa: E402 - it subclasses Lever

LEVERS: dict[str, Lever] = {lever.name: lever for lever in (FfnSparsity(), Depth(), Recovery(), WeightQuantization(),
                                                           KvBudget())}


def lever(name: str) -> Lever:
    if name not in LEVERS:
        raise EffideployError(f"unknown lever {name!r} (levers: {', '.join(LEVERS)})")
    return LEVERS[name]
