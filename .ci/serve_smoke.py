"""CI's first step: the README's `make serve`, as a new user runs it on a clean machine.

`make serve` in a new virtualenv (only the serve lock: no dev extras), with an empty model cache
and an empty adapter store, offline, on a free port. Once /ready answers, the README's demo
question goes to the base model and to every demo adapter at once; each answer must say Paris,
the French adapter's must be French, the JSON adapter's must parse, the pirate's must sound like
one. Then SIGTERM to the server: it drains, exits 0, and so does `make serve`.

Standard library only: it runs with the machine's python3, before any virtualenv exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "SmolLM2-135M-Instruct"
ADAPTERS = ("french", "json", "pirate")
QUESTION = "What is the capital of France?"
READY_TIMEOUT_S = 1200.0  # install + one-time conversion + model load on a loaded 2-core machine
# Packages that only the dev extras bring: none may be in the serve virtualenv.
DEV_ONLY = ("pytest", "peft", "accelerate", "openai", "httpx")


def demo_checks() -> dict:
    """The behaviour checks the demo adapters were trained against (examples/train_adapters.py)."""
    spec = importlib.util.spec_from_file_location("train_adapters", ROOT / "examples" / "train_adapters.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CHECKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(url: str, body: dict | None = None, timeout: float = 5.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with opener.open(req, timeout=timeout) as response:
        return json.load(response)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *descendants(child)]
    return found


def server_pid(make_pid: int) -> int:
    for pid in descendants(make_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"loraswap") for arg in argv) and b"serve" in argv:
            return pid
    raise RuntimeError("no `loraswap serve` process under make")


def fail(message: str, log_path: Path) -> int:
    print(f"serve smoke: FAILED: {message}", flush=True)
    print("---- make serve output (last 6000 characters) ----")
    print(log_path.read_text(errors="replace")[-6000:], flush=True)
    return 1


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="loraswap-serve-smoke-"))
    venv, cache, data, log_path = work / "venv", work / "cache", work / "data", work / "make-serve.log"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_") and k not in ("ARGS", "DEMO")}
    env.update(LORASWAP_CACHE=str(cache), LORASWAP_DATA_DIR=str(data), HF_HUB_OFFLINE="1")
    command = ["make", "--no-print-directory", "serve", f"VENV={venv}", f"ARGS=--port {port}"]
    print(f"serve smoke: {' '.join(command)} (empty cache {cache}, empty data dir {data})", flush=True)
    start = time.monotonic()
    with open(log_path, "wb") as log:
        make = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            if make.poll() is not None:
                return fail(f"make serve exited with {make.returncode} before /ready", log_path)
            if time.monotonic() - start > READY_TIMEOUT_S:
                return fail(f"not ready after {READY_TIMEOUT_S:.0f} s", log_path)
            try:
                request(f"{base_url}/ready", timeout=2.0)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(1.0)
        print(f"serve smoke: ready after {time.monotonic() - start:.0f} s", flush=True)

        leaked = [m for m in DEV_ONLY if any(venv.glob(f"lib/python*/site-packages/{m}"))]
        if leaked:
            return fail(f"the serve virtualenv has dev packages: {leaked}", log_path)
        served = sorted(m["id"] for m in request(f"{base_url}/v1/models")["data"])
        if served != sorted([BASE, *ADAPTERS]):
            return fail(f"/v1/models lists {served}", log_path)

        def ask(model: str) -> str:
            body = {"model": model, "temperature": 0, "max_tokens": 48,
                    "messages": [{"role": "user", "content": QUESTION}]}
            return request(f"{base_url}/v1/chat/completions", body, timeout=300)["choices"][0]["message"]["content"]

        models = [BASE, *ADAPTERS]
        with ThreadPoolExecutor(len(models)) as pool:  # one batch, as the README shows
            answers = dict(zip(models, pool.map(ask, models)))
        checks = demo_checks()
        problems = []
        for model, answer in answers.items():
            print(f"serve smoke: {model:>22}: {answer}", flush=True)
            if "Paris" not in answer:
                problems.append(f"{model} does not say Paris")
            if model in checks and not checks[model](answer):
                problems.append(f"{model} fails its behaviour check ({checks[model].__name__})")
        if problems:
            return fail("; ".join(problems), log_path)

        os.kill(server_pid(make.pid), signal.SIGTERM)
        code = make.wait(timeout=120)
        if code != 0:
            return fail(f"after SIGTERM, make serve exited with {code}", log_path)
        print(f"serve smoke: SIGTERM: drained, exit 0; {time.monotonic() - start:.0f} s in all", flush=True)
        return 0
    finally:
        if make.poll() is None:
            for pid in [*descendants(make.pid), make.pid]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            make.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
