"""Lazy, tensor-at-a-time access to a safetensors checkpoint (one file or a sharded index).

Pruning streams a model block by block through this, so memory holds one decoder block, not the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from effideploy.errors import EffideployError


# safetensors dtype tags -> torch dtypes (the ones checkpoints of this field use).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsWeights:
    """Reads each tensor with a plain ``readinto`` from its file instead of memory-mapping the file: pages of a
    mapping stay resident (and counted against the process) for as long as the mapping is open, so streaming a
    model through an mmap would end up holding all of it. Here memory holds exactly the tensors in use."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.folder / file for file in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise EffideployError(f"{self.folder} holds no .safetensors weights")
        self._entries: dict[str, tuple[Path, int, torch.dtype, list[int], int]] = {}
        for file in files:
            self._entries.update(read_header(file))

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._entries:
            raise EffideployError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        file, offset, stored, shape, nbytes = self._entries[name]
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with open(file, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer.numpy()) != nbytes:
                raise EffideployError(f"{file} is truncated (tensor {name})")
        tensor = buffer.view(stored).reshape(shape)
        return tensor if dtype is None else tensor.to(dtype)

    def dtype(self) -> torch.dtype:
        return self._entries[next(iter(self._entries))][2]

    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in {entry[0] for entry in self._entries.values()})


def read_header(file: Path) -> dict[str, tuple[Path, int, torch.dtype, list[int], int]]:
    """name -> (file, absolute byte offset, dtype, shape, byte length) from a safetensors header."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise EffideployError(f"{file} is not a safetensors file")
        length = int.from_bytes(prefix, "little")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise EffideployError(f"{file} is not a safetensors file (unreadable header)") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise EffideployError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries[name] = (file, 8 + length + start, SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), end - start)
    return entries


class StateDictWeights:
    """The same interface over an in-memory model's state dict (tests, and models already loaded)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._tensors = state_dict

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._tensors:
            raise EffideployError(f"tensor {name} is missing from the model")
        tensor = self._tensors[name].detach()
        return tensor if dtype is None else tensor.to(dtype)

    def dtype(self) -> torch.dtype:
        return next(iter(self._tensors.values())).dtype
