"""Writing a checkpoint shard by shard, so a pruned model is never held whole in memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from effideploy.checkpoint.config import REMOTE_FILES
from effideploy.io import write_json

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
# JSON files whose auto_map could point at remote code
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")
PROVENANCE_FILE = "effideploy.json"
PROVENANCE_FORMAT = 1


class ShardWriter:
    def __init__(self, folder: Path, n_shards: int) -> None:
        self.folder = Path(folder)
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._count = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self._count += 1
        if self._count > self.n_shards:
            raise RuntimeError(f"more shards than the {self.n_shards} announced")
        name = f"model-{self._count:05d}-of-{self.n_shards:05d}.safetensors"
        save_file({key: value.contiguous() for key, value in tensors.items()}, self.folder / name, metadata={"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def finish(self) -> None:
        if self._count != self.n_shards:
            raise RuntimeError(f"wrote {self._count} shards of {self.n_shards}")
        write_json(self.folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map})


def copy_files(source: Path, target: Path, names) -> list[str]:
    """Copy those of ``names`` that exist in ``source``; returns the ones copied."""
    copied = []
    from effideploy.safe_files import copy_json_without_foreign_code

    for name in names:
        if (source / name).is_file():
            if name in AUTO_MAP_FILES:  # remote code effideploy does not ship is never carried over
                copy_json_without_foreign_code(source / name, target / name)
            else:
                shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def copy_tokenizer(source: Path, target: Path) -> list[str]:
    return copy_files(source, target, TOKENIZER_FILES)


def copy_remote_code(target: Path) -> None:
    remote = Path(__file__).resolve().parent / "remote"
    for name in REMOTE_FILES:
        shutil.copy2(remote / name, target / name)


def read_provenance(folder: str | Path) -> dict | None:
    path = Path(folder) / PROVENANCE_FILE
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(path, what="provenance file")


def folder_size(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
