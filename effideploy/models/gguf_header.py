"""A bounded reader of a GGUF file's header, run before transformers converts the file.

transformers reads GGUF through gguf-py, whose errors on a damaged file surface as "... is not a valid JSON file"
(its config loader's fallback) or a traceback, and which trusts every count in the header: a file of a few bytes
can claim 2^64 key-value pairs. Here every count and length is checked against the bytes left in the file before
anything is read or allocated, every tensor must lie inside the data area, and the model's sizes in the metadata
(block count, embedding and FFN widths) must match the tensors, the way safetensors headers are checked against
config.json (``effideploy.models.weights``). Any violation is one ``EffideployError`` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from effideploy.errors import EffideployError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py (and so transformers) reads
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 4  # arrays of arrays nest no deeper in any real file
# value type -> struct format of a scalar (8: string, 9: array are read separately)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Reader:
    """Little-endian reads from a bytes buffer that never step past its end."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, message: str) -> EffideployError:
        return EffideployError(f"{self.path} is not a valid GGUF file: {message}")

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(f"{what} needs {count} bytes at byte {self.pos}, past the end of the file")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def scalar(self, kind: int, what: str):
        fmt = SCALARS[kind]
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar(10, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - len(raw)} is not UTF-8") from None

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in SCALARS:
            return self.scalar(kind, what)
        if kind == 8:
            return self.string(what)
        if kind != 9 or depth >= MAX_DEPTH:
            raise self.fail(f"{what} has unknown value type {kind}")
        inner, count = self.scalar(4, what), self.scalar(10, what)
        smallest = struct.calcsize(SCALARS[inner]) if inner in SCALARS else 8  # a string or array: its length
        if count * smallest > len(self.data) - self.pos:
            raise self.fail(f"{what} claims {count} elements, more than the file holds")
        if inner in SCALARS:  # numeric arrays (token scores, types) in one unpack
            fmt = SCALARS[inner]
            return list(struct.unpack(f"<{count}{fmt}", self.take(count * struct.calcsize(fmt), what)))
        return [self.value(inner, what, depth + 1) for _ in range(count)]


def read_gguf_header(path: str | Path) -> tuple[dict, dict[str, tuple[list[int], int]]]:
    """(metadata key -> value, tensor name -> (dims, ggml type)) of a GGUF file, validated (module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < 24:  # magic, version, two counts
                raise EffideployError(f"{path} is not a valid GGUF file: it is shorter than a GGUF header")
            # mapped, not read: only the header's pages are touched (the tensors can be gigabytes)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(_Reader(data, path))
    except OSError as exc:
        raise EffideployError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(reader: _Reader) -> tuple[dict, dict[str, tuple[list[int], int]]]:
    data = reader.data
    if reader.take(4, "the magic") != MAGIC:
        raise reader.fail("it does not start with the GGUF magic")
    version = reader.scalar(4, "the version")
    if version not in VERSIONS:
        raise reader.fail(f"version {version} is not one of {VERSIONS}")
    n_tensors, n_values = reader.scalar(10, "the tensor count"), reader.scalar(10, "the metadata count")
    # a key-value pair takes at least 13 bytes (key length, type, one byte), a tensor entry at least 32
    if 13 * n_values + 32 * n_tensors > len(data) - reader.pos:
        raise reader.fail(f"it claims {n_values} metadata entries and {n_tensors} tensors, more than its "
                          f"{len(data)} bytes hold")
    metadata = {}
    for _ in range(n_values):
        key = reader.string("a metadata key")
        metadata[key] = reader.value(reader.scalar(4, f"the type of {key}"), f"metadata {key!r}")
    tensors, ends = {}, []
    for _ in range(n_tensors):
        name = reader.string("a tensor name")
        n_dims = reader.scalar(4, f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise reader.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [reader.scalar(10, f"tensor {name!r}") for _ in range(n_dims)]
        kind, offset = reader.scalar(4, f"tensor {name!r}"), reader.scalar(10, f"tensor {name!r}")
        tensors[name] = (dims, kind)
        ends.append((name, offset, _nbytes(dims, kind, name, reader)))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise reader.fail(f"general.alignment {alignment!r} is not a power of two")
    start = -(-reader.pos // alignment) * alignment
    for name, offset, nbytes in ends:
        if start + offset + nbytes > len(data):
            raise reader.fail(f"tensor {name!r} ends at byte {start + offset + nbytes} of a {len(data)}-byte file "
                              "(truncated)")
    _check_sizes(metadata, tensors, reader)
    return metadata, tensors


def _nbytes(dims: list[int], kind: int, name: str, reader: _Reader) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise reader.fail(f"tensor {name!r} has unknown ggml type {kind}") from None
    count = 1
    for dim in dims:
        count *= dim
    if dims[0] % block:
        raise reader.fail(f"tensor {name!r}: its rows of {dims[0]} are not whole blocks of {block}")
    return count // block * size


def _check_sizes(metadata: dict, tensors: dict, reader: _Reader) -> None:
    """The sizes transformers builds the model from, against the tensors (GGUF lists dims innermost first)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise reader.fail("general.architecture is missing")
    blocks = {int(name.split(".")[1]) for name in tensors if name.startswith("blk.") and name.split(".")[1].isdigit()}
    count = metadata.get(f"{arch}.block_count")
    if type(count) is not int or count < 1:
        raise reader.fail(f"{arch}.block_count must be a positive integer, got {count!r}")
    if blocks and max(blocks) >= count or arch == "llama" and len(blocks) != count:
        raise reader.fail(f"{arch}.block_count is {count}, but the tensors hold {len(blocks)} blocks")
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise reader.fail("tensor 'token_embd.weight' is missing")
    hidden = metadata.get(f"{arch}.embedding_length")
    if hidden != embedding[0][0]:
        raise reader.fail(f"{arch}.embedding_length is {hidden!r}, but token_embd.weight has rows of "
                          f"{embedding[0][0]}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(embedding[0]) > 1 and len(tokens) != embedding[0][1]:
        raise reader.fail(f"the tokenizer has {len(tokens)} tokens, but token_embd.weight has {embedding[0][1]} rows")
    ffn, gate = metadata.get(f"{arch}.feed_forward_length"), tensors.get("blk.0.ffn_gate.weight")
    if type(ffn) is int and gate is not None and len(gate[0]) > 1 and gate[0][1] != ffn:
        raise reader.fail(f"{arch}.feed_forward_length is {ffn}, but blk.0.ffn_gate.weight has {gate[0][1]} rows")
