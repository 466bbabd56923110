"""The ONNX runner's KV cache: one buffer per layer and per key/value, sized for the prompt plus the tokens to
generate, bound through IO binding as both the layer's past input and its present output (see ``runtimes/onnx.py``).
"""

from __future__ import annotations

import numpy as np

from effideploy.errors import EffideployError

Past = list[tuple[np.ndarray, np.ndarray]]


class KVCache:
    """Key/value buffers [batch, kv_heads, capacity, head_dim] per layer, bound as past and present at once."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device: str):
        import onnxruntime as ort

        shape = (batch, kv_heads, capacity, head_dim)
        self.batch, self.capacity, self.dtype = batch, capacity, np.dtype(dtype)
        self.length = 0
        self.decode = None  # (IO binding, logits buffer) of decode steps, made by the runtime on first use
        self.on_host = device == "cpu"
        if self.on_host:  # numpy owns the memory and the OrtValues alias it: the hook reads views, not copies
            self.keys = [np.zeros(shape, dtype) for _ in range(num_layers)]
            self.values = [np.zeros(shape, dtype) for _ in range(num_layers)]
            self.ort_keys = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.keys]
            self.ort_values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.values]
        else:
            self.ort_keys = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0) for _ in range(num_layers)]
            self.ort_values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0) for _ in range(num_layers)]

    def fits(self, batch: int, capacity: int) -> bool:
        return self.batch == batch and self.capacity >= capacity

    def past(self) -> Past:
        if self.on_host:
            return [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values)]
        return [(k.numpy()[:, :, : self.length], v.numpy()[:, :, : self.length])
                for k, v in zip(self.ort_keys, self.ort_values)]

    def replace(self, past: Past) -> None:
        """Make ``past`` the cache contents: every layer one length, 1 up to the current length (a hook drops
        entries; it cannot add any)."""
        if len(past) != len(self.ort_keys):
            raise EffideployError(f"kv_hook returned {len(past)} layers; the model has {len(self.ort_keys)}")
        lengths = {int(np.shape(k)[2]) for k, _ in past} | {int(np.shape(v)[2]) for _, v in past}
        if len(lengths) != 1:
            raise EffideployError(f"kv_hook returned layers of different lengths {sorted(lengths)}; "
                                  "the ONNX graph takes one attention_mask for all layers")
        length = lengths.pop()
        if not 0 < length <= self.length:
            raise EffideployError(f"kv_hook returned a cache of {length} tokens; it must hold 1..{self.length}")
        for index, (key, value) in enumerate(past):
            if self.on_host:
                # copyto handles overlap, so a hook may return slices of the views it was given
                np.copyto(self.keys[index][:, :, :length], key)
                np.copyto(self.values[index][:, :, :length], value)
            else:
                for target, source in ((self.ort_keys[index], key), (self.ort_values[index], value)):
                    full = target.numpy()
                    full[:, :, :length] = source
                    target.update_inplace(full)
        self.length = length
