"""The speed cost model: a few real measurements on the target runtime, a least-squares line through them, and
predictions for every recipe that was only screened.

Decode on a CPU is memory-bound: time per output token ~ a + sum over kernels of b_k x (bytes that kernel reads in
one decode step: the matmul weights as stored, with their scales; float kernels also the KV cache attended over).
Each timed quantization-only recipe gives its kernel's slope (llama.cpp's q4_k_m reads fewer bytes than q8_0 but
spends more per byte unpacking them), so a pruned + quantized recipe, whose float fallbacks and quantized bytes mix
differently, is predicted from the slopes that read it; a kernel never timed falls back to one slope for all bytes. Prefill is compute-bound, and quantized matmuls
compute in integers (MatMulNBits at accuracy level 4, vLLM's W8A8, llama.cpp's quantized dot products): TTFT ~ a +
b_float x (FLOPs on float weights and attention) + b_quant x (FLOPs on quantized weights). Peak memory ~ a + b x
stored weight bytes. What each tensor costs is the runtime's own weight scheme's answer
(``effideploy.quantization.schemes``: per tensor, bytes as stored and whether it computes in integers), so the same
recipe is costed as ONNX Runtime, vLLM or llama.cpp stores it. Speedups are ratios of two predictions (dense / recipe), which
transfer between runs better than absolute times on a loaded machine; the report checks each prediction against
the measurement of every recipe that was then benched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effideploy.search.space import Recipe


@dataclass(frozen=True)
class CostInputs:
    """What the levers may change before the features are computed (``Lever.cost_inputs``); the structure comes
    from the checkpoint's config and the weights' bytes from the recipe's scheme."""

    prompt_tokens: int
    new_tokens: int
    kv_prompt_tokens: float  # prompt tokens whose KV entries a decode step attends over


@dataclass
class Predicted:
    """The cost model's estimates for one recipe before it is benched (None: not estimated)."""

    decode_speedup: float | None = None  # over the dense model, a ratio of two predictions
    ttft_speedup: float | None = None
    size_reduction: float | None = None  # 1 - stored weight bytes / the dense model's
    peak_memory_mb: float | None = None  # once the memory line is fitted on the final bench

    def to_dict(self) -> dict:
        return asdict(self)


DECODE_KERNEL = "decode_bytes:"  # + the kernel that reads them: a scheme's name, or "float"


@dataclass(frozen=True)
class Features:
    """What the cost model reads of a recipe, computed from its checkpoint's config alone (no export needed)."""

    decode_bytes: float  # weight bytes read per decoded token + KV bytes attended over
    prefill_flops_float: float
    prefill_flops_quant: float
    stored_bytes: float
    # decode_bytes split by the kernel that reads them: each kernel streams its bytes at its own rate (llama.cpp's
    # q4_k_m dequantizes more per byte than q8_0; a tensor a scheme cannot hold falls back to float), so one slope
    # for all bytes mispredicts every recipe whose mix differs from the fitted ones
    decode_kernels: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update({DECODE_KERNEL + kernel: value for kernel, value in out.pop("decode_kernels")})
        return out


def recipe_features(recipe: Recipe, config_dict: dict, prompt_tokens: int, new_tokens: int, scheme,
                    tensors=None) -> Features:
    """``scheme``: the recipe's weight scheme (``effideploy.quantization.schemes``; the exporter's float one for
    float weights); ``tensors``: the model's matrices (``model_tensors(config_dict)``, computed when not given)."""
    from effideploy.models.build import attention_layers, build_config, count_parameters
    from effideploy.quantization.schemes import model_tensors

    config = build_config(config_dict)
    counts = count_parameters(config)
    tensors = model_tensors(config_dict) if tensors is None else tensors
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inputs = CostInputs(prompt_tokens, new_tokens, float(prompt_tokens))
    for lever, value in recipe.settings():
        inputs = lever.cost_inputs(value, inputs)
    # only blocks with attention hold a KV cache and attend (a no-op attention has neither)
    kv_layers = len(attention_layers(config))
    kv_bytes = kv_layers * 2 * config.num_key_value_heads * head_dim * 4 * (inputs.kv_prompt_tokens + new_tokens / 2)
    attention_width = kv_layers * config.num_attention_heads * head_dim
    read = stored = quant_params = float_params = 0.0
    kernels = {"float": kv_bytes}  # the KV cache is read as float
    for tensor in tensors:
        storage = scheme.storage(tensor)
        if tensor.role != "embedding":  # a decode step multiplies every projection and the head (the embedding
            read += storage.bytes       # lookup reads one row); prefill FLOPs split by how each matmul computes
            kernel = scheme.name if storage.quantized else "float"
            kernels[kernel] = kernels.get(kernel, 0.0) + storage.bytes
            quant_params, float_params = ((quant_params + tensor.parameters, float_params) if storage.quantized
                                          else (quant_params, float_params + tensor.parameters))
        if tensor.role != "lm_head" or not tensor.tied or storage.separate:  # a tied head is the embedding's bytes
            stored += storage.bytes
    stored += counts["norms"] * 4.0  # norms stay float (a few KB)
    return Features(decode_bytes=read + kv_bytes,
                    prefill_flops_float=2.0 * float_params * prompt_tokens
                    + 2.0 * attention_width * prompt_tokens * prompt_tokens,
                    prefill_flops_quant=2.0 * quant_params * prompt_tokens,
                    stored_bytes=stored, decode_kernels=tuple(sorted(kernels.items())))


@dataclass
class LinearFit:
    """target ~ intercept + sum_i coef_i x feature_i, least squares with every slope >= 0; features that are zero at
    every fitted point (e.g. quantized FLOPs when no quantized recipe was measured) are left out and contribute
    nothing.

    Why non-negative: a byte read or a FLOP computed never makes a token faster, but an unconstrained exact fit on
    four noisy timings can say so (llama.cpp on SmolLM2 fitted -52 ms/GB for q4_k_m bytes and a 14.5 ms intercept,
    predicting pruned GGUFs 4-10% slow). A slope the data pushes below zero is held at zero (``pinned``) and the
    intercept absorbs it."""

    names: tuple[str, ...]
    coefficients: dict[str, float] = field(default_factory=dict)
    intercept: float = 0.0
    points: int = 0
    # RMS relative residual over the fitted points; None when there are no more distinct points than coefficients
    # (an exact fit by construction: its residual says nothing of the model, only held-out recipes test it)
    residual_pct: float | None = None
    degrees_of_freedom: int = 0
    pinned: list[str] = field(default_factory=list)  # features whose unconstrained slope was negative, held at 0

    def fit(self, rows: list[dict], targets: list[float]) -> "LinearFit":
        import numpy as np

        used = [n for n in self.names if any(abs(r.get(n, 0.0)) > 0 for r in rows)]
        scale = {n: max(abs(r.get(n, 0.0)) for r in rows) for n in used}  # conditioning: features span ~1e8..1e12
        matrix = np.array([[1.0] + [r.get(n, 0.0) / scale[n] for n in used] for r in rows])
        target = np.array(targets, dtype=float)
        solution = _nonnegative_slopes(matrix, target)
        self.intercept = float(solution[0])
        self.coefficients = {n: float(c) / scale[n] for n, c in zip(used, solution[1:])}
        self.pinned = [n for n, c in zip(used, solution[1:]) if c == 0.0]
        self.points = len(rows)
        fitted = matrix @ solution
        distinct = len({tuple(row) for row in matrix.round(12).tolist()})
        self.degrees_of_freedom = distinct - (matrix.shape[1] - len(self.pinned))  # a pinned slope is no free one
        self.residual_pct = (float(np.sqrt(np.mean(((fitted - target) / target) ** 2)) * 100)
                             if self.degrees_of_freedom > 0 else None)
        return self

    def predict(self, row: dict) -> float:
        return self.intercept + sum(c * row.get(n, 0.0) for n, c in self.coefficients.items())

    def covers(self, row: dict) -> bool:
        """Whether every feature of ``row`` this fit could read has a coefficient (one never measured has none)."""
        return all(n in self.coefficients or not row.get(n) for n in self.names)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CostModel:
    # decode: one slope per kernel (names set by ``fit`` from the timed recipes); decode_pooled: one slope for all
    # bytes, for a recipe whose kernel was never timed
    decode: LinearFit = field(default_factory=lambda: LinearFit(()))
    decode_pooled: LinearFit = field(default_factory=lambda: LinearFit(("decode_bytes",)))
    ttft: LinearFit = field(default_factory=lambda: LinearFit(("prefill_flops_float", "prefill_flops_quant")))
    memory: LinearFit | None = None
    fitted_on: list[str] = field(default_factory=list)

    def fit(self, points: list[tuple[str, Features, float, float]]) -> "CostModel":
        """``points``: (label, features, measured median TPOT s, measured median TTFT s)."""
        rows = [f.to_dict() for _, f, _, _ in points]
        kernels = tuple(sorted({n for r in rows for n in r if n.startswith(DECODE_KERNEL)}))
        self.decode = LinearFit(kernels or ("decode_bytes",))  # features without the split: one slope
        self.decode.fit(rows, [p[2] for p in points])
        self.decode_pooled.fit(rows, [p[2] for p in points])
        self.ttft.fit(rows, [p[3] for p in points])
        self.fitted_on = [p[0] for p in points]
        return self

    def fit_memory(self, points: list[tuple[Features, float]]) -> None:
        if len(points) >= 2:
            self.memory = LinearFit(("stored_bytes",)).fit([f.to_dict() for f, _ in points], [m for _, m in points])

    def speedups(self, dense: Features, recipe: Features) -> dict:
        d, r = dense.to_dict(), recipe.to_dict()
        decode = self.decode if self.decode.covers(r) and self.decode.covers(d) else self.decode_pooled
        out = {"decode_speedup": _ratio(decode.predict(d), decode.predict(r)),
               "ttft_speedup": _ratio(self.ttft.predict(d), self.ttft.predict(r))}
        if self.memory is not None:
            out["peak_memory_mb"] = self.memory.predict(r)
        return out

    def to_dict(self) -> dict:
        return {"decode": self.decode.to_dict(), "decode_pooled": self.decode_pooled.to_dict(), "ttft": self.ttft.to_dict(),
                "memory": None if self.memory is None else self.memory.to_dict(), "fitted_on": self.fitted_on}


def _nonnegative_slopes(matrix, target):
    """Least squares with column 0 (the intercept) free and every other coefficient >= 0, exactly: the optimum is the
    unconstrained solution on some subset of the columns, so every subset is solved and the best feasible one kept.
    A cost model has at most a handful of features (2**5 small solves), so no solver library is needed."""
    import itertools

    import numpy as np

    slopes = matrix.shape[1] - 1
    best, best_error = None, float("inf")
    for size in range(slopes, -1, -1):  # larger supports first: on ties the fuller model is kept
        for subset in itertools.combinations(range(1, slopes + 1), size):
            columns = [0, *subset]
            part, *_ = np.linalg.lstsq(matrix[:, columns], target, rcond=None)
            if (part[1:] < 0).any():
                continue
            solution = np.zeros(matrix.shape[1])
            solution[columns] = part
            error = float(np.sum((matrix @ solution - target) ** 2))
            if error < best_error * (1 - 1e-9) - 1e-30:
                best, best_error = solution, error
    return best


def _ratio(dense: float, recipe: float) -> float:
    return dense / recipe if recipe > 0 else float("nan")
