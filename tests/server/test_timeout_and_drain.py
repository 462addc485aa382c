"""Per-request timeout (in process) and SIGTERM drain (a real server process)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.e2e.server_process import running_server
from tests.server.test_api import wait_idle


@pytest.fixture(scope="module")
def slow_client(tiny_llama_dir: Path) -> Iterator[TestClient]:
    """A tiny model whose decode steps take 50 ms, with a 0.5 s request timeout."""
    def factory(metrics):  # type: ignore[no-untyped-def]
        settings = Settings(model=str(tiny_llama_dir), max_num_seqs=2, max_model_len=128, request_timeout=0.5)
        service = build_service(settings, metrics)
        runner = service.engine.runner
        fast_step = runner.step

        def slow_step(rows: list[int], chunks: Any = ()) -> list[int]:
            if rows:  # a step that decodes
                time.sleep(0.05)
            return fast_step(rows, chunks)

        runner.step = slow_step  # type: ignore[method-assign]
        return service

    app = create_app(factory)
    with TestClient(app) as client:
        app.state.holder.join(120)
        yield client



def test_timeout_non_streaming_is_408_and_frees_the_row(slow_client: TestClient) -> None:
    response = slow_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 100, "ignore_eos": True})
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"
    wait_idle(slow_client)
    ok = slow_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200


def test_timeout_streaming_ends_with_an_error_event(slow_client: TestClient) -> None:
    body = {"prompt": "hi", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with slow_client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert "--request-timeout" in error["error"]["message"]
    wait_idle(slow_client)


@pytest.mark.e2e
def test_sigterm_lets_a_running_stream_finish_then_exits_0(tmp_path: Path) -> None:
    with httpx.Client(trust_env=False, timeout=60) as http, running_server(
        ["--max-num-seqs", "2", "--max-model-len", "256", "--drain-timeout", "60"], tmp_path, http
    ) as server:
        lines: list[str] = []
        first = threading.Event()

        def consume() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
            with http.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(60)
        server.process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert server.process.wait(60) == 0, server.log_tail()
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and chunks[-1]["usage"]["completion_tokens"] == 40
