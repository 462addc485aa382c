"""The end-to-end client tests of tests/e2e/test_openai_client.py, unchanged, against `loraswap
serve-ray`: the embedded SmolLM2-135M-Instruct as 2 replicas behind the Ray Serve ingress. The
same answers, streams, logprobs, structured outputs and errors as one process gives."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.server_process import Server, running_server
from tests.ray.test_ray_serve import wait_for
from tests.e2e.test_openai_client import (  # noqa: F401  (collected here, against this module's server)
    MAX_MODEL_LEN,
    client,
    test_chat_completion,
    test_chat_completion_streaming,
    test_completion,
    test_completion_streaming,
    test_json_schema_through_the_client,
    test_logprobs_through_the_client,
    test_models_list,
    test_too_many_tokens_is_a_bad_request,
    test_unknown_model_is_not_found,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http: httpx.Client) -> Iterator[Server]:
    args = ["--max-num-seqs", "4", "--max-model-len", str(MAX_MODEL_LEN), "--replicas", "2",
            "--replica-cpus", "0.5", "--ray-num-cpus", "2"]
    with running_server(args, tmp_path_factory.mktemp("ray-e2e"), http, command_name="serve-ray",
                        stop_timeout_s=60.0) as running:
        wait_for(lambda: http.get(f"{running.base_url}/ready").json()["replicas"]["ready"] == 2,
                 "both replicas ready", running)
        yield running
