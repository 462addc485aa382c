"""Paged decode attention: the C++ op and its PyTorch fallback against a float64 reference, batch
invariance, isolation from whatever sits in unattended pool slots, windows, bad inputs, torch.compile."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import server.paged_attention as pa
from server.paged_attention import (
    paged_decode_attention,
    paged_decode_reference,
    paged_kernel_backend,
)

HEADS, KV_HEADS, HD, BS = 6, 2, 64, 16
LENGTHS = [1, 37, 16, 0, 64, 100, 5]  # 16 and 64: exact multiples of the block size; 0: padding row
NUM_BLOCKS = 64
Impl = Callable[..., torch.Tensor]
NO_KERNEL = "the C++ paged decode kernel is unavailable here (no g++, build failed, or LORASWAP_PAGED_KERNEL=torch)"


@pytest.fixture(scope="module")
def backend() -> str:
    return paged_kernel_backend()  # builds the kernel once (cached under $LORASWAP_CACHE/kernels)


@pytest.fixture
def cpp(backend: str) -> None:
    if backend != "cpp":
        pytest.skip(NO_KERNEL)


def cpp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bt: torch.Tensor, lens: torch.Tensor, *,
           block_size: int, window: int | None = None, scale: float | None = None,
           softcap: float | None = None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.loraswap.paged_decode(q, k, v, bt, lens, block_size, window or 0, scale, softcap or 0.0)


@pytest.fixture(params=["cpp", "torch"])
def impl(request: pytest.FixtureRequest, backend: str) -> Impl:
    if request.param == "torch":
        return paged_decode_reference
    if backend != "cpp":
        pytest.skip(NO_KERNEL)
    return cpp_op


def pool(seed: int = 0, kv_heads: int = KV_HEADS, hd: int = HD, block_size: int = BS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS * block_size, kv_heads, hd)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def tables(lengths: list[int], max_blocks: int, seed: int = 0, block_size: int = BS) -> torch.Tensor:
    """Distinct shuffled blocks per row; columns a row does not need are -1 (never to be read)."""
    ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    bt = torch.full((len(lengths), max_blocks), -1, dtype=torch.long)
    for r, length in enumerate(lengths):
        need = -(-length // block_size)
        bt[r, :need] = torch.tensor(ids[:need], dtype=torch.long)
        ids = ids[need:]
    return bt


def queries(n: int, seed: int = 1, heads: int = HEADS, hd: int = HD) -> torch.Tensor:
    return torch.randn(n, heads, hd, generator=torch.Generator().manual_seed(seed))


def reference64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bt: torch.Tensor, lengths: list[int],
                window: int | None = None, block_size: int = BS, scale: float | None = None,
                softcap: float | None = None) -> torch.Tensor:
    """Row by row in float64 over the row's own positions only."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group, hd = q.shape[1] // k.shape[1], q.shape[2]
    for r, length in enumerate(lengths):
        start = max(0, length - window) if window else 0
        if length == start:
            continue
        pos = torch.arange(start, length)
        slots = bt[r, pos // block_size] * block_size + pos % block_size
        keys = k[slots].double().repeat_interleave(group, dim=1)  # [L, heads, hd]
        values = v[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[r].double(), keys) * (hd**-0.5 if scale is None else scale)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = scores.softmax(-1)
        out[r] = torch.einsum("hl,lhd->hd", probs, values)
    return out


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "hd", "block_size"),
    [(HEADS, KV_HEADS, HD, BS), (4, 4, 36, 5), (8, 1, 128, 8)],
    ids=["gqa", "mha-hd36-bs5", "mqa-hd128"],
)
def test_matches_float64_reference(impl: Impl, window: int | None, heads: int, kv_heads: int, hd: int,
                                   block_size: int) -> None:
    k, v = pool(kv_heads=kv_heads, hd=hd, block_size=block_size)
    lengths = [*LENGTHS, 3 * block_size]
    bt = tables(lengths, 128 // block_size, block_size=block_size)
    q = queries(len(lengths), heads=heads, hd=hd)
    out = impl(q, k, v, bt, torch.tensor(lengths), block_size=block_size, window=window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    expected = reference64(q, k, v, bt, lengths, window, block_size)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[lengths.index(0)], torch.zeros(heads, hd))  # padding row: zeros


@pytest.mark.parametrize(("scale", "softcap"), [(0.3, None), (0.25, 2.0)], ids=["scale", "scale-softcap"])
def test_scale_and_softcap_match_float64_reference(impl: Impl, scale: float, softcap: float | None) -> None:
    """Gemma's query scale and Gemma 2's score soft-capping (a cap of 2 bites on these scores)."""
    k, v = pool(seed=5)
    bt = tables(LENGTHS, 8)
    q = queries(len(LENGTHS), seed=6)
    out = impl(q, k, v, bt, torch.tensor(LENGTHS), block_size=BS, window=20, scale=scale, softcap=softcap)
    expected = reference64(q, k, v, bt, LENGTHS, 20, BS, scale, softcap)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if softcap is not None:  # the cap really changes the result
        uncapped = reference64(q, k, v, bt, LENGTHS, 20, BS, scale, None)
        assert (uncapped - expected).abs().max() > 1e-2


def test_public_entry_point_uses_the_backend(backend: str) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 7), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    expected = (cpp_op if backend == "cpp" else paged_decode_reference)(q, k, v, bt, lens, block_size=BS)
    assert torch.equal(paged_decode_attention(q, k, v, bt, lens, block_size=BS), expected)
    # A non-contiguous q (a slice of a fused projection, as in the model) is accepted.
    wide = torch.cat([q, q], dim=-1)[..., :HD]
    assert torch.equal(paged_decode_attention(wide, k, v, bt, lens, block_size=BS), expected)


@pytest.mark.parametrize("window", [None, 24])
def test_rows_are_batch_invariant(impl: Impl, window: int | None) -> None:
    k, v = pool()
    bt, q = tables(LENGTHS, 7), queries(len(LENGTHS))
    full = impl(q, k, v, bt, torch.tensor(LENGTHS), block_size=BS, window=window)
    order = list(reversed(range(len(LENGTHS)))) + [0, 2]  # reversed, with duplicates
    wide = torch.cat([bt, torch.full((len(LENGTHS), 5), -1)], dim=1)[order]  # more padding columns
    crowd = impl(q[order], k, v, wide, torch.tensor([LENGTHS[i] for i in order]), block_size=BS, window=window)
    for r, length in enumerate(LENGTHS):
        need = max(1, -(-length // BS))
        alone = impl(q[r : r + 1], k, v, bt[r : r + 1, :need], torch.tensor([length]), block_size=BS, window=window)
        assert torch.equal(alone[0], full[r]), r
        for j, i in enumerate(order):
            if i == r:
                assert torch.equal(crowd[j], full[r]), (r, j)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("window", [None, 20])
def test_unattended_slots_never_leak(impl: Impl, poison: float, window: int | None) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 8), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    clean = impl(q, k, v, bt, lens, block_size=BS, window=window)
    attended = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
    for r, length in enumerate(LENGTHS):
        pos = torch.arange(max(0, length - window) if window else 0, length)
        attended[bt[r, pos // BS] * BS + pos % BS] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~attended] = poison  # the rest of partly used blocks, positions before the window, free blocks
    v_bad[~attended] = poison
    out = impl(q, k_bad, v_bad, bt, lens, block_size=BS, window=window)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


def test_thread_count_does_not_change_bits(cpp: None) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 8), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    threads = torch.get_num_threads()
    try:
        outs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outs.append(cpp_op(q, k, v, bt, lens, block_size=BS))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_window_longer_than_the_row_is_no_window(impl: Impl) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 8), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    assert torch.equal(impl(q, k, v, bt, lens, block_size=BS, window=1000), impl(q, k, v, bt, lens, block_size=BS))


def test_bad_inputs_raise(cpp: None) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 8), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    scale = HD**-0.5
    op = torch.ops.loraswap.paged_decode
    for bad_id in (NUM_BLOCKS, -1, 10**12):
        bad = bt.clone()
        bad[1, 2] = bad_id  # row 1 (length 37) reads columns 0..2
        with pytest.raises(RuntimeError, match=r"block_tables\[1, 2\] = .* out of range for a pool of 64 blocks"):
            op(q, k, v, bad, lens, BS, 0, scale, 0.0)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k, v, bt, lens, BS, 0, scale, 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, k, v, bt.int(), lens, BS, 0, scale, 0.0)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 129 is outside"):
        op(q, k, v, bt, torch.tensor([129, *LENGTHS[1:]]), BS, 0, scale, 0.0)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        op(q[:, :5].contiguous(), k, v, bt, lens, BS, 0, scale, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, bt, lens, BS, 0, scale, 0.0)
    # Columns a row does not read may hold anything: row 0 (length 1) reads column 0 only.
    junk = bt.clone()
    junk[0, 1:] = 10**12
    assert torch.equal(op(q, k, v, junk, lens, BS, 0, scale, 0.0), op(q, k, v, bt, lens, BS, 0, scale, 0.0))


def test_fake_kernel_passes_opcheck(cpp: None) -> None:
    k, v = pool()
    args = (queries(len(LENGTHS)), k, v, tables(LENGTHS, 8), torch.tensor(LENGTHS), BS, 0, HD**-0.5, 0.0)
    torch.library.opcheck(torch.ops.loraswap.paged_decode.default, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks(backend: str) -> None:
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 8), queries(len(LENGTHS)), torch.tensor(LENGTHS)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bt: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return paged_decode_attention(q, k, v, bt, lens, block_size=BS, window=40)

    # With the C++ op the graph is one opaque call; the fallback's graph runs eagerly (aot_eager),
    # so this test needs no second C++ toolchain run and stays fast.
    compiled = torch.compile(attend, fullgraph=True, dynamic=False, backend="inductor" if backend == "cpp" else "aot_eager")
    assert torch.equal(compiled(q, k, v, bt, lens), attend(q, k, v, bt, lens))


def test_fallback_traces_its_static_padding() -> None:
    """The fallback spans every column of the block table, so it reads no length back and has no
    data-dependent shape: it traces whole, with the same bits as eager."""
    k, v = pool()
    bt, q, lens = tables(LENGTHS, 9), queries(len(LENGTHS)), torch.tensor(LENGTHS)
    compiled = torch.compile(paged_decode_reference, fullgraph=True, dynamic=False, backend="aot_eager")
    assert torch.equal(compiled(q, k, v, bt, lens, block_size=BS), paged_decode_reference(q, k, v, bt, lens, block_size=BS))


def test_falls_back_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LORASWAP_CACHE", str(tmp_path))
    caplog.set_level(logging.WARNING, logger="loraswap.kernels")
    monkeypatch.setenv("LORASWAP_PAGED_KERNEL", "torch")
    assert pa._load() == "torch"
    monkeypatch.delenv("LORASWAP_PAGED_KERNEL")
    monkeypatch.setattr(pa, "COMPILER", "no-such-compiler-g++")
    assert pa._load() == "torch"
    if pa.shutil.which("g++"):
        monkeypatch.setattr(pa, "COMPILER", "g++")
        broken = tmp_path / "broken.cpp"
        broken.write_text("#error deliberately broken\n")
        monkeypatch.setattr(pa, "SOURCE", broken)
        assert pa._load() == "torch"
        assert "deliberately broken" in caplog.records[-1].getMessage()
        assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left behind
    assert all(record.levelno == logging.WARNING for record in caplog.records)
    assert len(caplog.records) == (3 if pa.shutil.which("g++") else 2)  # one per failed load


def test_build_is_cached(cpp: None) -> None:
    first = pa.build_kernel()
    built = first.stat().st_mtime_ns
    # A second call finds it in the cache: no compiler is even looked for, nothing is rewritten.
    assert pa.build_kernel("no-such-compiler") == first and first.stat().st_mtime_ns == built


def test_a_prebuilt_kernel_serves_a_machine_without_a_compiler(cpp: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Docker image does: the build stage compiles the kernel into the cache, the
    runtime stage has no compiler and loads it from there."""
    assert pa.kernel_path().is_file()
    monkeypatch.setattr(pa, "COMPILER", "no-such-compiler-g++")
    assert pa._load() == "cpp"
