"""Dependencies point inward: the domain is pure, and only infrastructure touches I/O."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = {"psycopg", "psycopg_pool", "nats", "httpx", "fastapi", "uvicorn", "requests"}


def imports_of(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[path] = names
    return found


def reads_environment(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(
        isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}
        for node in ast.walk(tree)
    )


def test_the_domain_imports_only_the_standard_library_and_eventsourcing_domain() -> None:
    allowed_third_party = {"eventsourcing.domain"}
    for path, names in imports_of("domain").items():
        for name in names:
            top = name.split(".")[0]
            assert (
                top in sys.stdlib_module_names or top == "domain" or name in allowed_third_party
            ), f"{path.name} imports {name}"
        assert not reads_environment(path), f"{path.name} reads the environment"


@pytest.mark.parametrize("package", ["domain", "services", "projections"])
def test_the_core_touches_no_io_library_nor_infrastructure(package: str) -> None:
    for path, names in imports_of(package).items():
        tops = {name.split(".")[0] for name in names}
        assert not tops & IO_LIBRARIES, f"{path.name} imports {tops & IO_LIBRARIES}"
        assert "infrastructure" not in tops, f"{path.name} imports infrastructure"
        assert not reads_environment(path), f"{path.name} reads the environment"


def test_the_web_ui_uses_only_the_api_context_never_a_driver() -> None:
    """The UI must work unchanged on any backend's ApiContext (PostgreSQL and NATS, or the
    embedded one): it imports no driver, and from the PostgreSQL adapter only the models."""
    drivers = {"psycopg", "psycopg_pool", "nats", "eventsourcing"}
    for path, names in imports_of("infrastructure/http/ui").items():
        tops = {name.split(".")[0] for name in names}
        assert not tops & drivers, f"{path.name} imports {tops & drivers}"
        adapters = {
            n for n in names if n.startswith(("infrastructure.postgres", "infrastructure.nats"))
        }
        assert adapters <= {"infrastructure.postgres.queries"}, f"{path.name} imports {adapters}"
