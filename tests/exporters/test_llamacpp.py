"""The GGUF export: llama.cpp reads the per-layer widths back and generates transformers' greedy tokens (float32);
quantized exports load and generate; the serve command answers over HTTP; bad options are refused.

Tests marked ``llamacpp`` need llama-cpp-python (built from source by scripts/setup.sh) and skip with the reason
when it is unavailable; the refusals and the GGUF layout checks run everywhere.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from effideploy.errors import EffideployError
import effideploy.exporters.llamacpp.export as gguf_export
from effideploy.exporters.llamacpp.export import MANIFEST_FILE, export_llamacpp
from effideploy.exporters.llamacpp.gguf import permute_rope, read_gguf_summary
from effideploy.runtimes.llamacpp import llamacpp_unavailable
from tests.exporters.test_vllm import TINY_PRUNED_WIDTHS, write_tiny_pruned

needs_llamacpp = pytest.mark.skipif(llamacpp_unavailable() is not None, reason=str(llamacpp_unavailable()))
pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def tiny_pruned_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_pruned(tmp_path_factory.mktemp("tiny-pruned"), tiny_tokenizer)


@pytest.fixture(scope="module")
def pruned_f32(tmp_path_factory, tiny_pruned_dir):
    """The tiny pruned checkpoint as a float32 GGUF, parity-checked against transformers when llama.cpp is here."""
    return export_llamacpp(tiny_pruned_dir, tmp_path_factory.mktemp("gguf") / "pruned-f32", quantize="f32")


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


# ------------------------------------------------------------------------------------------------ layout (anywhere)

def test_pruned_checkpoint_is_deci_with_per_layer_arrays(pruned_f32):
    summary = read_gguf_summary(pruned_f32.output / "model-f32.gguf")
    assert summary["architecture"] == "deci"
    assert summary["feed_forward_length"] == TINY_PRUNED_WIDTHS
    assert summary["head_count"] == [2] * 4 and summary["head_count_kv"] == [1] * 4
    assert summary["tensor_types"] == {"f32": 2 + 9 * 4}  # tied output: no output.weight
    record = manifest(pruned_f32.output)
    assert record["architecture"] == "deci" and record["gguf_type"] == "f32"
    assert record["ffn_widths"] == TINY_PRUNED_WIDTHS
    assert record["provenance"]["method"] == "random"


def test_dense_checkpoint_is_plain_llama(tiny_model_dir, tmp_path):
    result = export_llamacpp(tiny_model_dir, tmp_path / "dense", quantize="f32", verify=False)
    summary = read_gguf_summary(result.output / "model-f32.gguf")
    assert summary["architecture"] == "llama"
    assert summary["feed_forward_length"] == 256 and summary["head_count"] == 2 and summary["head_count_kv"] == 1
    assert result.manifest["tokenizer"]["model"] == "gpt2"
    assert result.manifest["tokenizer"]["special"] == {"bos": 1, "eos": 2, "pad": 0}


def test_rope_permutation_interleaves_each_heads_halves():
    # HF rotate-half order per head [x0..x3 | y0..y3] -> llama.cpp pairs [x0 y0 x1 y1 ...]
    rows = torch.arange(16.0)[:, None]
    permuted = permute_rope(rows, heads=2)[:, 0].tolist()
    assert permuted[:8] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permuted[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


# ---------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("options, message", [
    ({"quantize": "q4_z"}, "not a GGUF type"),
    ({"quantize": "f16", "realign": True}, "--realign applies to k-quants"),
    ({"quantize": "f32", "token_compression": "snapkv:0.2"}, "not available on llama.cpp"),
    ({"quantize": "q8_0", "dtype": "float16"}, "not both"),
])
def test_bad_options_are_refused_and_nothing_is_written(tiny_pruned_dir, tmp_path, options, message):
    with pytest.raises(EffideployError, match=message):
        export_llamacpp(tiny_pruned_dir, tmp_path / "out", verify=False, **options)
    assert not (tmp_path / "out").exists()


def test_unavailable_runtime_is_a_one_line_reason(tiny_pruned_dir, tmp_path, monkeypatch):
    import effideploy.runtimes.llamacpp as runtime_module

    reason = "llama-cpp-python is not installed (No module named 'llama_cpp'); scripts/setup.sh builds it"
    monkeypatch.setattr(runtime_module, "llamacpp_unavailable", lambda: reason)
    with pytest.raises(EffideployError, match="quantizer, but the llamacpp runtime is unavailable: llama-cpp-python is not"):
        export_llamacpp(tiny_pruned_dir, tmp_path / "q8", quantize="q8_0")
    with pytest.raises(EffideployError, match="parity check needs llama-cpp-python"):
        export_llamacpp(tiny_pruned_dir, tmp_path / "f32", quantize="f32", verify=True)
    with pytest.raises(EffideployError, match="the llamacpp runtime is unavailable: llama-cpp-python is not installed"):
        runtime_module.LlamaCppRuntime(tmp_path)
    # a float32 GGUF needs no llama.cpp: written, parity skipped
    result = export_llamacpp(tiny_pruned_dir, tmp_path / "f32", quantize="f32")
    assert result.parity is None and (tmp_path / "f32" / "model-f32.gguf").is_file()


def test_cli_refuses_unknown_type_with_one_line(tiny_pruned_dir, tmp_path):
    process = subprocess.run([sys.executable, "-m", "effideploy", "export", str(tiny_pruned_dir), "--runtime",
                              "llamacpp", "--quantize", "q4_z", "--output", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert process.returncode == 2
    assert process.stderr.strip().startswith("error:") and "not a GGUF type" in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_options_of_other_runtimes(tiny_pruned_dir, tmp_path):
    process = subprocess.run([sys.executable, "-m", "effideploy", "export", str(tiny_pruned_dir), "--runtime",
                              "llamacpp", "--group-size", "64", "--output", str(tmp_path / "out")],
                             capture_output=True, text=True)
    assert process.returncode == 2 and "--group-size does not apply to --runtime llamacpp" in process.stderr


# --------------------------------------------------------------------------------------------- llama.cpp (needs it)

@needs_llamacpp
def test_float32_gguf_round_trip_matches_transformers(pruned_f32, tiny_pruned_dir):
    """llama.cpp loads the deci GGUF (its loader checks every per-layer tensor shape against the arrays), counts the
    checkpoint's parameters, and generates transformers' greedy tokens (the export's own parity check, redone here)."""
    import llama_cpp

    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.llamacpp import LlamaCppRuntime
    from effideploy.runtimes.pytorch import TorchRuntime

    assert pruned_f32.parity.match is True and pruned_f32.parity.checked == "float32 GGUF"
    model = load_model(resolve_model(str(tiny_pruned_dir)))
    expected_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    prompts = [[5, 17, 33, 101, 7, 250, 9], [300, 12, 44]]
    reference = TorchRuntime(model=model).generate(prompts, 12).tokens
    with LlamaCppRuntime(pruned_f32.output, kv_cache_type="f32", flash_attn="off") as runtime:
        assert llama_cpp.llama_model_n_params(runtime.model) == expected_params
        assert runtime.generate(prompts, 12).tokens == reference



@needs_llamacpp
def test_llamacpp_reads_the_per_layer_widths(tiny_pruned_dir, tmp_path):
    """Arrays that disagree with the tensors (two blocks' widths swapped) make llama.cpp refuse the file: it builds
    every block from the per-layer feed_forward_length, not from the tensors."""
    from effideploy.exporters.llamacpp.gguf import write_gguf
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    source = resolve_model(str(tiny_pruned_dir))
    swapped = [TINY_PRUNED_WIDTHS[1], TINY_PRUNED_WIDTHS[0], *TINY_PRUNED_WIDTHS[2:]]
    path = tmp_path / "swapped.gguf"
    write_gguf(source.path, source.config_dict, path, dtype="float32", name="swapped", widths=swapped)
    with pytest.raises(EffideployError, match="ffn_gate.weight' has wrong shape; expected 128, 201, got 128, 256"):
        LlamaCppRuntime(path)


@needs_llamacpp
@pytest.mark.parametrize("kind, kquant", [("q8_0", False), ("q4_k_m", True), ("f16", False)])
def test_quantized_export_loads_generates_and_reports_types(tiny_pruned_dir, tmp_path, kind, kquant):
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    result = export_llamacpp(tiny_pruned_dir, tmp_path / kind, quantize=kind)
    assert result.files == sorted(result.files[:-1]) + [MANIFEST_FILE] and f"model-{kind}.gguf" in result.files
    assert not (tmp_path / kind / "model-f32.gguf").exists()  # the float32 intermediate is not kept
    record = result.manifest
    counts = record["tensor_types"]["counts"]
    quantized = result.parity.gguf_type_check
    assert 0.0 <= quantized.vs_float32_gguf.top1_agreement <= 1.0
    assert quantized.vs_float32_gguf.positions > 3 * 16
    # the scheme recorded as the other exporters record theirs: an export given to bench is labelled with it
    from effideploy.bench.artifacts import candidate_label
    from effideploy.bench.config import CandidateSpec

    assert record["quantize"] == (None if kind == "f16" else {"scheme": kind})
    pruned = candidate_label(CandidateSpec(model=str(tiny_pruned_dir)), {"dense"})
    assert candidate_label(CandidateSpec(model=str(tmp_path / kind)), {"dense"}) == \
        (pruned if kind == "f16" else f"{pruned}+{kind}")
    if kind == "q8_0":
        # every matrix (embedding included) but the ffn_down of widths 201, 97, 150 (rows not a multiple of 32): F16
        assert record["tensor_types"]["fallback"] == {f"blk.{i}.ffn_down.weight": "f16" for i in (1, 2, 3)}
        assert counts["q8_0"] == 7 * 4 + 1 - 3 and counts["f16"] == 3
        assert quantized.vs_float32_gguf.top1_agreement > 0.9
    if kquant:
        # hidden size 128 and widths 256/201/97/150: no row but the width-256 block's ffn_down is a multiple of 256
        assert record["tensor_types"]["k_quant_tensors"] <= 1
        fallback = record["tensor_types"]["fallback"]
        assert len(fallback) == 7 * 4 + 1 - 1 and not any(t.endswith("_k") for t in fallback.values())
    if kind == "f16":
        assert counts["f16"] == 7 * 4 + 1
        assert quantized.tokens_identical_to_transformers or quantized.teacher_forced_max_logit_gap <= 0.5
    with LlamaCppRuntime(result.output) as runtime:
        out = runtime.generate([[5, 17, 33]], 6)
        assert len(out.tokens[0]) == 6 and len(out.decode_seconds[0]) == 5
    assert shlex.split(result.serve_command)[:4] == ["python", "-m", "llama_cpp.server", "--model"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_llamacpp
def test_serve_command_answers_a_completion_over_http(pruned_f32, tiny_tokenizer):
    """The printed serve command (llama-cpp-python's OpenAI-compatible server) loads the GGUF and completes greedily
    what the adapter generates for the same text."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette_context")
    from effideploy.runtimes.llamacpp import LlamaCppRuntime

    port = _free_port()
    command = shlex.split(pruned_f32.serve_command.replace("--port 8000", f"--port {port}"))
    command[0] = sys.executable
    server = subprocess.Popen(command + ["--n_ctx", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    models = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        assert models["data"]
        prompt = "The history of the city begins"
        body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = answer["choices"][0]["text"]
    assert 1 <= answer["usage"]["completion_tokens"] <= 8
    ids = tiny_tokenizer(prompt).input_ids
    assert answer["usage"]["prompt_tokens"] == len(ids)  # llama.cpp tokenized the text as the HF tokenizer does
    with LlamaCppRuntime(pruned_f32.output) as runtime:
        tokens = runtime.generate([ids], answer["usage"]["completion_tokens"]).tokens[0]
    # the random model emits partial UTF-8 sequences: the server drops them, transformers decodes them as U+FFFD
    assert text == tiny_tokenizer.decode(tokens).replace("\ufffd", "")


@needs_llamacpp
def test_realign_rounds_ffn_widths_to_256_for_k_quants(tiny_tokenizer, tmp_path):
    """Widths 600/300/512/200 -> 512/256/512/200: ffn_down of the realigned blocks keeps q4_K/q6_K, the block narrower
    than 256 keeps its width (fallback), and the float32 GGUF still equals transformers on the narrowed model."""
    from effideploy.checkpoint.writer import copy_remote_code
    from effideploy.pruning import PruneConfig
    from effideploy.pruning.plan import BlockPlan, PrunePlan
    from effideploy.pruning.rewrite import apply_plan
    from tests.conftest import tiny_llama

    widths, full = [600, 300, 512, 200], 640
    model = tiny_llama(intermediate_size=full)
    generator = torch.Generator().manual_seed(1)
    apply_plan(model, PrunePlan(config=PruneConfig(method="uniform"), blocks=[
        BlockPlan(index=i, full_width=full, kept=torch.randperm(full, generator=generator)[:w].sort().values)
        for i, w in enumerate(widths)]))
    source = tmp_path / "pruned"
    model.save_pretrained(source)
    copy_remote_code(source)
    tiny_tokenizer.save_pretrained(source)
    result = export_llamacpp(source, tmp_path / "q4", quantize="q4_k_m", realign=True)
    assert result.manifest["ffn_widths"] == [512, 256, 512, 200]
    assert [(b["index"], b["before"], b["after"]) for b in result.manifest["realign"]["blocks"]] == [(0, 600, 512), (1, 300, 256)]
    assert result.parity.match  # against transformers with the same channels dropped
    types = {name: kind for kind, names in result.manifest["tensor_types"]["tensors"].items() for name in names}
    assert all(types[f"blk.{i}.ffn_down.weight"].endswith("_k") for i in (0, 1, 2))
    assert result.manifest["tensor_types"]["fallback"]["blk.3.ffn_down.weight"] == "f16"  # 200: not a multiple of 32
