"""Writing a checkpoint shard by shard, so a pruned model is never held whole in memory."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
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


def write_block_shards(folder: Path, outer: dict[str, torch.Tensor], blocks: Iterable[dict[str, torch.Tensor]],
                       n_blocks: int) -> None:
    """The checkpoint layout ``prune`` writes: one shard for the outer tensors (embeddings, final norm, head), then
    one per decoder block (``blocks`` yields them in order, so only one block is in memory), and the index."""
    writer = ShardWriter(folder, n_shards=n_blocks + 1)
    writer.add(outer)
    for tensors in blocks:
        writer.add(tensors)
    writer.finish()


def write_state_dict(folder: Path, state: dict[str, torch.Tensor], names: list[str], n_blocks: int,
                     dtype: torch.dtype) -> None:
    """The tensors ``names`` of a model's ``state`` in ``dtype``, in the layout of ``write_block_shards``."""
    missing = [name for name in names if name not in state]
    if missing:
        raise RuntimeError(f"the model lacks tensors of the source checkpoint: {missing[:3]}")

    def group(keep) -> dict[str, torch.Tensor]:
        # clone: tied tensors share storage, which safetensors refuses within one file
        return {name: state[name].detach().to(dtype).clone() for name in names if keep(name)}

    blocks = (group(lambda name, i=i: name.startswith(f"model.layers.{i}.")) for i in range(n_blocks))
    write_block_shards(folder, group(lambda name: not name.startswith("model.layers.")), blocks, n_blocks)


def source_record(source) -> dict:
    """The ``source`` section of a provenance or export manifest, for a ModelSource."""
    return {"model": source.spec, "path": str(source.path), "origin": source.origin, "model_type": source.model_type}


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


def copy_checkpoint_files(source: Path, target: Path, *, remote_code: bool) -> None:
    """config.json (without a foreign ``auto_map``), the tokenizer and (``remote_code``: a pruned checkpoint)
    effideploy's own config/model code, never the input's, which could be anything."""
    copy_files(source, target, ("config.json",))
    if remote_code:
        copy_remote_code(target)
    copy_tokenizer(source, target)


def read_provenance(folder: str | Path) -> dict | None:
    path = Path(folder) / PROVENANCE_FILE
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(path, what="provenance file")


def folder_size(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
