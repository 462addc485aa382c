"""Schema-driven fuzzing of every route (OpenAI and admin) with schemathesis: requests generated
from the server's own OpenAPI schema, valid ones and invalid ones (wrong types, out-of-range
values, missing fields), a bounded number per route. No answer may be a 5xx, and the server must
be idle and healthy afterwards. (Cases are drawn with hypothesis directly: schemathesis' pytest
plugin does not run under pytest 9.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.server.test_admin_api import AUTH, TOKEN, ready

EXAMPLES = 50  # per route and generation mode; derandomized, so every run sends the same requests
BODY_EXAMPLES = 100  # the two generation routes, whose bodies have the most fields
# The schema is the app's own; building the app loads nothing, so it is read at collection time.
SCHEMA = schemathesis.openapi.from_dict(create_app(lambda metrics: None).openapi())  # type: ignore[arg-type, return-value]
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    conf = Settings(model=str(tiny_llama_dir), max_num_seqs=4, max_model_len=64, max_loras=2, max_lora_rank=8,
                    data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[tmp_path_factory.mktemp("roots")],
                    max_upload_mb=0.5, request_timeout=30)
    with TestClient(create_app(lambda metrics: build_service(conf, metrics), admin_token=TOKEN)) as test_client:
        yield ready(test_client)


def send(client: TestClient, case: Any) -> Any:
    """The case as an HTTP request through the module's client, authenticated (so admin routes
    reach their handlers)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=AUTH)
    if "data" in kwargs and isinstance(kwargs["data"], (bytes, str)):
        kwargs["content"] = kwargs.pop("data")
    if kwargs.get("cookies"):  # the schema declares no cookies: none should be generated
        raise AssertionError(f"unexpected cookies {kwargs['cookies']!r}")
    keep = ("method", "url", "headers", "params", "json", "content", "data", "files")
    return client.request(**{k: v for k, v in kwargs.items() if k in keep})


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_request_is_a_server_error(client: TestClient, operation: Any, mode: Any) -> None:
    failures: list[str] = []

    examples = BODY_EXAMPLES if operation.label in ("POST /v1/completions", "POST /v1/chat/completions") else EXAMPLES

    @given(operation.as_strategy(mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        response = send(client, case)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.formatted_path} body={case.body!r:.300} -> "
                            f"{response.status_code}: {response.text[:300]}")

    try:
        check()
    except Unsatisfiable:  # a route whose schema admits every value (no body, string parameters)
        pytest.skip(f"no {mode.value} input exists for {operation.label}")
    assert not failures, "\n".join(failures[:5])


def test_the_server_is_idle_and_healthy_after_the_fuzz(client: TestClient) -> None:
    from tests.server.test_api import wait_idle

    body = wait_idle(client)  # /ready reports as of the engine's last step
    assert body["status"] == "ready" and body["running"] == 0 and body["waiting"] == 0, body
    engine = client.app.state.holder.service.engine  # type: ignore[attr-defined]
    assert sorted(engine._free_rows) == [0, 1, 2, 3]
