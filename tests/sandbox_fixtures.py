"""Shared by the sandbox tests (test_execution, test_execution_kernel); not a test module itself.

The autouse fixture `host_keeps_working` is active in every module that imports it: after each test no
sandbox process is left behind and the sandbox still runs code. `mode` runs a test twice, with the real
isolation and with the Python-level guards alone.
"""

from __future__ import annotations

import os
import socket

import psutil
import pytest

from picochat import execution
from picochat.execution import ExecutionResult, execute_code

FAST = 10.0  # generous timeout for code that should finish (or be stopped) at once: no flakes on a busy box

KERNEL_LAYERS = os.geteuid() == 0 and bool(execution._namespace_prefix())
needs_kernel_layers = pytest.mark.skipif(
    not KERNEL_LAYERS, reason="needs root and working `unshare` (network/PID namespaces)"
)

# Undoes the Python-level guards the way a determined attacker could: a fresh, unpatched posix.
# How a refused import shows up: blocked outright, or (as `nobody`) unreadable and so not found.
IMPORT_REFUSED = ("ImportError", "ModuleNotFoundError")

REAL_POSIX = "import sys\ndel sys.modules['posix']\nimport posix\n"


@pytest.fixture(autouse=True)
def host_keeps_working(tmp_path, monkeypatch):
    """After every test: no sandbox process is left behind and the sandbox still runs code.

    Only processes started during the test count: earlier tests in the session may leave helpers of
    their own (multiprocessing's resource tracker, torch.compile workers) running."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    assert [p for p in psutil.Process().children(recursive=True) if p.pid not in before] == []
    assert execute_code("print('still fine')", timeout=FAST).stdout == "still fine\n"


@pytest.fixture(params=["isolated", "guards-only"])
def mode(request, monkeypatch):
    if request.param == "guards-only":
        monkeypatch.setattr(execution, "_namespace_prefix", lambda: ())
        monkeypatch.setattr(execution, "_unprivileged_ids", lambda: None)
    return request.param


def assert_blocked(result: ExecutionResult, *fragments: str) -> None:
    assert not result.success, result
    assert result.error is not None
    assert any(fragment in result.error for fragment in fragments), result.error


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that records whether anything connected to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        server.accept()[0].close()


SECRET = "xyz-picochat-secret-7f3a"
