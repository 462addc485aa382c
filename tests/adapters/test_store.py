"""The on-disk adapter store: versions, persistence, crash safety (including a real SIGKILL)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.durable import STEPS
from adapters.store import (
    AdapterNameError,
    AdapterStore,
    StoreError,
    StoredVersion,
    UnknownAdapterError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = b'{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'


def sha(config: bytes, weights: bytes) -> str:
    return hashlib.sha256(config + weights).hexdigest()


def files_hash(stored: StoredVersion) -> str:
    """The version id recomputed from the files on disk."""
    return sha((stored.path / "adapter_config.json").read_bytes(), (stored.path / "adapter_model.safetensors").read_bytes())


def add(store: AdapterStore, name: str, weights: bytes, config: bytes = CONFIG, source: str = "upload") -> StoredVersion:
    return store.commit(name, store.stage_files(config, io.BytesIO(weights)), source=source)


def tmp_entries(root: Path) -> list[Path]:
    """What is staged or trashed under tmp/: live stores' own (empty) staging areas and their
    lock files aside, everything there."""
    tmp = root / "tmp"
    found: list[Path] = []
    for entry in tmp.iterdir():
        if entry.name.endswith(".lock"):
            continue
        if entry.is_dir() and (tmp / (entry.name + ".lock")).exists():
            found += list(entry.iterdir())
        else:
            found.append(entry)
    return found


def test_stage_commit_and_query(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    weights = os.urandom(3000)
    staged = store.stage_files(CONFIG, io.BytesIO(weights))
    assert staged.version == sha(CONFIG, weights)
    assert staged.size == len(CONFIG) + len(weights)
    assert staged.path.parent.parent == tmp_path / "tmp"  # tmp/<this store's staging area>/
    assert store.names() == []  # staged is not visible

    stored = store.commit("alpha", staged, source="path:/x")
    assert stored.version == sha(CONFIG, weights)
    assert stored.path == tmp_path / "adapters" / "alpha" / stored.version
    assert (stored.path / "adapter_config.json").read_bytes() == CONFIG
    assert (stored.path / "adapter_model.safetensors").read_bytes() == weights
    assert (stored.name, stored.size, stored.source) == ("alpha", len(CONFIG) + len(weights), "path:/x")
    assert store.current("alpha") == stored
    assert store.versions("alpha") == [stored]
    assert store.names() == ["alpha"]
    assert tmp_entries(tmp_path) == []
    catalog = json.loads((tmp_path / "catalog.json").read_text())
    assert catalog["format"] == 1
    assert catalog["adapters"]["alpha"] == {
        "current": stored.version,
        "versions": [{"version": stored.version, "size": stored.size, "created": stored.created, "source": "path:/x"}],
    }


def test_stage_dir_and_path_from_safetensors(tmp_path: Path) -> None:
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_bytes(CONFIG)
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, 2)}, peft / "adapter_model.safetensors")
    weights = (peft / "adapter_model.safetensors").read_bytes()

    store = AdapterStore(tmp_path / "data")
    from_dir = store.stage_dir(peft)
    from_path = store.stage_files(CONFIG, peft / "adapter_model.safetensors")
    assert from_dir.version == from_path.version == sha(CONFIG, weights)
    stored = store.commit("lora", from_dir, source="path:" + str(peft))
    assert files_hash(stored) == stored.version
    assert store.commit("lora", from_path, source="upload").version == stored.version

    (peft / "adapter_model.safetensors").unlink()
    with pytest.raises(StoreError):
        store.stage_dir(peft)


def test_identical_commit_is_idempotent(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first = add(store, "a", b"same")
    second = add(store, "a", b"same", source="other")
    assert second == first  # the original record, not a new one
    assert store.versions("a") == [first]
    assert sorted(p.name for p in (tmp_path / "adapters" / "a").iterdir()) == [first.version]
    assert tmp_entries(tmp_path) == []  # the duplicate staged copy was discarded


def test_new_content_adds_a_version_and_becomes_current(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    v1 = add(store, "a", b"one")
    v2 = add(store, "a", b"two")
    assert v1.version != v2.version
    assert store.current("a") == v2
    assert store.versions("a") == [v1, v2]  # oldest first
    assert (v1.path / "adapter_model.safetensors").read_bytes() == b"one"  # older versions stay on disk
    # Recommitting older content makes it current again without a third version.
    assert add(store, "a", b"one") == v1
    assert store.current("a") == v1
    assert store.versions("a") == [v1, v2]
    # A different config alone is a different version.
    assert add(store, "a", b"one", config=b"{}").version == sha(b"{}", b"one")


def test_catalog_persists_across_restart(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    v1 = add(store, "b", b"one")
    v2 = add(store, "b", b"two")
    other = add(store, "a", b"x", source="hub:org/repo@rev")
    add(store, "b", b"one")  # current goes back to v1

    reopened = AdapterStore(tmp_path)
    assert reopened.names() == ["a", "b"]
    assert reopened.versions("b") == [v1, v2]
    assert reopened.current("b") == v1
    assert reopened.current("a") == other


def test_tmp_leftovers_are_removed_at_start(tmp_path: Path) -> None:
    AdapterStore(tmp_path)
    leftover = tmp_path / "tmp" / "deadbeef"
    leftover.mkdir()
    (leftover / "adapter_config.json").write_bytes(CONFIG)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "tmp" / "stray-file").write_bytes(b"x")

    store = AdapterStore(tmp_path)
    assert tmp_entries(tmp_path) == []
    assert store.names() == []


def test_staged_but_not_committed_is_invisible_and_kept_while_its_store_lives(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    v1 = add(store, "a", b"one")
    staged = store.stage_files(CONFIG, io.BytesIO(b"two"))  # an upload in flight
    other = AdapterStore(tmp_path)  # another process opens the same store meanwhile
    assert other.versions("a") == [v1]  # nothing uncommitted is visible
    assert staged.path.is_dir()  # and its start-up cleanup left the live upload alone
    assert store.commit("a", staged, source="upload").version == staged.version
    assert [v.version for v in other.versions("a")] == [v1.version, staged.version]  # seen there too
    # Crashed uploads (the process gone, its lock with it) are cleaned: see the SIGKILL tests.


def test_entries_whose_files_are_gone_are_dropped_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = AdapterStore(tmp_path)
    a1 = add(store, "a", b"one")
    a2 = add(store, "a", b"two")
    b1 = add(store, "b", b"bee")
    c1 = add(store, "c", b"sea")
    for path in (a2.path / "adapter_model.safetensors", b1.path / "adapter_config.json"):
        path.unlink()  # a version that lacks a file
    for path in c1.path.iterdir():
        path.unlink()
    c1.path.rmdir()  # a version whose folder is missing

    reopened = AdapterStore(tmp_path)
    assert reopened.names() == ["a"]
    assert reopened.versions("a") == [a1]
    assert reopened.current("a") == a1  # the current one was dropped: fall back to the newest left
    assert "dropping" in caplog.text
    # The repair is persisted.
    assert list(json.loads((tmp_path / "catalog.json").read_text())["adapters"]) == ["a"]


def test_stray_catalog_temp_file_is_ignored(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    v1 = add(store, "a", b"one")
    # A crash during the catalog write leaves a (possibly truncated) temp file next to catalog.json.
    stray = tmp_path / ".catalog-0123abcd.tmp"
    stray.write_bytes(b'{"format": 1, "adapters": {"a": {"curr')

    reopened = AdapterStore(tmp_path)
    assert reopened.current("a") == v1
    assert not stray.exists()


def test_failed_catalog_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path)
    v1 = add(store, "a", b"one")
    before = (tmp_path / "catalog.json").read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        add(store, "a", b"two")
    monkeypatch.undo()

    assert store.current("a") == v1  # memory did not move ahead of the disk
    assert (tmp_path / "catalog.json").read_bytes() == before
    assert not list(tmp_path.glob(".catalog-*"))
    assert AdapterStore(tmp_path).versions("a") == [v1]


def test_malformed_catalog_refuses_to_start(tmp_path: Path) -> None:
    AdapterStore(tmp_path)
    (tmp_path / "catalog.json").write_text('{"format": 1, "adapters": {"../etc": {"current": "x", "versions": []}}}')
    with pytest.raises(StoreError, match="malformed"):
        AdapterStore(tmp_path)
    (tmp_path / "catalog.json").write_text("{not json")
    with pytest.raises(StoreError, match="malformed"):
        AdapterStore(tmp_path)


# The child commits version 1, then stages version 2 from a slow endless stream; it prints a marker
# once staging has written some blocks, and the test kills it there.
# A child commits "a" and "b", then arms the crash hook for one step and makes one more change:
# a new version of "a" (commit) or the removal of "b" (delete). It is SIGKILLed at that step.
_CRASH_CHILD = r"""
import io, os, signal, sys
from pathlib import Path
import adapters.durable as durable
from adapters.store import AdapterStore

root, step, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = AdapterStore(root)
store.commit("a", store.stage_files(b'{"v": 1}', io.BytesIO(b"\x01" * 3_000_000)), source="upload")
store.commit("b", store.stage_files(b'{"v": 9}', io.BytesIO(b"\x09" * 10)), source="upload")
durable.CRASH_POINT = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
if action == "commit":  # 3 MB: the weights take several blocks, so the partial copy is partial
    store.commit("a", store.stage_files(b'{"v": 2}', io.BytesIO(b"\x02" * 3_000_000)), source="upload")
else:
    store.delete("b")
print("NOT KILLED", flush=True)
"""
V1 = sha(b'{"v": 1}', b"\x01" * 3_000_000)
V2 = sha(b'{"v": 2}', b"\x02" * 3_000_000)
VB = sha(b'{"v": 9}', b"\x09" * 10)
# The steps each change passes through (adapters/durable.py STEPS lists them all).
COMMIT_STEPS = [s for s in STEPS if not s.startswith("remove:")]
DELETE_STEPS = [s for s in STEPS if s.startswith(("catalog:", "remove:"))]
# Once the new catalog has replaced the old one, the change is what a restart sees.
DONE_AFTER = ("catalog:replaced", "catalog:synced", "remove:moved")


def test_every_step_is_a_crash_point(tmp_path: Path) -> None:
    """The hook sits where STEPS says: a commit and a removal pass every listed step."""
    import adapters.durable as store_module

    seen: list[str] = []
    store = AdapterStore(tmp_path)
    add(store, "a", b"\x01" * 3_000_000)
    store_module.CRASH_POINT = seen.append
    try:
        add(store, "a", b"\x02" * 3_000_000)
        assert seen == COMMIT_STEPS
        seen.clear()
        store.delete("a")
        assert seen == DELETE_STEPS
    finally:
        store_module.CRASH_POINT = None


@pytest.mark.parametrize(("action", "step"), [("commit", s) for s in COMMIT_STEPS] + [("delete", s) for s in DELETE_STEPS])
def test_sigkill_at_every_step_leaves_a_consistent_store(tmp_path: Path, action: str, step: str) -> None:
    """Killed at any step of a commit or a removal, the store reopens as it was before the change
    or as it is after it, never between: every listed version whole, nothing staged left, the
    catalog readable. A non-atomic step (say the catalog written in place) fails this."""
    root = tmp_path / "data"
    child = subprocess.run([sys.executable, "-c", _CRASH_CHILD, str(root), step, action], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr[-2000:])

    store = AdapterStore(root)  # must open: a half-written catalog would make it refuse
    done = step in DONE_AFTER
    if action == "commit":
        assert store.names() == ["a", "b"]
        assert store.current("a").version == (V2 if done else V1)
        assert [v.version for v in store.versions("a")] == ([V1, V2] if done else [V1])
    else:
        assert store.names() == (["a"] if done else ["a", "b"])
    for name in store.names():
        for stored in store.versions(name):
            assert files_hash(stored) == stored.version, (name, stored.version)
    if "b" in store.names():
        assert store.current("b").version == VB
    assert tmp_entries(root) == []
    assert not list(root.glob(".catalog-*"))


def test_max_bytes_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    with pytest.raises(StoreError, match=r"exceed.*MB"):
        store.stage_files(CONFIG, io.BytesIO(b"x" * 3_000_001), max_bytes=3_000_000)
    assert tmp_entries(tmp_path) == []
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_bytes(CONFIG)
    (peft / "adapter_model.safetensors").write_bytes(b"y" * 11)
    with pytest.raises(StoreError, match="MB"):
        store.stage_dir(peft, max_bytes=10)
    assert tmp_entries(tmp_path) == []
    assert store.stage_dir(peft, max_bytes=11).size == len(CONFIG) + 11  # the limit itself is allowed
    assert store.names() == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 65, "name with space", "../etc", "a\\b", "é"])
def test_invalid_names_are_refused_before_touching_the_disk(tmp_path: Path, name: str) -> None:
    store = AdapterStore(tmp_path)
    staged = store.stage_files(CONFIG, io.BytesIO(b"w"))
    with pytest.raises(AdapterNameError, match="1-64 characters"):
        store.commit(name, staged, source="upload")
    assert staged.path.is_dir()  # untouched
    assert list((tmp_path / "adapters").iterdir()) == []
    assert not (tmp_path / "catalog.json").exists()
    for call in (store.current, store.versions, store.delete):
        with pytest.raises(AdapterNameError):
            call(name)
    with pytest.raises(AdapterNameError):
        store.prune(name, set())


def test_valid_edge_names(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for name in ("x" * 64, "a.b_c-D9", "...", ".hidden"):
        add(store, name, b"w")
    assert store.names() == sorted(["x" * 64, "a.b_c-D9", "...", ".hidden"])


def test_delete_removes_catalog_entry_and_files(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    add(store, "a", b"one")
    add(store, "a", b"two")
    kept = add(store, "b", b"one")
    store.delete("a")
    assert store.names() == ["b"]
    assert not (tmp_path / "adapters" / "a").exists()
    assert tmp_entries(tmp_path) == []
    with pytest.raises(UnknownAdapterError):
        store.current("a")
    reopened = AdapterStore(tmp_path)
    assert reopened.names() == ["b"]
    assert files_hash(reopened.current("b")) == kept.version


def test_unknown_names(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    for call in (store.current, store.versions, store.delete):
        with pytest.raises(UnknownAdapterError, match="nope"):
            call("nope")
    with pytest.raises(UnknownAdapterError):
        store.prune("nope", set())


def test_prune_keeps_current_and_kept_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    v1, v2, v3, v4 = (add(store, "a", w) for w in (b"1", b"2", b"3", b"4"))
    store.prune("a", {v2.version})
    assert store.versions("a") == [v2, v4]  # v4 is current
    assert not v1.path.exists() and not v3.path.exists()
    assert v2.path.exists() and v4.path.exists()
    store.prune("a", set())
    assert store.versions("a") == [v4]
    assert AdapterStore(tmp_path).versions("a") == [v4]
    assert tmp_entries(tmp_path) == []


def test_commit_only_accepts_this_stores_staging(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "one")
    other = AdapterStore(tmp_path / "two")
    staged = other.stage_files(CONFIG, io.BytesIO(b"w"))
    with pytest.raises(StoreError):
        store.commit("a", staged, source="upload")
    staged.discard()
    assert not staged.path.exists()


def test_concurrent_commits(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                add(store, f"n{i}", b"%d-%d" % (i, j))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reopened = AdapterStore(tmp_path)
    assert reopened.names() == [f"n{i}" for i in range(6)]
    assert all(len(reopened.versions(f"n{i}")) == 5 for i in range(6))


def test_temporary_store_goes_with_its_owner_and_with_the_process(tmp_path: Path) -> None:
    """The store of start-up adapters (--lora-modules) is removed once nothing holds it, and at
    the latest when the process exits."""
    import gc
    import tempfile

    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        store = AdapterStore.temporary()
        root = store.root
        assert root.parent == tmp_path and root.is_dir()
        del store
        gc.collect()
        assert not root.exists()
    finally:
        tempfile.tempdir = previous
    script = (
        "import sys; from adapters.store import AdapterStore\n"
        "store = AdapterStore.temporary(); print(store.root); sys.stdout.flush()\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    left = Path(out.stdout.strip())
    assert left.parent == tmp_path and not left.exists()


def test_a_damaged_version_folder_is_not_reused(tmp_path: Path) -> None:
    """Committing content whose version folder exists reuses the folder only if its files hash
    to the version; a damaged or half-copied one is replaced by the new copy."""
    store = AdapterStore(tmp_path)
    first = add(store, "a", b"\x01" * 5000)
    (first.path / "adapter_model.safetensors").write_bytes(b"\x01" * 100)  # damaged behind our back
    again = add(store, "a", b"\x01" * 5000)
    assert again.path == first.path and files_hash(again) == again.version
    assert tmp_entries(tmp_path) == []


def test_a_fresh_store_deletes_and_prunes_without_staging_first(tmp_path: Path) -> None:
    """After a restart nothing has been staged: a delete or prune (which trash folders into the
    staging area) must not wait on the store's own lock (it once deadlocked the server here)."""
    first = AdapterStore(tmp_path)
    add(first, "a", b"one")
    add(first, "a", b"two")
    add(first, "b", b"bee")
    del first
    done: list[str] = []

    def work() -> None:
        fresh = AdapterStore(tmp_path)
        fresh.prune("a", keep=set())
        fresh.delete("b")
        done.append("ok")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(30)
    assert done == ["ok"], "delete/prune on a fresh store did not finish"
    reopened = AdapterStore(tmp_path)
    assert reopened.names() == ["a"] and len(reopened.versions("a")) == 1


def test_readers_never_wait_for_a_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer holding the file lock (another process committing a large upload) blocks no
    reader of this store: while this store's own commit waits for that lock, names() and
    current() answer at once."""
    import adapters.store as store_module
    from adapters.store_locks import exclusive

    store = AdapterStore(tmp_path)
    add(store, "a", b"one")
    held, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def other_process_writing() -> None:
        with exclusive(tmp_path / ".lock"):
            held.set()
            release.wait(30)

    def announced(path: Path):  # type: ignore[no-untyped-def]
        waiting.set()  # this store's writer is about to wait for the file lock
        return exclusive(path)

    writer = threading.Thread(target=other_process_writing, daemon=True)
    writer.start()
    assert held.wait(10)
    monkeypatch.setattr(store_module, "exclusive", announced)
    committing = threading.Thread(target=lambda: add(store, "b", b"bee"), daemon=True)
    committing.start()
    assert waiting.wait(10)
    answers: list[object] = []
    reader = threading.Thread(target=lambda: answers.extend([store.names(), store.current("a").version]), daemon=True)
    reader.start()
    reader.join(10)
    release.set()
    committing.join(30)
    writer.join(30)
    assert answers and answers[0] == ["a"], "a reader waited for the writer"
    assert store.names() == ["a", "b"]
