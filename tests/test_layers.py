"""
Imports point down (issue 14): the lower modules may import only what is
listed here, so a circle cannot come back through them unnoticed.

Every import counts, wherever it is written: at module level, inside a
function, or under C{if TYPE_CHECKING:}. A function-level import still
makes the lower module depend on the upper one; it only hides the circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portrouter"

# module -> the portrouter modules it may import. Modules not listed here are
# not checked (yet); a module listed here and not existing fails the test.
ALLOWED: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "interfaces": frozenset(),
    "certs": frozenset(),
    "table": frozenset({"model"}),
    "config": frozenset({"model", "table", "certs"}),
    "sessions": frozenset({"certs"}),
    "relay": frozenset({"interfaces", "sessions"}),
    # The HTTP server: the access log redacts targets itself, so it needs
    # nothing from auth.py, which imports it.
    "web": frozenset({"certs", "interfaces"}),
}


def portrouter_imports(source: str) -> dict[str, int]:
    """The portrouter modules C{source} imports, each with its first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from .x import y
                base = node.module.split(".") if node.module else []
                names = [".".join(["portrouter", *base, *([] if base else [a.name])]) for a in node.names]
            elif node.module == "portrouter":
                names = [f"portrouter.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "portrouter" and len(parts) > 1:
                found.setdefault(parts[1], node.lineno)
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_lower_modules_import_only_what_lies_below(module: str) -> None:
    imports = portrouter_imports((PACKAGE / f"{module}.py").read_text())
    upward = {name: line for name, line in imports.items() if name not in ALLOWED[module]}
    assert not upward, (
        f"portrouter/{module}.py may import only {sorted(ALLOWED[module]) or 'nothing from portrouter'}, "
        f"but imports " + ", ".join(f"{name} (line {line})" for name, line in sorted(upward.items()))
    )


def test_every_import_form_is_seen() -> None:
    source = (
        "import portrouter.router\n"
        "from portrouter import api\n"
        "from portrouter.tcp import TCPRoute\n"
        "from . import ingress\n"
        "from .http import HTTPRoute\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from portrouter.state import State\n"
        "def f():\n"
        "    from portrouter.udp import UDPRoute\n"
        "import twisted.internet\n"
    )
    assert set(portrouter_imports(source)) == {"router", "api", "tcp", "ingress", "http", "state", "udp"}
