"""Run a Llama one decoder block at a time from lazily loaded weights.

Memory holds the calibration activations and one block, whatever the depth, so a model larger than memory can be
calibrated and rewritten. The blocks are transformers' own ``LlamaDecoderLayer`` modules, fed exactly what
``LlamaModel.forward`` feeds them (causal mask, rotary position embeddings), so the activations are the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from effideploy.models.build import layer_config


class LayerwiseModel:
    def __init__(self, config: PretrainedConfig, weights, dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.rotary = LlamaRotaryEmbedding(config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.weights.get("model.embed_tokens.weight", self.dtype)
        return F.embedding(input_ids, table)

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = f"model.layers.{index}."
        return [name for name in self.weights.names() if name.startswith(prefix)]

    def block_state(self, index: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """One block's tensors in ``self.dtype``; on a GPU each is read in its stored dtype, moved, then cast there,
        so the host holds one stored tensor at a time."""
        prefix = f"model.layers.{index}."
        if device is None or torch.device(device).type == "cpu":
            return {name[len(prefix):]: self.weights.get(name, self.dtype) for name in self.block_tensor_names(index)}
        return {name[len(prefix):]: self.weights.get(name).to(device).to(self.dtype)
                for name in self.block_tensor_names(index)}

    def block(self, index: int, device: torch.device | str | None = None) -> LlamaDecoderLayer:
        config = layer_config(self.config, index)
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, index)
        layer.load_state_dict(self.block_state(index, device), assign=True, strict=True)
        return layer.eval()

    def context(self, hidden: torch.Tensor) -> dict:
        """The keyword arguments LlamaModel passes to every block for a batch of full windows (no cache)."""
        batch, length = hidden.shape[:2]
        position_ids = torch.arange(length, device=hidden.device).unsqueeze(0)
        self.rotary.to(hidden.device)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids=position_ids),
        }

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (tied to the embedding when the config says so)."""
        norm = self.weights.get("model.norm.weight", self.dtype)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.config.rms_norm_eps) * norm
        name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return hidden @ self.weights.get(name, self.dtype).T
