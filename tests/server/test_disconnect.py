"""A client that disconnects frees its row within a step, streaming or not: the app runs in
this process under uvicorn on a loopback port, so the test can hold the engine still while the
client goes away and then count what the engine did."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.e2e.server_process import free_port
from tests.server.test_admin_api import PausedEngine

MAX_TOKENS = 100


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=256,
                    data_dir=tmp_path_factory.mktemp("data"))
    app = create_app(lambda metrics: build_service(conf, metrics))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve()), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(trust_env=False, timeout=30) as http:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http.get(f"{base}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the in-process server never became ready"
            time.sleep(0.05)
    yield base, app.state.holder.service.engine
    uv.should_exit = True
    thread.join(30)


class CancelSeen:
    """Records when the service asks the engine to cancel a request."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.real = engine, engine.cancel
        self.event = threading.Event()
        engine.cancel = self._cancel

    def _cancel(self, request_id: str, reason: str = "abort") -> None:
        self.event.set()
        self.real(request_id, reason)

    def restore(self) -> None:
        self.engine.cancel = self.real


def settle(engine: Any) -> None:
    deadline = time.monotonic() + 60
    while engine.num_running or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


def check_freed_within_a_step(engine: Any, before: dict[str, int], tokens_before: int) -> None:
    settle(engine)
    assert engine.finished["abort"] == before["abort"] + 1, (before, engine.finished)
    assert engine.finished["length"] == before["length"], "the abandoned request ran to max_tokens"
    # Held at its second token while the client left: at most a step more before the cancel.
    assert engine.generated_tokens - tokens_before <= 3, engine.generated_tokens - tokens_before
    assert sorted(engine._free_rows) == [0, 1] and engine.health() is None
    assert engine.stats()["kv_cache"]["blocks_used"] == 0 and engine.blocks.pool.references == 0  # its blocks too


def test_a_closed_stream_frees_its_row(server: tuple[str, Any]) -> None:
    base, engine = server
    before, tokens_before = dict(engine.finished), engine.generated_tokens
    pause, cancels = PausedEngine(engine), CancelSeen(engine)
    # Greedy: the same first token every run, one that decodes to visible text (a data line).
    body = {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "temperature": 0}
    try:
        with httpx.Client(trust_env=False, timeout=30) as http:
            with http.stream("POST", f"{base}/v1/completions", json=body) as response:
                assert pause.paused.wait(30), "the request never reached its second token"
                lines = response.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
            # Leaving the block closed the connection: the client is gone.
        assert cancels.event.wait(30), "the server never cancelled the abandoned stream"
    finally:
        pause.resume()
        cancels.restore()
    check_freed_within_a_step(engine, before, tokens_before)


def test_a_client_that_hangs_up_on_a_non_streamed_request_frees_its_row(server: tuple[str, Any]) -> None:
    base, engine = server
    before, tokens_before = dict(engine.finished), engine.generated_tokens
    pause, cancels = PausedEngine(engine), CancelSeen(engine)
    payload = json.dumps({"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                          "temperature": 0}).encode()
    host, port = base.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            assert pause.paused.wait(30), "the request never reached its second token"
        # The socket is closed: the server notices the disconnect while the engine is held.
        assert cancels.event.wait(30), "the server never cancelled the abandoned request"
    finally:
        pause.resume()
        cancels.restore()
    check_freed_within_a_step(engine, before, tokens_before)
