"""Runtime adapters: one class per runtime with the same interface (``generate``, ``score``, ``close``), looked up
by name so that vLLM and onnxruntime are imported only when used."""

from effideploy.errors import EffideployError
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


def require_server(name: str) -> None:
    """Refuse, in one line and before any work, a serving bench on a runtime without an OpenAI-compatible server
    (``Capabilities.server``; the adapter modules import only torch and numpy, so asking them is cheap)."""
    servers = [n for n in RUNTIMES.names() if RUNTIMES.get(n).capabilities.server]
    if name not in servers:
        raise EffideployError(f"--serve needs a runtime with an OpenAI-compatible server ({' or '.join(servers)}), "
                              f"not {name!r}")
