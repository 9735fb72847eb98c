"""
Imports point down (issue 14): every module of the package sits in one
layer and imports only from the layers below it, so no import circle can
form, and none can come back unnoticed.

Every import counts, wherever it is written: at module level, inside a
function, or under C{if TYPE_CHECKING:}. A function-level import still makes
the module depend on what it imports; it only hides a circle, so there are
none of those either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portrouter"

# Top to bottom; a module may import from any layer below its own, never from
# its own or one above. README.rst ("How it is built") draws the same picture.
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("the daemons: composition roots", frozenset({"tap", "tunnel"})),
    ("the front, put together", frozenset({"front"})),
    ("the dashboard's page and cookie", frozenset({"dashboard"})),
    ("the dashboard's event stream, from the API's rows", frozenset({"events"})),
    ("the front: what the router's own ports answer", frozenset({"api", "ingress", "stream", "tlsfront"})),
    ("the front's parts", frozenset({"metrics", "manhole", "hosts"})),
    ("the cluster: the table kept in Redis, applied through the router", frozenset({"cluster"})),
    ("the router: table, listeners, changes under one lock", frozenset({"router"})),
    ("UDP service ports, on the WebSocket bridge", frozenset({"wsudp"})),
    ("routes", frozenset({"http", "tcp", "udp", "ws"})),
    ("credentials and the state file", frozenset({"auth", "state", "proxyproto"})),
    ("parsing, the HTTP server, the relay", frozenset({"config", "web", "relay"})),
    ("table, sessions, supervised commands, hostnames", frozenset({"table", "sessions", "services", "hostnames"})),
    ("log format and destinations", frozenset({"logs"})),
    ("the model and the reactor's interfaces", frozenset({"model", "interfaces", "certs", "sni", "proxyheader",
                                                          "eventloop", "__init__"})),
]


def layer_of(module: str) -> int:
    """The index of C{module}'s layer in L{LAYERS} (0 is the top)."""
    for index, (_, modules) in enumerate(LAYERS):
        if module in modules:
            return index
    raise AssertionError(f"portrouter/{module}.py is in no layer of tests/test_layers.py: put it in one")


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


MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_modules_import_only_what_lies_below(module: str) -> None:
    own = layer_of(module)
    imports = portrouter_imports((PACKAGE / f"{module}.py").read_text())
    upward = {name: line for name, line in imports.items() if layer_of(name) <= own}
    assert not upward, (
        f"portrouter/{module}.py ({LAYERS[own][0]}) may import only from the layers below it, but imports "
        + ", ".join(f"{name} (line {line}; {LAYERS[layer_of(name)][0]})" for name, line in sorted(upward.items()))
    )


def imports_inside_functions(source: str) -> list[int]:
    """The lines where C{source} imports from portrouter inside a function."""
    return sorted({
        inner.lineno
        for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        if isinstance(inner, (ast.Import, ast.ImportFrom)) and portrouter_imports(ast.unparse(inner))
    })


@pytest.mark.parametrize("module", MODULES)
def test_no_import_of_the_package_inside_a_function(module: str) -> None:
    hidden = imports_inside_functions((PACKAGE / f"{module}.py").read_text())
    assert not hidden, f"portrouter/{module}.py imports from portrouter inside a function, at lines {hidden}"


def test_an_import_inside_a_function_is_seen() -> None:
    source = (
        "from portrouter.model import Config\n"
        "def f():\n"
        "    import json\n"
        "    from portrouter.api import API\n"
        "class C:\n"
        "    async def g(self):\n"
        "        from . import router\n"
    )
    assert imports_inside_functions(source) == [4, 7]


def test_every_layer_is_a_layer_of_modules_that_exist() -> None:
    listed = [m for _, modules in LAYERS for m in modules]
    assert len(listed) == len(set(listed)), "a module is in two layers"
    assert sorted(listed) == MODULES


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
