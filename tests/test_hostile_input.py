"""
Hostile input to the configuration, the API and the state file (issue 12):
each gets a clear error quoting the bad value (shortened when it is long),
never a 500 or a traceback, and a refused change leaves everything as it was.

The API is driven over real loopback sockets (the helpers of test_api); the
state file and the config file are read in-process (L{State.load}, L{load}:
what ``twistd`` calls) and each once by a real ``twistd``; a Hypothesis
property covers any manifest at all.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock

from portrouter.front import Front
from portrouter.config import BigNumber, ConfigError, load, parse_project, quote, read_json, with_cli
from portrouter.model import Command, Config, Limits
from portrouter.router import RouterService
from portrouter.services import StartFailed, Supervisor
from portrouter.state import State, StateError
from tests.support import LOOPBACK, Twistd, wait_for
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


async def api_refuses(tmp_path: Path, cases: list[tuple[str, Any, str | None, str]]) -> None:
    """A fresh router's API refuses each PUT (see L{refused_and_nothing_changed})."""
    router = await api_router(tmp_path)
    port = router.port_of()
    try:
        await refused_and_nothing_changed(Snapshot(port, tmp_path / "state" / "projects.json", router), port, cases)
    finally:
        await router.stopService()


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
            ("x", manifest_bytes(runtime='"a"', entry='"b"', **{"runtime ": '"c"'}), "['runtime ']", "unknown key"),
            ("x", b'{"backend": "tcp:127.0.0.1:1", "backend": "tcp:127.0.0.1:2"}', None,
             "the body holds the key 'backend' twice in one object"),
            ("x", {"backend": "tcp:127.0.0.1\x00:1"}, "backend", "contains a control character (0x00)"),
            ("x", {"backend": BACKEND, "runtime": "a\nb"}, "runtime", "contains a control character (0x0a)"),
            ("x", manifest_bytes(runtime='"\\ud800"'), "runtime", "is not valid Unicode (a lone surrogate)"),
            ("x", {"backend": BACKEND, "command": ["\x00rm"]}, "command[0]", "contains a control character (0x00)"),
            ("x", {"backend": BACKEND, "command": ["x" * 200_000]}, "command[0]",
             "is longer than 131072 characters"),
            ("x", {"backend": BACKEND, "command": ["true"], "env": {"A=B": "1"}}, "env['A=B']",
             "'A=B' is not an environment variable name"),
        ])
        saved = state_file.read_text()
        assert json.loads(saved)["projects"] == [{"name": "kept", "backend": BACKEND}]
        for word in ("Infinity", "NaN", "1e999"):
            assert word not in saved
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_an_odd_key_is_quoted_in_the_field_path(tmp_path: Path) -> None:
    """A key is the client's text too: a newline or a megabyte in it must not reach the field or the message raw."""
    await api_refuses(tmp_path, [
        ("x", {"backend": BACKEND, "listen": {"port": 80, "\nX-Forged: 1": 1}}, "listen['\\nX-Forged: 1']",
         "unknown key"),
        ("x", {"backend": BACKEND, "k" * 500_000: 1}, "['kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk']",
         "unknown key"),
        ("x", {"backend": BACKEND, "command": ["true"], "env": {"A\nB": "1"}}, "env['A\\nB']",
         "'A\\nB' is not an environment variable name"),
    ])


# -- any manifest at all ------------------------------------------------------------------------

# Each field gets values it takes and, now and then, values it must refuse,
# so that both sides of every validator are reached.
_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.builds(BigNumber, st.just("9" * 5000)), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """C{valid} about nine times in ten (one_of would take one branch in two)."""
    return st.sampled_from([valid] * 9 + [_ODD]).flatmap(lambda strategy: strategy)


_SECONDS = mostly(st.one_of(st.floats(min_value=0.001, max_value=1e6), st.integers(1, 10**6)))
_PORTS = mostly(st.integers(1, 65535))
_FIELDS = {
    "backend": mostly(st.sampled_from([BACKEND, "unix:/run/app.sock", "tcp:\\:\\:1:1", "127.0.0.1:53"])),
    "listen": mostly(st.fixed_dictionaries(
        {"port": _PORTS}, optional={"protocol": st.sampled_from(["http", "tcp", "udp", "ws", "sctp"]),
                                    "interface": st.sampled_from([LOOPBACK, "::1", "nowhere"])})),
    "host": mostly(st.sampled_from([LOOPBACK, "::1", "db.internal", "a:b"])),
    "services": mostly(st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["sshd", "web", "Bad"]), "port": _PORTS},
        optional={"protocol": st.sampled_from(["tcp", "http", "udp"]), "start_timeout": _SECONDS}), max_size=3)),
    "command": mostly(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3)),
    "env": mostly(st.dictionaries(st.text(min_size=1, max_size=5),
                                  st.one_of(st.text(max_size=5), st.integers(), st.floats()), max_size=3)),
    "runtime": mostly(st.text(min_size=1, max_size=10)),
    "preserve_host": mostly(st.booleans()),
    "connect_timeout": _SECONDS,
    "idle_timeout": st.one_of(st.none(), _SECONDS),
    "max_connections": mostly(st.integers(1, 10**30)),
    "udp_busy_poll": mostly(st.floats(0, 0.01)),
}
MANIFESTS = st.fixed_dictionaries(
    {"name": mostly(st.sampled_from(["web"] * 9 + ["stream"])), "backend": _FIELDS["backend"]},
    optional={key: value for key, value in _FIELDS.items() if key != "backend"})


@settings(max_examples=300, deadline=None)
@given(MANIFESTS)
def test_any_manifest_is_accepted_and_round_trips_or_refused_in_one_line(manifest: dict[str, Any]) -> None:
    """
    Whatever a manifest holds, validating it raises nothing but a ConfigError
    of one short line; one that is accepted is written as strict JSON (no
    NaN or Infinity) and read back, by the state file's reader, as the same.
    """
    try:
        project = parse_project(manifest, static=False)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < SHORT, str(e)
        return
    text = json.dumps(dict(project.manifest), allow_nan=False).encode()
    assert parse_project(read_json(text), static=False) == project


# -- a service host is a hostname or an IP address ------------------------------------------


def services_at(host: str) -> dict[str, Any]:
    return {"name": "k1", "host": host, "services": [{"name": "sshd", "port": 22}]}


@pytest.mark.parametrize("host", [
    "127.0.0.1:19001:timeout=1", "tcp:127.0.0.1", "[::1]", "a b", "-lead.example", "trail-.example",
    "a..b", "exa$mple.com", "http://x", "1.2.3.4/24", "é.example", "a" * 64 + ".example",
])
def test_a_service_host_that_is_not_a_hostname_or_address_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_project(services_at(host), path="projects[0]")
    assert str(info.value) == f"projects[0].host: {host!r} is not a hostname or an IP address"


def test_a_long_service_host_is_refused_and_quoted_short() -> None:
    host = ".".join(["a" * 63] * 5)
    with pytest.raises(ConfigError) as info:
        parse_project(services_at(host), path="projects[0]")
    message = str(info.value)
    assert message.startswith("projects[0].host: 'aaaaaaa") and "...aaaa" in message, message
    assert message.endswith("is not a hostname or an IP address") and len(message) < SHORT


@pytest.mark.parametrize("host", [
    "127.0.0.1", "::1", "fe80::1%lo", "localhost", "db.internal", "my_app_1", "example.com.", "a" * 63 + ".b",
])
def test_hostnames_and_addresses_are_accepted_as_service_hosts(host: str) -> None:
    assert parse_project(services_at(host)).host == host


def test_a_udp_backend_host_is_checked_the_same_way() -> None:
    manifest = {"name": "dns", "backend": "a b:53", "listen": {"port": 5353, "protocol": "udp"}}
    with pytest.raises(ConfigError) as info:
        parse_project(manifest)
    assert str(info.value) == "backend: 'a b:53': 'a b' is not a hostname or an IP address"


@pytest_twisted.ensureDeferred
async def test_the_api_refuses_a_bad_service_host(tmp_path: Path) -> None:
    await api_refuses(tmp_path, [
        ("k1", services_at("127.0.0.1:19001:timeout=1"), "host",
         "'127.0.0.1:19001:timeout=1' is not a hostname or an IP address"),
    ])


# -- reserved names --------------------------------------------------------------------------

STREAM = "'stream' is reserved: the ingress keeps /stream/ for service ports, so no project of that name could be reached by path"


def test_a_project_named_stream_is_refused_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(f"projects:\n  - {{name: web, backend: '{BACKEND}'}}\n  - {{name: stream, backend: '{BACKEND}'}}\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: projects[1].name: {STREAM}"
    # A service of that name is reached by its project's path, not by its own: it may.
    assert parse_project({"name": "k1", "services": [{"name": "stream", "port": 22}]}).services[0].name == "stream"


def test_a_project_named_stream_in_the_state_file_stops_start_up(tmp_path: Path) -> None:
    state = State(str(tmp_path))
    Path(state.path).write_text(json.dumps({"version": 1, "projects": [{"name": "stream", "backend": BACKEND}]}))
    with pytest.raises(StateError) as info:
        state.load(Limits())
    assert str(info.value) == f"{state.path}: projects[0].name: {STREAM}"


@pytest_twisted.ensureDeferred
async def test_the_api_refuses_a_project_named_stream(tmp_path: Path) -> None:
    await api_refuses(tmp_path, [
        ("stream", {"backend": BACKEND}, "name", STREAM),
    ])


# -- the state file --------------------------------------------------------------------------------


def state_of(*projects: Any) -> bytes:
    return json.dumps({"version": 1, "projects": list(projects)}).encode()


HOSTILE_STATE = {
    "binary-garbage": (bytes(range(256)) * 4, "not UTF-8 (byte 0x80 at offset 128)"),
    "deep-nesting": (b"[" * 100_000, "nests deeper than 32 levels"),
    "deep-nesting-inside": (b'{"version": 1, "projects": [' + b"[" * 40 + b"]" * 40 + b"]}",
                            "nests deeper than 32 levels"),
    "invalid-utf8": (state_of({"name": "web", "backend": BACKEND, "runtime": "caf"}).replace(b'"caf"', b'"caf\xe9"'),
                     "not UTF-8 (byte 0xe9 at offset "),
    "utf16": (state_of().decode().encode("utf-16"), "not UTF-8 (byte 0xff at offset 0)"),
    "a-string": (b'"projects"', "not a portrouter state file (version 1)"),
    "version-true": (b'{"version": true, "projects": []}', "not a portrouter state file (version 1)"),
    "duplicate-names": (state_of({"name": "web", "backend": BACKEND}, {"name": "api", "backend": BACKEND},
                                 {"name": "web", "backend": "tcp:127.0.0.1:2"}),
                        "projects[2].name: 'web' is already the name of projects[0]"),
    "duplicate-keys": (b'{"version": 1, "projects": [], "projects": []}',
                       "holds the key 'projects' twice in one object"),
    "nan": (state_of({"name": "web", "backend": BACKEND, "connect_timeout": 1}).replace(b": 1}", b": NaN}"),
            "holds NaN, which is not a finite number"),
    "huge-number": (state_of({"name": "web", "backend": BACKEND, "listen": {"port": 1}})
                    .replace(b'"port": 1', b'"port": ' + b"9" * 5000),
                    "projects[0].listen.port: 999999999999...999 (5000 digits) is not a port (1-65535)"),
}


@pytest.mark.parametrize("case", HOSTILE_STATE)
def test_a_hostile_state_file_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    content, problem = HOSTILE_STATE[case]
    state = State(str(tmp_path))
    Path(state.path).write_bytes(content)
    with pytest.raises(StateError) as info:
        state.load(Limits())
    message = str(info.value)
    assert message.startswith(f"{state.path}: {problem}"), message
    assert "\n" not in message and len(message) < SHORT + len(state.path), message


def test_the_state_file_is_never_written_with_a_non_finite_number(tmp_path: Path) -> None:
    """Validation refuses them; should one slip past it, the old file stays rather than one no reader takes."""
    state = saved_state(tmp_path, "old")
    old = Path(state.path).read_bytes()
    project = parse_project({"name": "new", "backend": BACKEND}, static=False)
    with pytest.raises(ValueError):
        state.save([replace(project, manifest={**project.manifest, "connect_timeout": float("inf")})])
    assert Path(state.path).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projects.json"]


@pytest.mark.parametrize("case", ["binary-garbage", "duplicate-names"])
@pytest_twisted.ensureDeferred
async def test_twistd_refuses_a_hostile_state_file_with_one_line(tmp_path: Path, case: str) -> None:
    content, problem = HOSTILE_STATE[case]
    config, state = tmp_path / "routes.yaml", tmp_path / "state"
    write_config(config, state)
    saved = saved_state(state)
    Path(saved.path).write_bytes(content)
    daemon = Twistd("--config", str(config))
    try:
        assert await daemon.wait_exit() != 0
        assert len(daemon.errors) == 1, daemon.errors
        assert daemon.errors[0].startswith(f"{saved.path}: {problem}"), daemon.errors
        assert not daemon.find("listening on"), "something was bound"
        assert Path(saved.path).read_bytes() == content, "the file was touched"
    finally:
        daemon.stop()


# -- every value in the config file and the API is quoted when refused --------------------------


def project_with(fields: str) -> str:
    return f"projects:\n  - {{name: web, backend: '{BACKEND}', {fields}}}\n"


CONFIG_VALUES = [
    ("drain_timeout: soon\n", "drain_timeout: expected a number of seconds, got 'soon'"),
    ("drain_timeout: .inf\n", "drain_timeout: .inf is not a finite number of seconds"),
    ("drain_timeout: -.inf\n", "drain_timeout: -.inf is not a finite number of seconds"),
    ("drain_timeout: .nan\n", "drain_timeout: .nan is not a finite number of seconds"),
    ("drain_timeout: true\n", "drain_timeout: expected a number of seconds, got true"),
    ("drain_timeout: " + "9" * 400 + "\n", "drain_timeout: 999999999999...999 (400 digits) is too large"),
    ("drain_timeout: " + "9" * 5000 + "\n", "drain_timeout: 999999999999...999 (5000 digits) is too large"),
    ("defaults: {udp_busy_poll: fast}\n",
     "defaults.udp_busy_poll: expected a number of seconds (0 to turn polling off), got 'fast'"),
    ("defaults: {udp_busy_poll: .nan}\n", "defaults.udp_busy_poll: .nan must be from 0 to 0.01 seconds"),
    ("defaults: {max_connections: 2.5}\n", "defaults.max_connections: expected a whole number or null, got 2.5"),
    ("defaults: {udp_max_sessions: many}\n", "defaults.udp_max_sessions: expected a whole number, got 'many'"),
    ("defaults: {udp_max_sessions: " + "9" * 5000 + "}\n",
     "defaults.udp_max_sessions: expected a whole number, got 999999999999...999 (5000 digits)"),
    ("ingress: 8080\n", "ingress: expected a string, got 8080"),
    ("state: null\nmanhole: {listen: 2222, authorized_keys: x}\n", "manhole.listen: expected a string, got 2222"),
    ("auth: {tokens: [{token: t, admin: 'yes'}]}\n", "auth.tokens[0].admin: expected true or false, got 'yes'"),
    ("auth: {tokens: [{token: t, admin: 1}]}\n", "auth.tokens[0].admin: expected true or false, got 1"),
    (project_with("listen: {port: true}"), "projects[0].listen.port: true is not a port (1-65535)"),
    (project_with("listen: {port: '80'}"), "projects[0].listen.port: '80' is not a port (1-65535)"),
    (project_with("listen: {port: .inf}"), "projects[0].listen.port: .inf is not a port (1-65535)"),
    (project_with("listen: {port: 80.0}"), "projects[0].listen.port: 80.0 is not a port (1-65535)"),
    (project_with("listen: {port: " + "9" * 5000 + "}"),
     "projects[0].listen.port: 999999999999...999 (5000 digits) is not a port (1-65535)"),
    (project_with("listen: {port: 80, interface: 5}"), "projects[0].listen.interface: expected a string, got 5"),
    (project_with("preserve_host: 'no'"), "projects[0].preserve_host: expected true or false, got 'no'"),
    (project_with("runtime: 12"), "projects[0].runtime: expected a string, got 12"),
    (project_with("runtime: 2001-12-14"), "projects[0].runtime: expected a string, got a date"),
    (project_with("idle_timeout: .inf"), "projects[0].idle_timeout: .inf is not a finite number of seconds"),
    (project_with("connect_timeout: 0"), "projects[0].connect_timeout: 0 must be greater than 0"),
    (project_with("command: [x], idle_stop: forever"),
     "projects[0].idle_stop: expected a number of seconds or null, got 'forever'"),
    (project_with("command: [x], env: {A: .inf}"), "projects[0].env.A: .inf is not a finite number"),
    (project_with("command: [x], env: {A: [1]}"), "projects[0].env.A: expected a string, got a list"),
    (project_with("command: [x], cwd: 5"), "projects[0].cwd: expected a string, got 5"),
    ("projects:\n  - {name: no, backend: 'tcp:127.0.0.1:1'}\n", "projects[0].name: expected a string, got false"),
    ("projects:\n  - {name: 12, backend: 'tcp:127.0.0.1:1'}\n", "projects[0].name: expected a string, got 12"),
    ("projects:\n  - {name: k1, services: [{name: s, port: 22, protocol: 5}]}\n",
     "projects[0].services[0].protocol: 5 is not a service protocol (http, tcp, udp)"),
]


def refusal_of(tmp_path: Path, content: bytes) -> str:
    """What loading a config file of C{content} says, without the file's name."""
    path = tmp_path / "routes.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


@pytest.mark.parametrize("text, message", CONFIG_VALUES, ids=[m[:50] for _, m in CONFIG_VALUES])
def test_a_bad_value_in_the_config_file_is_quoted(tmp_path: Path, text: str, message: str) -> None:
    assert refusal_of(tmp_path, text.encode()) == message


@pytest.mark.parametrize("content, message", [
    (bytes(range(256)) * 4, "not UTF-8 (byte 0x80 at offset 128)"),
    ("projects: [{name: café}]\n".encode("latin-1"), "not UTF-8 (byte 0xe9 at offset 21)"),
    ("projects: []\n".encode("utf-16"), "not UTF-8 (byte 0xff at offset 0)"),
    (b"projects: " + b"[" * 100_000 + b"\n", "invalid YAML: nested too deeply"),
    (b"projects: " + b"{a: " * 5000 + b"\n", "invalid YAML: nested too deeply"),
    (b"projects: [\x00]\n", "invalid YAML: unacceptable character #x0000 at offset 11: "
                              "special characters are not allowed"),
    (b"state: \x1b[2J\n", "invalid YAML: unacceptable character #x001b at offset 7: special characters are not allowed"),
], ids=["binary", "latin-1", "utf-16", "deep-lists", "deep-mappings", "nul", "escape"])
def test_a_config_file_that_is_not_yaml_text_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    assert refusal_of(tmp_path, content) == message


@pytest.mark.parametrize("text, message", [
    (project_with("listen: {port: 1:20}"), "projects[0].listen.port: '1:20' is not a port (1-65535)"),
    (project_with("listen: {port: 010}"), "projects[0].listen.port: '010' is not a port (1-65535)"),
    (project_with("listen: {port: 0777}"), "projects[0].listen.port: '0777' is not a port (1-65535)"),
    ("drain_timeout: 1:30\n", "drain_timeout: expected a number of seconds, got '1:30'"),
    ("drain_timeout: 1:30.5\n", "drain_timeout: expected a number of seconds, got '1:30.5'"),
], ids=["port-sexagesimal", "port-octal", "port-octal-2", "seconds-sexagesimal", "seconds-sexagesimal-float"])
def test_yaml_11_sexagesimal_and_octal_numbers_are_not_silently_other_numbers(
        tmp_path: Path, text: str, message: str) -> None:
    """YAML 1.1 reads 1:20 as 80 and 010 as 8; YAML 1.2 and every operator read neither so."""
    assert refusal_of(tmp_path, text.encode()) == message


def test_yaml_numbers_an_operator_writes_still_read_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("drain_timeout: 0.5\ndefaults: {connect_timeout: 1_000, udp_max_sessions: 0x10, "
                    "start_timeout: .5, idle_timeout: 2.5e+3}\n" + project_with("listen: {port: 8081}, runtime: 010"))
    config = load(str(path))
    assert config.drain_timeout == 0.5
    limits = config.defaults
    assert (limits.connect_timeout, limits.udp_max_sessions, limits.start_timeout, limits.idle_timeout) == (
        1000.0, 16, 0.5, 2500.0)
    assert config.projects[0].listen is not None and config.projects[0].listen.port == 8081
    assert config.projects[0].runtime == "010"


@pytest.mark.parametrize("token, message", [
    ("token_file: /dev/zero", "auth.tokens[0].token_file: '/dev/zero' is longer than 4096 bytes: not a secret"),
    ("token_file: /dev/urandom", "auth.tokens[0].token_file: '/dev/urandom' is longer than 4096 bytes: not a secret"),
    ("token_file: {binary}", "auth.tokens[0].token_file: '{binary}' is not UTF-8 text"),
    ("token_file: {control}", "auth.tokens[0].token_file: '{control}' holds a control character (0x00)"),
    ('token: "s3cr\\x01t"', "auth.tokens[0].token: contains a control character (0x01)"),
    ("token: s3cr" + "t" * 5000, "auth.tokens[0].token: is longer than 4096 characters"),
    ("token: 1234567890", "auth.tokens[0].token: expected a string, got an integer (quote it)"),
], ids=["dev-zero", "dev-urandom", "binary", "control", "inline-control", "inline-long", "inline-number"])
def test_a_token_file_that_is_no_secret_is_refused_without_reading_it_all(
        tmp_path: Path, token: str, message: str) -> None:
    """A device or a binary file named by mistake: refused at once (it was read forever), the secret never quoted."""
    binary, control = tmp_path / "binary", tmp_path / "control"
    binary.write_bytes(bytes(range(256)))
    control.write_bytes(b"s3cr\x00t\n")
    text = "auth: {tokens: [{" + token.format(binary=binary, control=control) + ", admin: true}]}\n"
    refusal = refusal_of(tmp_path, text.encode())
    assert refusal == message.format(binary=binary, control=control)
    assert "s3cr" not in refusal and "1234" not in refusal


def test_an_endpoint_error_without_a_message_still_says_what_failed(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    backend = f"tls:example.com:443:trustRoots={missing}"
    assert refusal_of(tmp_path, f"projects:\n  - {{name: web, backend: '{backend}'}}\n".encode()) == (
        f"projects[0].backend: {quote(backend)} is not a client endpoint: "
        f"[Errno 2] No such file or directory: '{missing}'")


@pytest_twisted.ensureDeferred
async def test_twistd_refuses_a_binary_config_file_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    daemon = Twistd("--config", str(path), "--state", str(tmp_path / "state"))
    try:
        assert await daemon.wait_exit() != 0
        assert daemon.errors == [f"{path}: not UTF-8 (byte 0x80 at offset 128)"], daemon.errors
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_a_reload_of_a_hostile_config_file_is_a_400_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    write_config(path, tmp_path / "state", f"{{name: web, backend: '{BACKEND}'}}")
    router = RouterService(load(str(path)), reactor, Front, reload_config=lambda: load(str(path)))
    router.privilegedStartService()
    router.startService()
    port = router.port_of()
    snapshot = Snapshot(port, tmp_path / "state" / "projects.json", router)
    try:
        before = await snapshot.take()
        for content, message in [
            (bytes(range(256)) * 4, "not UTF-8 (byte 0x80 at offset 128)"),
            (b"projects: " + b"[" * 100_000 + b"\n", "invalid YAML: nested too deeply"),
            (b"drain_timeout: " + b"9" * 5000 + b"\n", "drain_timeout: 999999999999...999 (5000 digits) is too large"),
            (b"drain_timeout: .inf\n", "drain_timeout: .inf is not a finite number of seconds"),
        ]:
            path.write_bytes(content)
            status, got = await api(port, "POST", "/_api/reload")
            assert (status, got["error"]["code"]) == (400, "invalid"), got
            assert got["error"]["message"] == f"{path}: {message}"
            assert await snapshot.take() == before
    finally:
        await router.stopService()


@pytest.mark.parametrize("protocol, text, message", [
    ("udp", "udp:" + "9" * 5000 + " -> 127.0.0.1:53", "--udp: 'udp:999999999999999999999999999999999...99999999999999999999999999999999999999' "
     "is longer than 4096 characters"),
    ("udp", "udp:" + "9" * 4000 + " -> 127.0.0.1:53", "--udp: 'udp:999999999999999999999999999999999...99999999999999999999999999999999999999': "
     "999999999999...999 (4000 digits) is not a port (0-65535)"),
    ("udp", "udp:5\n3 -> 127.0.0.1:53", "--udp: 'udp:5\\n3' contains a control character (0x0a)"),
], ids=["udp-5000-digits", "udp-4000-digits", "udp-newline"])
def test_a_hostile_cli_route_is_one_line(protocol: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_cli(Config(), routes=[(protocol, text)])
    assert str(info.value) == message


@pytest_twisted.ensureDeferred
async def test_the_api_quotes_a_bad_value(tmp_path: Path) -> None:
    await api_refuses(tmp_path, [
        ("x", {"backend": BACKEND, "connect_timeout": "soon"}, "connect_timeout",
         "expected a number of seconds, got 'soon'"),
        ("x", {"backend": BACKEND, "listen": {"port": True}}, "listen.port", "true is not a port (1-65535)"),
        ("x", {"backend": BACKEND, "listen": {"port": 80.0}}, "listen.port", "80.0 is not a port (1-65535)"),
        ("x", {"backend": BACKEND, "listen": {"port": "80"}}, "listen.port", "'80' is not a port (1-65535)"),
        ("x", {"backend": BACKEND, "max_connections": 1e300}, "max_connections",
         "expected a whole number or null, got 1e+300"),
        ("x", {"backend": BACKEND, "connect_timeout": int("9" * 400)}, "connect_timeout",
         "999999999999...999 (400 digits) is too large"),
        ("x", {"backend": BACKEND, "preserve_host": "false"}, "preserve_host",
         "expected true or false, got 'false'"),
        ("x", {"backend": 3000}, "backend", "expected a string, got 3000"),
    ])


# -- the start timeout says so ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_start_timeout_says_it_was_the_start_timeout(tmp_path: Path, logged: list[str]) -> None:
    service = Service(tmp_path, "slow", "echo", "--gate")
    clock = Clock()
    sup = Supervisor(reactor, "k1/notebook", Command(tuple(service.command)), service.backend, 30.0, clock=clock)
    waiter = sup.ensure()
    expected = f"k1/notebook did not open port {service.port} within start_timeout 30 s"
    try:
        pid = await wait_for(lambda: sup.pid, what="the child to be spawned")
        await wait_for(clock.getDelayedCalls, what="the first poll to be refused")
        clock.advance(30.1)
        with pytest.raises(StartFailed) as info:
            await waiter
        assert str(info.value) == expected
        await log_line(logged, rf"^{expected}; stopping it$")
        await gone(pid)
    finally:
        waiter.addErrback(lambda _: None)
        await within(sup.stop(), 15, "the child to stop")
        await gone(*service.starts())


def test_a_start_timeout_of_a_unix_socket_backend_names_the_socket(tmp_path: Path) -> None:
    sup = Supervisor(reactor, "web", Command(("true",)), f"unix:{tmp_path}/app.sock", 2.5)
    assert sup.waits_for == f"{tmp_path}/app.sock"
    sup = Supervisor(reactor, "web", Command(("true",)), f"tcp:{LOOPBACK}:8888", 2.5)
    assert sup.waits_for == "port 8888"
