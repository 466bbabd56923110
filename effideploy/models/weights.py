"""Lazy, tensor-at-a-time access to a safetensors checkpoint (one file or a sharded index).

Pruning streams a model block by block through this, so memory holds one decoder block, not the whole model.
"""

from __future__ import annotations

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
            files = sorted(set(index_files(self.folder).values()))
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


# Bytes per element of each safetensors dtype tag.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# A header larger than this is not a checkpoint's (real ones are kilobytes to a few MB); bounding it before reading
# keeps a hostile length prefix from allocating gigabytes.
MAX_HEADER_BYTES = 100 * 2**20


def index_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> shard path from ``model.safetensors.index.json``; every file name must be a plain name inside
    ``folder`` (an index cannot point outside its checkpoint)."""
    from effideploy.safe_files import member_path, read_json

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    payload = read_json(index, what="safetensors index")
    weight_map = payload.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise EffideployError(f"{index} has no weight_map object (tensor name -> file name)")
    files = {}
    for name, file in weight_map.items():
        path = member_path(folder, file, what="weight_map file")
        if not path.is_file():
            raise EffideployError(f"{index} names {file!r} for tensor {name}, but {path} is missing")
        files[name] = path
    return files


def read_header(file: Path) -> dict[str, tuple[Path, int, torch.dtype, list[int], int]]:
    """name -> (file, absolute byte offset, dtype, shape, byte length) from a safetensors header, validated against
    the file: header length bounded, dtypes known, shape x dtype size == byte range, ranges ordered, inside the data
    area and not overlapping. Any violation is an ``EffideployError`` naming the file."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise EffideployError(f"{file} is not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise EffideployError(f"{file} is not a safetensors file (header length {length} does not fit the "
                                      f"{size}-byte file)")
            raw = handle.read(length)
    except OSError as exc:
        raise EffideployError(f"cannot read {file}: {exc.strerror or exc}") from None
    from effideploy.safe_files import parse_json

    try:
        header = parse_json(raw, str(file), what="safetensors header")
    except EffideployError as exc:
        raise EffideployError(f"{file} is not a safetensors file (unreadable header: "
                              f"{str(exc).split(str(file), 1)[-1].strip()})") from None
    data_size = size - 8 - length
    entries = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not isinstance(info, dict):
                raise EffideployError(f"{file}: __metadata__ must be an object")
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict):
            raise EffideployError(f"{where} has no header entry object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str):
            raise EffideployError(f"{where} has no dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise EffideployError(f"{where} has unsupported dtype {dtype}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise EffideployError(f"{where} has no valid shape (a list of non-negative integers)")
        offsets = info.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise EffideployError(f"{where} has no valid data_offsets ([begin, end])")
        start, end = offsets
        if start > end:
            raise EffideployError(f"{where} has reversed data_offsets [{start}, {end}]")
        if end > data_size:
            raise EffideployError(f"{file} is truncated: tensor {name!r} ends at byte {end} of a {data_size}-byte "
                                  "data area")
        count = 1
        for dim in shape:
            count *= dim
        if count * DTYPE_SIZES[dtype] != end - start:
            raise EffideployError(f"{where}: shape {shape} x {dtype} is {count * DTYPE_SIZES[dtype]} bytes, but its "
                                  f"data_offsets span {end - start}")
        ranges.append((start, end, name))
        entries[name] = (file, 8 + length + start, SAFETENSORS_DTYPES[dtype], list(shape), end - start)
    ranges.sort()
    for (_, end_a, name_a), (start_b, _, name_b) in zip(ranges, ranges[1:]):
        if start_b < end_a:
            raise EffideployError(f"{file}: tensors {name_a!r} and {name_b!r} overlap")
    return entries


def expected_shapes(config) -> dict[str, list[int]]:
    """The tensors a Llama-shaped checkpoint of ``config`` must hold and their shapes (biases, if any, not listed)."""
    from effideploy.models.build import attention_layers, ffn_widths

    with_attention = set(attention_layers(config))  # a no-op attention (or FFN) sublayer has no tensors
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": [config.vocab_size, hidden], "model.norm.weight": [hidden]}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = [config.vocab_size, hidden]
    for index, width in enumerate(ffn_widths(config)):
        prefix = f"model.layers.{index}."
        if index in with_attention:
            shapes.update({
                prefix + "input_layernorm.weight": [hidden],
                prefix + "self_attn.q_proj.weight": [q_out, hidden], prefix + "self_attn.k_proj.weight": [kv_out, hidden],
                prefix + "self_attn.v_proj.weight": [kv_out, hidden], prefix + "self_attn.o_proj.weight": [hidden, q_out],
            })
        if width:
            shapes.update({
                prefix + "post_attention_layernorm.weight": [hidden],
                prefix + "mlp.gate_proj.weight": [width, hidden], prefix + "mlp.up_proj.weight": [width, hidden],
                prefix + "mlp.down_proj.weight": [hidden, width],
            })
    return shapes


def layer_indices(names) -> set[int]:
    """The block indices ``model.layers.N.`` that tensor names carry."""
    indices = set()
    for name in names:
        if name.startswith("model.layers."):
            index = name[len("model.layers."):].split(".", 1)[0]
            if index.isdigit():
                indices.add(int(index))
    return indices


def check_layer_count(folder: Path, config_dict: dict, names) -> None:
    """config.json's ``num_hidden_layers`` against the blocks the weight headers hold, before anything is built
    per layer: a 700-byte config saying 10^9 layers would otherwise grow lists, dicts and modules until the kernel
    kills the process. Every block of a dense Llama has tensors; a pruned (nemotron-nas) block may have none (both
    sublayers no-op), but its ``block_configs`` list has one entry per layer, so the config's own size bounds it."""
    layers = config_dict["num_hidden_layers"]
    present = layer_indices(names)
    beyond = sorted(index for index in present if index >= layers)
    if beyond:
        raise EffideployError(f"{folder}: the weights hold block {beyond[-1]}, but config.json says num_hidden_layers "
                              f"{layers}")
    if config_dict.get("model_type") == "llama" and len(present) != layers:
        missing = next(index for index in range(layers) if index not in present)
        raise EffideployError(f"{folder}: config.json says num_hidden_layers {layers}, but the weights hold "
                              f"{len(present)} blocks (block {missing} is missing)")


def check_weights_match_config(folder: str | Path, config_dict: dict) -> None:
    """Every tensor the config implies is present with the shape it implies (headers only; no weights read). The
    layer count is checked first and every size then against the headers, which read_header checked against the file
    size, so nothing larger than the files is ever planned or allocated from config.json's numbers."""
    from effideploy.models.build import build_config

    folder = Path(folder)
    weights = SafetensorsWeights(folder)
    check_layer_count(folder, config_dict, weights.names())
    try:
        config = build_config(config_dict)
        expected = expected_shapes(config)
    except EffideployError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own config validation: the user's config.json
        raise EffideployError(f"{folder}/config.json is not a valid model config: {str(exc).splitlines()[0]}") from None
    for name, shape in expected.items():
        if name not in weights:
            raise EffideployError(f"{folder}: tensor {name} is missing from the weights, but config.json implies it")
        actual = weights._entries[name][3]
        if actual != shape:
            raise EffideployError(f"{folder}: tensor {name} has shape {actual}, but config.json implies {shape}")


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
