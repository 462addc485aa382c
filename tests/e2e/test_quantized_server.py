"""End to end on a quantized base: the embedded model with --quantization int8 and nf4 answers
through the HTTP API, with and without an adapter, and reports its memory footprint."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes  # noqa: F401  (a dev dependency: a broken install fails here, it never skips)
import httpx
import pytest

from server.model_source import resolve_model
from tests.adapters.helpers import projection_shapes, write_random_adapter
from tests.e2e.server_process import openai_client, running_server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def dense_projection_bytes() -> int:
    """The embedded model's decoder projections in float32 (what quantization shrinks)."""
    folder = resolve_model(None)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return 4 * layers * sum(d_in * d_out for _, d_in, d_out in projection_shapes(folder).values())


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_server_answers_paris(method: str, tmp_path: Path) -> None:
    adapter = write_random_adapter(tmp_path / "ad", resolve_model(None), rank=8, targets=["q_proj", "v_proj"], seed=1)
    args = ["--quantization", method, "--max-num-seqs", "2", "--max-model-len", "256", "--max-lora-rank", "8",
            "--lora-modules", f"ad={adapter}"]
    with httpx.Client(trust_env=False, timeout=120) as http, running_server(args, tmp_path, http) as server:
        info = http.get(f"{server.base_url}/admin/model").json()
        assert info["quantization"] == method
        memory = info["memory"]
        assert memory["linear_bytes"] < (0.3 if method == "int8" else 0.2) * dense_projection_bytes()
        with openai_client(server) as api:
            answer = api.chat.completions.create(model=info["model"], messages=QUESTION,  # type: ignore[arg-type]
                                                 temperature=0, max_tokens=16)
            assert "Paris" in (answer.choices[0].message.content or "")
            with_adapter = api.chat.completions.create(model="ad", messages=QUESTION, temperature=0, max_tokens=4)  # type: ignore[arg-type]
            assert with_adapter.usage is not None and with_adapter.usage.completion_tokens >= 1
