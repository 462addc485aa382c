"""A server killed with SIGKILL in the middle of an adapter upload restarts with the previous
version intact and no partial adapter listed.

The server kills itself at one exact step through the store's crash hook (adapters/durable.py
CRASH_POINT), so the test does not race the copy with a polling loop."""

from __future__ import annotations

import hashlib
import signal
import socket
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.adapters.helpers import write_random_adapter
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.e2e

BOUNDARY = "loraswapboundary"
# Killed while copying the second upload's weights into the staging area (the first upload
# passes that step once).
CRASH_PRELUDE = """
import os, signal
import adapters.durable as durable
hits = []
def crash(step):
    if step == "stage:weights-partial":
        hits.append(step)
        if len(hits) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
durable.CRASH_POINT = crash
"""


def multipart_head(config: bytes) -> bytes:
    """The start of a multipart body: the config part, then the weights part's headers."""
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"adapter_config.json\"; filename=\"adapter_config.json\"\r\n\r\n".encode()
        + config
        + f"\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"; "
        "filename=\"adapter_model.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
    )


def test_sigkill_during_upload_keeps_the_previous_version(tiny_llama_dir: Path, tmp_path: Path) -> None:
    v1 = write_random_adapter(tmp_path / "v1", tiny_llama_dir, rank=4, targets=["q_proj"], seed=1)
    v2 = write_random_adapter(tmp_path / "v2", tiny_llama_dir, rank=8, targets=["q_proj", "v_proj"], seed=2)
    # The new version's weights are 8 MB of filler (several copy blocks): it never gets as far as validation.
    args = ["--model", str(tiny_llama_dir), "--max-num-seqs", "2", "--max-model-len", "128", "--max-lora-rank", "8",
            "--data-dir", str(tmp_path / "data")]
    files = {n: (n, (v1 / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}
    expected = hashlib.sha256(files["adapter_config.json"][1] + files["adapter_model.safetensors"][1]).hexdigest()

    with httpx.Client(trust_env=False, timeout=60) as http:
        (tmp_path / "first").mkdir()
        with running_server(args, tmp_path / "first", http, python_prelude=CRASH_PRELUDE) as server:
            assert http.put(f"{server.base_url}/admin/adapters/ad", files=files).json()["version"] == expected
            # A whole upload of a large new version; the server dies while the store is copying
            # it into its staging area (after the HTTP layer has received it).
            weights = b"\0" * (8 << 20)
            head = multipart_head((v2 / "adapter_config.json").read_bytes())
            tail = f"\r\n--{BOUNDARY}--\r\n".encode()
            url = urlparse(server.base_url)
            staging = tmp_path / "data" / "tmp"
            with socket.create_connection((url.hostname, url.port)) as sock:
                sock.sendall(
                    f"PUT /admin/adapters/ad HTTP/1.1\r\nHost: {url.netloc}\r\n"
                    f"Content-Length: {len(head) + len(weights) + len(tail)}\r\n"
                    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode() + head + weights + tail
                )
                assert server.process.wait(120) == -signal.SIGKILL, server.log_tail()
            # The crash left its staging folder behind (the restart below must clean it up).
            assert list(staging.glob("*/*/adapter_model.safetensors"))  # tmp/<owner>/<upload>/

        (tmp_path / "second").mkdir()
        with running_server(args, tmp_path / "second", http) as server:
            listing = http.get(f"{server.base_url}/admin/adapters").json()["adapters"]
            assert [(a["name"], a["version"], len(a["versions"])) for a in listing] == [("ad", expected, 1)]
            assert not list((tmp_path / "data" / "tmp").glob("*/*"))  # the partial copy is gone
            answer = http.post(f"{server.base_url}/v1/completions",
                               json={"model": "ad", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
            assert answer.status_code == 200, answer.text
