"""llama.cpp's own ``llama-server`` serving SmolLM2's GGUF on a loopback port: the real server the remote tests use.

The binary comes from ``scripts/build_llama_cpp.sh`` (llama.cpp as vendored in the llama-cpp-python
sdist; CI builds it and exports ``CHATKV_LLAMA_CPP_BIN``). Without it the tests skip with the reason,
except in CI (``CI`` set), where a missing server is a failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from chatkv.model.source import find_default_gguf, pull_default_gguf
from chatkv.paths import Paths

LLAMA_CPP_VERSION = "0.3.36"  # scripts/build_llama_cpp.sh's
BUILD_HINT = "build it with scripts/build_llama_cpp.sh (CI does) or point CHATKV_LLAMA_CPP_BIN at its bin folder"


def llama_server_binary() -> Path | None:
    configured = os.environ.get("CHATKV_LLAMA_CPP_BIN")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = Path(configured) if configured else cache / "chatkv-build" / f"llama.cpp-{LLAMA_CPP_VERSION}" / "bin"
    binary = folder / "llama-server"
    return binary if os.access(binary, os.X_OK) else None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the remote-backend tests)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_llama_server(parallel: int = 2, threads: int = 2, context: int = 4096) -> Iterator[str]:
    """Start llama-server with ``parallel`` slots and metrics on; yields its ``/v1`` URL; stops it after."""
    binary = llama_server_binary()
    if binary is None:
        skip_or_fail(f"llama.cpp's llama-server is not built: {BUILD_HINT}")
    models = Paths.resolve(None).models
    gguf = find_default_gguf(models) or pull_default_gguf(models)  # the model cache the other tests share
    port = free_port()
    log = open(os.devnull, "wb")
    process = subprocess.Popen(
        [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
         "-c", str(context), "--parallel", str(parallel), "--metrics", "--no-webui"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode} while starting")
            try:
                if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 120 s")
            time.sleep(0.2)
        yield f"{root}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
