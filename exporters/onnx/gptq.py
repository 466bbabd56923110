"""GPTQ on ONNX Runtime's MatMulNBits from the second moments the pruning pass kept (``prune --keep-stats``).

ORT's own GPTQ quantizer runs the float graph over calibration text a second time; a checkpoint pruned with
``--keep-stats`` already holds every Linear's input second moments from its one calibration pass
(``effideploy.quantization.hessians``). Here the graph is first quantized by round-to-nearest (which lays out every
MatMulNBits node, its packed weight and scales), then each node whose Linear has kept statistics gets GPTQ's codes
and scales written into those same initializers, on the grid RTN uses (symmetric, implied zero point 2^(bits-1)).
The output head has no kept statistics (the pass stops at the last block) and stays round-to-nearest.
"""

from __future__ import annotations

from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.quantization.gptq import gptq, onnx_grid
from effideploy.quantization.hessians import CheckpointHessians


def pack_matmul_nbits(q, scales, *, bits: int, block_size: int):
    """Integer codes [N, K] and scales [N, blocks] -> MatMulNBits' B [N, blocks, blob] uint8 and scales [N * blocks]
    (two 4-bit codes per byte, low nibble first; K padded to whole blocks with the zero point, i.e. weight 0)."""
    import numpy as np

    codes = q.numpy().astype(np.uint8)
    n, k = codes.shape
    blocks = (k + block_size - 1) // block_size
    padded = np.full((n, blocks * block_size), 2 ** (bits - 1), dtype=np.uint8)
    padded[:, :k] = codes
    padded = padded.reshape(n, blocks, block_size)
    if bits == 4:
        packed = padded[..., 0::2] | (padded[..., 1::2] << 4)
    elif bits == 8:
        packed = padded
    else:
        raise EffideployError(f"MatMulNBits with {bits} bits is not supported here")
    return np.ascontiguousarray(packed), scales.numpy().astype(np.float32).reshape(-1)


def apply_gptq(model_path: Path, reference, digests: dict[str, str], hessians: CheckpointHessians,
               settings: dict) -> dict:
    """Rewrite the round-to-nearest MatMulNBits weights of ``model_path`` with GPTQ's (in place, same layout).
    ``reference``: the float transformers model the graph was exported from; ``digests``: quantize_graph's map from
    node to the float weight it replaced. Returns what the manifest records."""
    import onnx
    import torch

    from effideploy.exporters.onnx.quant import linear_targets

    bits, block_size = settings["bits"], settings["block_size"]
    grid = onnx_grid(bits)
    model = onnx.load(str(model_path))
    initializers = {init.name: init for init in model.graph.initializer}
    targets = linear_targets(reference)
    rewritten, kept_rtn = [], []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        modules = targets.get(digests.get(node.name, ""))
        hessian = hessians.for_module(modules[0][0]) if modules else None
        if hessian is None:
            kept_rtn.append(node.name)
            continue
        if len(node.input) > 3 and node.input[3]:
            raise EffideployError(f"{node.name}: GPTQ writes symmetric weights, but the node has zero points")
        weight = torch.cat([module.weight.detach() for _, module in modules]).float()  # [N, K]
        result = gptq(weight, hessian, grid, block_size)
        packed, scales = pack_matmul_nbits(result.q, result.scales, bits=bits, block_size=block_size)
        for name, array in ((node.input[1], packed), (node.input[2], scales)):
            old = onnx.numpy_helper.to_array(initializers[name])
            if old.size != array.size:
                raise EffideployError(f"{node.name}: GPTQ's {name} has {array.size} values where the graph has {old.size}")
            initializers[name].CopyFrom(onnx.numpy_helper.from_array(array.reshape(old.shape).astype(old.dtype), name))
        rewritten.append(node.name)
    if not rewritten:
        raise EffideployError("--quant-method gptq: no quantized MatMul matched a Linear with kept statistics")
    # onnx appends external data to an existing file: the old one goes (its tensors are in memory).
    (Path(model_path).parent / f"{Path(model_path).name}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{Path(model_path).name}.data", size_threshold=1024)
    return {"gptq_matmuls": len(rewritten), "rtn_matmuls": kept_rtn,
            "hessians": {"source": "the pruning's calibration pass (prune --keep-stats)", **hessians.meta},
            "tool": "effideploy GPTQ (torch) on ORT MatMulNBitsQuantizer's round-to-nearest layout"}
