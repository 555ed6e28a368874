"""The gateway's layers, read from the source: its core (state, room logic, protocol) imports
no transport — neither the web stack nor the modules that wire it — so it runs in-process over
the in-memory bus and stream, and the transports depend on the core, never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
TRANSPORT = {"app", "main", "ws", "sse", "api", "edge", "wire", "sinks"}
"""The modules that speak HTTP, WebSocket or SSE, or wire those to the core."""
WEB_LIBRARIES = {"litestar", "uvicorn", "websockets", "starlette", "h11", "httptools"}
CORE = sorted(p.stem for p in GATEWAY.glob("*.py") if p.stem not in TRANSPORT | {"__init__"})


def _imports(module: str) -> set[str]:
    """Every module ``gateway/<module>.py`` imports, type-only imports included (``.x`` for
    the gateway's own)."""
    tree = ast.parse((GATEWAY / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` names modules, `from .x import y` one
                base = node.module
                found.update([f".{base}"] if base else [f".{alias.name}" for alias in node.names])
            elif node.module:
                found.add(node.module)
    return found


def test_the_split_names_real_modules() -> None:
    present = {p.stem for p in GATEWAY.glob("*.py")}
    assert present >= TRANSPORT
    assert {"core", "hub", "handlers", "publisher", "feeds", "recovery", "conn"} <= set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_no_transport(module: str) -> None:
    imports = _imports(module)
    own = {name[1:] for name in imports if name.startswith(".")} & TRANSPORT
    web = {name for name in imports if name.split(".")[0] in WEB_LIBRARIES}
    assert not own, f"gateway/{module}.py imports transport modules {sorted(own)}"
    assert not web, f"gateway/{module}.py imports web libraries {sorted(web)}"


def test_the_core_is_imported_by_the_transports_not_through_the_app() -> None:
    """Handlers, API, SSE and WebSocket reach the gateway's state as ``core.Gateway``: nothing
    but the server's entry point imports the app module (no import cycle through it)."""
    importers = sorted(p.stem for p in GATEWAY.glob("*.py") if ".app" in _imports(p.stem))
    assert importers == ["main"]
