"""Engine scheduling on a tiny model: rows, chunked prefill, cancellation, limits, the thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from server.engine import Engine
from server.errors import EngineStoppedError
from server.runner import ModelRunner, chunk_window
from server.sampling import SamplingParams
from server.sequence import GenerationRequest, TokenOutput
from server.weights import build_model
from tests.server.fakes import Collector


def make_engine(folder: Path, *, rows: int = 4, max_len: int = 64, chunk: int = 512) -> Engine:
    model = build_model(folder, dtype=torch.float32, device="cpu", max_rows=rows, max_len=max_len)
    return Engine(ModelRunner(model), eos_ids=frozenset(), prefill_chunk=chunk)


def greedy(rid: str, prompt: list[int], n: int = 8) -> GenerationRequest:
    return GenerationRequest(rid, prompt, max_tokens=n, sampling=SamplingParams(temperature=0))


def test_chunk_windows_round_to_64() -> None:
    assert chunk_window(1, 2048) == 64 and chunk_window(65, 2048) == 128 and chunk_window(3000, 2048) == 2048


def test_chunked_prefill_and_sharing_rows_change_nothing(tiny_dir: Path) -> None:
    prompt = list(range(3, 40))
    alone = Collector()
    engine = make_engine(tiny_dir, chunk=512)
    engine.submit(greedy("a", prompt), alone)
    engine.run_until_idle()

    shared = Collector()
    engine = make_engine(tiny_dir, chunk=7)
    engine.submit(greedy("x", [50, 51]), shared)
    engine.submit(greedy("a", prompt), shared)
    engine.submit(greedy("y", list(range(60, 80)), n=3), shared)
    engine.run_until_idle()
    assert shared.tokens["a"] == alone.tokens["a"]


def test_more_requests_than_rows_wait_and_all_finish(tiny_dir: Path) -> None:
    got = Collector()
    engine = make_engine(tiny_dir, rows=2)
    for i in range(5):
        engine.submit(greedy(str(i), [10 + i, 11, 12], n=4 + i), got)
    engine.run_until_idle()
    assert sorted(got.final) == [str(i) for i in range(5)]
    assert all(len(got.tokens[str(i)]) == 4 + i for i in range(5))
    assert sorted(engine._free_rows) == [0, 1] and engine.num_running == 0


def test_context_limit_finishes_with_length(tiny_dir: Path) -> None:
    got = Collector()
    engine = make_engine(tiny_dir, max_len=32)
    engine.submit(GenerationRequest("r", list(range(3, 30)), max_tokens=100), got)
    engine.run_until_idle()
    assert got.final["r"].finish_reason == "length"
    assert len(got.tokens["r"]) == 32 - 27


def test_cancel_frees_the_row(tiny_dir: Path) -> None:
    got = Collector()
    engine = make_engine(tiny_dir, rows=2)
    engine.submit(greedy("long", [5, 6, 7], n=50), got)
    engine.submit(greedy("waiting", [5, 6], n=50), got)
    engine.submit(greedy("queued", [5], n=50), got)
    engine._drain_inbox(block=False)
    engine.step()
    engine.step()
    engine.cancel("long")
    engine.cancel("queued")
    engine._drain_inbox(block=False)
    assert got.final["long"].finish_reason == "abort"
    assert got.final["queued"].finish_reason == "abort"
    assert engine.num_running == 1 and len(engine._free_rows) == 1
    engine.run_until_idle()
    assert len(got.tokens["waiting"]) == 50


def test_seeded_sampling_is_independent_of_neighbours(tiny_dir: Path) -> None:
    def seeded(rid: str) -> GenerationRequest:
        return GenerationRequest(rid, [7, 8, 9], max_tokens=10, sampling=SamplingParams(temperature=1.0, seed=42))

    alone = Collector()
    engine = make_engine(tiny_dir)
    engine.submit(seeded("s"), alone)
    engine.run_until_idle()
    crowd = Collector()
    engine = make_engine(tiny_dir)
    engine.submit(GenerationRequest("o1", [3, 4], max_tokens=12, sampling=SamplingParams(seed=1)), crowd)
    engine.submit(seeded("s"), crowd)
    engine.submit(GenerationRequest("o2", [30] * 9, max_tokens=4, sampling=SamplingParams(seed=2)), crowd)
    engine.run_until_idle()
    assert crowd.tokens["s"] == alone.tokens["s"]


def test_background_thread_serves_and_stops(tiny_dir: Path) -> None:
    engine = make_engine(tiny_dir)
    engine.start()
    done = threading.Event()
    got = Collector()

    def sink(event: TokenOutput) -> None:
        got(event)
        if event.finished:
            done.set()

    engine.submit(greedy("t", [4, 5, 6]), sink)
    assert done.wait(30)
    engine.stop()
    assert len(got.tokens["t"]) == 8
    assert engine._thread is not None and not engine._thread.is_alive()
    with pytest.raises(EngineStoppedError):
        engine.submit(greedy("u", [4]), sink)


def test_the_engine_implements_the_client_interface() -> None:
    """What the service, the admin API and a future remote replica rely on (server/engine_client.py):
    every method, with the same parameters, defaults and kinds."""
    import inspect

    from server.engine_client import EngineClient

    methods = [name for name, value in vars(EngineClient).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert {"submit", "cancel", "adapter_slots", "stats", "health"} <= set(methods)
    for name in methods:
        wanted = inspect.signature(getattr(EngineClient, name)).parameters
        got = inspect.signature(getattr(Engine, name)).parameters
        assert [(p.name, p.kind, p.default) for p in got.values()] == [
            (p.name, p.kind, p.default) for p in wanted.values()
        ], name
