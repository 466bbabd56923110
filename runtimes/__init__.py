"""Runtime adapters: one class per runtime with the same interface (``generate``, ``score``, ``close``), looked up
by name so that vLLM and onnxruntime are imported only when used."""

from effideploy.registry import Registry

RUNTIMES = Registry(
    "runtime",
    {
        "torch": "effideploy.runtimes.pytorch:TorchRuntime",
        "onnx": "effideploy.runtimes.onnx:OnnxRuntime",
        "vllm": "effideploy.runtimes.vllm:VllmRuntime",
        "llamacpp": "effideploy.runtimes.llamacpp:LlamaCppRuntime",
    },
)


def open_runtime(name: str, path, **options):
    """Open the artifact at ``path`` with runtime ``name`` (see each adapter for its options)."""
    return RUNTIMES.get(name)(path, **options)
