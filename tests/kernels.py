"""Skips for tests that need a kernel the installed vLLM may lack on this machine (W4A16 on AVX2, an fp8 KV cache
without AVX-512): asked of vLLM itself (``effideploy.runtimes.vllm_kernels.probe``), so the tests run wherever the
kernel exists and skip with the reason where it does not; the reason starts with "kernel unavailable on this
machine", which CI's skip rule (tests/conftest.py) accepts as a fact of the machine, not a broken install."""

from __future__ import annotations

import pytest


def require_vllm_kernel(*, scheme: str | None = None, kv_cache_dtype: str | None = None) -> None:
    pytest.importorskip("vllm")
    from effideploy.runtimes.vllm_kernels import probe

    reason = probe().missing(scheme=scheme, kv_cache_dtype=kv_cache_dtype)
    if reason:
        pytest.skip(reason)
