"""What a start serves is what that start was told to serve: adapters named with --lora-modules
are this run's and do not come back at the next start (unless --persist-lora-modules), while
uploads through the admin API stay in the store across restarts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config.settings import Settings
from server.api.app import create_app
from server.bootstrap import build_service
from tests.adapters.helpers import write_random_adapter
from tests.server.test_admin_api import AUTH, TOKEN, ready, upload

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_random_adapter(root / name, tiny_llama_dir, rank=4, targets=["q_proj"], seed=seed, scale=2.0)
        for seed, name in enumerate(["one", "two", "three"], start=1)
    }


@contextmanager
def serving(model: Path, data: Path, **extra: Any) -> Iterator[TestClient]:
    conf = Settings(model=str(model), max_num_seqs=2, max_model_len=64, max_loras=2, max_lora_rank=8,
                    data_dir=data, **extra)
    with TestClient(create_app(lambda metrics: build_service(conf, metrics), admin_token=TOKEN)) as client:
        yield ready(client)


def served(client: TestClient) -> list[str]:
    return sorted(m["id"] for m in client.get("/v1/models").json()["data"])


def admin(client: TestClient, name: str) -> dict[str, Any]:
    response = client.get(f"/admin/adapters/{name}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def test_startup_adapters_are_not_served_by_the_next_start(
    tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with serving(tiny_llama_dir, data, lora_modules={"one": str(adapters["one"])}) as client:
        assert served(client) == sorted([BASE, "one"])
        assert admin(client, "one")["persistent"] is False
        assert upload(client, "two", adapters["two"]).status_code == 200  # an upload is persistent
        assert admin(client, "two")["persistent"] is True
    with serving(tiny_llama_dir, data) as client:
        assert served(client) == sorted([BASE, "two"])
    with serving(tiny_llama_dir, data) as client:  # and uploads stay, start after start
        assert served(client) == sorted([BASE, "two"])


def test_persist_lora_modules_publishes_them(tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serving(tiny_llama_dir, data, lora_modules={"one": str(adapters["one"])}, persist_lora_modules=True) as client:
        assert admin(client, "one")["persistent"] is True
    with serving(tiny_llama_dir, data) as client:
        assert served(client) == sorted([BASE, "one"])
        assert admin(client, "one")["source"] == f"path:{adapters['one']}"


def test_a_startup_adapter_shadows_a_stored_one_for_its_run(
    tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with serving(tiny_llama_dir, data) as client:
        stored = upload(client, "one", adapters["one"]).json()["version"]
    with serving(tiny_llama_dir, data, lora_modules={"one": str(adapters["three"])}) as client:
        status = admin(client, "one")
        assert status["version"] != stored and status["persistent"] is False
        assert [v["version"] for v in status["versions"]] == [status["version"]]
    with serving(tiny_llama_dir, data) as client:  # the stored version is back
        assert admin(client, "one")["version"] == stored


def test_upload_makes_a_startup_name_persistent_and_delete_removes_both(
    tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with serving(tiny_llama_dir, data) as client:
        upload(client, "three", adapters["three"])
    modules = {"one": str(adapters["one"]), "three": str(adapters["one"])}
    with serving(tiny_llama_dir, data, lora_modules=modules) as client:
        replaced = upload(client, "one", adapters["two"]).json()
        assert replaced["persistent"] is True and replaced["replaced"] is not None
        assert client.delete("/admin/adapters/three", headers=AUTH).status_code == 200
        assert served(client) == sorted([BASE, "one"])
    with serving(tiny_llama_dir, data) as client:
        assert served(client) == sorted([BASE, "one"])  # the upload stayed; the stored "three" is gone
        assert admin(client, "one")["version"] == replaced["version"]
