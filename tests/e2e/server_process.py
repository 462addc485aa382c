"""Start the real server as a subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Server:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(server: Server, http: httpx.Client, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /ready until 200; fail at once, with the server's log, if the process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            pytest.fail(f"the server exited with code {code} before it was ready:\n{server.log_tail()}")
        try:
            response = http.get(f"{server.base_url}/ready", timeout=2.0)
        except httpx.TransportError as exc:  # not listening yet
            last = repr(exc)
        else:
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text}"
        time.sleep(0.2)
    pytest.fail(f"the server was not ready after {timeout_s} s (last: {last}):\n{server.log_tail()}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)



@contextmanager
def running_server(
    args: list[str], log_dir: Path, http: httpx.Client, *, python_prelude: str | None = None,
    command_name: str = "serve", stop_timeout_s: float = 15.0,
) -> Iterator[Server]:
    """`python -m server serve --port <free> *args` (or another `command_name`: serve-ray),
    ready, stopped at exit. `python_prelude`: Python run in the server process before the CLI
    starts (test hooks, e.g. a crash point)."""
    port = free_port()
    log_path = log_dir / "server.log"
    if "--data-dir" not in args:  # each server its own adapter store
        args = [*args, "--data-dir", str(log_dir / "data")]
    command = [sys.executable, "-m", "server", command_name, "--port", str(port), *args]
    if python_prelude is not None:
        entry = f"{python_prelude}\nimport sys\nfrom server.cli import main\nsys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", entry, *command[3:]]
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    server = Server(base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_ready(server, http)
        yield server
    finally:
        stop_process(process, stop_timeout_s)


@contextmanager
def openai_client(server: Server) -> Iterator[openai.OpenAI]:
    """The official client on the server's /v1, never through a proxy, with no retries."""
    http_client = httpx.Client(trust_env=False, timeout=120.0)
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client) as api:
        yield api
