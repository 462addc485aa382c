"""Paged decode attention: one query token per sequence over keys/values in a block pool.

A layer's keys and values live in pools `[num_slots, kv_heads, hd]` (num_slots = num_blocks *
block_size); position p of a sequence with block table `bt` is slot
`bt[p // block_size] * block_size + p % block_size`. Two implementations, both batch-invariant
(a row's output is bit-identical whatever other rows share the call):

- `torch.ops.loraswap.paged_decode`, a C++ kernel (server/csrc/paged_decode.cpp) that reads the
  pool directly; compiled with g++ on first use and cached under `$LORASWAP_CACHE/kernels/`;
- `paged_decode_reference`, pure PyTorch: gathers the slots, then batched matmuls and a masked
  softmax. Used when the kernel cannot be built, for other devices/dtypes, or when
  `LORASWAP_PAGED_KERNEL=torch`.

The two agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from server.model_source import _file_lock, cache_dir

log = logging.getLogger("loraswap.kernels")

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
COMPILER = "g++"

_lock = threading.Lock()
_backend: str | None = None


def _compile_flags() -> list[str]:
    """g++ flags matching this torch build: its C++ ABI, its OpenMP, the CPU's SIMD level."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    flags = ["-O3", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-Wno-psabi"]  # no fused a*b+c: exact order
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    # at::parallel_for is inlined into the kernel: it must use the same threading as torch, and
    # OpenMP resolves to the libgomp.so.1 torch already loaded.
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    # The kernel's lanes fill one 256-bit register; AVX512 machines all have AVX2 + FMA, and
    # wider vectors would not change the (fixed) lane order, only risk down-clocking.
    if torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma"]
    flags += [f"-isystem{path}" for path in cpp_extension.include_paths()]
    return flags


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    return [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch"]


def _compiler_version(cxx: str) -> str:
    result = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()[0] if result.stdout else ""


def kernel_path() -> Path:
    """Where the kernel for this source, torch build and CPU lives in the cache. The compiler is
    not part of the key: the library links against torch's ABI only, so one built elsewhere (a
    Docker image's build stage) serves a machine without a compiler."""
    flags, link = _compile_flags(), _link_flags()
    key = json.dumps([SOURCE.read_text(), torch.__version__, flags, link, torch.backends.cpu.get_cpu_capability()])
    return cache_dir() / "kernels" / f"paged_decode-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"


def build_kernel(cxx: str = COMPILER) -> Path:
    """The compiled kernel (kernel_path()), built with `cxx` if not cached."""
    flags, link = _compile_flags(), _link_flags()
    target = kernel_path()
    folder = target.parent
    if target.is_file():
        return target
    log.info("compiling the paged decode kernel with %s", _compiler_version(cxx))
    with _file_lock(folder / f"{target.stem}.lock"):  # one builder per machine; others wait
        if target.is_file():  # built while we waited
            return target
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.stem}-", suffix=".so")
        os.close(fd)
        try:
            start = time.perf_counter()
            cmd = [cxx, *flags, str(SOURCE), "-o", tmp, *link]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
            os.chmod(tmp, 0o755)  # mkstemp made it private; others sharing the cache may load it
            os.replace(tmp, target)  # atomic: a reader sees no file or the whole library
            log.info("built %s in %.1f s", target.name, time.perf_counter() - start)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _fake_paged_decode(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
    lengths: torch.Tensor, block_size: int, window: int, scale: float, softcap: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)  # [n, heads, hd]: what torch.compile needs to trace the op


def _load() -> str:
    if os.environ.get("LORASWAP_PAGED_KERNEL", "").strip().lower() == "torch":
        log.warning("LORASWAP_PAGED_KERNEL=torch: paged decode attention uses the PyTorch fallback")
        return "torch"
    cxx = shutil.which(COMPILER)
    try:
        if cxx is None and not kernel_path().is_file():
            log.warning("%s not found and no prebuilt kernel: paged decode attention uses the slower PyTorch "
                        "fallback", COMPILER)
            return "torch"
        path = kernel_path() if cxx is None else build_kernel(cxx)
        torch.ops.load_library(str(path))
        torch.library.register_fake("loraswap::paged_decode")(_fake_paged_decode)
    except Exception as exc:  # noqa: BLE001 -- any build or load failure: the fallback computes the same thing
        log.warning("paged decode kernel unavailable, using the PyTorch fallback: %s", exc)
        return "torch"
    return "cpp"


@torch.compiler.assume_constant_result  # torch.compile runs it once at trace time: a constant
def paged_kernel_backend() -> str:
    """Which implementation paged_decode_attention uses on CPU float32: "cpp" when the C++ kernel
    is loaded, else "torch". Builds (or finds in the cache) and loads the kernel on the first call."""
    global _backend
    if _backend is not None:  # the common case: no lock
        return _backend
    with _lock:
        if _backend is None:
            _backend = _load()
        return _backend


def paged_decode_attention(
    q: torch.Tensor,  # [n, heads, hd]
    k_pool: torch.Tensor,  # [num_slots, kv_heads, hd]
    v_pool: torch.Tensor,  # [num_slots, kv_heads, hd]
    block_tables: torch.Tensor,  # [n, max_blocks] int64
    lengths: torch.Tensor,  # [n] int64; 0 = padding row (zeros out)
    *,
    block_size: int,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """softmax(cap(q·k * scale)) · v for each row over its positions [max(0, len - window), len)
    (all of [0, len) without a window); scale defaults to hd ** -0.5, cap(s) = softcap *
    tanh(s / softcap) when a softcap is given. -> [n, heads, hd]"""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel_ok = q.device.type == "cpu" and q.dtype == k_pool.dtype == v_pool.dtype == torch.float32
    if kernel_ok and paged_kernel_backend() == "cpp":
        return torch.ops.loraswap.paged_decode(
            q.contiguous(), k_pool.contiguous(), v_pool.contiguous(), block_tables.long().contiguous(),
            lengths.long().contiguous(), block_size, window or 0, scale, softcap or 0.0,
        )
    return paged_decode_reference(q, k_pool, v_pool, block_tables, lengths, block_size=block_size, window=window,
                                  scale=scale, softcap=softcap)


def paged_decode_reference(
    q: torch.Tensor,  # [n, heads, hd]
    k_pool: torch.Tensor,  # [num_slots, kv_heads, hd]
    v_pool: torch.Tensor,  # [num_slots, kv_heads, hd]
    block_tables: torch.Tensor,  # [n, max_blocks]
    lengths: torch.Tensor,  # [n]
    *,
    block_size: int,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The pure-PyTorch paged decode, for any device and float dtype: gather the blocks each row
    reads, then one batched matmul per row and kv head and a masked row-wise softmax (a fused
    attention kernel splits its work by batch size, which would change a row's bits). Padded positions add exact zeros (score -inf -> weight 0,
    value 0), so a row's bits do not depend on how far the batch is padded. -> [n, heads, hd]"""
    n, heads, hd = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    # Every column of the table: the engine sizes tables to the widest row it runs (a fixed width
    # under compile), and reading the lengths back to size it here would sync the device per layer.
    span = block_tables.shape[1]
    L = span * block_size
    pos = torch.arange(L, device=q.device)  # [L]
    lens = lengths.to(q.device, torch.long)[:, None]  # [n, 1]
    valid = pos < lens  # [n, L]
    if window is not None and window > 0:
        valid = valid & (pos >= lens - window)
    # Block-table entries a row does not need may be -1 or stale: point them at block 0 (masked).
    needed = valid.view(n, span, block_size).any(dim=-1)  # [n, span]
    blocks = torch.where(needed, block_tables[:, :span].to(q.device, torch.long), 0).flatten()
    # Gather whole blocks (block_size * kv_heads * hd contiguous floats: long copies), then lay
    # them out as contiguous [n, kv_heads, L, hd]: a strided layout would take other matmul
    # paths, whose bits need not match from one batch to the next.
    num_blocks = k_pool.shape[0] // block_size
    k_blocks = k_pool[: num_blocks * block_size].reshape(num_blocks, block_size, kv_heads, hd)
    v_blocks = v_pool[: num_blocks * block_size].reshape(num_blocks, block_size, kv_heads, hd)
    keys = k_blocks.index_select(0, blocks).view(n, L, kv_heads, hd).transpose(1, 2).contiguous()
    values = v_blocks.index_select(0, blocks).view(n, L, kv_heads, hd).transpose(1, 2).contiguous()
    # Unattended slots may hold NaN/inf, and 0 * NaN is NaN: zero those values themselves. An AND
    # of the float bits with 0 (masked) or all ones (kept) does it exactly, several times faster
    # than masked_fill with a broadcast mask.
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    keep = valid.to(bits).neg()  # [n, L]: -1 = all bits set
    values.view(bits).bitwise_and_(keep[:, None, :, None])
    mask = valid[:, None, None, :]  # [n, 1, 1, L]
    qg = q.reshape(n, kv_heads, group, hd)  # query heads sharing a kv head, side by side
    scores = (qg @ keys.transpose(-1, -2)) * (hd**-0.5 if scale is None else scale)  # [n, kvh, group, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))  # also replaces NaN scores of masked keys
    probs = torch.where(mask, scores.softmax(dim=-1), 0)  # a padding row's all -inf softmax is NaN
    return (probs @ values).reshape(n, heads, hd)  # [n, kvh, group, hd] -> [n, heads, hd]
