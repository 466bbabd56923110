"""The ``nemotron-nas`` config of a pruned model."""

from __future__ import annotations

from transformers import PretrainedConfig

from effideploy.checkpoint.remote.configuration_decilm import DeciLMConfig

REMOTE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}
_DROPPED = ("auto_map", "architectures", "model_type", "transformers_version", "_name_or_path", "block_configs",
            "quantization_config")


def pruned_config(base: PretrainedConfig, widths: list[int], *, mlp_bias: bool,
                  attention: list[bool] | None = None) -> DeciLMConfig:
    """``widths`` (and ``attention``: whether each block keeps its attention) of the blocks the checkpoint holds:
    dropped blocks are absent, so ``num_hidden_layers`` is their count."""
    values = {key: value for key, value in base.to_dict().items() if key not in _DROPPED}
    n_heads_in_group = base.num_attention_heads // base.num_key_value_heads
    attention = [True] * len(widths) if attention is None else attention

    def attention_entry(kept: bool) -> dict:
        # vLLM builds no attention, and allocates no KV cache, for a no_op entry
        return {"no_op": False, "n_heads_in_group": n_heads_in_group} if kept else {"no_op": True}

    values.update(
        num_hidden_layers=len(widths),
        intermediate_size=max(widths),  # the global width transformers builds before the per-block rebuild
        mlp_bias=bool(mlp_bias),
        block_configs=[
            {"attention": attention_entry(kept), "ffn": {"no_op": False, "intermediate_size": int(width)}}
            for width, kept in zip(widths, attention)
        ],
        architectures=["DeciLMForCausalLM"],
        auto_map=dict(AUTO_MAP),
    )
    config = DeciLMConfig(**values)
    config._attn_implementation = "sdpa"
    return config
