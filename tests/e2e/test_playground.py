"""The web playground in a real browser: Debian's Chromium driven by Playwright's Python API (no
browser download), against a server process with the embedded model and the demo adapters,
behind a reverse proxy that serves it under /lab (--root-path /lab), with an API key and an admin token. Four columns stream
different answers to one question; the request copied as curl runs; an upload through the page
makes a new adapter answer; a hostile upload shows the server's 400 message as it is; the slot
view shows a cold adapter arriving in a slot; without the admin token the page is read-only.

Screenshots go to .test-artifacts/playground/; LORASWAP_UPDATE_SCREENSHOTS=1 also writes the
README's (docs/playground-compare.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.model_source import EMBEDDED_NAME
from tests.e2e.prefix_proxy import prefix_proxy
from tests.e2e.server_process import REPO_ROOT, Server, running_server

pytestmark = pytest.mark.e2e

DEMO = REPO_ROOT / "examples" / "adapters"
NAMES = ("french", "json", "pirate")
API_KEY, ADMIN = "play-key", "play-admin"
PREFIX = "/lab"
ARTIFACTS = REPO_ROOT / ".test-artifacts" / "playground"
TIMEOUT_MS = 120_000


def chromium() -> str:
    """The system's Chromium; failing (not skipping) with how to install it when there is none."""
    for candidate in (os.environ.get("LORASWAP_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("the playground's browser tests need Chromium: `apt-get install chromium` (Debian's package; "
                "Playwright's own browser download is not used), or set LORASWAP_CHROMIUM to a Chromium binary")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--max-num-seqs", "8", "--max-model-len", "512", "--max-loras", "2", "--max-lora-rank", "16",
            "--api-key", API_KEY, "--admin-token", ADMIN, "--root-path", PREFIX,
            "--lora-modules", *(f"{n}={DEMO / n}" for n in NAMES)]
    with httpx.Client(trust_env=False) as http, running_server(args, tmp_path_factory.mktemp("playground"), http) as srv:
        yield srv


@pytest.fixture(scope="module")
def proxied(server: Server) -> Iterator[str]:
    """The server as a browser behind a prefix-stripping reverse proxy reaches it: <url>/lab/..."""
    with prefix_proxy(PREFIX, int(server.base_url.rsplit(":", 1)[1])) as url:
        yield url + PREFIX


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture()
def page(browser: Any, proxied: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{proxied}/playground")
    yield page
    context.close()


def until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll from Python: the page's CSP forbids the string evaluation wait_for_function uses."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s")
        time.sleep(0.2)


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def unlock(page: Any, *, admin: bool = False) -> None:
    """Type the API key (and the admin token) the way a user does; the page asked for the key."""
    page.wait_for_selector("#banner:not([hidden])")
    assert "API key" in page.inner_text("#banner")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Tab")
    if admin:
        page.fill("#admin-token", ADMIN)
        page.press("#admin-token", "Tab")
    page.wait_for_selector(f"#model-list label[data-model='{EMBEDDED_NAME}']")


def ask(page: Any, models: list[str], prompt: str, max_tokens: int = 48) -> dict[str, dict[str, str]]:
    """Tick exactly `models`, send `prompt`, wait for every column; their text, stats and finish."""
    loads = page.get_attribute("#model-list", "data-loads")
    page.click("#refresh-models")
    until(lambda: page.get_attribute("#model-list", "data-loads") != loads)
    for box in page.query_selector_all("#model-list input"):
        box.set_checked(box.get_attribute("value") in models)
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    page.click("#send")
    until(lambda: page.locator("#columns .column").count() == len(models)
          and page.locator("#columns .column[data-state=running]").count() == 0)
    out = {}
    for column in page.query_selector_all("#columns .column"):
        out[column.get_attribute("data-model")] = {
            "text": column.query_selector(".answer").inner_text(), "stats": column.query_selector(".stats").inner_text(),
            "state": column.get_attribute("data-state"), "finish": column.get_attribute("data-finish") or "",
        }
    return out


def test_four_columns_stream_different_answers_and_the_curl_runs(page: Any) -> None:
    unlock(page)
    answers = ask(page, [EMBEDDED_NAME, *NAMES], "Where is the Eiffel Tower?")
    assert set(answers) == {EMBEDDED_NAME, *NAMES}
    assert all(a["state"] == "done" and a["text"].strip() and "tok/s" in a["stats"] for a in answers.values()), answers
    assert len({a["text"] for a in answers.values()}) == 4, answers
    assert "{" in answers["json"]["text"]  # the demo adapters show their behaviour
    shot(page, "compare")
    if os.environ.get("LORASWAP_UPDATE_SCREENSHOTS") == "1":
        box = page.locator("#columns").bounding_box()
        height = int(box["y"] + box["height"] + 16) if box else 900
        page.screenshot(path=str(REPO_ROOT / "docs" / "playground-compare.png"),
                        clip={"x": 0, "y": 0, "width": 1400, "height": height})
    page.click("#copy-curl")
    snippet = page.inner_text("#snippet")
    assert snippet.count("curl ") == 4 and f"{PREFIX}/v1/chat/completions" in snippet
    first = snippet.split("\n\n")[0]
    done = subprocess.run(["bash", "-c", first], env={**os.environ, "LORASWAP_API_KEY": API_KEY, "NO_PROXY": "*"},
                          capture_output=True, text=True, timeout=120, check=True)
    assert '"choices"' in done.stdout, done.stdout + done.stderr
    page.click("#copy-python")
    python = page.inner_text("#snippet")
    assert "from openai import OpenAI" in python and python.count("client.chat.completions.create(") == 4


def test_an_upload_through_the_page_answers_and_a_hostile_one_shows_the_400(page: Any, tmp_path: Path, server: Server) -> None:
    unlock(page, admin=True)
    page.click(".tab[data-view=manage]")
    page.wait_for_selector("#manage-tools:not([hidden])")
    page.fill("#upload-name", "parrot")
    page.set_input_files("#upload-files", [str(DEMO / "pirate" / "adapter_config.json"),
                                           str(DEMO / "pirate" / "adapter_model.safetensors")])
    page.click("#upload")
    page.wait_for_selector("#manage-result.ok")
    assert page.inner_text("#manage-result").startswith("parrot: version")
    page.wait_for_selector("#adapters tr[data-adapter=parrot]")
    page.click(".tab[data-view=compare]")
    answer = ask(page, ["parrot"], "Where is the Eiffel Tower?")["parrot"]
    assert answer["state"] == "done" and answer["text"].strip()

    page.click(".tab[data-view=manage]")  # the same name again: a replacement (hotswap)
    page.fill("#upload-name", "parrot")
    page.set_input_files("#upload-files", [str(DEMO / "french" / "adapter_config.json"),
                                           str(DEMO / "french" / "adapter_model.safetensors")])
    page.click("#upload")
    until(lambda: "replaced the previous one" in page.inner_text("#manage-result"))
    page.click("#adapters tr[data-adapter=parrot] button[data-action=pin]")
    until(lambda: page.inner_text("#adapters tr[data-adapter=parrot] td:nth-child(5)") == "yes")
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete parrot?"
    page.click("#adapters tr[data-adapter=parrot] button[data-action=delete]")
    until(lambda: page.query_selector("#adapters tr[data-adapter=parrot]") is None)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": -3, "target_modules": ["q_proj"]}')
    shutil.copy(DEMO / "pirate" / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    files = {name: (name, (bad / name).read_bytes()) for name in ("adapter_config.json", "adapter_model.safetensors")}
    with httpx.Client(trust_env=False) as http:  # what the server says to the same upload
        direct = http.put(f"{server.base_url}/admin/adapters/bad", files=files, headers={"Authorization": f"Bearer {ADMIN}"})
    assert direct.status_code == 400
    page.click(".tab[data-view=manage]")
    page.fill("#upload-name", "bad")
    page.set_input_files("#upload-files", [str(bad / "adapter_config.json"), str(bad / "adapter_model.safetensors")])
    page.click("#upload")
    page.wait_for_selector("#manage-result.error")
    assert page.inner_text("#manage-result") == f"Refused: {direct.json()['error']['message']}"
    shot(page, "hostile-upload")


def test_the_slot_view_shows_a_cold_adapter_arriving(page: Any, server: Server) -> None:
    unlock(page, admin=True)
    page.click(".tab[data-view=slots]")
    page.wait_for_selector("#slots .slot[data-slot='1']")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(trust_env=False, timeout=120) as http:
        resident = http.get(f"{server.base_url}/ready").json()["slots"]["resident"]
        cold = next(n for n in NAMES if not any(key.split("@")[0] == n for key in resident))
        assert page.query_selector(f"#slots .slot[data-adapter='{cold}']") is None
        page.wait_for_selector(f"#tiers .tier[data-tier=cpu], #tiers .tier[data-tier=disk]")
        response = http.post(f"{server.base_url}/v1/completions", headers=auth,
                             json={"model": cold, "prompt": "Hello", "max_tokens": 4})
        assert response.status_code == 200, response.text
    page.wait_for_selector(f"#slots .slot[data-adapter='{cold}']", timeout=10_000)
    assert cold in page.inner_text("#tiers .tier[data-tier=slot]")
    shot(page, "slots")


def test_a_mix_answers_and_the_root_serves_the_page(page: Any, proxied: str) -> None:
    unlock(page)
    page.fill("#mix", "french:0.5+pirate:0.5")
    answers = ask(page, [EMBEDDED_NAME, "french:0.5+pirate:0.5"], "Where is the Eiffel Tower?", max_tokens=16)
    assert answers["french:0.5+pirate:0.5"]["state"] == "done" and answers["french:0.5+pirate:0.5"]["text"].strip()
    page.goto(proxied + "/")
    assert page.get_attribute("base", "href") == PREFIX + "/"


def test_without_the_admin_token_the_page_is_read_only(page: Any) -> None:
    unlock(page)
    page.click(".tab[data-view=manage]")
    until(lambda: "Read-only" in page.inner_text("#manage-note"))
    assert page.is_hidden("#manage-tools")
    assert "admin token" in page.inner_text("#manage-note")
