"""The one reader of effideploy_export.json."""

import pytest

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import MANIFEST_FILE, read_export_manifest


def test_a_folder_without_a_manifest_is_not_an_export(tmp_path):
    assert read_export_manifest(tmp_path) is None
    assert read_export_manifest(tmp_path / "missing") is None


def test_a_manifest_is_read_as_a_dict(tmp_path):
    (tmp_path / MANIFEST_FILE).write_text('{"runtime": "onnx", "source": {"path": "/x"}}')
    assert read_export_manifest(tmp_path) == {"runtime": "onnx", "source": {"path": "/x"}}


@pytest.mark.parametrize("text, fragment", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold an object")])
def test_a_broken_manifest_is_a_one_line_error(tmp_path, text, fragment):
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(EffideployError, match=fragment) as error:
        read_export_manifest(tmp_path)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------- typed records (issue 21)

def _onnx_parity(quantized: bool):
    from effideploy.exporters.onnx.records import OnnxParity, OnnxQuantizedParity, OnnxVsFloat

    inner = OnnxQuantizedParity(
        prompts=2, prompt_tokens=[32, 20], new_tokens=16, reference="fake-quant", logits_max_abs_diff=0.15,
        logits_tolerance=0.48, top1_agreement=0.96, top1_agreement_decided=1.0, decided_positions=40, positions=52,
        top1_required=0.95, vs_float=OnnxVsFloat(reference="float32", logits_max_abs_diff=0.9, top1_agreement=0.8,
                                                 fake_quant_logits_max_abs_diff=0.85, token_agreement=0.75,
                                                 first_mismatch=(0, 3, 7, 9)),
        exact_max_abs_diff=2.5e-4, exact_tolerance=4.5e-3)
    return OnnxParity(prompts=2, prompt_tokens=[32, 20], new_tokens=16, reference="transformers", dtype="float32",
                      logits_max_abs_diff=7.6e-5, logits_tolerance=1e-3, tokens_match=True,
                      quantized=inner if quantized else None)


def test_a_parity_record_round_trips_through_the_manifest_typed(tmp_path):
    """The manifest holds to_dict(); read_export_parity gives the exporter's record back, nested parts typed, and
    the JSON keys are the ones the manifest always had (what reports and scripts read)."""
    import json

    from effideploy.exporters.manifest import read_export_parity
    from effideploy.exporters.onnx.records import OnnxQuantizedParity, OnnxVsFloat

    record = _onnx_parity(quantized=True)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"runtime": "onnx", "parity": record.to_dict()}))
    stored = json.loads((tmp_path / MANIFEST_FILE).read_text())["parity"]
    assert stored["tokens_match"] is True and stored["quantized"]["vs_float"]["first_mismatch"] == [0, 3, 7, 9]
    back = read_export_parity(tmp_path)
    assert isinstance(back.quantized, OnnxQuantizedParity) and isinstance(back.quantized.vs_float, OnnxVsFloat)
    assert back.to_dict() == stored and back.quantized.vs_float.token_agreement == 0.75
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"runtime": "onnx", "parity": None}))  # --no-verify
    assert read_export_parity(tmp_path) is None
    assert "quantized" not in _onnx_parity(quantized=False).to_dict()  # None is left out, as before


def test_a_vllm_manifest_reads_back_the_record_of_the_check_that_ran(tmp_path):
    import json

    from effideploy.exporters.manifest import read_export_parity
    from effideploy.exporters.vllm.records import KvCacheCheck, VllmParity, VllmQuantizedParity, VsUnquantized

    plain = VllmParity(prompts=3, prompt_tokens=[32] * 3, new_tokens=16, reference="transformers", text="wiki",
                       dtype="float32", match=True, tensor_parallel_size_checked=1,
                       kv_cache=KvCacheCheck(kv_cache_dtype="fp8", identical=False, matching_prefix_tokens=[16, 4, 9]))
    quantized = VllmQuantizedParity(
        prompts=3, prompt_tokens=[32] * 3, new_tokens=16, reference="fake-quant", text="wiki", dtype="float32",
        positions=141, decided_positions=120, top1_agreement_all_positions=0.97, top1_agreement=0.99,
        top1_tolerance=0.95, max_abs_logprob_diff=0.04, criterion="top-1", match=True,
        vs_unquantized=VsUnquantized(top1_agreement=0.9, max_abs_logit_diff=1.2, max_abs_logprob_diff=0.3),
        tensor_parallel_size_checked=1)
    for record, quantize in ((plain, None), (quantized, {"scheme": "w8a8"})):
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({"runtime": "vllm", "quantize": quantize,
                                                          "parity": record.to_dict()}))
        assert read_export_parity(tmp_path) == record
    assert plain.summary() == "greedy tokens identical over 3 prompts x 16 tokens"
    assert quantized.summary() == ("teacher-forced top-1 99.0% vs the fake-quant reference (tolerance >= 95%) over 141 "
                                   "positions, max |log-prob diff| 0.04; vs unquantized: top-1 90.0%, max |logit diff| 1.2")


def test_each_parity_record_says_its_own_summary():
    """What `effideploy export` prints, from the record itself (no guessing the exporter from dict keys)."""
    from effideploy.exporters.llamacpp.records import GgufTypeCheck, GgufVsFloat32, LlamacppParity

    assert _onnx_parity(quantized=False).summary() == (
        "greedy tokens identical over 2 prompts x 16 tokens, logits within 7.6e-05 (tolerance 0.001)")
    assert _onnx_parity(quantized=True).summary().endswith(
        "; quantized graph vs fake-quant: with float activations within 0.00025 (tolerance 0.0045), as shipped "
        "within 0.15 (usual bound 0.48), top-1 96%; vs float32: top-1 80%, greedy tokens 75%")
    gguf = LlamacppParity(prompts=3, prompt_tokens=[32] * 3, new_tokens=16, reference="transformers", text="wiki",
                          match=True, checked="float32 GGUF",
                          gguf_type_check=GgufTypeCheck(type="q8_0", tokens_identical_to_transformers=False,
                                                        matching_prefix_tokens=[16, 5, 16],
                                                        vs_float32_gguf=GgufVsFloat32(positions=141, top1_agreement=0.93,
                                                                                      max_abs_logit_diff=0.31,
                                                                                      mean_abs_logit_diff=0.02,
                                                                                      sequences="teacher-forced")))
    assert gguf.summary() == ("greedy tokens identical over 3 prompts x 16 tokens (float32 GGUF); q8_0: greedy tokens "
                              "agree for the first [16, 5, 16] tokens, teacher-forced top-1 93.0% vs the float32 GGUF, "
                              "max |logit diff| 0.31")


def test_export_options_are_the_exporters_parameters():
    """An option an exporter does not take is refused by name before any work (the bench passes option dicts as
    keywords); the options object and the keywords are one call."""
    from effideploy.errors import OptionError
    from effideploy.exporters import EXPORT_OPTIONS
    from effideploy.exporters.llamacpp.export import export_llamacpp
    from effideploy.exporters.vllm.records import VllmExportOptions

    with pytest.raises(OptionError) as error:
        export_llamacpp("/nonexistent", "/nonexistent-out", group_size=32)
    assert error.value.as_flag() == "--group-size does not apply to --runtime llamacpp"
    options = VllmExportOptions.of(VllmExportOptions(quantize="w8a8"), {"group_size": 64})
    assert (options.quantize, options.group_size, options.tensor_parallel_size) == ("w8a8", 64, 1)
    for runtime in EXPORT_OPTIONS.names():
        assert EXPORT_OPTIONS.get(runtime).runtime == runtime
