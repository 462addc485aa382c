"""Starting and stopping the benchmarks' server and child processes (shared by bench/serving_compare.py,
bench/vllm_baseline.py, bench/engine_compare.py and bench/hotswap_compare.py; no pytest here).

Every process runs in its own session (so one signal to its group reaches it and its workers and
nothing else) under `setpriv --pdeathsig TERM` where there is one (so it gets SIGTERM when the
benchmark dies, even by SIGKILL), and is always stopped on the way out.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.5


def free_port() -> int:
    """A port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen[Any], grace: float = 30.0) -> None:
    """SIGTERM to the process group of `proc` (started with start_new_session=True), SIGKILL after
    `grace` seconds, and SIGKILL to whatever is left of the group (children that outlived it)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def die_with_parent(command: list[str]) -> list[str]:
    """`command` under `setpriv --pdeathsig TERM` where there is one (util-linux): the process gets
    SIGTERM when the benchmark dies, even by SIGKILL (e.g. a runner's timeout), so none outlives it."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else list(command)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError, http.client.HTTPException, ValueError):
        return False


@contextmanager
def serve(label: str, command: list[str], port: int, ready_path: str, log: Path, *,
          env: Mapping[str, str] | None = None, timeout: float, cwd: Path | None = None) -> Iterator[dict[str, Any]]:
    """Starts `command` (which must listen on 127.0.0.1:`port`) in its own session, with its output in
    `log`; polls GET http://127.0.0.1:{port}{ready_path} until it answers 200 and yields
    {"url": "http://127.0.0.1:{port}/v1", "startup_s"}. Raises with the log's tail when the process
    exits or `timeout` seconds pass first. The process group is always stopped on the way out.
    `cwd`: where it runs (default the repository root)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting {label} on :{port} (log {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(die_with_parent(command), stdout=out, stderr=subprocess.STDOUT, cwd=str(cwd or ROOT),
                                start_new_session=True, env=None if env is None else dict(env))
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {proc.returncode} during startup:\n{log_tail(log)}")
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"{label} not ready after {timeout:.0f} s:\n{log_tail(log)}")
            if _ready(base + ready_path):
                break
            time.sleep(POLL_S)
        startup = time.perf_counter() - start
        print(f"  {label} ready after {startup:.1f} s", flush=True)
        yield {"url": base + "/v1", "startup_s": round(startup, 1)}
    finally:
        stop_group(proc)
