"""Device selection, compute dtype and the calibration memory plan (CPU: no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from effideploy import device as device_module
from effideploy.device import compute_dtype, host_available_bytes, resolve_device
from effideploy.errors import EffideployError, OptionError
from effideploy.memory_plan import CUDA_HOST_EXTRA, DEVICE_BASELINE, DEVICE_HEADROOM, HOST_BASELINE, Shapes, plan_calibration
from tests.test_cli import assert_one_line_error, run_cli

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "torch_dtype": "bfloat16"}


def test_auto_is_the_cpu_without_cuda_and_cuda_0_with_it(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(device_module, "cuda_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_missing_cuda_devices_and_bad_names_are_refused(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_count", lambda: 0)
    with pytest.raises(OptionError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(device_module, "cuda_count", lambda: 2)
    with pytest.raises(OptionError, match=r"sees 2 CUDA device\(s\) \(0..1\)"):
        resolve_device("cuda:2")
    for bad in ("gpu", "cuda:x", "cpu:1", "auto:0", ""):
        with pytest.raises(OptionError):
            resolve_device(bad)


def test_compute_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    assert compute_dtype(torch.device("cpu")) == "float32"
    assert compute_dtype(torch.device("cuda", 0)) == "bfloat16"
    assert compute_dtype(torch.device("cuda", 0), "float32") == "float32"
    assert compute_dtype(torch.device("cpu"), "bfloat16") == "bfloat16"
    with pytest.raises(OptionError, match="calib_dtype must be one of"):
        compute_dtype(torch.device("cpu"), "float16")


def test_prune_config_validates_device_and_memory_options():
    from effideploy.pruning import PruneConfig

    assert PruneConfig().device == "auto" and PruneConfig().calib_dtype == "auto"
    with pytest.raises(OptionError, match="device must be auto, cpu, cuda or cuda:N"):
        PruneConfig(device="tpu")
    with pytest.raises(OptionError) as info:
        PruneConfig(max_memory_gb=0)
    assert info.value.as_flag().startswith("--max-memory must be a positive number")


def test_host_available_bytes_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n")
    assert host_available_bytes(str(meminfo)) == 20_000_000 * 1024
    assert host_available_bytes(str(tmp_path / "missing")) is None
    assert host_available_bytes() > 0  # this machine's


def test_block_parameters_match_a_real_decoder_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=500)
    layer = LlamaDecoderLayer(config, 0)
    shapes = Shapes.from_config(config.to_dict())
    assert shapes.block_parameters == sum(p.numel() for p in layer.parameters())
    assert (shapes.head_dim, shapes.kv_heads, shapes.stored_bytes) == (32, 2, 4)


def test_memory_plan_arithmetic_on_llama2_7b_shapes():
    shapes = Shapes.from_config(LLAMA2_7B)
    assert shapes.stored_bytes == 2
    assert shapes.block_parameters == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    plan = plan_calibration(shapes, windows=4, seqlen=128, batch_size=8, gram=False, host_limit=None)
    assert plan.block == 4 * 202_383_360
    assert plan.activations == 4 * 4 * 128 * 4096
    assert plan.statistics == 16 * 11008
    assert plan.read_buffer == 2 * 32000 * 4096  # the embedding table is the largest stored tensor
    tokens = 4 * 128
    assert plan.batch == 4 * tokens * (6 * 4096 + 3 * 4096 + 4 * 11008) + 4 * 4 * 128 * 128 * (2 * 32 + 1)
    calibration = plan.block + plan.read_buffer + plan.activations + plan.batch + plan.statistics
    hf = 4096 * 11008
    assert plan.scoring == 28 * hf + 2 * hf
    assert plan.writing == max(2 * 2 * (2 * 32000 * 4096 + 4096), 3 * 2 * 202_383_360 + 4 * hf)
    assert plan.writing > plan.scoring > calibration  # the write pass sets the peak of a bf16 7B
    assert plan.host_peak == int(HOST_BASELINE + plan.writing)
    assert 1.9e9 < plan.host_peak < 2.1e9  # ~2 GB for a 13.5 GB model
    with_gram = plan_calibration(shapes, windows=4, seqlen=128, batch_size=8, gram=True)
    assert with_gram.statistics - plan.statistics == 20 * 11008 ** 2
    assert with_gram.writing - plan.writing == 24 * (hf + 11008 ** 2)  # the lstsq solve on the host
    assert with_gram.spool_disk == 8 * 11008 ** 2 * 32
    bf16 = plan_calibration(shapes, windows=4, seqlen=128, batch_size=8, gram=False, dtype="bfloat16")
    assert bf16.block == 6 * 202_383_360  # autocast's bf16 copies on top of the float32 weights


def test_pruned_config_plans_its_widest_block():
    config = dict(LLAMA2_7B, block_configs=[{"ffn": {"intermediate_size": w}} for w in (5000, 7000, 3000)])
    assert Shapes.from_config(config).ffn == 7000
    with pytest.raises(EffideployError, match="lacks the shapes"):
        Shapes.from_config({"hidden_size": 64})


def test_host_plan_fits_or_is_refused_in_one_line():
    shapes = Shapes.from_config(LLAMA2_7B)
    fits = plan_calibration(shapes, windows=4, seqlen=128, batch_size=8, gram=False, host_limit=int(8e9))
    assert fits.fits
    fits.check()
    assert "memory plan (cpu, float32 compute): host peak ~1.99 GB of 8.00 GB allowed" in fits.describe()
    big = plan_calibration(shapes, windows=128, seqlen=4096, batch_size=8, gram=False, host_limit=int(8e9))
    assert big.activations == 4 * 128 * 4096 * 4096 and not big.fits
    with pytest.raises(EffideployError) as info:
        big.check()
    message = str(info.value)
    assert "\n" not in message and "of host memory" in message and "8.0 GB is allowed" in message


def test_device_plan_keeps_activations_on_the_device_when_they_fit_and_spills_them_when_not():
    shapes = Shapes.from_config(LLAMA2_7B)
    options = dict(windows=128, seqlen=1024, batch_size=8, gram=True, device="cuda:0", dtype="bfloat16",
                   host_limit=int(100e9))
    roomy = plan_calibration(shapes, device_free=int(80e9), **options)
    fixed = DEVICE_BASELINE + roomy.block + roomy.batch + roomy.statistics
    assert roomy.activations == 4 * 128 * 1024 * 4096  # 2.1 GB
    assert roomy.activations_on_device and roomy.device_peak == int(fixed + roomy.activations)
    tight_free = int((fixed + roomy.activations / 2) / DEVICE_HEADROOM)  # room for half the activations
    tight = plan_calibration(shapes, device_free=tight_free, **options)
    assert not tight.activations_on_device and tight.device_peak == int(fixed) and tight.fits
    host = HOST_BASELINE + CUDA_HOST_EXTRA
    assert roomy.host_peak == int(host + max(roomy.embedding + 2 * roomy.activations, roomy.writing))
    assert roomy.writing == tight.writing == max(2 * 2 * (2 * 32000 * 4096 + 4096), 3 * 2 * 202_383_360
                                                 + 4 * 4096 * 11008) + 8 * 11008 ** 2  # second moments read back
    assert tight.host_peak == int(host + max(tight.embedding + 2 * tight.activations,
                                             tight.read_buffer + tight.activations, tight.writing))
    assert "spilled" in tight.describe()
    small = plan_calibration(shapes, device_free=int(fixed / 2), **options)
    assert not small.fits
    with pytest.raises(EffideployError, match=r"on cuda:0 .* is free; use a smaller --batch-size"):
        small.check()


def test_prune_prints_the_memory_plan(tmp_path, tiny_model_dir, calib_file):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--calib-samples", "4",
                           "--calib-seqlen", "32", "--device", "cpu", "--output", tmp_path / "out")
    assert code == 0, err
    assert "memory plan (cpu, float32 compute): host peak ~" in err
    import json

    record = json.loads((tmp_path / "out" / "effideploy.json").read_text())
    assert record["calibration"]["device"] == "cpu" and record["calibration"]["compute_dtype"] == "float32"


def test_prune_refuses_a_plan_over_max_memory_before_any_work(tmp_path, tiny_model_dir, calib_file):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--max-memory", "0.1", "--calib-seqlen", "32",
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, "but 0.1 GB is allowed (--max-memory")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA device")
def test_prune_on_cuda_without_cuda_is_one_line(tmp_path, tiny_model_dir, calib_file):
    code, _, err = run_cli("prune", "--model", tiny_model_dir, "--calib", calib_file, "--device", "cuda", "--calib-seqlen", "32",
                           "--output", tmp_path / "out")
    assert_one_line_error(code, err, "--device cuda asked for, but torch sees no CUDA device")
    assert not (tmp_path / "out").exists()


def test_onnx_providers_follow_the_device_option():
    from effideploy.device import onnx_providers

    cpu_only = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("auto", cpu_only) is None  # the runtime's default: CUDA when present
    assert onnx_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert onnx_providers("cuda:1", gpu) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(OptionError, match="no CUDAExecutionProvider \\(install onnxruntime-gpu\\)"):
        onnx_providers("cuda", cpu_only)


def test_vllm_device_must_match_its_build():
    from effideploy.device import vllm_check

    vllm_check("auto", "cpu")
    vllm_check("cpu", "cpu")
    vllm_check("cuda", "cuda")
    with pytest.raises(OptionError, match="installed vLLM runs on cpu \\(install the CUDA build"):
        vllm_check("cuda", "cpu")
    with pytest.raises(OptionError, match="CUDA_VISIBLE_DEVICES=1"):
        vllm_check("cuda:1", "cuda")


def test_torch_runtime_puts_model_and_inputs_on_its_device(tiny_model_dir):
    from effideploy.runtimes.pytorch import TorchRuntime

    runtime = TorchRuntime(tiny_model_dir, device="cpu")
    assert runtime.device == torch.device("cpu") and runtime.describe()["device"] == "cpu"
    generation = runtime.generate([[5, 6, 7, 8]], 4)
    assert len(generation.tokens[0]) == 4
    scores = runtime.score_continuations([([5, 6, 7], [8, 9])])[0]
    assert scores.nll.device.type == "cpu" and scores.nll.shape == (2,)


def test_bench_config_checks_the_device():
    from effideploy.bench.config import BenchConfig, CandidateSpec

    with pytest.raises(OptionError, match="device must be"):
        BenchConfig(candidates=(CandidateSpec(model="x"),), device="npu")


def test_calibration_on_an_explicit_cpu_device_with_activations_spilled_matches_the_default(tiny_model_dir):
    """The device path (block moved, activations stored apart from the compute device) gives the same statistics."""
    from effideploy.models.build import build_config
    from effideploy.models.layerwise import LayerwiseModel
    from effideploy.models.resolve import resolve_model
    from effideploy.models.weights import SafetensorsWeights
    from effideploy.pruning.calibration import collect_stats

    source = resolve_model(str(tiny_model_dir))
    model = LayerwiseModel(build_config(source.config_dict), SafetensorsWeights(source.path))
    windows = torch.randint(3, 384, (3, 16), generator=torch.Generator().manual_seed(0))
    reference = collect_stats(model, windows, batch_size=2)
    other = collect_stats(model, windows, batch_size=2, device=torch.device("cpu"), activations_on_device=False)
    for a, b in zip(reference.blocks, other.blocks):
        assert torch.equal(a.act_sq_sum, b.act_sq_sum) and a.angular_sum == b.angular_sum
