"""Spec strings, the export config section, and the per-runtime refusals."""

import pytest

from effideploy.compression import METHODS, CompressionSpec, parse_spec, validate_for_runtime, vllm_kv_cache_dtype
from effideploy.errors import EffideployError


@pytest.mark.parametrize("text, method, budget, options", [
    ("snapkv:0.2", "snapkv", 0.2, {}),
    ("StreamingLLM:0.4,sinks=2", "streamingllm", 0.4, {"sinks": 2}),
    ("fastv:k=2,r=0.5", "fastv", 0.5, {"k": 2}),
    ("pyramidkv:budget=0.1,beta=10,pool=max", "pyramidkv", 0.1, {"beta": 10, "pool": "max"}),
    ("prumerge+:0.25", "prumerge+", 0.25, {}),
    ("kv-dtype:fp8", "kv-dtype", 1.0, {"dtype": "fp8"}),
])
def test_parse_and_round_trip(text, method, budget, options):
    spec = parse_spec(text)
    assert (spec.method, spec.budget, dict(spec.options)) == (method, budget, options)
    assert parse_spec(str(spec)) == spec
    assert CompressionSpec.from_config(spec.to_config()) == spec
    hash(spec)  # frozen


def test_a_bare_method_and_budget_section_is_read():
    assert CompressionSpec.from_config({"method": "snapkv", "budget": 0.2}) == parse_spec("snapkv:0.2")
    assert CompressionSpec.from_config({"method": "kv-dtype", "budget": 1.0, "options": {"dtype": "fp8"}}) == \
        parse_spec("kv-dtype:fp8")


def test_every_registered_method_parses():
    for name in METHODS.names():
        spec = parse_spec(f"{name}:fp8" if name == "kv-dtype" else f"{name}:0.5")
        assert spec.method == name
        assert (spec.budget, dict(spec.options)) == ((1.0, {"dtype": "fp8"}) if name == "kv-dtype" else (0.5, {}))
        assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("text, message", [
    ("foo:0.2", "unknown token compression method 'foo'; choose one of: streamingllm"),
    ("snapkv:1.5", "outside \\(0, 1\\]"),
    ("snapkv:0", "outside \\(0, 1\\]"),
    ("snapkv:-0.1", "outside \\(0, 1\\]"),
    ("snapkv", "give a budget"),
    ("snapkv:abc", "is not a number"),
    ("h2o:0.2,sinks=3", "unknown option 'sinks' for h2o"),
    ("snapkv:0.2,kernel=4", "must be odd"),
    ("snapkv:0.2,pool=mean", "choose one of: avg, max, none"),
    ("fastv:k=0,r=0.5", "k must be >= 1"),
    ("pyramidkv:0.2,beta=0", "beta must be >= 1"),
    ("kv-dtype:int4", "choose one of: fp8"),
    ("streamingllm:0.2,window=0", "window=0 must be in"),
])
def test_bad_specs_give_one_line_errors(text, message):
    with pytest.raises(EffideployError, match=message) as info:
        parse_spec(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["snapkv:0.2", "streamingllm:0.4", "fastv:k=2,r=0.5", "visionzip:0.25", "random:0.1"])
def test_vllm_refuses_everything_but_kv_dtype(text):
    with pytest.raises(EffideployError, match="not available on vLLM.*kv-dtype:fp8"):
        validate_for_runtime(text, "vllm")


def test_vllm_accepts_kv_dtype():
    assert validate_for_runtime("kv-dtype:fp8", "vllm") == parse_spec("kv-dtype:fp8")
    assert vllm_kv_cache_dtype("kv-dtype:fp8_e5m2") == "fp8_e5m2"


def test_torch_accepts_everything_and_unknown_runtimes_are_refused():
    for name in METHODS.names():
        validate_for_runtime(f"{name}:fp8" if name == "kv-dtype" else f"{name}:0.5", "torch")
    with pytest.raises(EffideployError, match="unknown runtime 'tensorrt'"):
        validate_for_runtime("snapkv:0.2", "tensorrt")
