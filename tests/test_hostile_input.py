"""
Hostile input to the configuration, the API and the state file (issue 12):
each gets a clear error quoting the bad value (shortened when it is long),
never a 500 or a traceback, and a refused change leaves everything as it was.

The API is driven over real loopback sockets (the helpers of test_api); the
state file is read in-process and once by a real ``twistd``; the config file
through L{load}, the same function ``twistd`` uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from portrouter.config import Command, ConfigError, Limits, load, parse_project
from portrouter.services import StartFailed, Supervisor
from portrouter.state import State, StateError
from tests.support import LOOPBACK, Twistd, free_port
from tests.test_api import Snapshot, api, api_router, saved_state, write_config
from tests.test_services import Service, gone, logged, log_line, within  # noqa: F401 (a fixture)

BACKEND = f"tcp:{LOOPBACK}:1"
# An error message is one short line, however long the value it quotes.
SHORT = 400


def manifest_bytes(**fields: str) -> bytes:
    """A manifest as raw JSON text, C{fields} spliced in verbatim (for what json.dumps cannot write)."""
    parts = [f'"backend": "{BACKEND}"'] + [f'"{k}": {v}' for k, v in fields.items()]
    return ("{" + ", ".join(parts) + "}").encode()


async def refused_and_nothing_changed(snapshot: Snapshot, port: int, cases: list[tuple[str, Any, str | None, str]]) -> None:
    """Each PUT is a 400 C{invalid} naming the field, its message holding C{expected}; nothing changes."""
    before = await snapshot.take()
    for name, body, field, expected in cases:
        status, got = await api(port, "PUT", f"/_api/projects/{name}", body)
        assert status == 400, (name, field, expected, got)
        error = got["error"]
        assert error["code"] == "invalid", got
        assert error.get("field") == field, (expected, got)
        assert expected in error["message"], (expected, got)
        assert len(error["message"]) < SHORT and "\n" not in error["message"], got
        assert await snapshot.take() == before, expected


@pytest_twisted.ensureDeferred
async def test_api_refuses_hostile_json_bodies_with_400(tmp_path: Path) -> None:
    router = await api_router(tmp_path)
    port = router.port_of()
    state_file = tmp_path / "state" / "projects.json"
    try:
        # A project already deployed: the state file exists and must stay as it is.
        assert (await api(port, "PUT", "/_api/projects/kept", {"backend": BACKEND}))[0] == 201
        digits = "9" * 5000
        await refused_and_nothing_changed(Snapshot(port, state_file, router), port, [
            ("x", b"[" * 100_000, None, "the body nests deeper than 32 levels"),
            ("x", b'{"a": ' * 100_000, None, "the body nests deeper than 32 levels"),
            ("x", manifest_bytes(listen=f'{{"port": {digits}}}'), "listen.port",
             "999999999999...999 (5000 digits) is not a port (1-65535)"),
            ("x", manifest_bytes(connect_timeout="1e999"), None, "the body holds 1e999, which is not a finite number"),
            ("x", manifest_bytes(connect_timeout="Infinity"), None, "the body holds Infinity"),
            ("x", manifest_bytes(connect_timeout="-Infinity"), None, "the body holds -Infinity"),
            ("x", manifest_bytes(command='["true"]', env='{"A": NaN}'), None, "the body holds NaN"),
            ("x", manifest_bytes(command='["true"]', env='{"A": [1e999]}'), None, "the body holds 1e999"),
            ("x", b'{"runtime": "caf\xe9"}', None, "the body is not UTF-8 (byte 0xe9 at offset 16)"),
            ("x", json.dumps({"backend": BACKEND}).encode("utf-16"), None, "the body is not UTF-8"),
            ("x", b"[]", None, "the body must be a JSON object (a project manifest), got a list"),
            ("x", b'"x"', None, "the body must be a JSON object (a project manifest), got a string"),
            ("x", b"null", None, "the body must be a JSON object (a project manifest), got null"),
            ("x", b"{nope", None, "the body is not valid JSON: "),
            ("x", b"", None, "the body is not valid JSON: "),
            ("x", {"backend": BACKEND, "runtime": "r" * 900_000}, "runtime",
             "'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr...rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr' "
             "is longer than 4096 characters"),
            ("x", {"name": "n" * 900_000, "backend": BACKEND}, "name", "the body names project 'nnnnn"),
            ("x", manifest_bytes(runtime='"a"', entry='"b"', **{"runtime ": '"c"'}), "runtime ", "unknown key"),
            ("x", b'{"backend": "tcp:127.0.0.1:1", "backend": "tcp:127.0.0.1:2"}', None,
             "the body holds the key 'backend' twice in one object"),
            ("x", {"backend": "tcp:127.0.0.1\x00:1"}, "backend", "contains a control character (0x00)"),
            ("x", {"backend": BACKEND, "runtime": "a\nb"}, "runtime", "contains a control character (0x0a)"),
            ("x", manifest_bytes(runtime='"\\ud800"'), "runtime", "is not valid Unicode (a lone surrogate)"),
            ("x", {"backend": BACKEND, "command": ["\x00rm"]}, "command[0]", "contains a control character (0x00)"),
            ("x", {"backend": BACKEND, "command": ["x" * 200_000]}, "command[0]",
             "is longer than 131072 characters"),
            ("x", {"backend": BACKEND, "command": ["true"], "env": {"A=B": "1"}}, "env.A=B",
             "'A=B' is not an environment variable name"),
        ])
        saved = state_file.read_text()
        assert json.loads(saved)["projects"] == [{"name": "kept", "backend": BACKEND}]
        for word in ("Infinity", "NaN", "1e999"):
            assert word not in saved
    finally:
        await router.stopService()
