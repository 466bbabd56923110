"""Integration: a CFSP-pruned SmolLM2 as a q4_k_m GGUF (llama.cpp's ``deci`` architecture), its float32 GGUF
token-identical to transformers, the tokenizer llama.cpp's own (copied from the embedded GGUF), and scores through
the adapter."""

import pytest

from effideploy.runtimes.llamacpp import llamacpp_unavailable

pytestmark = [pytest.mark.smollm2, pytest.mark.llamacpp,
              pytest.mark.skipif(llamacpp_unavailable() is not None, reason=str(llamacpp_unavailable()))]


@pytest.fixture(scope="module")
def pruned_smollm2(pruned_smollm2_4x128):
    return pruned_smollm2_4x128[0]  # CFSP 50% from 4 x 128 calibration tokens (tests/conftest.py), shared with recovery


def test_pruned_smollm2_q4_k_m_gguf(pruned_smollm2, tmp_path):
    import math

    from effideploy.exporters.llamacpp.export import export_llamacpp
    from effideploy.exporters.llamacpp.gguf import read_gguf_summary
    from effideploy.models.build import load_tokenizer
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    result = export_llamacpp(pruned_smollm2, tmp_path / "q4", quantize="q4_k_m", realign=True, threads=2)
    manifest = result.manifest
    assert result.parity.match and result.parity.checked == "float32 GGUF"  # 3 prompts x 16 tokens identical
    widths = manifest["ffn_widths"]
    assert all(w % 256 == 0 or w < 256 for w in widths) and len(set(widths)) > 1
    summary = read_gguf_summary(result.output / "model-q4_k_m.gguf")
    assert summary["architecture"] == "deci" and summary["feed_forward_length"] == widths
    assert summary["head_count"] == [9] * 30 and summary["head_count_kv"] == [3] * 30
    # hidden 576 is no multiple of 256: q/k/v/o/gate/up fall back; every realigned ffn_down keeps a k-quant
    fallback = manifest["tensor_types"]["fallback"]
    assert "blk.0.attn_q.weight" in fallback and "blk.0.ffn_gate.weight" in fallback
    assert manifest["tensor_types"]["k_quant_tensors"] == sum(w % 256 == 0 for w in widths)
    assert manifest["tokenizer"]["pre"] == "smollm" and "embedded" in manifest["tokenizer"]["source"]
    quantized = result.parity.gguf_type_check.vs_float32_gguf
    # lossy by design: 0.65 (evidence checkpoint) and 0.44 (this 4 x 128-token prune) measured with every ffn_down
    # 4-bit after --realign; a layout defect would agree at chance (~0 over 49152 tokens)
    assert quantized.top1_agreement > 0.25
    tokenizer = load_tokenizer(pruned_smollm2)
    text = "Robert Boulter is an English film , television and theatre actor ."
    with LlamaCppRuntime(result.output, threads=2, n_ctx=128) as runtime:
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(runtime.model)
        buffer = (llama_cpp.llama_token * 64)()
        count = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buffer, 64, False, False)
        assert list(buffer[:count]) == tokenizer(text).input_ids  # llama.cpp's tokenizer = transformers'
        ids = tokenizer(text).input_ids
        scores = runtime.score_windows([ids])[0]
    # no closeness to the source checkpoint is asserted: --realign itself (channels dropped without compensation)
    # moves this sentence's mean NLL from 4.6 to 11.6 on the evidence checkpoint (docs/llamacpp.md)
    assert math.isfinite(float(scores.nll.mean())) and len(scores.nll) == len(ids) - 1
