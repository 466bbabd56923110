"""The device path on a real CUDA device: skipped where torch sees none (run them on a GPU machine with
``pytest -m gpu``)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_cli import run_cli

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def layerwise(folder):
    from effideploy.models.build import build_config
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights

    source = resolve_model(str(folder))
    return source, LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))


def windows(n=6, length=64, vocab=384):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def test_cuda_calibration_matches_the_cpu_in_float32(tiny_model_dir):
    from effideploy.pruning.calibration import collect_stats

    _, model = layerwise(tiny_model_dir)
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = collect_stats(model, windows(), batch_size=4)
    gpu = collect_stats(model, windows(), batch_size=4, device="cuda", gram=True)
    for a, b in zip(cpu.blocks, gpu.blocks):
        assert b.act_sq_sum.device.type == "cpu" and b.gram_sum.device.type == "cpu"  # statistics come home
        torch.testing.assert_close(b.act_sq_sum, a.act_sq_sum, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.act_sum, a.act_sum, rtol=1e-3, atol=1e-4)
        assert abs(a.angular - b.angular) < 1e-4


def test_spilled_activations_give_the_same_statistics(tiny_model_dir):
    from effideploy.pruning.calibration import collect_stats

    _, model = layerwise(tiny_model_dir)
    kept = collect_stats(model, windows(), batch_size=4, device="cuda", compute_dtype="bfloat16")
    spilled = collect_stats(model, windows(), batch_size=4, device="cuda", compute_dtype="bfloat16",
                            activations_on_device=False)
    for a, b in zip(kept.blocks, spilled.blocks):
        assert torch.equal(a.act_sq_sum, b.act_sq_sum) and a.angular_sum == b.angular_sum


def test_auto_is_cuda_with_bfloat16_and_the_plan_uses_the_free_memory(tiny_model_dir):
    from effideploy.pruning import PruneConfig
    from effideploy.pruning.engine import memory_plan

    source, _ = layerwise(tiny_model_dir)
    device, dtype, plan = memory_plan(PruneConfig(calib_samples=8, calib_seqlen=64), source.config_dict)
    assert device == torch.device("cuda", 0) and dtype == "bfloat16"
    assert 0 < plan.device_free <= torch.cuda.get_device_properties(0).total_memory
    assert plan.activations_on_device and plan.fits


def test_measured_device_peak_is_within_the_plan():
    """A 4-block model of hidden 1024 / FFN 4096: the allocator's peak over the calibration pass stays under the
    plan's device peak (which also counts the CUDA context, outside max_memory_allocated)."""
    from effideploy.memory_plan import Shapes, plan_calibration
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.weights import StateDictWeights
    from effideploy.pruning.calibration import collect_stats
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       num_key_value_heads=4)
    weights = StateDictWeights(model.state_dict())
    shapes = Shapes.from_config(model.config.to_dict())
    plan = plan_calibration(shapes, windows=16, seqlen=256, batch_size=8, gram=True, device="cuda:0",
                            dtype="bfloat16", device_free=torch.cuda.mem_get_info(0)[0])
    torch.cuda.reset_peak_memory_stats()
    collect_stats(LayerwiseModel(model.config, weights), windows(16, 256, 1000), batch_size=8, device="cuda",
                  compute_dtype="bfloat16", gram=True)
    peak = torch.cuda.max_memory_allocated()
    assert peak <= plan.device_peak, (peak, plan)
    print(f"measured device peak {peak / 1e9:.3f} GB, planned {plan.device_peak / 1e9:.3f} GB")


def test_prune_on_cuda_writes_a_checkpoint(tmp_path, tiny_model_dir, calib_file):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "8",
                           "--calib-seqlen", "64", "--device", "cuda", "--output", tmp_path / "out")
    assert code == 0, err
    assert "memory plan (cuda:0, bfloat16 compute)" in err and "on device" in err
    record = json.loads((tmp_path / "out" / "effideploy.json").read_text())
    assert record["calibration"]["device"] == "cuda:0" and record["calibration"]["compute_dtype"] == "bfloat16"
    assert abs(record["sparsity"]["ffn_actual"] - 0.5) < 0.05


def test_torch_runtime_on_cuda_gives_the_cpu_tokens_and_scores(tiny_model_dir):
    from effideploy.runtimes.pytorch import TorchRuntime

    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    cpu, gpu = TorchRuntime(tiny_model_dir, device="cpu"), TorchRuntime(tiny_model_dir, device="cuda")
    assert gpu.device.type == "cuda"
    assert gpu.generate(prompts, 8).tokens == cpu.generate(prompts, 8).tokens
    assert gpu.generate_batch(prompts, 8).tokens == cpu.generate_batch(prompts, 8).tokens
    a = cpu.score_windows([list(range(3, 40))])[0]
    b = gpu.score_windows([list(range(3, 40))])[0]
    torch.testing.assert_close(b.nll, a.nll, rtol=1e-4, atol=1e-4)


def test_recover_trains_on_cuda(tmp_path, tiny_model_dir, calib_file):
    code, _, err = run_cli("recover", tiny_model_dir, "--output", tmp_path / "rec", "--steps", "2", "--batch-size",
                           "2", "--seqlen", "32", "--data", calib_file, "--device", "cuda")
    assert code == 0, err
    record = json.loads((tmp_path / "rec" / "effideploy.json").read_text())
    assert record["recovery"]["training"]["compute_dtype"] == "bfloat16"


def test_onnx_runtime_uses_the_cuda_provider_when_onnxruntime_gpu_is_installed(tmp_path, tiny_model_dir):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (onnxruntime-gpu not installed)")
    from effideploy.exporters import EXPORTERS
    from effideploy.runtimes.onnx import OnnxRuntime

    EXPORTERS.get("onnx")(str(tiny_model_dir), tmp_path / "onnx", verify=False)
    runtime = OnnxRuntime(tmp_path / "onnx", device="cuda")
    assert runtime.device == "cuda" and runtime.describe()["providers"][0] == "CUDAExecutionProvider"


def test_lstsq_solve_on_cuda_matches_the_cpu():
    from effideploy.pruning.compensation import least_squares

    g = torch.Generator().manual_seed(0)
    activations = torch.randn(4000, 300, generator=g)
    gram = activations.T.double() @ activations.double() / 4000
    down = torch.randn(64, 300, generator=g)
    kept = torch.arange(0, 300, 2)
    cpu = least_squares(down, gram, activations.mean(0), kept, 1e-3)
    gpu = least_squares(down, gram, activations.mean(0), kept, 1e-3, device="cuda")
    assert gpu[0].device.type == "cpu"
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-5, atol=1e-6)
