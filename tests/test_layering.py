"""The package layers: adapters/ sits below server/ and never imports it; server/ never imports
the HTTP layer below server/api; config/ imports neither. Checked on the source, statically."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(package: str, forbidden: tuple[str, ...], skip: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(skip):
            continue
        bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
        if bad:
            found[rel] = bad
    return found


def test_adapters_never_import_the_server() -> None:
    assert offenders("adapters", ("server",)) == {}


def test_config_imports_no_other_layer() -> None:
    assert offenders("config", ("server", "adapters")) == {}


def test_only_the_http_layer_imports_fastapi() -> None:
    found = offenders("server", ("fastapi", "starlette", "server.api"), skip=("server/api/", "server/cli.py"))
    assert found == {}


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom server.errors import X\n\ndef f():\n    from server import api\n")
    assert imported_modules(probe) == {"os", "server.errors", "server"}
