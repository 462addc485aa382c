"""Several processes on one adapter store: no lost update, no cleanup of a live process's upload,
every process sees the others' changes (the store and the catalog above it)."""

from __future__ import annotations


import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.catalog import AdapterCatalog
from adapters.errors import AdapterNotFoundError
from adapters.store import AdapterStore
from adapters.validation import SlotSpec
from tests.adapters.test_store import REPO_ROOT, tmp_entries

WRITER = r"""
import io, sys
from pathlib import Path
from adapters.store import AdapterStore

store = AdapterStore(Path(sys.argv[1]))
print("OPEN", flush=True)
sys.stdin.readline()  # start together
for i in range(int(sys.argv[3])):
    store.commit(f"{sys.argv[2]}{i}", store.stage_files(b"{}", io.BytesIO(f"{sys.argv[2]}{i}".encode() * 100)),
                 source="upload")
print("DONE", flush=True)
"""


def child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_writers_lose_no_update(tmp_path: Path) -> None:
    """Two processes add names as fast as they can: every name of both is listed afterwards (each
    wrote its own in-memory catalog before, so one's additions vanished)."""
    writers = [child(WRITER, str(tmp_path), prefix, "25") for prefix in ("a", "b")]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "OPEN"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0 and out.strip() == "DONE"
    names = AdapterStore(tmp_path).names()
    assert names == sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25)])


STAGER = r"""
import io, sys
from pathlib import Path
from adapters.store import AdapterStore

store = AdapterStore(Path(sys.argv[1]))
staged = store.stage_files(b'{"v": 1}', io.BytesIO(b"w" * 3_000_000))
print(staged.path, flush=True)
sys.stdin.readline()
print(store.commit("up", staged, source="upload").version, flush=True)
"""


def test_a_live_upload_survives_another_process_starting(tmp_path: Path) -> None:
    uploader = child(STAGER, str(tmp_path))
    assert uploader.stdout is not None and uploader.stdin is not None
    staged = Path(uploader.stdout.readline().strip())
    assert staged.is_dir()
    other = AdapterStore(tmp_path)  # a replica starting now runs its start-up cleanup
    assert staged.is_dir() and (staged / "adapter_model.safetensors").stat().st_size == 3_000_000
    uploader.stdin.write("commit\n")
    uploader.stdin.flush()
    version, _ = uploader.communicate(timeout=60)
    assert uploader.returncode == 0
    assert other.current("up").version == version.strip()  # and the other one sees it


def test_a_dead_process_upload_is_cleaned_by_the_next_start(tmp_path: Path) -> None:
    uploader = child(STAGER, str(tmp_path))
    assert uploader.stdout is not None
    staged = Path(uploader.stdout.readline().strip())
    os.kill(uploader.pid, signal.SIGKILL)
    uploader.wait(30)
    assert staged.is_dir()  # left behind by the crash
    AdapterStore(tmp_path)
    assert not staged.exists() and tmp_entries(tmp_path) == []


def adapter_folder(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    save_file({key.format("A"): torch.randn(2, 8, generator=g), key.format("B"): torch.randn(8, 2, generator=g)},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    return folder


SPEC = SlotSpec(targets={"model.layers.0.self_attn.q_proj": (8, 8)}, other_modules=frozenset(), max_rank=8)


def catalog(root: Path) -> AdapterCatalog:
    """What one server process holds: its own store object and catalog on the shared root."""
    return AdapterCatalog(AdapterStore(root), SPEC, base_name="base", max_cpu=4)


def test_catalogs_of_two_processes_follow_each_other(tmp_path: Path) -> None:
    one, two = catalog(tmp_path / "data"), catalog(tmp_path / "data")
    retired: list[str] = []  # what one's server would unload (bootstrap: engine.unload_adapter)
    one.on_retired = retired.append
    first = adapter_folder(tmp_path / "v1", seed=1)
    second = adapter_folder(tmp_path / "v2", seed=2)

    added, _ = one.add("x", one.store.stage_dir(first), source="upload")
    assert "x" in two and two.get("x").version == added.version  # uploaded on one, served by two
    assert two.resolve("x").key == added.key

    replaced, _ = two.add("x", two.store.stage_dir(second), source="upload")
    assert one.get("x").version == replaced.version  # new requests on one get the new version
    assert [a.name for a in one.all()] == ["x"]
    assert retired == [added.key]  # the old version leaves one's slots too

    two.delete("x")
    assert "x" not in one
    assert retired == [added.key, replaced.key]
    with pytest.raises(AdapterNotFoundError):
        one.resolve("x")

