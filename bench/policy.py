"""A sign-off policy: thresholds read from TOML, checked against a bench report.

Every threshold is optional; the ones present are checked for every candidate. A threshold whose metric was not
measured (e.g. memory with ``--no-memory``) fails: a gate never passes on a number it does not have.
``require = "all"`` passes only when every candidate passes; ``"any"`` when at least one does (pick it to ship).
See ``bench/policies/default.toml`` for the fields.

Where a policy comes from: a name of a policy shipped with the package (``default``: ``bench/policies/default.toml``,
installed as package data of ``effideploy.bench``) is read through ``importlib.resources``, so ``--policy default``
works from any folder and from a wheel install, not only from the repository root; anything else is a path. A
packaged name wins over a file of that exact name in the current folder (``--policy default`` never depends on the
folder it is run from); such a file is read when given with a folder, e.g. ``$PWD/default``.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.safe_files import read_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python): the same parser, from PyPI (a dependency there)
    import tomli as tomllib

# The policy `effideploy tune` applies when --policy is left out, and the name `--policy default` reads.
DEFAULT_POLICY = "default"
# A policy is a few hundred bytes of TOML; anything this large is a wrong path (a model file, a log), refused
# before it is read into memory.
MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class Threshold:
    metric: str  # attribute of the candidate's Comparison (bench/compare.py)
    direction: str  # "max": value <= limit passes; "min": value >= limit passes
    unit: str
    description: str
    # the Comparison attribute holding the metric's standard error, where it has one; ``difference``: the metric is a
    # dense-vs-candidate difference, so "within noise" (|value| <= NOISE_Z SE) means no measurable change
    stderr: str | None = None
    difference: bool = False


THRESHOLDS = {
    "max_perplexity_increase": Threshold("perplexity_increase", "max", "fraction",
                                         "relative WikiText-2 perplexity increase, candidate / dense - 1"),
    "max_perplexity": Threshold("perplexity", "max", "", "WikiText-2 perplexity of the candidate"),
    "max_accuracy_drop": Threshold("accuracy_drop", "max", "points",
                                   "the suite's mean multiple-choice accuracy over the tasks where dense is above "
                                   "chance, dense - candidate (0..1)", stderr="accuracy_drop_stderr", difference=True),
    "min_op": Threshold("op", "min", "", "OP, quadratic mean of score ratios to dense"),
    "max_og": Threshold("og", "max", "%", "OG, coefficient of variation of the score ratios"),
    "min_loyalty": Threshold("loyalty", "min", "", "OL, share of predictions identical to dense",
                             stderr="loyalty_stderr"),
    "max_kl_divergence": Threshold("kl_divergence", "max", "nats",
                                   "mean KL(dense || candidate) of next-token distributions on the runtime's "
                                   "artifacts (dense's top-20 support plus a tail bucket; perplexity windows)",
                                   stderr="kl_divergence_stderr"),
    "min_top_k_agreement": Threshold("top_k_agreement", "min", "",
                                     "mean overlap of dense and candidate top-5 next tokens on the runtime's "
                                     "artifacts (perplexity windows)", stderr="top_k_agreement_stderr"),
    "min_chat_rouge_l": Threshold("chat_rouge_l", "min", "",
                                  "mean ROUGE-L of the candidate's greedy chat responses against dense's (--chat-prompts)"),
    "max_chat_loglik_drop": Threshold("chat_loglik_drop", "max", "nats",
                                      "dense's per-token log-likelihood of its own chat responses minus of the "
                                      "candidate's (--chat-prompts)"),
    "min_decode_speedup": Threshold("decode_speedup", "min", "x", "median TPOT dense / candidate"),
    "min_ttft_speedup": Threshold("ttft_speedup", "min", "x", "median TTFT dense / candidate"),
    "min_throughput_speedup": Threshold("throughput_speedup", "min", "x",
                                        "tokens/s candidate / dense at the largest batch size"),
    "max_p99_latency_ms": Threshold("p99_latency_ms", "max", "ms", "p99 end-to-end request latency"),
    "max_p99_tpot_ms": Threshold("p99_tpot_ms", "max", "ms", "p99 time per output token"),
    "max_peak_memory_mb": Threshold("peak_memory_mb", "max", "MiB", "peak RSS of the process tree, MiB (2**20 bytes)"),
    "min_size_reduction": Threshold("size_reduction", "min", "fraction",
                                    "share of stored weight bytes removed, 1 - candidate / dense (pruning and "
                                    "quantization both count)"),
}
REQUIRE = ("all", "any")


@dataclass(frozen=True)
class Check:
    candidate: str
    name: str
    limit: float
    value: float | None
    passed: bool
    # where the threshold's metric has a standard error (Threshold.stderr): the SE, whether the value is within
    # noise of no change (difference metrics) and of the limit (another draw of items could flip the verdict), and
    # what the metric is computed over (max_accuracy_drop: the competent tasks). The verdict uses the value alone.
    stderr: float | None = None
    within_noise: bool | None = None
    near_limit: bool | None = None
    scope: str | None = None

    def to_dict(self) -> dict:
        out = {"candidate": self.candidate, "threshold": self.name, "limit": self.limit, "value": self.value,
               "passed": self.passed, "metric": THRESHOLDS[self.name].metric}
        if THRESHOLDS[self.name].stderr is not None:
            out.update(stderr=self.stderr, within_noise=self.within_noise, near_limit=self.near_limit, scope=self.scope)
        return out


@dataclass(frozen=True)
class Policy:
    name: str = "policy"
    require: str = "all"
    thresholds: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    serve: object | None = None  # bench.serve_policy.ServeSLO: the [serve] table, for `bench --serve`

    def to_dict(self) -> dict:
        out = {"name": self.name, "require": self.require, "thresholds": dict(self.thresholds), "path": self.path}
        if self.serve is not None:  # only then: reports of policies without [serve] keep their exact keys
            out["serve"] = self.serve.to_dict()
        return out


def packaged_policies() -> dict[str, Path]:
    """The policies shipped with effideploy, by name (file stem): ``{"default": .../policies/default.toml}``."""
    folder = resources.files("effideploy.bench") / "policies"
    if not folder.is_dir():  # a broken install: the name then reads as a path and fails as "not found"
        return {}
    # Traversable -> Path: package data of an installed wheel or an editable checkout is a real file. A zipped
    # install would need resources.as_file; effideploy does not support one (it is not zip-safe: it copies files
    # such as checkpoint/remote/*.py by path).
    return {entry.name.removesuffix(".toml"): Path(str(entry)) for entry in folder.iterdir()
            if entry.name.endswith(".toml") and entry.is_file()}


def resolve_policy(spec: str | Path) -> Path:
    """The file a ``--policy`` value names: a packaged policy's name (``default``) or a path."""
    text = str(spec)
    shipped = packaged_policies()
    if os.sep not in text and text in shipped:
        return shipped[text]
    return Path(text).expanduser()


def _check_policy_file(path: Path) -> None:
    """One line naming what is wrong with ``path`` before reading it: a folder or a device (``/dev/zero`` would
    be read forever, ``/dev/null`` reads as an empty policy) is not "not found"."""
    try:
        info = path.stat()
    except FileNotFoundError:
        names = ", ".join(sorted(packaged_policies())) or "none installed"
        raise EffideployError(f"policy file {path} not found (packaged policies: {names})") from None
    except OSError as exc:
        raise EffideployError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise EffideployError(f"policy file {path} is a folder, not a TOML file")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a pipe" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else
                "not a regular file")
        raise EffideployError(f"policy file {path} is {kind}, not a TOML file")
    if info.st_size > MAX_POLICY_BYTES:
        raise EffideployError(f"policy file {path} is {info.st_size} bytes; a policy is a small TOML file "
                              f"(at most {MAX_POLICY_BYTES} bytes)")


def load_policy(path: str | Path) -> Policy:
    """The policy a ``--policy`` value names (see :func:`resolve_policy`), or a one-line ``EffideployError``."""
    path = resolve_policy(path)
    _check_policy_file(path)
    try:
        data = tomllib.loads(read_text(path, what="policy file"))
    except tomllib.TOMLDecodeError as exc:
        raise EffideployError(f"policy file {path} is not valid TOML: {' '.join(str(exc).split())}") from None
    return policy_from_dict(data, str(path))


def policy_from_dict(data: dict, where: str = "policy") -> Policy:
    known = {f.name for f in fields(Policy)} - {"path"}
    unknown = set(data) - known
    if unknown:
        raise EffideployError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected name, require, [thresholds], [serve]")
    require = data.get("require", "all")
    if require not in REQUIRE:
        raise EffideployError(f"{where}: require must be one of {REQUIRE}, got {require!r}")
    raw = data.get("thresholds", {})
    if not isinstance(raw, dict):
        raise EffideployError(f"{where}: [thresholds] must be a table")
    thresholds = {}
    for key, value in raw.items():
        if key not in THRESHOLDS:
            raise EffideployError(f"{where}: unknown threshold {key!r}; known: {', '.join(THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EffideployError(f"{where}: threshold {key} must be a finite number, got {value!r}")
        thresholds[key] = float(value)
    serve = None
    if "serve" in data:
        from effideploy.bench.serve_policy import serve_from_dict

        serve = serve_from_dict(data["serve"], where)
    if not thresholds and serve is None:  # a serving-only policy ([serve] alone) is complete
        raise EffideployError(f"{where}: no thresholds; add a [thresholds] table (see the packaged policy: --policy default)")
    return Policy(name=str(data.get("name", Path(where).stem)), require=require, thresholds=thresholds, path=where,
                  serve=serve)


def evaluate(policy: Policy, comparisons) -> list[Check]:
    """One check per candidate and threshold; ``comparisons`` are the run's ``Comparison`` records."""
    checks = []
    for record in comparisons:
        for name, limit in policy.thresholds.items():
            spec = THRESHOLDS[name]
            value = getattr(record, spec.metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                checks.append(Check(record.candidate, name, limit, None, False, **_noise(record, spec, None, limit)))
                continue
            passed = value <= limit if spec.direction == "max" else value >= limit
            checks.append(Check(record.candidate, name, limit, float(value), passed, **_noise(record, spec, value, limit)))
    return checks


def _noise(record, spec: Threshold, value: float | None, limit: float) -> dict:
    """Check's uncertainty fields (see Check) for a threshold whose metric has a standard error."""
    if spec.stderr is None:
        return {}
    from effideploy.bench.metrics import within_noise

    stderr = getattr(record, spec.stderr, None)
    stderr = None if stderr is None or math.isnan(stderr) else float(stderr)
    scope = getattr(record, "accuracy_scope", None) if spec.metric == "accuracy_drop" else None
    if spec.metric in ("kl_divergence", "top_k_agreement"):
        scope = getattr(record, "fidelity_source", None)  # which artifact and text the value was measured on
    return {"stderr": stderr, "within_noise": within_noise(value, stderr) if spec.difference else None,
            "near_limit": None if value is None else within_noise(value - limit, stderr), "scope": scope}


def candidates_passed(checks: list[Check]) -> dict[str, bool]:
    verdict: dict[str, bool] = {}
    for check in checks:
        verdict[check.candidate] = verdict.get(check.candidate, True) and check.passed
    return verdict


def passed(policy: Policy, checks: list[Check]) -> bool:
    verdict = candidates_passed(checks)
    if not verdict:
        return False
    return all(verdict.values()) if policy.require == "all" else any(verdict.values())


def sign_off(policy: Policy, comparisons) -> dict:
    """The report's ``policy`` section: every check, each candidate's verdict and the overall one."""
    checks = evaluate(policy, comparisons)
    return {**policy.to_dict(), "checks": [c.to_dict() for c in checks], "candidates": candidates_passed(checks),
            "passed": passed(policy, checks)}
