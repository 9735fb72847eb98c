"""
The config file and the CLI: what parses, what it means, and the one line an
operator gets for each mistake (SPEC sections 1, 6, 7 and 8).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from portrouter.config import ConfigError, load, parse, with_cli
from portrouter.model import Auth, Command, Config, Keypair, Limits, Listen, Manhole, Token

ROOT = Path(__file__).resolve().parent.parent
# The command an operator runs, from the environment that runs the tests.
TWISTD = str(Path(sys.executable).with_name("twistd")) if Path(sys.executable).with_name(
    "twistd").exists() else shutil.which("twistd")


@dataclass(frozen=True)
class Broken:
    """A config that must be refused, and the line that says why."""

    id: str
    text: str
    message: str  # after "FILE: "; {tmp} is the test's temporary directory


BROKEN = [
    # -- ports --------------------------------------------------------------
    Broken("port-zero", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: 0}
        """, "projects[0].listen.port: 0 is not a port (1-65535)"),
    Broken("port-too-big", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - {name: api, backend: "tcp:127.0.0.1:3001", listen: {port: 3000}}
          - {name: big, backend: "tcp:127.0.0.1:3002", listen: {port: 70000}}
        """, "projects[2].listen.port: 70000 is not a port (1-65535)"),
    Broken("port-word", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: abc}
        """, "projects[0].listen.port: 'abc' is not a port (1-65535)"),
    Broken("port-boolean", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: true}
        """, "projects[0].listen.port: true is not a port (1-65535)"),
    Broken("port-quoted", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: "3000"}
        """, "projects[0].listen.port: '3000' is not a port (1-65535)"),
    Broken("port-missing", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {protocol: tcp}
        """, "projects[0].listen.port: is required"),
    Broken("service-port", """
        projects:
          - name: k1
            services:
              - {name: sshd, protocol: tcp, port: 2200}
              - {name: notebook, protocol: http, port: 88888}
        """, "projects[0].services[1].port: 88888 is not a port (1-65535)"),
    # -- protocols ------------------------------------------------------------
    Broken("unknown-protocol", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: 3000, protocol: sctp}
        """, "projects[0].listen.protocol: 'sctp' is not a protocol (http, tcp, udp, ws)"),
    Broken("unknown-service-protocol", """
        projects:
          - name: k1
            services:
              - {name: dns, protocol: sctp, port: 53}
        """, "projects[0].services[0].protocol: 'sctp' is not a service protocol (http, tcp, udp)"),
    # -- names ----------------------------------------------------------------
    Broken("duplicate-project", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - {name: api, backend: "tcp:127.0.0.1:4001"}
          - {name: web, backend: "tcp:127.0.0.1:4002"}
        """, "projects[2].name: 'web' is already the name of projects[0]"),
    Broken("name-not-slug", """
        projects:
          - {name: My_App, backend: "tcp:127.0.0.1:4000"}
        """, "projects[0].name: 'My_App' is not a valid name (lower-case letters, "
             "digits and '-', starting with a letter or digit, at most 63)"),
    Broken("name-leading-dash", """
        projects:
          - {name: "-web", backend: "tcp:127.0.0.1:4000"}
        """, "projects[0].name: '-web' is not a valid name (lower-case letters, "
             "digits and '-', starting with a letter or digit, at most 63)"),
    Broken("name-too-long", f"""
        projects:
          - {{name: {'a' * 64}, backend: "tcp:127.0.0.1:4000"}}
        """, f"projects[0].name: '{'a' * 64}' is not a valid name (lower-case letters, "
             "digits and '-', starting with a letter or digit, at most 63)"),
    Broken("name-missing", """
        projects:
          - {backend: "tcp:127.0.0.1:4000"}
        """, "projects[0].name: is required"),
    Broken("duplicate-service", """
        projects:
          - name: k1
            services:
              - {name: sshd, port: 22}
              - {name: notebook, port: 8888}
              - {name: sshd, port: 2200}
        """, "projects[0].services[2].name: 'sshd' is already the name of projects[0].services[0]"),
    # -- port conflicts -------------------------------------------------------
    Broken("http-and-tcp-same-port", """
        projects:
          - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 3000}}
          - {name: my-socket, backend: "tcp:127.0.0.1:5001", listen: {port: 3000, protocol: tcp}}
        """, "projects[1].listen.port: port 3000/tcp is already bound by project 'my-api'; "
             "project 'my-socket' cannot bind it"),
    Broken("ws-and-http-same-port", """
        projects:
          - {name: vnc, backend: "tcp:127.0.0.1:5900", listen: {port: 7000, protocol: ws}}
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 7000, protocol: http}}
        """, "projects[2].listen.port: port 7000/tcp is already bound by project 'vnc'; "
             "project 'my-api' cannot bind it"),
    Broken("udp-twice", """
        projects:
          - {name: dns, backend: "127.0.0.1:53", listen: {port: 5353, protocol: udp}}
          - {name: mdns, backend: "127.0.0.1:5354", listen: {port: 5353, protocol: udp}}
        """, "projects[1].listen.port: port 5353/udp is already bound by project 'dns'; "
             "project 'mdns' cannot bind it"),
    Broken("ingress-port", """
        ingress: tcp:8080:interface=127.0.0.1
        projects:
          - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 8080, protocol: tcp}}
        """, "projects[0].listen.port: port 8080/tcp is reserved for the ingress; "
             "project 'my-api' cannot bind it"),
    Broken("default-ingress-port", """
        projects:
          - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 8080}}
        """, "projects[0].listen.port: port 8080/tcp is reserved for the ingress; "
             "project 'my-api' cannot bind it"),
    Broken("manhole-port", """
        manhole:
          listen: tcp:2222:interface=127.0.0.1
          authorized_keys: {tmp}/authorized_keys
        projects:
          - {name: sshd, backend: "tcp:127.0.0.1:22", listen: {port: 2222, protocol: tcp}}
        """, "projects[0].listen.port: port 2222/tcp is reserved for the manhole; "
             "project 'sshd' cannot bind it"),
    # -- strports and endpoints -------------------------------------------------
    Broken("ingress-unknown-type", """
        ingress: foo:8080
        """, "ingress: 'foo:8080' is not a listening endpoint: Unknown endpoint type: 'foo'"),
    Broken("ingress-port-word", """
        ingress: tcp:http
        """, "ingress: 'tcp:http' is not a listening endpoint: 'http' is not a number"),
    Broken("ingress-port-too-big", """
        ingress: tcp:70000
        """, "ingress: 'tcp:70000': 70000 is not a port (0-65535)"),
    Broken("ingress-unknown-option", """
        ingress: tcp:8080:iface=127.0.0.1
        """, "ingress: 'tcp:8080:iface=127.0.0.1' is not a listening endpoint: unknown option 'iface'"),
    Broken("ingress-number", """
        ingress: 8080
        """, "ingress: expected a string, got 8080"),
    Broken("backend-unknown-type", """
        projects:
          - {name: web, backend: "http://127.0.0.1:4000"}
        """, "projects[0].backend: 'http://127.0.0.1:4000' is not a client endpoint: "
             "Unknown endpoint type: 'http'"),
    Broken("backend-missing-port", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1"}
        """, "projects[0].backend: 'tcp:127.0.0.1' is not a client endpoint: missing port"),
    Broken("backend-port-too-big", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:99999"}
        """, "projects[0].backend: 'tcp:127.0.0.1:99999': 99999 is not a port (1-65535)"),
    Broken("udp-backend-endpoint", """
        projects:
          - name: dns
            backend: tcp:127.0.0.1:53
            listen: {port: 5353, protocol: udp}
        """, "projects[0].backend: 'tcp:127.0.0.1:53' is not HOST:PORT"),
    Broken("udp-backend-no-port", """
        projects:
          - name: dns
            backend: 127.0.0.1
            listen: {port: 5353, protocol: udp}
        """, "projects[0].backend: '127.0.0.1' is not HOST:PORT"),
    Broken("udp-backend-port-zero", """
        projects:
          - name: dns
            backend: 127.0.0.1:0
            listen: {port: 5353, protocol: udp}
        """, "projects[0].backend: '127.0.0.1:0': 0 is not a port (1-65535)"),
    Broken("interface-name", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: 3000, interface: localhost}
        """, "projects[0].listen.interface: 'localhost' is not an IP address"),
    Broken("interface-bad-address", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:4000
            listen: {port: 3000, interface: 300.0.0.1}
        """, "projects[0].listen.interface: '300.0.0.1' is not an IP address"),
    # -- unknown keys -----------------------------------------------------------
    Broken("unknown-top-key", """
        ingres: tcp:8080
        """, "ingres: unknown key (did you mean 'ingress'?)"),
    Broken("unknown-top-key-no-hint", """
        upstreams: []
        """, "upstreams: unknown key"),
    Broken("unknown-project-key", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - name: api
            backend: tcp:127.0.0.1:3001
            lisen: {port: 3000}
        """, "projects[1].lisen: unknown key (did you mean 'listen'?)"),
    Broken("unknown-listen-key", """
        projects:
          - name: api
            backend: tcp:127.0.0.1:3001
            listen: {port: 3000, proto: tcp}
        """, "projects[0].listen.proto: unknown key (did you mean 'protocol'?)"),
    Broken("unknown-defaults-key", """
        defaults:
          conect_timeout: 5
        """, "defaults.conect_timeout: unknown key (did you mean 'connect_timeout'?)"),
    # -- types ------------------------------------------------------------------
    Broken("projects-mapping", """
        projects:
          name: web
          backend: tcp:127.0.0.1:4000
        """, "projects: expected a list, got a mapping"),
    Broken("projects-empty-mapping", """
        projects: {}
        """, "projects: expected a list, got a mapping"),
    Broken("projects-string", """
        projects: web
        """, "projects: expected a list, got 'web'"),
    Broken("project-string", """
        projects:
          - web
        """, "projects[0]: expected a mapping, got 'web'"),
    Broken("listen-number", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000", listen: 3000}
        """, "projects[0].listen: expected a mapping, got 3000"),
    Broken("drain-timeout-string", """
        drain_timeout: 30s
        """, "drain_timeout: expected a number of seconds, got '30s'"),
    Broken("drain-timeout-zero", """
        drain_timeout: 0
        """, "drain_timeout: 0 must be greater than 0"),
    Broken("command-string", """
        projects:
          - name: web
            backend: tcp:127.0.0.1:8000
            command: python3 -m http.server
        """, "projects[0].command: expected a list, got 'python3 -m http.server'"),
    Broken("command-number-item", """
        projects:
          - name: k1
            services:
              - name: notebook
                port: 8888
                command: [python3, -m, http.server, 8888]
        """, "projects[0].services[0].command[3]: expected a string, got 8888"),
    Broken("command-empty", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:8000", command: []}
        """, "projects[0].command: must name a program to run"),
    Broken("env-without-command", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:8000", env: {PORT: 8000}}
        """, "projects[0].env: only makes sense with 'command'"),
    Broken("defaults-not-mapping", """
        defaults: 10
        """, "defaults: expected a mapping, got 10"),
    Broken("limit-negative", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000", connect_timeout: -1}
        """, "projects[0].connect_timeout: -1 must be greater than 0"),
    Broken("busy-poll-too-long", """
        defaults: {udp_busy_poll: 0.5}
        """, "defaults.udp_busy_poll: 0.5 must be from 0 to 0.01 seconds"),
    Broken("busy-poll-negative", """
        projects:
          - {name: dns, backend: "127.0.0.1:53", listen: {port: 5353, protocol: udp}, udp_busy_poll: -0.001}
        """, "projects[0].udp_busy_poll: -0.001 must be from 0 to 0.01 seconds"),
    Broken("busy-poll-yaml-exponent", """
        defaults: {udp_busy_poll: 5e-05}
        """, "defaults.udp_busy_poll: expected a number of seconds (0 to turn polling off), got '5e-05'"),
    Broken("service-limit-zero", """
        projects:
          - name: k1
            services:
              - {name: sshd, port: 22, max_connections: 0}
        """, "projects[0].services[0].max_connections: 0 must be at least 1"),
    Broken("document-list", """
        - name: web
          backend: tcp:127.0.0.1:4000
        """, "expected a mapping, got a list"),
    # -- backend and services -----------------------------------------------------
    Broken("neither-backend-nor-services", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
          - {name: api, runtime: deno, entry: server.ts}
        """, "projects[1]: needs 'backend', 'services', or both"),
    Broken("listen-without-backend", """
        projects:
          - name: k1
            listen: {port: 3000}
            services: [{name: sshd, port: 22}]
        """, "projects[0].backend: is required for a project with 'listen'"),
    # -- YAML -------------------------------------------------------------------
    Broken("yaml-indentation", """
        ingress: tcp:8080
        projects:
          - name: web
           backend: tcp:127.0.0.1:4000
        """, "line 4, column 4: invalid YAML: expected <block end>, but found '<block mapping start>'"),
    Broken("yaml-unclosed", """
        projects: [
        """, "line 2, column 1: invalid YAML: expected the node content, but found '<stream end>'"),
    Broken("yaml-duplicate-key", """
        projects:
          - {name: web, backend: "tcp:127.0.0.1:4000"}
        drain_timeout: 10
        projects:
          - {name: api, backend: "tcp:127.0.0.1:3001"}
        """, "line 4, column 1: invalid YAML: duplicate key 'projects' (first on line 1)"),
    # -- auth -------------------------------------------------------------------
    Broken("token-file-missing", """
        auth:
          tokens:
            - token_file: {tmp}/ops.token
              admin: true
        """, "auth.tokens[0].token_file: cannot read '{tmp}/ops.token': No such file or directory"),
    Broken("secret-key-file-missing", """
        auth:
          keypairs:
            - access_key: AKIAEXAMPLE
              secret_key_file: {tmp}/ak.secret
              projects: [k1]
        """, "auth.keypairs[0].secret_key_file: cannot read '{tmp}/ak.secret': No such file or directory"),
    Broken("token-and-token-file", """
        auth:
          tokens:
            - {token: abc, token_file: ops.token}
        """, "auth.tokens[0]: needs exactly one of 'token' and 'token_file'"),
    Broken("token-admin-word", """
        auth:
          tokens:
            - {token: abc, admin: yes please}
        """, "auth.tokens[0].admin: expected true or false, got 'yes please'"),
    Broken("token-bad-project", """
        auth:
          tokens:
            - {token: abc, projects: ["*", K1]}
        """, "auth.tokens[0].projects[1]: 'K1' is not a valid name (lower-case letters, "
             "digits and '-', starting with a letter or digit, at most 63)"),
    Broken("manhole-no-keys", """
        manhole:
          listen: tcp:2222:interface=127.0.0.1
        """, "manhole.authorized_keys: is required"),
]


def write(tmp_path: Path, case: Broken) -> tuple[str, str]:
    """Write C{case} as C{routes.yaml}; return the path and the full expected line."""
    tmp = str(tmp_path)
    text = textwrap.dedent(case.text).lstrip("\n").replace("{tmp}", tmp)
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return str(path), f"{path}: {case.message.replace('{tmp}', tmp)}"


def test_enough_broken_configs() -> None:
    assert len(BROKEN) >= 20
    assert len({case.id for case in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize("case", BROKEN, ids=[case.id for case in BROKEN])
def test_broken_config(tmp_path: Path, case: Broken) -> None:
    path, expected = write(tmp_path, case)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == expected
    assert "\n" not in str(info.value)
    assert info.value.source == path


def test_error_parts(tmp_path: Path) -> None:
    """The message is made of its parts, so that the API can reuse field and problem."""
    path, _ = write(tmp_path, BROKEN[1])
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.source, info.value.field, info.value.problem) == (
        path, "projects[2].listen.port", "70000 is not a port (1-65535)",
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"


def test_parse_without_source() -> None:
    """An API body or a document without a file: no file name in front."""
    with pytest.raises(ConfigError) as info:
        parse({"projects": [{"name": "web", "backend": "tcp:127.0.0.1:4000", "listen": {"port": 0}}]})
    assert str(info.value) == "projects[0].listen.port: 0 is not a port (1-65535)"


# --- the real command ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def twistd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run C{twistd -n portrouter ARGS} from the checkout, in C{tmp_path}."""
    assert TWISTD is not None, "twistd is not installed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    ))
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "portrouter", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# True: the case leaves room for an ingress on a port of our choosing, which
# must still be free once twistd has refused the file.
TWISTD_CASES = {
    "port-too-big": True,
    "http-and-tcp-same-port": True,
    "unknown-project-key": True,
    "token-file-missing": True,
    "ingress-unknown-type": False,
    "yaml-indentation": False,
    "yaml-duplicate-key": False,
}


@pytest.mark.parametrize("case_id", sorted(TWISTD_CASES))
def test_twistd_refuses_broken_config(tmp_path: Path, case_id: str) -> None:
    case = next(c for c in BROKEN if c.id == case_id)
    port = free_port()
    if TWISTD_CASES[case_id]:
        case = Broken(case.id, f"ingress: tcp:{port}:interface=127.0.0.1\n"
                      + textwrap.dedent(case.text).lstrip("\n"), case.message)
    path, expected = write(tmp_path, case)
    result = twistd(tmp_path, "--config", path)
    assert result.returncode != 0, result
    assert last_line(result.stderr) == expected, result.stderr
    # One line, before anything was bound or even logged.
    assert result.stderr.strip() == expected
    assert "listening on" not in result.stdout
    assert not (tmp_path / "portrouter-state").exists()
    assert bindable(port)


def test_twistd_refuses_cli_conflict(tmp_path: Path) -> None:
    """A CLI route that clashes with the file's is refused the same way."""
    port = free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(f"""\
        ingress: tcp:{port}:interface=127.0.0.1
        projects:
          - {{name: my-api, backend: "tcp:127.0.0.1:3001", listen: {{port: 3000}}}}
        """))
    result = twistd(tmp_path, "--config", str(path), "--tcp", "tcp:3000 -> tcp:127.0.0.1:6000")
    assert result.returncode != 0, result
    assert last_line(result.stderr) == (
        "--tcp: port 3000/tcp is already bound by project 'my-api'; "
        "project 'tcp-3000' cannot bind it"
    ), result.stderr
    assert "listening on" not in result.stdout
    assert bindable(port)


# --- what parses ----------------------------------------------------------------


SPEC_EXAMPLE = """\
ingress: tcp:8080                  # strports
state: ./portrouter-state          # API-deployed projects, manhole host key
drain_timeout: 30
defaults:                          # every one may be overridden per project
  connect_timeout: 10
  idle_timeout: null
  udp_timeout: 60
  udp_max_sessions: 10000
  max_connections: null
  start_timeout: 30
auth:                              # absent: /_api/ and /stream/ answer loopback only
  tokens:
    - token_file: {tmp}/ops.token
      admin: true
      projects: ["*"]
  keypairs:
    - access_key: AKIAEXAMPLE
      secret_key_file: {tmp}/ak.secret
      projects: [k1]
manhole:
  listen: tcp:2222:interface=127.0.0.1
  authorized_keys: {tmp}/authorized_keys
projects:
  - name: web
    backend: tcp:127.0.0.1:4000
  - name: my-api
    runtime: deno
    entry: server.ts
    backend: tcp:127.0.0.1:3001
    listen: {{port: 3000, protocol: http}}
  - name: my-socket
    backend: tcp:127.0.0.1:5001
    listen: {{port: 5000, protocol: tcp}}
  - name: dns
    backend: 127.0.0.1:53
    listen: {{port: 5353, protocol: udp}}
  - name: vnc
    backend: tcp:127.0.0.1:5900
    listen: {{port: 7000, protocol: ws}}
  - name: k1
    host: 127.0.0.1
    services:
      - {{name: sshd, protocol: tcp, port: 2200}}
      - {{name: notebook, protocol: http, port: 8888,
         command: [python3, -m, http.server, "8888", --bind, 127.0.0.1]}}
"""

OPS_TOKEN = "ops-token-8c1f0e5b"
AK_SECRET = "ak-secret-3d94a7"


@pytest.fixture
def spec_example(tmp_path: Path) -> str:
    """SPEC section 7's example, its secrets in files under C{tmp_path}."""
    (tmp_path / "ops.token").write_text(OPS_TOKEN + "\n")
    (tmp_path / "ak.secret").write_text(AK_SECRET + "\n")
    path = tmp_path / "routes.yaml"
    path.write_text(SPEC_EXAMPLE.format(tmp=tmp_path))
    return str(path)


def test_spec_example(spec_example: str, tmp_path: Path) -> None:
    config = load(spec_example)
    assert config.source == spec_example
    assert config.ingress == "tcp:8080"
    assert config.state == "./portrouter-state"
    assert config.drain_timeout == 30.0
    assert config.defaults == Limits()
    assert config.auth == Auth(
        tokens=(Token(OPS_TOKEN, admin=True, projects=("*",)),),
        keypairs=(Keypair("AKIAEXAMPLE", AK_SECRET, projects=("k1",)),),
    )
    assert config.manhole == Manhole("tcp:2222:interface=127.0.0.1", f"{tmp_path}/authorized_keys")

    projects = {p.name: p for p in config.projects}
    assert list(projects) == ["web", "my-api", "my-socket", "dns", "vnc", "k1"]
    assert {name: p.listen for name, p in projects.items()} == {
        "web": None,
        "my-api": Listen("http", 3000, None, "tcp:3000"),
        "my-socket": Listen("tcp", 5000, None, "tcp:5000"),
        "dns": Listen("udp", 5353, None, "udp:5353"),
        "vnc": Listen("ws", 7000, None, "tcp:7000"),
        "k1": None,
    }
    assert projects["web"].path_routed and not projects["my-api"].path_routed
    assert projects["dns"].backend == "127.0.0.1:53"
    assert (projects["my-api"].runtime, projects["my-api"].entry) == ("deno", "server.ts")
    assert projects["my-api"].manifest["runtime"] == "deno"

    k1 = projects["k1"]
    assert (k1.backend, k1.host, k1.path_routed) == (None, "127.0.0.1", False)
    assert [(s.name, s.protocol, s.port) for s in k1.services] == [
        ("sshd", "tcp", 2200), ("notebook", "http", 8888),
    ]
    assert k1.service("sshd") is k1.services[0]
    assert k1.service("nope") is None
    assert k1.services[0].command is None
    assert k1.services[1].command == Command(
        ("python3", "-m", "http.server", "8888", "--bind", "127.0.0.1")
    )
    assert all(p.static for p in config.projects)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("# nothing yet\n")
    assert load(str(path)) == Config(source=str(path))


def test_tcp_and_udp_share_a_port_number(tmp_path: Path) -> None:
    """5353/udp and 5353/tcp are different ports; so are 8080/udp and the ingress."""
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        projects:
          - {name: dns-udp, backend: "127.0.0.1:53", listen: {port: 5353, protocol: udp}}
          - {name: dns-tcp, backend: "tcp:127.0.0.1:53", listen: {port: 5353, protocol: tcp}}
          - {name: echo, backend: "127.0.0.1:7", listen: {port: 8080, protocol: udp}}
        """))
    config = load(str(path))
    assert [(p.name, p.listen.protocol, p.listen.port) for p in config.projects if p.listen] == [
        ("dns-udp", "udp", 5353), ("dns-tcp", "tcp", 5353), ("echo", "udp", 8080),
    ]


def test_ingress_may_use_port_zero_and_interfaces(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        ingress: tcp:0:interface=127.0.0.1
        projects:
          - name: api
            backend: unix:/run/app.sock
            listen: {port: 3000, interface: "::1"}
          - name: dns
            backend: "[::1]:53"
            listen: {port: 5353, protocol: udp, interface: 127.0.0.1}
        """))
    config = load(str(path))
    assert config.ingress == "tcp:0:interface=127.0.0.1"
    assert config.projects[0].listen == Listen("http", 3000, "::1", r"tcp:3000:interface=\:\:1")
    assert config.projects[1].listen == Listen("udp", 5353, "127.0.0.1", "udp:5353:interface=127.0.0.1")


def test_limits_inherited_and_overridden(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        defaults:
          connect_timeout: 5
          udp_timeout: 20
          max_connections: 100
        projects:
          - {name: plain, backend: "tcp:127.0.0.1:4000"}
          - name: tuned
            backend: tcp:127.0.0.1:4001
            connect_timeout: 2
            idle_timeout: 300
            max_connections: null
          - name: k1
            start_timeout: 90
            services:
              - {name: sshd, port: 22}
              - {name: notebook, port: 8888, start_timeout: 120, udp_max_sessions: 7}
        """))
    config = load(str(path))
    defaults = Limits(connect_timeout=5.0, udp_timeout=20.0, max_connections=100)
    assert config.defaults == defaults
    plain, tuned, k1 = config.projects
    assert plain.limits == defaults
    assert tuned.limits == Limits(
        connect_timeout=2.0, idle_timeout=300.0, udp_timeout=20.0, max_connections=None,
    )
    assert k1.limits == Limits(connect_timeout=5.0, udp_timeout=20.0, max_connections=100, start_timeout=90.0)
    assert k1.services[0].limits == k1.limits
    assert k1.services[1].limits == Limits(
        connect_timeout=5.0, udp_timeout=20.0, max_connections=100,
        start_timeout=120.0, udp_max_sessions=7,
    )
    assert isinstance(k1.services[1].limits.start_timeout, float)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    """A repeated key is refused, but a key that overrides a merged one is YAML as intended."""
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        projects:
          - &base {name: web, backend: "tcp:127.0.0.1:4000", connect_timeout: 3}
          - <<: *base
            name: web2
        """))
    config = load(str(path))
    assert [(p.name, p.backend, p.limits.connect_timeout) for p in config.projects] == [
        ("web", "tcp:127.0.0.1:4000", 3.0), ("web2", "tcp:127.0.0.1:4000", 3.0),
    ]


def test_inline_secrets(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent("""\
        auth:
          tokens:
            - {token: t0k3n}
          keypairs:
            - {access_key: AK, secret_key: s3cr3t}
        """))
    auth = load(str(path)).auth
    assert auth == Auth((Token("t0k3n", False, ()),), (Keypair("AK", "s3cr3t", ()),))


def test_secrets_not_in_repr(spec_example: str, tmp_path: Path) -> None:
    config = load(spec_example)
    assert config.auth is not None
    shown = [repr(config), str(config), repr(config.auth), repr(config.auth.tokens[0]),
             repr(config.auth.keypairs[0])]
    for text in shown:
        assert OPS_TOKEN not in text
        assert AK_SECRET not in text
    assert "AKIAEXAMPLE" in repr(config.auth.keypairs[0])


def test_empty_token_file(tmp_path: Path) -> None:
    (tmp_path / "ops.token").write_text("\n")
    path = tmp_path / "routes.yaml"
    path.write_text(f"auth:\n  tokens:\n    - token_file: {tmp_path}/ops.token\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}: auth.tokens[0].token_file: '{tmp_path}/ops.token' is empty"


# --- the CLI joins the file -------------------------------------------------------


FILE_PROJECTS = """\
ingress: tcp:8080
state: /var/lib/portrouter
projects:
  - {name: web, backend: "tcp:127.0.0.1:4000"}
  - {name: my-api, backend: "tcp:127.0.0.1:3001", listen: {port: 3000}}
  - {name: dns, backend: "127.0.0.1:53", listen: {port: 5300, protocol: udp}}
"""


@pytest.fixture
def file_config(tmp_path: Path) -> Config:
    path = tmp_path / "routes.yaml"
    path.write_text(FILE_PROJECTS)
    return load(str(path))


def test_cli_routes_join_the_file(file_config: Config) -> None:
    config = with_cli(file_config, routes=[
        ("tcp", "tcp:5000 -> tcp:127.0.0.1:6000"),
        ("udp", "udp:5353 -> 127.0.0.1:53"),
    ])
    assert [p.name for p in config.projects] == ["web", "my-api", "dns", "tcp-5000", "udp-5353"]
    tcp, udp = config.projects[3:]
    assert (tcp.listen, tcp.backend) == (Listen("tcp", 5000, None, "tcp:5000"), "tcp:127.0.0.1:6000")
    assert (udp.listen, udp.backend) == (Listen("udp", 5353, None, "udp:5353"), "127.0.0.1:53")
    assert tcp.static and udp.static
    assert config.ingress == "tcp:8080"
    assert config.state == "/var/lib/portrouter"
    assert config.projects[:3] == file_config.projects


def test_cli_wins_over_file(file_config: Config) -> None:
    config = with_cli(file_config, ingress="tcp:0:interface=127.0.0.1", state="/tmp/elsewhere")
    assert (config.ingress, config.state) == ("tcp:0:interface=127.0.0.1", "/tmp/elsewhere")
    assert config.projects == file_config.projects


def test_cli_without_file() -> None:
    config = with_cli(Config(), routes=[
        ("http", "tcp:3000:interface=127.0.0.1 -> tcp:127.0.0.1:3001"),
        ("ws", "tcp:7000 -> tcp:127.0.0.1:5900"),
        ("tcp", "tcp:0 -> tcp:127.0.0.1:6000"),
        ("tcp", "tcp:0 -> tcp:127.0.0.1:6001"),
    ], manhole="tcp:2222:interface=127.0.0.1")
    assert [(p.name, p.listen) for p in config.projects] == [
        ("http-3000", Listen("http", 3000, "127.0.0.1", "tcp:3000:interface=127.0.0.1")),
        ("ws-7000", Listen("ws", 7000, None, "tcp:7000")),
        ("tcp-0", Listen("tcp", 0, None, "tcp:0")),
        ("tcp-0-2", Listen("tcp", 0, None, "tcp:0")),
    ]
    assert config.manhole is not None
    assert config.manhole.listen == "tcp:2222:interface=127.0.0.1"


def test_cli_route_renamed_past_a_file_project(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text('projects:\n  - {name: tcp-5000, backend: "tcp:127.0.0.1:1", listen: {port: 5001, protocol: tcp}}\n')
    config = with_cli(load(str(path)), routes=[("tcp", "tcp:5000 -> tcp:127.0.0.1:6000")])
    assert [(p.name, p.listen.port) for p in config.projects if p.listen] == [
        ("tcp-5000", 5001), ("tcp-5000-2", 5000),
    ]


@pytest.mark.parametrize("kwargs, expected", [
    ({"routes": [("tcp", "tcp:3000 -> tcp:127.0.0.1:6000")]},
     "--tcp: port 3000/tcp is already bound by project 'my-api'; project 'tcp-3000' cannot bind it"),
    ({"routes": [("ws", "tcp:3000:interface=127.0.0.1 -> tcp:127.0.0.1:5900")]},
     "--ws: port 3000/tcp is already bound by project 'my-api'; project 'ws-3000' cannot bind it"),
    ({"routes": [("udp", "udp:5300 -> 127.0.0.1:54")]},
     "--udp: port 5300/udp is already bound by project 'dns'; project 'udp-5300' cannot bind it"),
    ({"routes": [("http", "tcp:8080 -> tcp:127.0.0.1:6000")]},
     "--http: port 8080/tcp is reserved for the ingress; project 'http-8080' cannot bind it"),
    ({"ingress": "tcp:3000"},
     "--ingress: port 3000/tcp is reserved for the ingress; project 'my-api' cannot bind it"),
    ({"manhole": "tcp:3000"},
     "--manhole: port 3000/tcp is reserved for the manhole; project 'my-api' cannot bind it"),
    ({"routes": [("tcp", "tcp:5000 -> tcp:127.0.0.1:6000"), ("tcp", "tcp:5000 -> tcp:127.0.0.1:6001")]},
     "--tcp: port 5000/tcp is already bound by project 'tcp-5000'; project 'tcp-5000-2' cannot bind it"),
    ({"routes": [("tcp", "tcp:5000 tcp:127.0.0.1:6000")]},
     "--tcp: 'tcp:5000 tcp:127.0.0.1:6000' is not 'LISTEN -> BACKEND'"),
    ({"routes": [("udp", "udp:5353 -> tcp:127.0.0.1:53")]},
     "--udp: 'tcp:127.0.0.1:53' is not HOST:PORT"),
    ({"routes": [("udp", "tcp:5353 -> 127.0.0.1:53")]},
     "--udp: 'tcp:5353' is not a UDP listen description (udp:PORT[:interface=ADDR])"),
    ({"routes": [("http", "tcp:3001 -> tcp:127.0.0.1")]},
     "--http: 'tcp:127.0.0.1' is not a client endpoint: missing port"),
    ({"ingress": "tcp:-1"},
     "--ingress: 'tcp:-1': -1 is not a port (0-65535)"),
], ids=[
    "tcp-vs-file-http", "ws-vs-file-http", "udp-vs-file-udp", "http-vs-ingress",
    "ingress-vs-file", "manhole-vs-file", "cli-vs-cli", "no-arrow", "udp-backend",
    "udp-listen", "backend-port", "ingress-port",
])
def test_cli_errors(file_config: Config, kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_cli(file_config, **kwargs)
    assert str(info.value) == expected


def test_file_route_that_collides_with_the_manhole_names_the_file(tmp_path: Path) -> None:
    """Without --manhole on the CLI, a file project that clashes is named by its field."""
    path = tmp_path / "routes.yaml"
    path.write_text("projects:\n  - {name: web, backend: 'tcp:127.0.0.1:1', listen: {port: 2222}}\n")
    config = load(str(path))
    # The manhole is given in the file-less config object, as the API would.
    with pytest.raises(ConfigError) as info:
        with_cli(Config(source=str(path), manhole=Manhole("tcp:2222", "keys"), projects=config.projects))
    assert str(info.value) == (
        f"{path}: projects[0].listen.port: port 2222/tcp is reserved for the manhole; "
        "project 'web' cannot bind it"
    )
