"""Config of a Llama whose decoder blocks have their own FFN widths (DeciLM / ``nemotron-nas`` layout).

effideploy copies this file into every checkpoint it writes, so it must import nothing but transformers.
The layout is NVIDIA's ``block_configs`` list, which stock vLLM serves with ``DeciLMForCausalLM``:

    block_configs[i] = {"attention": {"no_op": false, "n_heads_in_group": H / KV},
                        "ffn": {"no_op": false, "intermediate_size": W_i}}

and ``{"no_op": true}`` for a removed attention (or FFN) sublayer: no weights, no KV cache.

vLLM reads the entries by attribute and checks ``hasattr(ffn, "ffn_mult")`` before ``intermediate_size``, so the
entries become ``SimpleNamespace`` objects here (picklable anywhere, unlike classes of a remote-code module) and go
back to plain dicts when the config is saved. ``ffn_mult`` is therefore never set unless a checkpoint carries it.
"""

from types import SimpleNamespace

from transformers import LlamaConfig


def _to_namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{key: _to_namespace(item) for key, item in value.items()})
    return value


def _to_dict(value):
    if isinstance(value, SimpleNamespace):
        return {key: _to_dict(item) for key, item in vars(value).items()}
    return value


def ffn_width(block, hidden_size):
    """The FFN width of one block entry: explicit ``intermediate_size``, else DeciLM's ``ffn_mult`` rule."""
    ffn = block.ffn
    if getattr(ffn, "no_op", False):
        return 0
    if hasattr(ffn, "intermediate_size"):
        return int(ffn.intermediate_size)
    width = int(2 * ffn.ffn_mult * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            n_heads_in_group = self.num_attention_heads // self.num_key_value_heads
            self.block_configs = [
                {"attention": {"no_op": False, "n_heads_in_group": n_heads_in_group},
                 "ffn": {"no_op": False, "intermediate_size": self.intermediate_size}}
                for _ in range(self.num_hidden_layers)
            ]
        self.block_configs = [_to_namespace(block) for block in self.block_configs]
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries for {self.num_hidden_layers} layers"
            )

    def attention_layers(self):
        """Indices of the blocks that have attention (and a KV cache)."""
        return [index for index, block in enumerate(self.block_configs) if not block.attention.no_op]

    def ffn_widths(self):
        return [ffn_width(block, self.hidden_size) for block in self.block_configs]

    def to_dict(self):
        output = super().to_dict()
        if output.get("block_configs") is not None:
            output["block_configs"] = [_to_dict(block) for block in output["block_configs"]]
        return output
