"""Writing a checkpoint as a GGUF file that llama.cpp loads, with the ``gguf`` package (no llama.cpp code runs).

Architectures (what llama.cpp's loader reads, src/models/deci.cpp and src/llama-model.cpp):

- a dense Llama is ``llama``: scalar ``feed_forward_length`` / ``attention.head_count`` / ``head_count_kv``;
- a pruned checkpoint (``nemotron-nas``, per-block ``block_configs``) is ``deci``, llama.cpp's DeciLM /
  Llama-Nemotron architecture: ``deci.feed_forward_length``, ``deci.attention.head_count`` and
  ``deci.attention.head_count_kv`` are per-layer arrays (``get_key_or_arr``). A block whose FFN is a no-op has width
  0 (no ffn tensors), a block whose attention is a no-op has 0 heads and 0 KV heads (no attention tensors), a
  ``replace_with_linear`` attention has heads but 0 KV heads and one [hidden, hidden] ``attn_output``. With per-layer
  head counts llama.cpp would derive the head size from layer 0, so ``attention.key_length`` / ``value_length`` are
  written explicitly, and ``rope.dimension_count`` equals them (the loader checks it).

Tensors follow convert_hf_to_gguf.py's names; q_proj and k_proj rows are permuted from Hugging Face's rotate-half
layout to llama.cpp's interleaved RoPE pairs (``LlamaModel.permute``, with the block's KV heads for k_proj). 1-D
tensors (norms, biases) stay float32, as the converter keeps them. A tied ``lm_head`` is not written (llama.cpp
reuses ``token_embd``).

Tokenizer: byte-level BPE from ``tokenizer.json`` as the ``gpt2`` tokenizer model (tokens by id, token types,
merges, special ids, ``add_bos_token``, chat template). When the vocabulary is the embedded default model's
(SmolLM2, itself shipped as a GGUF) its tokenizer metadata is copied from that GGUF, which carries llama.cpp's own
pre-tokenizer name (``smollm``); otherwise the pre-tokenizer is ``default`` (GPT-2's split), recorded in the
manifest. The tokenizer is read as data: nothing from the model folder runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effideploy.errors import EffideployError

GGUF_FILE = "model-{type}.gguf"


@dataclass(frozen=True)
class BlockShape:
    """One decoder block as llama.cpp's ``deci`` loader sees it."""

    heads: int  # 0: attention-free block
    kv_heads: int  # 0 with heads > 0: linear attention (one attn_output)
    ffn: int  # 0: FFN-free block


@dataclass
class GgufPlan:
    architecture: str  # "llama" | "deci"
    blocks: list[BlockShape]
    head_dim: int
    tied: bool
    notes: dict = field(default_factory=dict)


def plan_of(config_dict: dict) -> GgufPlan:
    """The architecture and per-block shapes of a checkpoint config (a dense Llama or a nemotron-nas pruned one)."""
    from effideploy.models.build import build_config

    config = build_config(config_dict)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise EffideployError(f"llama.cpp's llama/deci graphs use SiLU; this model's hidden_act is {config.hidden_act!r}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if (rope.get("rope_type") or "default") not in ("default", "linear", "llama3"):
        raise EffideployError(f"rope_type {rope.get('rope_type')!r} is not written to GGUF by effideploy "
                              "(supported: default, linear, llama3)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    block_configs = getattr(config, "block_configs", None)
    if not block_configs:
        blocks = [BlockShape(heads, kv_heads, config.intermediate_size)] * config.num_hidden_layers
        return GgufPlan("llama", blocks, head_dim, tied)
    from effideploy.checkpoint.remote.configuration_decilm import ffn_width

    blocks = []
    for block in block_configs:
        attention = block.attention
        if getattr(attention, "no_op", False):
            blocks.append(BlockShape(0, 0, ffn_width(block, config.hidden_size)))
        elif getattr(attention, "replace_with_linear", False):
            blocks.append(BlockShape(heads, 0, ffn_width(block, config.hidden_size)))
        else:
            group = getattr(attention, "n_heads_in_group", None) or heads // kv_heads
            blocks.append(BlockShape(heads, heads // group, ffn_width(block, config.hidden_size)))
    return GgufPlan("deci", blocks, head_dim, tied)


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q_proj/k_proj from Hugging Face's rotate-half order to llama.cpp's interleaved pairs (per head)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.linear_attn.weight": "attn_output.weight",  # DeciLM's replace_with_linear
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
_SKIPPED = ("rotary_emb.inv_freq",)


def gguf_name(name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face Llama tensor (None for buffers the converter skips)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name.endswith(_SKIPPED):
        return None
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        suffix = ".".join(parts[3:])
        if suffix in _BLOCK_TENSORS:
            return f"blk.{parts[2]}.{_BLOCK_TENSORS[suffix]}"
    raise EffideployError(f"tensor {name} has no GGUF counterpart in the llama/deci architectures")


def write_gguf(source_path: Path, config_dict: dict, target: Path, *, dtype: str, name: str,
               widths: list[int] | None = None, realigned: list[dict] | None = None) -> dict:
    """Write ``source_path``'s weights as ``target`` (GGUF, ``dtype`` "float32" or "float16" for 2-D tensors).
    ``realigned``: blocks whose FFN width is cut (pruning.realign records), applied before writing. Returns the
    manifest's ``gguf`` section."""
    import gguf

    from effideploy.models.build import build_config
    from effideploy.models.weights import SafetensorsWeights

    plan = plan_of(config_dict)
    config = build_config(config_dict)
    if widths is not None:
        plan.blocks = [BlockShape(b.heads, b.kv_heads, w) for b, w in zip(plan.blocks, widths)]
    arch = plan.architecture
    writer = gguf.GGUFWriter(str(target), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(len(plan.blocks))
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(config.hidden_size)
    if arch == "llama":
        writer.add_feed_forward_length(plan.blocks[0].ffn)
        writer.add_head_count(plan.blocks[0].heads)
        writer.add_head_count_kv(plan.blocks[0].kv_heads)
    else:
        writer.add_feed_forward_length([b.ffn for b in plan.blocks])
        writer.add_head_count([b.heads for b in plan.blocks])
        writer.add_head_count_kv([b.kv_heads for b in plan.blocks])
        writer.add_key_length(plan.head_dim)
        writer.add_value_length(plan.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(plan.head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    tokenizer = write_tokenizer(writer, source_path, config_dict)

    weights = SafetensorsWeights(source_path)
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    cut = {block["index"]: block for block in realigned or []}
    written = 0
    for hf_name in weights.names():
        target_name = gguf_name(hf_name)
        if target_name is None or (hf_name == "lm_head.weight" and plan.tied):
            continue
        tensor = weights.get(hf_name, torch.float32)
        if target_name.startswith("blk."):
            index = int(target_name.split(".")[1])
            block = plan.blocks[index]
            if target_name.endswith(("attn_q.weight", "attn_q.bias")):
                tensor = permute_rope(tensor, block.heads)
            elif target_name.endswith(("attn_k.weight", "attn_k.bias")):
                tensor = permute_rope(tensor, block.kv_heads)
            if index in cut and ".ffn_" in target_name and not target_name.endswith("ffn_norm.weight"):
                by_block.setdefault(index, {})[hf_name] = tensor
                continue
        writer.add_tensor(target_name, _array(tensor, dtype))
        written += 1
    for index, tensors in sorted(by_block.items()):  # realigned FFNs: the lowest-norm channels dropped
        from effideploy.pruning.realign import realign_block_tensors

        new = realign_block_tensors(tensors, index, cut[index]["before"], cut[index]["after"])
        for hf_name, tensor in {**tensors, **new}.items():
            writer.add_tensor(gguf_name(hf_name), _array(tensor, dtype))
            written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": written, "head_dim": plan.head_dim, "tied_embeddings": plan.tied,
            "feed_forward_length": [b.ffn for b in plan.blocks], "head_count": [b.heads for b in plan.blocks],
            "head_count_kv": [b.kv_heads for b in plan.blocks], "tokenizer": tokenizer}


def _array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """2-D weights in ``dtype``; 1-D tensors (norms, biases) in float32, as llama.cpp's converter keeps them."""
    if tensor.ndim >= 2 and dtype == "float16":
        return tensor.to(torch.float16).contiguous().numpy()
    return tensor.to(torch.float32).contiguous().numpy()


# -------------------------------------------------------------------------------------------------------- tokenizer

TOKENIZER_KEY_PREFIX = "tokenizer."


def write_tokenizer(writer, folder: Path, config_dict: dict) -> dict:
    """Tokenizer metadata for llama.cpp (see the module docstring); returns how it was obtained."""
    from effideploy.safe_files import read_json

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EffideployError(f"{folder} has no tokenizer.json; the GGUF export writes byte-level BPE tokenizers from it")
    data = read_json(path, what="tokenizer")
    model = data.get("model") or {}
    pre = json.dumps(data.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise EffideployError(f"{path}: only byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style) are written to "
                              f"GGUF by effideploy; this one is {model.get('type')!r} without a ByteLevel pre-tokenizer")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {entry["content"]: entry for entry in data.get("added_tokens") or []}
    for content, entry in added.items():
        vocab[content] = entry["id"]
    size = max(int(config_dict.get("vocab_size") or 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf_token_type("UNUSED")] * size
    for token, index in vocab.items():
        tokens[index] = token
        entry = added.get(token)
        types[index] = gguf_token_type("NORMAL" if entry is None else "CONTROL" if entry.get("special") else "USER_DEFINED")
    embedded = _embedded_tokenizer(tokens)
    if embedded is not None:
        for key, value, value_type, sub_type in embedded:
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
        return {"model": "gpt2", "pre": _field_value(embedded, "tokenizer.ggml.pre"), "tokens": size,
                "source": "copied from the embedded SmolLM2 GGUF (same vocabulary)"}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = _special_ids(folder, config_dict, vocab)
    for key, index in special.items():
        getattr(writer, f"add_{key}_token_id")(index)
    writer.add_add_bos_token(bool(_tokenizer_config(folder).get("add_bos_token", False)))
    template = chat_template(folder)
    if template:
        writer.add_chat_template(template)
    return {"model": "gpt2", "pre": "default", "tokens": size, "merges": len(merges), "special": special,
            "chat_template": bool(template), "source": "tokenizer.json (pre-tokenizer: llama.cpp's default GPT-2 split)"}


def gguf_token_type(name: str) -> int:
    import gguf

    return int(getattr(gguf.TokenType, name))


def _tokenizer_config(folder: Path) -> dict:
    from effideploy.safe_files import read_json_if_exists

    return read_json_if_exists(folder / "tokenizer_config.json", what="tokenizer config") or {}


def chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = _tokenizer_config(folder).get("chat_template")
    return template if isinstance(template, str) else None


def _special_ids(folder: Path, config_dict: dict, vocab: dict[str, int]) -> dict[str, int]:
    """bos / eos / unknown / padding ids: config.json's, else tokenizer_config.json's token strings."""
    tokenizer_config = _tokenizer_config(folder)
    ids = {}
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unk"), ("pad", "pad")):
        value = config_dict.get(f"{key}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            token = tokenizer_config.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            value = vocab.get(token) if isinstance(token, str) else None
        if isinstance(value, int) and value >= 0:
            ids[gguf_key] = int(value)
    return ids


def _embedded_tokenizer(tokens: list[str]) -> list[tuple] | None:
    """The embedded default GGUF's tokenizer key-values when its token list equals ``tokens``, else None."""
    try:
        from effideploy.models.resolve import embedded_gguf_path

        path = embedded_gguf_path()
    except EffideployError:
        return None
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or len(field.data) != len(tokens):
        return None
    if [bytes(field.parts[i]).decode("utf-8") for i in field.data] != tokens:
        return None
    values = []
    for key, item in reader.fields.items():
        if not key.startswith(TOKENIZER_KEY_PREFIX):
            continue
        value_type = item.types[0]
        sub_type = item.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        values.append((key, item.contents(), value_type, sub_type))
    return values


def _field_value(values: list[tuple], key: str):
    return next((value for name, value, _, _ in values if name == key), None)


# ------------------------------------------------------------------------------------------------------- read back

def read_gguf_summary(path: Path) -> dict:
    """What a GGUF file says (read with the gguf package): architecture, per-layer widths and head counts, and the
    storage type of every tensor (grouped by type)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def value(key):
        item = reader.fields.get(f"{arch}.{key}")
        return None if item is None else item.contents()

    by_type: dict[str, list[str]] = {}
    rows = {}
    for tensor in reader.tensors:
        by_type.setdefault(tensor.tensor_type.name.lower(), []).append(tensor.name)
        rows[tensor.name] = (int(tensor.shape[0]), tensor.tensor_type.name.lower(), len(tensor.shape))
    return {"architecture": arch, "feed_forward_length": value("feed_forward_length"),
            "head_count": value("attention.head_count"), "head_count_kv": value("attention.head_count_kv"),
            "tensor_types": {kind: len(names) for kind, names in sorted(by_type.items())},
            "tensors_by_type": {kind: sorted(names) for kind, names in sorted(by_type.items())},
            "rows": rows}  # name -> (row length ne[0], type, dimensions)
