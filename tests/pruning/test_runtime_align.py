"""``prune --runtime R --quantize Q``: kept FFN widths aligned to what the runtime's scheme stores on its fast path
(``WeightScheme.ffn_multiple``), so llama.cpp's q8_0 export keeps no down projection in F16."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import assert_one_line_error, run_cli


def prune(tiny_model_dir, calib_file, out, *extra):
    code, stdout, err = run_cli("prune", "--model", tiny_model_dir, "--sparsity", "0.4", "--calib", calib_file,
                                "--calib-samples", "4", "--calib-seqlen", "32", "--output", out, *extra)
    assert code == 0, err
    return [block["kept_width"] for block in json.loads((out / "effideploy.json").read_text())["blocks"]]


def test_widths_follow_the_runtimes_scheme(tiny_model_dir, calib_file, tmp_path):
    from effideploy.exporters.llamacpp.schemes import DECLARATION as GGUF
    from effideploy.exporters.onnx.schemes import DECLARATION as ONNX

    assert GGUF.resolve("q8_0").ffn_multiple == 32 and GGUF.resolve("q4_k_m").ffn_multiple == 256
    assert GGUF.resolve("f16").ffn_multiple == 32 and ONNX.resolve("int4").ffn_multiple == 32
    assert GGUF.float.ffn_multiple == 32 and ONNX.float.ffn_multiple == 1  # f16 GGUFs want 32 too; ONNX fp32 any width
    free = prune(tiny_model_dir, calib_file, tmp_path / "free")
    aligned = prune(tiny_model_dir, calib_file, tmp_path / "q8", "--runtime", "llamacpp", "--quantize", "q8_0")
    assert any(width % 32 for width in free)  # unaligned CFSP widths: the case alignment exists for
    assert all(width % 32 == 0 for width in aligned)
    assert abs(sum(aligned) - sum(free)) <= 32 * len(free)  # the same budget, rounded
    # --align combines with the scheme's multiple (lcm), and the float scheme adds nothing
    both = prune(tiny_model_dir, calib_file, tmp_path / "both", "--runtime", "onnx", "--quantize", "int4",
                 "--align", "64")
    assert all(width % 64 == 0 for width in both)


@pytest.mark.parametrize("extra, fragment", [
    (["--quantize", "q8_0"], "--quantize needs --runtime"),
    (["--runtime", "llamacpp", "--quantize", "q3"], "unknown scheme 'q3'"),
    (["--runtime", "llamacpp", "--quantize", "q4_k_m"], "not smaller than the narrowest FFN width 256"),
])
def test_bad_runtime_alignment_is_refused_in_one_line(tiny_model_dir, calib_file, tmp_path, extra, fragment):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "4",
                           "--calib-seqlen", "32", "--output", tmp_path / "out", *extra)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.llamacpp
def test_aligned_checkpoint_exports_to_q8_0_without_f16_fallback(tiny_model_dir, calib_file, tmp_path):
    from effideploy.exporters.llamacpp.export import export_llamacpp
    from effideploy.runtimes.llamacpp import llamacpp_unavailable

    if llamacpp_unavailable():
        pytest.skip(f"llama-cpp-python not installed: {llamacpp_unavailable()}")
    prune(tiny_model_dir, calib_file, tmp_path / "q8", "--runtime", "llamacpp", "--quantize", "q8_0")
    result = export_llamacpp(tmp_path / "q8", tmp_path / "gguf", quantize="q8_0")
    types = result.manifest["tensor_types"]
    assert types.get("fallback", {}) == {} and "f16" not in types["counts"], types
