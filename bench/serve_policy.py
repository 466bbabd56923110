"""The policy's ``[serve]`` table: the load to drive a server with and its service-level objectives.

Objectives are per request, as GuideLLM (and vLLM's ``benchmark_serving``) define them: ``ttft_p99_ms`` (time to
first token), ``tpot_p99_ms`` (GuideLLM's inter-token latency: time per output token after the first, vLLM's
TPOT) and ``e2el_p99_ms`` (end-to-end request latency). A load level *meets the SLO* when the p99 of every metric
named is within its limit and at most ``max_failed_rate`` of its requests failed; *goodput* is GuideLLM's rate of
requests meeting every objective. The sign-off is judged at ``target`` (the load we expect; default the highest
level of the sweep): each candidate's p99s there, its goodput against dense's (``min_goodput_ratio``) and the
highest load meeting the SLO against dense's (``min_load_ratio``). See bench/policies/default.toml for an example.

``repeats`` sweeps every model that many times, the models interleaved (dense, A, B, then B, A, dense, ...: a
drift of the machine reaches every model alike). One sweep's p99 of 48 requests is set by its slowest request and
goodput at an SLO's edge flips with it, so a ranking of two close models needs the spread of several sweeps
(bench/serve.py combines them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from effideploy.errors import EffideployError

OBJECTIVES = {"ttft_p99_ms": "time_to_first_token_ms", "tpot_p99_ms": "inter_token_latency_ms",
              "e2el_p99_ms": "request_latency_ms"}
RATIOS = ("min_goodput_ratio", "min_load_ratio")


@dataclass(frozen=True)
class ServeSLO:
    concurrency: tuple[int, ...] = (1, 2, 4)  # concurrent streams per load level (GuideLLM's "concurrent" profile)
    rate: tuple[float, ...] = ()  # or requests per second (GuideLLM's "constant" profile); excludes concurrency
    prompt_tokens: int = 128
    output_tokens: int = 32
    max_requests: int = 32  # per load level: every level is bounded in requests and in time
    max_seconds: float = 60.0
    repeats: int = 1  # sweeps per model, interleaved across models (a ranking of close models needs more than one)
    target: float | None = None  # the load the p99 objectives and ratios are judged at (default: the highest)
    ttft_p99_ms: float | None = None
    tpot_p99_ms: float | None = None
    e2el_p99_ms: float | None = None
    max_failed_rate: float = 0.0
    min_goodput_ratio: float | None = None
    min_load_ratio: float | None = None

    @property
    def kind(self) -> str:
        return "rate" if self.rate else "concurrency"

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(self.rate) if self.rate else tuple(float(c) for c in self.concurrency)

    @property
    def target_level(self) -> float:
        return self.target if self.target is not None else max(self.levels)

    def objectives(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in OBJECTIVES if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        return {**asdict(self), "kind": self.kind, "levels": list(self.levels), "target_level": self.target_level}


def _number(where: str, key: str, value, *, integer: bool = False, positive: bool = True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EffideployError(f"{where}: [serve] {key} must be a finite number, got {value!r}")
    if integer and value != int(value):
        raise EffideployError(f"{where}: [serve] {key} must be an integer, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise EffideployError(f"{where}: [serve] {key} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return int(value) if integer else float(value)


def serve_from_dict(raw, where: str = "policy") -> ServeSLO:
    """The ``[serve]`` table, every key checked (unknown ones are an error, as in [thresholds])."""
    if not isinstance(raw, dict):
        raise EffideployError(f"{where}: [serve] must be a table")
    known = set(ServeSLO.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise EffideployError(f"{where}: unknown [serve] key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    values: dict = {}
    for key in ("concurrency", "rate"):
        if key in raw:
            items = raw[key] if isinstance(raw[key], list) else [raw[key]]
            if not items:
                raise EffideployError(f"{where}: [serve] {key} must list at least one load level")
            values[key] = tuple(_number(where, key, v, integer=key == "concurrency") for v in items)
    if "concurrency" in values and "rate" in values:
        raise EffideployError(f"{where}: [serve] gives both concurrency and rate; a sweep is one or the other")
    if "rate" in values:
        values["concurrency"] = ()
    for key in ("prompt_tokens", "output_tokens", "max_requests", "repeats"):
        if key in raw:
            values[key] = _number(where, key, raw[key], integer=True)
    for key in ("max_seconds", "target", *OBJECTIVES, *RATIOS):
        if key in raw:
            values[key] = _number(where, key, raw[key])
    if "max_failed_rate" in raw:
        values["max_failed_rate"] = _number(where, "max_failed_rate", raw["max_failed_rate"], positive=False)
    slo = ServeSLO(**values)
    if not slo.objectives():
        raise EffideployError(f"{where}: [serve] names no objective; give at least one of {', '.join(OBJECTIVES)}")
    if slo.output_tokens < 2 and slo.tpot_p99_ms is not None:
        raise EffideployError(f"{where}: [serve] tpot_p99_ms needs output_tokens >= 2 (one inter-token gap)")
    if slo.target is not None and slo.target not in slo.levels:
        raise EffideployError(f"{where}: [serve] target {slo.target:g} is not one of the load levels "
                              f"{', '.join(f'{v:g}' for v in slo.levels)}")
    return slo
