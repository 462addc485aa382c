"""The demo adapters of examples/adapters (trained by examples/train_adapters.py), served by a real
server: on questions never trained on, `french` answers in French, `json` as {"answer": ...} and
`pirate` in a pirate's voice, while the base model does none of these.

LORASWAP_DEMO_ADAPTERS=<folder> tests a retrained set instead of the committed one, e.g. after
`python examples/train_adapters.py --out /tmp/demo`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from server.model_source import EMBEDDED_NAME as BASE
from tests.e2e.server_process import REPO_ROOT, openai_client, running_server

NAMES = ("french", "json", "pirate")
MAX_BYTES = 5 * 1024 * 1024
ADAPTERS_DIR = Path(os.environ.get("LORASWAP_DEMO_ADAPTERS") or REPO_ROOT / "examples" / "adapters")


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """examples/ is not a package: import the training script by path (its main() does not run)."""
    spec = importlib.util.spec_from_file_location("train_adapters", REPO_ROOT / "examples" / "train_adapters.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- cheap checks: no server ---------------------------------------------------------------


def test_training_data_is_deterministic_and_holds_out_the_test_questions(script: ModuleType) -> None:
    trained = {question for question, _, _ in script.FACTS}
    assert not trained & set(script.HELD_OUT)
    assert sorted(script.TARGETS) == sorted(NAMES) == sorted(script.CHECKS)
    for name in NAMES:
        examples = script.build_examples(name)
        assert examples == script.build_examples(name)
        assert len(examples) == len(script.FACTS) >= 40
        # Every target shows its behaviour and the English source answers do not: the checks
        # used below are able to tell the two apart.
        check = script.CHECKS[name]
        assert all(check(answer) for _, answer in examples), name
        assert not any(check(english) for _, english, _ in script.FACTS), name


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files_load_and_are_small(name: str, script: ModuleType) -> None:
    from adapters.peft_format import read_adapter_dir

    folder = ADAPTERS_DIR / name
    weights = folder / "adapter_model.safetensors"
    assert (folder / "adapter_config.json").is_file() and weights.is_file()
    assert weights.stat().st_size < MAX_BYTES
    raw = read_adapter_dir(folder, name)
    assert raw.problems == ()
    assert raw.config.r == script.RANK
    modules = {module.rsplit(".", 1)[-1] for module in raw.tensors}
    assert modules == set(script.TARGET_MODULES)
    assert len(raw.tensors) == 30 * len(script.TARGET_MODULES)  # every layer of SmolLM2-135M


def _serve_command(*make_args: str) -> list[str]:
    """The command `make serve` would run (make -n prints it without running anything)."""
    # Not the caller's make variables: `make test ARGS=...` exports ARGS to this process.
    env = {k: v for k, v in os.environ.items() if k not in ("ARGS", "DEMO", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", "-s", "serve", *make_args], cwd=REPO_ROOT, check=True,
                          capture_output=True, text=True, env=env)
    return shlex.split(done.stdout.strip().splitlines()[-1])


def test_make_serve_serves_the_demo_adapters_by_default() -> None:
    command = _serve_command()
    assert command[1:3] == ["serve", "--lora-modules"]
    modules = dict(item.split("=", 1) for item in command[3:])
    assert sorted(modules) == sorted(NAMES)
    for name, path in modules.items():
        assert (REPO_ROOT / path).resolve() == (REPO_ROOT / "examples" / "adapters" / name).resolve()
    # Another model, other adapters or DEMO=0 turn them off: they only fit the embedded model.
    for make_args in (["ARGS=--model /some/model"], ["ARGS=--lora-modules a=/x"], ["ARGS=--config c.toml"],
                      ["DEMO=0"]):
        assert "french=examples/adapters/french" not in _serve_command(*make_args), make_args
    assert "--port" in _serve_command("ARGS=--port 9000")


# --- behaviours through the HTTP API --------------------------------------------------------


# Asked of every model with each held-out question: none of the adapters was trained for it.
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 160},
                                           "sure": {"type": "boolean"}}, "required": ["answer", "sure"]}
FORMATTED = "schema: "  # the answers key prefix of those requests


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory, script: ModuleType) -> dict[tuple[str, str], str]:
    """Greedy chat answers of the base model and of each adapter to every held-out question, and
    (under FORMATTED + question) their answers constrained to SCHEMA."""
    modules = [f"{name}={ADAPTERS_DIR / name}" for name in NAMES]
    args = ["--max-num-seqs", "32", "--max-model-len", "256", "--max-loras", str(len(NAMES)),
            "--max-lora-rank", str(script.RANK), "--lora-modules", *modules]
    jobs = [(model, prefix + question) for model in (BASE, *NAMES) for question in script.HELD_OUT
            for prefix in ("", FORMATTED)]
    with (httpx.Client(trust_env=False) as http,
          running_server(args, tmp_path_factory.mktemp("demo-srv"), http) as server,
          openai_client(server) as client):

        def ask(job: tuple[str, str]) -> str:
            model, question = job
            if question.startswith(FORMATTED):
                response = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question.removeprefix(FORMATTED)}],
                    temperature=0, max_tokens=160,
                    response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
                )
                assert response.choices[0].finish_reason == "stop", response
                return response.choices[0].message.content or ""
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}],
                temperature=0, max_tokens=script.MAX_NEW_TOKENS,
            )
            return (response.choices[0].message.content or "").strip()

        # All at once: the server decodes them together, which keeps this test short on a CPU.
        with ThreadPoolExecutor(len(jobs)) as pool:
            return dict(zip(jobs, pool.map(ask, jobs)))


@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_adapter_shows_its_behaviour_on_held_out_questions(
    name: str, answers: dict[tuple[str, str], str], script: ModuleType
) -> None:
    check = script.CHECKS[name]
    failures = {q: answers[name, q] for q in script.HELD_OUT if not check(answers[name, q])}
    assert not failures, f"{name} answers without its behaviour: {failures}"


@pytest.mark.e2e
def test_base_model_shows_none_of_the_behaviours(answers: dict[tuple[str, str], str], script: ModuleType) -> None:
    for question in script.HELD_OUT:
        text = answers[BASE, question]
        assert text, question
        shown = [name for name, check in script.CHECKS.items() if check(text)]
        assert not shown, f"the base model's answer to {question!r} already looks {shown}: {text!r}"


@pytest.mark.e2e
@pytest.mark.parametrize("model", [BASE, *NAMES])
def test_json_schema_answers_validate_for_every_adapter(model: str, answers: dict[tuple[str, str], str],
                                                        script: ModuleType) -> None:
    import jsonschema

    for question in script.HELD_OUT:
        jsonschema.validate(json.loads(answers[model, FORMATTED + question]), SCHEMA)
