"""The serving bench's runtime check reads the adapters' own ``server`` capability."""

import pytest

from effideploy.errors import EffideployError
from effideploy.runtimes import RUNTIMES, require_server


def test_servers_are_the_runtimes_whose_adapter_has_a_server():
    servers = [name for name in RUNTIMES.names() if RUNTIMES.get(name).capabilities.server]
    assert servers == ["vllm", "llamacpp"]
    for name in servers:
        require_server(name)  # no error


@pytest.mark.parametrize("name", ["onnx", "torch", "tensorrt"])
def test_a_runtime_without_a_server_is_refused_in_one_line(name):
    with pytest.raises(EffideployError) as info:
        require_server(name)
    assert str(info.value) == (f"--serve needs a runtime with an OpenAI-compatible server (vllm or llamacpp), "
                               f"not {name!r}")
