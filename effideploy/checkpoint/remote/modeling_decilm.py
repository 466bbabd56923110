"""Llama with a per-block FFN width and optional no-op sublayers, for checkpoints in the DeciLM / ``nemotron-nas``
layout.

effideploy copies this file into every checkpoint it writes (with ``configuration_decilm.py``), so plain
transformers loads the checkpoint with ``trust_remote_code=True``. Everything but the FFN width and the no-op
sublayers is transformers' own Llama code: attention, caches, generation and weight names are unchanged, which keeps
the safetensors layout identical to a Llama checkpoint and to what vLLM's ``DeciLMForCausalLM`` expects.

A block whose ``attention.no_op`` is set has no attention weights and no input norm (as in vLLM, which allocates no
KV cache for it); its attention is replaced by a module that adds nothing to the residual stream. It still records
the tokens it saw in the cache, with zero-width keys and values (no memory), because transformers reads the past
length from the cache of layer 0 (positions, masks, ``generate``). ``ffn.no_op`` likewise removes the FFN and its norm.
"""

import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

try:  # package-relative when transformers loads this file as remote code
    from .configuration_decilm import DeciLMConfig
except ImportError:  # a plain import (effideploy itself, tests)
    from configuration_decilm import DeciLMConfig


class NoOpAttention(nn.Module):
    """A removed attention sublayer: contributes zero, keeps the cache's token count right at no memory cost."""

    is_no_op = True

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, past_key_values=None, **kwargs):
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 1, length, 0)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoOpMLP(nn.Module):
    """A removed FFN sublayer."""

    is_no_op = True

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        # Llama builds every block at the global width, which is the widest block; each FFN is then rebuilt at
        # its own width. Under from_pretrained this happens on the meta device, so the detour costs nothing.
        super().__init__(config)
        widths = config.ffn_widths()
        for index, (layer, block) in enumerate(zip(self.model.layers, config.block_configs)):
            if block.attention.no_op:
                layer.self_attn = NoOpAttention(index)
                layer.input_layernorm = nn.Identity()
            elif config.num_attention_heads // block.attention.n_heads_in_group != config.num_key_value_heads:
                raise ValueError(f"block {index}: per-block KV head counts are not supported by this loader")
            if block.ffn.no_op:
                layer.mlp = NoOpMLP()
                layer.post_attention_layernorm = nn.Identity()
            elif widths[index] != layer.mlp.intermediate_size:
                block_config = copy.copy(config)
                block_config.intermediate_size = widths[index]
                layer.mlp = LlamaMLP(block_config)
        self.post_init()
