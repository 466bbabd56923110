"""The ONNX export: ONNX Runtime reproduces transformers (logits, greedy tokens) for dense and pruned models, the
artifacts are complete, and failures leave nothing behind.

Exporting a tiny model takes 10-20 s (torch.export dominates), so the real exports are made once per session
(``exported``, shared with tests/runtimes/test_onnx.py) and the failure-path tests reuse the dense graph by
standing in for ``export_graph`` with a file copy: everything after the graph (parity, quantization, manifest,
atomic output) still runs for real.
"""

from __future__ import annotations

import json
import re
from collections import Counter
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import read_export_parity
from tests.conftest import tiny_llama

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.onnx

_EXPORTS: dict[str, object] = {}  # kind -> ExportResult, for the whole session (both test modules)


def exported(kind: str, tmp_path_factory, tiny_model_dir: Path, calib_file: Path):
    """A verified export of the tiny model: 'dense', 'pruned' (CFSP at 0.5) or 'attentions' (dense with
    attention outputs); made once per session."""
    if kind not in _EXPORTS:
        from effideploy.exporters.onnx.export import export_onnx

        source = pruned_checkpoint(tmp_path_factory, tiny_model_dir, calib_file) if kind == "pruned" else tiny_model_dir
        output = tmp_path_factory.mktemp("onnx-exports") / kind
        _EXPORTS[kind] = export_onnx(source, output, attention_outputs=kind == "attentions")
    return _EXPORTS[kind]


def pruned_checkpoint(tmp_path_factory, tiny_model_dir: Path, calib_file: Path) -> Path:
    if "pruned-checkpoint" not in _EXPORTS:
        from effideploy.data.text import TextSpec
        from effideploy.models.resolve import resolve_model
        from effideploy.pruning import PruneConfig, prune_checkpoint

        config = PruneConfig(method="cfsp", sparsity=0.5, calib_samples=4, calib_seqlen=64)
        text = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
        target, _ = prune_checkpoint(resolve_model(tiny_model_dir), config,
                                     tmp_path_factory.mktemp("tiny-pruned") / "cfsp50", calibration=text)
        _EXPORTS["pruned-checkpoint"] = target
    return _EXPORTS["pruned-checkpoint"]


@pytest.fixture
def dense_onnx(tmp_path_factory, tiny_model_dir, calib_file):
    return exported("dense", tmp_path_factory, tiny_model_dir, calib_file)


@pytest.fixture
def pruned_onnx(tmp_path_factory, tiny_model_dir, calib_file):
    return exported("pruned", tmp_path_factory, tiny_model_dir, calib_file)


@pytest.fixture
def copied_graph(monkeypatch, dense_onnx):
    """Make export_onnx take the dense tiny graph instead of exporting again (fast failure-path tests)."""
    from effideploy.exporters.onnx import graph as onnx_graph

    def copy_graph(model, path, **_):
        for file in dense_onnx.output.glob("model.onnx*"):
            shutil.copy2(file, Path(path).parent / file.name)
        return {"opset": None, "fusions": {}}

    monkeypatch.setattr(onnx_graph, "export_graph", copy_graph)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "effideploy_export.json").read_text())


def hf_logits(folder: Path, ids: torch.Tensor) -> np.ndarray:
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model

    with torch.no_grad():
        return load_model(resolve_model(folder))(input_ids=ids).logits.numpy()


# ------------------------------------------------------------------------------------------- real exports

def test_dense_export_is_complete_and_matches_transformers(dense_onnx, tiny_model_dir):
    folder = dense_onnx.output
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json", "effideploy_export.json"):
        assert (folder / name).is_file(), name
    record = manifest(folder)
    assert record["runtime"] == "onnx" and record["dtype"] == "float32" and record["quantize"] is None
    assert record["source"]["path"] == str(tiny_model_dir) and record["token_compression"] is None
    parity = read_export_parity(folder)  # the manifest's record, read back typed
    assert parity.tokens_match and parity.logits_max_abs_diff <= 1e-3
    assert record["sizes"]["bytes"] == dense_onnx.size_bytes > record["sizes"]["model_bytes"] > 0
    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert (genai["num_hidden_layers"], genai["num_key_value_heads"], genai["head_size"]) == (4, 1, 64)

    from effideploy.runtimes.onnx import OnnxRuntime

    ids = torch.randint(3, 384, (2, 9), generator=torch.Generator().manual_seed(3))
    with OnnxRuntime(folder) as runtime:
        np.testing.assert_allclose(runtime.logits(ids.tolist()), hf_logits(tiny_model_dir, ids), atol=1e-4, rtol=0)


def test_pruned_export_keeps_each_blocks_width(pruned_onnx, tmp_path_factory, tiny_model_dir, calib_file):
    import onnx

    checkpoint = pruned_checkpoint(tmp_path_factory, tiny_model_dir, calib_file)
    widths = [block["ffn"]["intermediate_size"] for block in json.loads((checkpoint / "config.json").read_text())["block_configs"]]
    assert len(set(widths)) > 1 and max(widths) < 256
    record = manifest(pruned_onnx.output)
    assert record["model"]["ffn_widths"] == widths and record["source"]["pruned"]
    assert record["provenance"]["method"] == "cfsp" and (pruned_onnx.output / "effideploy.json").is_file()
    # The widths are physical: each block's down projection is a [width, hidden] MatMul weight in the graph.
    graph = onnx.load(str(pruned_onnx.details["model_file"]), load_external_data=False).graph
    shapes = [tuple(init.dims) for init in graph.initializer]
    for width in widths:
        assert (width, 128) in shapes
    assert pruned_onnx.details["model_bytes"] < exported("dense", tmp_path_factory, tiny_model_dir, calib_file).details["model_bytes"]

    from effideploy.runtimes.onnx import OnnxRuntime

    ids = torch.randint(3, 384, (1, 17), generator=torch.Generator().manual_seed(4))
    with OnnxRuntime(pruned_onnx.output) as runtime:
        np.testing.assert_allclose(runtime.logits(ids.tolist()), hf_logits(checkpoint, ids), atol=1e-4, rtol=0)


def test_float16_export_runs_and_passes_its_parity_check(tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    result = export_onnx(tiny_model_dir, tmp_path / "fp16", dtype="float16")
    assert result.parity.tokens_match and result.parity.logits_max_abs_diff <= result.parity.logits_tolerance
    with OnnxRuntime(result.output) as runtime:
        assert runtime.dtype == np.float16
    assert result.details["model_bytes"] < 0.6 * exported_model_bytes(tiny_model_dir)


def exported_model_bytes(tiny_model_dir: Path) -> int:
    return sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- failure paths

def test_logits_mismatch_fails_and_keeps_nothing(copied_graph, monkeypatch, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    original = OnnxRuntime.logits
    monkeypatch.setattr(OnnxRuntime, "logits", lambda self, sequences: original(self, sequences) + 0.01)
    with pytest.raises(EffideployError, match=r"logits differ from transformers by 0\.01") as error:
        export_onnx(tiny_model_dir, tmp_path / "out")
    assert "\n" not in str(error.value) and "not kept" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


def test_greedy_mismatch_fails_and_keeps_nothing(copied_graph, monkeypatch, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    original = OnnxRuntime.generate

    def off_by_one(self, prompts, max_new_tokens, **options):
        generation = original(self, prompts, max_new_tokens, **options)
        generation.tokens[1][5] += 1
        return generation

    monkeypatch.setattr(OnnxRuntime, "generate", off_by_one)
    with pytest.raises(EffideployError, match="greedy token 5 of prompt 1"):
        export_onnx(tiny_model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(copied_graph, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(EffideployError, match="already exists; pass --overwrite"):
        export_onnx(tiny_model_dir, target, verify=False)
    with pytest.raises(EffideployError, match="not written by effideploy"):  # only effideploy's folders are replaced
        export_onnx(tiny_model_dir, target, verify=False, overwrite=True)
    (target / "effideploy_export.json").write_text("{}")  # an earlier export
    assert (target / "keep.txt").read_text() == "old"
    result = export_onnx(tiny_model_dir, target, verify=False, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.onnx").is_file() and result.parity is None


def test_output_inside_the_input_is_refused(tmp_path, tiny_model_dir):
    from effideploy.exporters.onnx.export import export_onnx

    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir, source)
    with pytest.raises(EffideployError, match="overlaps the input"):
        export_onnx(source, source / "onnx")
    assert not (source / "onnx").exists()


@pytest.mark.parametrize("options, message", [
    ({"dtype": "bfloat16"}, "ONNX dtype must be one of float32, float16"),
    ({"quantize": "int3"}, "--quantize must be one of int8, int4"),
    ({"quantize": "int8", "dtype": "float16"}, "use --dtype float32 with --quantize int8"),
    ({"opset": 9}, "opset must be an integer from 18 to 23"),
    ({"token_compression": "snapkv"}, "give a budget"),
    ({"token_compression": {"method": "h2o", "budget": -1}}, r"outside \(0, 1\]"),
    ({"token_compression": "snapkv:0.2"}, "export the ONNX graph with attention_outputs=True"),
    ({"token_compression": "fastv:k=2,r=0.5"}, "run it on the torch runtime"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, tiny_model_dir, options, message):
    from effideploy.exporters.onnx.export import export_onnx

    with pytest.raises(EffideployError, match=message):
        export_onnx(tiny_model_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_token_compression_is_recorded(copied_graph, tiny_model_dir, tmp_path):
    from effideploy.exporters.onnx.export import export_onnx

    result = export_onnx(tiny_model_dir, tmp_path / "a", verify=False, token_compression="streamingllm:0.25")
    assert manifest(result.output)["token_compression"] == {"spec": "streamingllm:0.25", "method": "streamingllm",
                                                             "budget": 0.25, "options": {}}
    result = export_onnx(tiny_model_dir, tmp_path / "b", verify=False, token_compression={"method": "random", "budget": 0.5})
    assert manifest(result.output)["token_compression"]["spec"] == "random:0.5"


def test_int8_export_replaces_the_float_graph_and_generates(copied_graph, dense_onnx, tiny_model_dir, tmp_path):
    import onnx

    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.runtimes.onnx import OnnxRuntime

    result = export_onnx(tiny_model_dir, tmp_path / "int8", quantize="int8")
    assert not (result.output / ".float").exists()
    ops = Counter(node.op_type for node in onnx.load(str(result.details["model_file"]), load_external_data=False).graph.node)
    # Every projection of the 4 blocks (qkv, o, gate, up, down) and the tied lm_head (its Transpose of the
    # embedding is stored as a weight of its own); no float MatMul is left.
    assert ops["MatMulNBits"] == 4 * 5 + 1 and ops["MatMul"] == 0
    assert result.details["model_bytes"] < dense_onnx.details["model_bytes"]
    assert manifest(result.output)["quantize"]["bits"] == 8
    int8 = result.parity.quantized.vs_float  # measured, not required
    assert 0 <= int8.token_agreement <= 1 and np.isfinite(int8.logits_max_abs_diff)
    with OnnxRuntime(result.output) as runtime:
        tokens = runtime.generate([[5, 6, 7, 8]], 6).tokens[0]
    assert len(tokens) == 6 and all(0 <= t < 384 for t in tokens)


# ------------------------------------------------------------------------------------------- GenAI

def test_onnxruntime_genai_runs_the_export(dense_onnx, tiny_model_dir):
    og = pytest.importorskip("onnxruntime_genai")
    from effideploy.runtimes.pytorch import TorchRuntime

    prompt = [5, 17, 99, 230, 41, 8, 77]
    expected = TorchRuntime(model=tiny_llama()).generate([prompt], 10).tokens[0]
    model = og.Model(str(dense_onnx.output))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 10)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(prompt):] == expected


# ------------------------------------------------------------------------------------------- CLI

def test_cli_exports_and_prints_path_size_and_parity(copied_graph, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from effideploy.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--runtime", "onnx", "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    printed = "".join(result.output.split())  # rich wraps long lines
    assert str(tmp_path / "cli") in printed and re.search(r"files,\d+\.\d(MiB|KiB);parity", printed)
    assert "greedytokensidenticalover2promptsx16tokens,logitswithin" in printed
    assert manifest(tmp_path / "cli")["runtime"] == "onnx"


@pytest.mark.parametrize("args, message", [
    (["--runtime", "tflite"], "unknown runtime 'tflite'; choose one of: onnx, vllm, llamacpp"),
    (["--runtime", "onnx", "--tensor-parallel-size", "2"], "--tensor-parallel-size does not apply to --runtime onnx"),
    (["--runtime", "vllm", "--block-size", "32", "--attention-outputs"], "--block-size, --attention-outputs do not apply to --runtime vllm"),
    (["--runtime", "onnx", "--group-size", "32"], "--group-size does not apply to --runtime onnx"),
])
def test_cli_refuses_bad_runtime_options(tmp_path, tiny_model_dir, args, message):
    from typer.testing import CliRunner

    from effideploy.cli import app

    result = CliRunner().invoke(app, ["export", str(tiny_model_dir), *args, "--output", str(tmp_path / "out")])
    assert isinstance(result.exception, EffideployError) and str(result.exception) == message
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_folder_that_is_not_a_checkpoint_in_one_line(tmp_path):
    from tests.test_cli import assert_one_line_error, run_cli

    (tmp_path / "notes").mkdir()
    code, _, err = run_cli("export", tmp_path / "notes", "--runtime", "onnx", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "is not a model folder: config.json is missing")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.smollm2
def test_pruned_smollm2_exports_with_identical_greedy_tokens(tmp_path, pruned_smollm2_8x256):
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.models.build import load_tokenizer
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.onnx import OnnxRuntime
    from effideploy.runtimes.pytorch import TorchRuntime

    checkpoint, _ = pruned_smollm2_8x256  # CFSP 50%, 8 x 256 calibration tokens (tests/conftest.py)
    result = export_onnx(checkpoint, tmp_path / "onnx")
    assert result.parity.tokens_match
    source = resolve_model(checkpoint)
    prompt = load_tokenizer(checkpoint)("Robert Boulter is an English film , television and theatre actor .").input_ids
    expected = TorchRuntime(model=load_model(source)).generate([prompt], 16).tokens
    with OnnxRuntime(result.output, threads=2) as runtime:
        assert runtime.generate([prompt], 16).tokens == expected
