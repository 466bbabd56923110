"""Build configs and models from a ModelSource with transformers' own classes (no remote code)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from effideploy.checkpoint.remote.configuration_decilm import DeciLMConfig
from effideploy.checkpoint.remote.modeling_decilm import DeciLMForCausalLM
from effideploy.errors import EffideployError
from effideploy.models.resolve import ModelSource, check_architecture

_IGNORED_KEYS = ("auto_map", "transformers_version", "model_type", "_name_or_path", "quantization_config")


def build_config(config_dict: dict, where: str = "config.json") -> PretrainedConfig:
    check_architecture(config_dict, where)
    values = {key: value for key, value in config_dict.items() if key not in _IGNORED_KEYS}
    try:
        if config_dict["model_type"] == "nemotron-nas":
            config = DeciLMConfig(**values)
        else:
            config = LlamaConfig(**values)
    except Exception as exc:  # noqa: BLE001 - transformers' field validation of the user's config.json
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise EffideployError(f"{where} is not a valid {config_dict['model_type']} config: {reason[:300]}") from None
    config._attn_implementation = "sdpa"
    return config


def ffn_widths(config: PretrainedConfig) -> list[int]:
    if isinstance(config, DeciLMConfig):
        return config.ffn_widths()
    return [config.intermediate_size] * config.num_hidden_layers


def layer_config(config: PretrainedConfig, index: int) -> LlamaConfig:
    """A Llama config for block ``index`` alone: the global config with that block's FFN width."""
    block = copy.copy(config)
    block.intermediate_size = ffn_widths(config)[index]
    return block


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    return DeciLMForCausalLM if isinstance(config, DeciLMConfig) else LlamaForCausalLM


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    config = build_config(source.config_dict)
    cls = model_class(config)
    transformers_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(source.path, config=config, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EffideployError(f"cannot load the model in {source.path}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def load_tokenizer(source: ModelSource | str | os.PathLike):
    """The tokenizer of a ModelSource or a folder, never through remote code: a pruned checkpoint's config has an
    ``auto_map``, and without ``trust_remote_code=False`` transformers stops to ask on the terminal whether to run
    it. Raises EffideployError (one line) when there is no usable tokenizer."""
    from transformers import AutoTokenizer

    folder = source.path if isinstance(source, ModelSource) else Path(source)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # it still warns that the nemotron-nas config is not a known model type
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer is the user's checkpoint
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EffideployError(f"cannot load a tokenizer from {folder}: {detail}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def count_parameters(config: PretrainedConfig) -> dict[str, int]:
    """Parameter counts from the shapes alone (no weights needed), by role."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if getattr(config, "attention_bias", False):
        attention += q_out + 2 * kv_out + hidden
    widths = ffn_widths(config)
    ffn = sum(3 * hidden * width for width in widths)
    if getattr(config, "mlp_bias", False):
        ffn += sum(2 * width + hidden for width in widths if width)
    n_attention = len(attention_layers(config))
    norms = (n_attention + sum(1 for width in widths if width)) * hidden + hidden  # a no-op sublayer has no norm
    embed = config.vocab_size * hidden
    head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return {
        "attention": n_attention * attention,
        "ffn": ffn,
        "norms": norms,
        "embedding": embed,
        "lm_head": head,
        "total": n_attention * attention + ffn + norms + embed + head,
    }


def attention_layers(config: PretrainedConfig) -> list[int]:
    """Indices of the blocks with attention (a nemotron-nas block may have a no-op attention and no KV cache)."""
    if isinstance(config, DeciLMConfig):
        return config.attention_layers()
    return list(range(config.num_hidden_layers))
