"""Typed results of a bench run: what was measured per model (``ModelResult``), per candidate against the dense
model (``Comparison``, in ``compare.py``) and the whole run (``BenchReport``). The report and the policy read
them by attribute; ``to_dict`` gives report.json (schema in ``report.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from effideploy.bench import metrics

if TYPE_CHECKING:
    from effideploy.bench.compare import Comparison
    from effideploy.bench.fidelity import Fidelity
    from effideploy.eval.chat import ChatResponses
    from effideploy.eval.multiple_choice import TaskResult
    from effideploy.eval.perplexity import PerplexityResult

LATENCY_KEYS = ("ttft_s", "tpot_s", "e2e_s")


@dataclass
class Latency:
    """Raw samples of the interleaved repeats: TTFT per request, TPOT per decode step, end-to-end per request."""

    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    tokens: list[list[int]] | None = None  # the greedy tokens of the last repeat

    def p50(self, key: str) -> float:
        return metrics.percentile(getattr(self, key), 50)

    def summary(self) -> dict:
        return {key: metrics.summarize(getattr(self, key)) for key in LATENCY_KEYS}


@dataclass
class Parameters:
    counts: dict[str, int]  # by role: attention, ffn, norms, embedding, lm_head, total
    ffn_widths: list[int]
    attention_width: int  # layers x query width (the attention FLOPs over the context)
    max_positions: int | None


@dataclass
class Size:
    checkpoint_weights_bytes: int | None
    artifact_bytes: int
    artifact: str
    checkpoint: str | None


@dataclass
class WeightStorage:
    """How the weights are stored where the runtime reads them: ``format`` (e.g. float32, int8 MatMulNBits block
    32, w4a16 group 128), ``stored_bytes`` (all weights as stored), ``bytes_per_token`` (what one decode step reads:
    the matmul weights with their scales)."""

    format: str
    stored_bytes: int
    bytes_per_token: int


@dataclass
class ExportRecord:
    path: str
    reused: bool
    seconds: float


@dataclass
class ModelResult:
    """One measured model: what it is, where it came from, and everything measured on it."""

    label: str
    kind: str  # dense | checkpoint | compression
    spec: str
    artifact: Path  # what the runtime opens
    checkpoint: Path | None  # the safetensors checkpoint behind it (parameter counts, weight bytes)
    config_dict: dict | None = field(default=None, repr=False)
    compression: str | None = None
    export: ExportRecord | None = None
    parameters: Parameters | None = None
    size: Size | None = None
    weights: WeightStorage | None = None
    memory: dict | None = None  # the memory probe's record (bench/memory.py)
    runtime: dict = field(default_factory=dict)  # the adapter's describe()
    latency: Latency = field(default_factory=Latency)
    kv_cache: dict | None = None  # what compression left in the KV cache (Runtime.kv_record)
    throughput: dict[str, list[float]] = field(default_factory=dict)  # batch size -> tokens/s per repeat
    perplexity: PerplexityResult | None = None
    fidelity: Fidelity | None = None  # a candidate's next-token distributions against dense's (bench/fidelity.py)
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    chat: ChatResponses | None = None  # greedy responses to the chat prompts (--chat-prompts)

    def to_dict(self) -> dict:
        """report.json's entry: sections that were not measured are absent; per-window mean NLL instead of the
        per-token NLL and predictions behind loyalty."""
        out = {"label": self.label, "kind": self.kind, "spec": self.spec, "artifact": str(self.artifact),
               "compression": self.compression}
        for name in ("export", "parameters", "size", "weights"):
            value = getattr(self, name)
            if value is not None:
                out[name] = dataclasses.asdict(value)
        if self.memory is not None:
            out["memory"] = self.memory
        out["runtime"] = self.runtime
        out["latency"] = {**dataclasses.asdict(self.latency), "summary": self.latency.summary()}
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache
        out["throughput"] = self.throughput
        if self.perplexity is not None:
            ppl = self.perplexity
            out["perplexity"] = {"scope": ppl.scope, "perplexity": ppl.perplexity, "mean_nll": ppl.mean_nll,
                                 "window_mean_nll": [sum(row) / len(row) for row in ppl.nll]}
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity.to_dict()
        if self.tasks:
            out["tasks"] = {name: task.to_dict() for name, task in self.tasks.items()}
        if self.chat is not None:
            out["chat"] = self.chat.to_dict()
        return out


@dataclass
class BenchReport:
    """Everything a run produced; ``policy``, ``pipeline`` and ``plots`` are filled in by whoever adds them."""

    created: str
    config: dict
    runtime: dict
    runtime_options: dict
    environment: dict
    data: dict
    models: list[ModelResult]
    comparisons: list[Comparison]
    pareto: dict
    notes: list[str]
    phase_seconds: dict[str, float]
    seconds: float
    policy: dict | None = None
    pipeline: dict | None = None
    plots: list[str] = field(default_factory=list)
    lm_eval: dict | None = None  # --lm-eval-task: {"tasks", "limit", "samples", "models": {label: {task: {metric: value}}}}

    @property
    def dense(self) -> ModelResult:
        return self.models[0]

    def to_dict(self) -> dict:
        out = {"created": self.created, "config": self.config, "runtime": self.runtime,
               "runtime_options": self.runtime_options, "environment": self.environment, "data": self.data,
               "models": [model.to_dict() for model in self.models],
               "comparisons": [comparison.to_dict() for comparison in self.comparisons],
               "pareto": {quality: {axis: [dataclasses.asdict(p) for p in points] for axis, points in by_axis.items()}
                          for quality, by_axis in self.pareto.items()},
               "notes": self.notes, "phase_seconds": self.phase_seconds, "seconds": self.seconds}
        for name in ("policy", "pipeline", "lm_eval"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.plots:
            out["plots"] = self.plots
        return out
