"""
Hostname routing (SPEC section 10, issue 15) end to end over loopback, with
curl (names given with ``--resolve``, no DNS) and Python's own TLS client
setting the SNI: HTTP by ``Host`` on the plain ingress, HTTPS by SNI on the
TLS front, tcp routes relayed behind terminated TLS, passthrough to a backend
that holds its own certificate, unknown names, slow and broken ClientHellos,
deploys through the API, the table and the metrics.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from portrouter.config import ConfigError, load, parse
from portrouter.front import Front
from portrouter.hostnames import resolve
from portrouter.router import RouterService
from tests.httpbackend import Backend
from tests.pki import CA, serial_of
from tests.support import (
    LOOPBACK, ClockedReactor, ThreadServer, free_port, in_thread, our_sockets, start_router, stop_clocked, wait_for,
)
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)

DOMAIN = "apps.test"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "ca")


@pytest.fixture
def store(tmp_path: Path, ca: CA) -> Path:
    """A certificate store with one wildcard certificate for the base domain."""
    directory = tmp_path / "certs"
    directory.mkdir()
    ca.issue(str(directory / "apps.pem"), f"*.{DOMAIN}", DOMAIN)
    return directory


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = Backend()
    yield server
    server.close()


def config(tmp_path: Path, store: Path, projects: list[dict[str, Any]], *, front: bool = True) -> Any:
    data: dict[str, Any] = {
        "ingress": f"tcp:0:interface={LOOPBACK}",
        "state": str(tmp_path / "state"),
        "tls": {"certificates": str(store)},
        "hostnames": {"domains": [DOMAIN], **({"listen": f"tcp:0:interface={LOOPBACK}"} if front else {})},
        "projects": projects,
    }
    return parse(data)


def front_port(router: RouterService) -> int:
    assert router.tls_front is not None
    return int(router.tls_front.port.getHost().port)  # type: ignore[attr-defined]


def curl(url: str, *extra: str, cafile: str | None = None) -> subprocess.CompletedProcess[str]:
    """curl as a user runs it, the URL's host resolved to 127.0.0.1 by ``--resolve``."""
    host, port = url.split("/")[2].rsplit(":", 1)
    argv = ["curl", "-sS", "--max-time", "30", "--resolve", f"{host}:{port}:{LOOPBACK}",
            *(["--cacert", cafile] if cafile else []), *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def headers_seen(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """What the test backend's /headers saw, from curl's output."""
    assert result.returncode == 0, result.stderr
    seen: dict[str, Any] = json.loads(result.stdout)
    seen["headers"] = dict(seen["headers"])
    return seen


def tls_connect(port: int, server_name: str | None, cafile: str) -> ssl.SSLSocket:
    """A verified TLS connection to the front, with C{server_name} as its SNI (none for L{None})."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = server_name is not None
    raw = socket.create_connection((LOOPBACK, port), timeout=30)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def echo(conn: socket.socket) -> int:
    """A TCP echo until EOF; the bytes it echoed."""
    total = 0
    while data := conn.recv(65536):
        conn.sendall(data)
        total += len(data)
    return total


def tls_roundtrip(port: int, server_name: str, cafile: str, message: bytes) -> bytes:
    with tls_connect(port, server_name, cafile) as tls:
        tls.sendall(message)
        got = b""
        while len(got) < len(message):
            data = tls.recv(65536)
            if not data:
                break
            got += data
        return got


def alert_for(port: int, server_name: str | None, cafile: str) -> str:
    """The TLS error a client gets for C{server_name}: the alert's name, as OpenSSL words it."""
    with pytest.raises(ssl.SSLError) as caught:
        tls_connect(port, server_name, cafile).close()
    return str(caught.value)


# -- HTTP by Host on the plain ingress --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_host_routes_http_on_the_plain_ingress(tmp_path: Path, store: Path, backend: Backend) -> None:
    """
    ``<project>.<domain>`` reaches a path-routed project with the whole path
    (no prefix strip), ``<project>-<port>`` a project's own HTTP route and an
    HTTP service port; X-Forwarded-Host is the name; other hosts keep path
    routing; an unknown name under the domain is a 404 naming the host.
    """
    web_port, jupyter = free_port(), Backend()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "k1", "backend": backend.address},
        {"name": "web-app", "backend": backend.address, "listen": {"port": web_port, "protocol": "http"}},
        {"name": "k2", "services": [{"name": "jupyter", "protocol": "http", "port": jupyter.port}]},
    ], front=False))
    try:
        port = router.port_of()
        seen = headers_seen(await in_thread(curl, f"http://k1.{DOMAIN}:{port}/headers?x=1"))
        assert seen["path"] == "/headers?x=1"
        assert seen["headers"]["X-Forwarded-Host"] == f"k1.{DOMAIN}:{port}"
        assert "X-Forwarded-Prefix" not in seen["headers"]
        for name in (f"web-app.{DOMAIN}", f"web-app-{web_port}.{DOMAIN}"):
            assert headers_seen(await in_thread(curl, f"http://{name}:{port}/headers"))["path"] == "/headers"
        jupyter_seen = headers_seen(await in_thread(curl, f"http://k2-{jupyter.port}.{DOMAIN}:{port}/headers"))
        assert jupyter_seen["path"] == "/headers"
        assert jupyter.stats.seen and backend.stats.seen[-1]["path"] == "/headers"

        # Outside the base domains, and the domain itself: path routing as before.
        assert headers_seen(await in_thread(curl, f"http://{LOOPBACK}:{port}/k1/headers"))["path"] == "/headers"
        assert headers_seen(await in_thread(curl, f"http://{DOMAIN}:{port}/k1/headers"))["path"] == "/headers"

        for name in (f"nope.{DOMAIN}", f"k1-9.{DOMAIN}", f"k2.{DOMAIN}", f"a.b.{DOMAIN}"):
            result = await in_thread(curl, f"http://{name}:{port}/", "-w", "%{http_code}")
            assert result.stdout.endswith("404"), (name, result.stdout)
            assert f"'{name}:{port}'" in result.stdout
        assert router.sessions.stats.hostnames["unknown"] == 4
        assert router.sessions.stats.hostnames["host"] == 4
    finally:
        jupyter.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_host_of_a_tcp_route_on_the_plain_ingress_says_where_to_go(
        tmp_path: Path, store: Path, backend: Backend) -> None:
    tcp_port = free_port()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "db", "backend": backend.address, "listen": {"port": tcp_port, "protocol": "tcp"}},
    ], front=False))
    try:
        result = await in_thread(curl, f"http://db-{tcp_port}.{DOMAIN}:{router.port_of()}/", "-w", "%{http_code}")
        assert result.stdout.endswith("404")
        assert "its tcp route of project 'db', which is not HTTP: reach it on the TLS front" in result.stdout
    finally:
        await router.stopService()


# -- the TLS front ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_https_by_sni_on_the_tls_front(tmp_path: Path, store: Path, ca: CA, backend: Backend) -> None:
    """curl verifies the store's wildcard certificate for the name, and the request is proxied as HTTPS."""
    router = await start_router(config=config(tmp_path, store, [{"name": "k1", "backend": backend.address}]))
    try:
        port = front_port(router)
        result = await in_thread(curl, f"https://k1.{DOMAIN}:{port}/headers", cafile=ca.path)
        seen = headers_seen(result)
        assert seen["path"] == "/headers"
        assert seen["headers"]["X-Forwarded-Proto"] == "https"
        assert seen["headers"]["X-Forwarded-Host"] == f"k1.{DOMAIN}:{port}"
        # A Host under no base domain, behind a name that is: refused as misdirected.
        result = await in_thread(curl, f"https://k1.{DOMAIN}:{port}/", "-H", "Host: elsewhere.test",
                                 "-w", "%{http_code}", cafile=ca.path)
        assert result.stdout.endswith("421"), result.stdout
        assert router.sessions.stats.hostnames["tls"] == 2
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_tcp_route_and_tcp_service_port_behind_terminated_tls(
        tmp_path: Path, store: Path, ca: CA) -> None:
    """dstack's default: TLS terminated with the store's certificate, then the bytes relayed."""
    server = ThreadServer(echo)
    tcp_port = free_port()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "db", "backend": server.address, "listen": {"port": tcp_port, "protocol": "tcp"}},
        {"name": "k1", "services": [{"name": "sshd", "protocol": "tcp", "port": server.port}]},
    ]))
    try:
        port = front_port(router)
        message = b"x" * 300_000
        for name in (f"db.{DOMAIN}", f"db-{tcp_port}.{DOMAIN}", f"k1-{server.port}.{DOMAIN}"):
            assert await in_thread(tls_roundtrip, port, name, ca.path, message) == message, name
        await wait_for(lambda: server.results == [len(message)] * 3, 15, "the echo to see every byte")
        assert router.sessions.stats.connections[("tcp", "k1/sshd")] == 1
        assert router.sessions.stats.connections[("tcp", "db")] == 2
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_passthrough_reaches_a_backend_with_its_own_certificate(tmp_path: Path, store: Path, ca: CA) -> None:
    """
    Suffix ``s``: the client verifies the *backend's* certificate (another
    CA, which portrouter does not have), so nothing was terminated.
    """
    backend_ca = CA(tmp_path / "backend-ca", "backend CA")
    tls_port = free_port()
    name = f"db-{tls_port}s.{DOMAIN}"
    context = backend_ca.server_context(name)

    def tls_echo(conn: socket.socket) -> int:
        with context.wrap_socket(conn, server_side=True) as tls:
            return echo(tls)

    server = ThreadServer(tls_echo)
    router = await start_router(config=config(tmp_path, store, [
        {"name": "db", "backend": server.address, "listen": {"port": tls_port, "protocol": "tcp"}},
    ]))
    try:
        port = front_port(router)
        message = b"through, untouched" * 1000
        assert await in_thread(tls_roundtrip, port, name, backend_ca.path, message) == message
        with await in_thread(tls_connect, port, name, backend_ca.path) as tls:
            assert serial_of(tls.getpeercert(binary_form=True)) != 0
        # portrouter's own CA cannot verify what came back: it is not portrouter's certificate.
        assert "CERTIFICATE_VERIFY_FAILED" in await in_thread(alert_for, port, name, ca.path)
        assert router.sessions.stats.hostnames["passthrough"] == 3
    finally:
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_names_that_reach_nothing(tmp_path: Path, store: Path, ca: CA, backend: Backend,
                                        logged: list[str]) -> None:
    """
    No SNI, or SNI under no base domain: alert unrecognized_name. An unknown
    name under a base domain: HTTP 404 naming the host, behind the wildcard
    certificate; an unknown passthrough name: the alert.
    """
    router = await start_router(config=config(tmp_path, store, [{"name": "k1", "backend": backend.address}]))
    try:
        port = front_port(router)
        for server_name in (None, "k1.other.test", f"nope-443s.{DOMAIN}"):
            assert "UNRECOGNIZED_NAME" in await in_thread(alert_for, port, server_name, ca.path), server_name
        await log_line(logged, r"tls front 127\.0\.0\.1:\d+: no server name \(SNI\); alert unrecognized_name; closed")
        await log_line(logged, r"the server name 'k1\.other\.test' is under no base domain")
        result = await in_thread(curl, f"https://nope.{DOMAIN}:{port}/", "-w", "%{http_code}", cafile=ca.path)
        assert result.stdout.endswith("404") and f"nope.{DOMAIN}" in result.stdout, result.stdout
        assert router.sessions.stats.hostnames["refused"] == 3
        assert router.sessions.stats.hostnames["unknown"] == 2  # the connection, then its request
    finally:
        await router.stopService()


# -- ClientHellos that do not come, or are not ones ------------------------------------------------


def client_hello(server_name: str) -> bytes:
    """The first flight of a real client (Python's ssl) for C{server_name}."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def read_to_the_end(sock: socket.socket) -> bytes:
    """What comes until the connection closes (a reset, as a refusal with unread bytes makes it, too)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest_twisted.ensureDeferred
async def test_a_slow_clienthello_is_closed_after_the_header_timeout(
        tmp_path: Path, store: Path, backend: Backend, logged: list[str]) -> None:
    clock = Clock()
    conf = config(tmp_path, store, [{"name": "k1", "backend": backend.address}])
    router = await start_router(config=conf, using=ClockedReactor(clock))
    port = front_port(router)
    hello = client_hello(f"k1.{DOMAIN}")
    try:
        with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
            sock.sendall(hello[:40])
            await wait_for(lambda: len(router.tls_front.factory.reading) == 1, 15,  # type: ignore[union-attr]
                           "the front to read the first bytes")
            clock.advance(conf.defaults.header_timeout - 1)
            sock.settimeout(0.0)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still open: the timeout has not passed
            clock.advance(1)
            sock.settimeout(30)
            assert await in_thread(read_to_the_end, sock) == b""
        await log_line(logged, r"no whole ClientHello within 30 s \(40 bytes came\); closed")
        assert not router.tls_front.factory.reading  # type: ignore[union-attr]
    finally:
        await stop_clocked(router, clock)


@pytest_twisted.ensureDeferred
async def test_truncated_oversized_and_plain_http_hellos(tmp_path: Path, store: Path, backend: Backend,
                                                        logged: list[str]) -> None:
    router = await start_router(config=config(tmp_path, store, [{"name": "k1", "backend": backend.address}]))
    port = front_port(router)
    hello = client_hello(f"k1.{DOMAIN}")
    try:
        def closes_after(data: bytes) -> bytes:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                try:
                    sock.sendall(data)
                except ConnectionResetError:
                    return b""  # closed before it took everything: what a refusal does
                return read_to_the_end(sock)

        def truncated() -> None:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                sock.sendall(hello[:-10])

        await in_thread(truncated)
        await log_line(logged, rf"closed by the client before its ClientHello was whole \({len(hello) - 10} bytes")
        # A record that says it holds 16 KiB of a 64 KiB hello: refused before the rest is read.
        huge = bytes([0x16, 3, 1, 0x40, 0]) + bytes([1, 1, 0, 0]) + b"\0" * 16379
        assert await in_thread(closes_after, huge) == b""
        await log_line(logged, r"a ClientHello of 65536 bytes, longer than the 16384 this port reads; closed")
        assert await in_thread(closes_after, b"GET / HTTP/1.1\r\nHost: k1.apps.test\r\n\r\n") == b""
        await log_line(logged, r"not a TLS handshake: the connection began with b'GET / HTTP/1.1\\r\\nHost: k1'\.\.\.; closed")
        await wait_for(lambda: not router.tls_front.factory.reading, 15, "no hello left")  # type: ignore[union-attr]
    finally:
        await router.stopService()
    assert our_sockets([port]) == {}


# -- deploys, the table, the metrics ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_deployed_project_has_its_hostname_at_once_and_loses_it_when_deleted(
        tmp_path: Path, store: Path, ca: CA, backend: Backend) -> None:
    router = await start_router(config=config(tmp_path, store, []))
    api = f"http://{LOOPBACK}:{router.port_of()}/_api/projects/late"
    try:
        url = f"https://late.{DOMAIN}:{front_port(router)}/headers"
        result = await in_thread(curl, url, "-w", "%{http_code}", cafile=ca.path)
        assert result.stdout.endswith("404")
        put = await in_thread(curl, api, "-X", "PUT", "-d", json.dumps({"backend": backend.address}))
        assert put.returncode == 0 and '"late"' in put.stdout, put.stdout
        assert headers_seen(await in_thread(curl, url, cafile=ca.path))["path"] == "/headers"
        await in_thread(curl, api, "-X", "DELETE")
        result = await in_thread(curl, url, "-w", "%{http_code}", cafile=ca.path)
        assert result.stdout.endswith("404")
    finally:
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_the_table_shows_hostnames(tmp_path: Path, store: Path, backend: Backend) -> None:
    web_port = free_port()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "k1", "backend": backend.address},
        {"name": "web", "backend": backend.address, "listen": {"port": web_port, "protocol": "http"}},
        {"name": "k2", "services": [{"name": "ssh", "protocol": "tcp", "port": 2200}]},
    ]))
    try:
        base = f"http://{LOOPBACK}:{router.port_of()}/_api"
        rows = json.loads((await in_thread(curl, f"{base}/routes")).stdout)["routes"]
        named = {(r["project"], r.get("service")): r.get("hostnames") for r in rows}
        assert named[("k1", None)] == [f"k1.{DOMAIN}"]
        assert named[("web", None)] == [f"web.{DOMAIN}", f"web-{web_port}.{DOMAIN}"]
        assert named[("k2", "ssh")] == [f"k2-2200.{DOMAIN}"]
        front = [r for r in rows if r["protocol"] == "sni"]
        assert front == [{"port": front_port(router), "protocol": "sni", "project": None,
                          "backend": "hostname routing (TLS front)"}]
        text = (await in_thread(curl, f"{base}/routes?format=text")).stdout.splitlines()
        assert text[0].split() == ["Host", "port", "Protocol", "Project", "Hostname", "Backend"]
        assert any(line.split()[2:4] == ["k2/ssh", f"k2-2200.{DOMAIN}"] for line in text), text
        await in_thread(curl, f"http://k1.{DOMAIN}:{router.port_of()}/")
        metrics = (await in_thread(curl, f"{base}/metrics")).stdout
        assert 'portrouter_hostname_routing_total{kind="host"} 1.0' in metrics
    finally:
        await router.stopService()


# -- the configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("hostnames, message", [
    ({"domains": []}, "hostnames.domains: names no domain"),
    ({"domains": ["apps..test"]}, "hostnames.domains[0]: 'apps..test' is not a domain name"),
    ({"domains": ["apps.test", "APPS.test."]}, "hostnames.domains[1]: 'APPS.test.' is already domains[0]"),
    ({"listen": "tcp:0"}, "hostnames.domains: is required"),
    ({"domains": ["other.test"], "listen": "tcp:0"},
     "hostnames.domains[0]: 'other.test': no certificate in {store} covers *.other.test"),
    ({"domains": ["apps.test"], "listen": "ssl:0:privateKey=x"}, "the TLS front terminates TLS itself with the certificate store; give it a plain endpoint (tcp:8443)"),
])
def test_config_errors(store: Path, hostnames: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"tls": {"certificates": str(store)}, "hostnames": hostnames})
    assert message.format(store=store) in str(caught.value)


def test_the_front_needs_the_store_and_a_port_of_its_own() -> None:
    with pytest.raises(ConfigError, match=r"hostnames\.listen: the TLS front needs a top-level 'tls' section"):
        parse({"hostnames": {"domains": ["apps.test"], "listen": "tcp:8443"}})


def test_the_front_port_is_reserved(store: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"ingress": "tcp:8443", "tls": {"certificates": str(store)},
               "hostnames": {"domains": ["apps.test"], "listen": "tcp:8443"}})
    assert str(caught.value) == ("hostnames.listen: port 8443/tcp is reserved for the ingress; "
                                 "the TLS front cannot bind it")
    with pytest.raises(ConfigError) as caught:
        parse({"tls": {"certificates": str(store)}, "hostnames": {"domains": ["apps.test"], "listen": "tcp:8443"},
               "projects": [{"name": "a", "backend": "tcp:127.0.0.1:1", "listen": {"port": 8443}}]})
    assert "port 8443/tcp is reserved for the TLS front; project 'a' cannot bind it" in str(caught.value)


# -- the grammar, by example (the property test searches it) ---------------------------------------


def test_a_reading_whose_project_exists_decides() -> None:
    projects = {p.name: p for p in parse({"projects": [
        {"name": "web", "backend": "tcp:127.0.0.1:1", "listen": {"port": 8081, "protocol": "http"},
         "services": [{"name": "ssh", "port": 2200}]},
        {"name": "web-8081", "backend": "tcp:127.0.0.1:2"},
        {"name": "webs", "services": [{"name": "x", "port": 1}]},
        {"name": "k1", "services": [{"name": "sshd", "port": 2200}]},
    ]}).projects}

    def reached(label: str) -> tuple[str, str | None, int | None, str] | None:
        target = resolve(label, projects)
        if target is None:
            return None
        return target.project.name, target.service.name if target.service else None, target.port, target.mode

    assert reached("web") == ("web", None, None, "")
    assert reached("web-8081") == ("web-8081", None, None, "")  # the project of that name, not web's port
    assert reached("web-8081s") == ("web-8081", None, None, "s")
    assert reached("web-2200g") == ("web", "ssh", 2200, "g")
    assert reached("webs") is None  # project "webs" exists, has no route: not web's passthrough
    assert reached("webg") == ("web", None, None, "g")
    assert reached("k1") is None  # services only: nothing by the bare name
    assert reached("k1-2200") == ("k1", "sshd", 2200, "")
    for nothing in ("k1-02200", "k1-99999", "k1-2201", "k1-", "-2200", "k1-2200x", ""):
        assert reached(nothing) is None, nothing


@pytest_twisted.ensureDeferred
async def test_reload_keeps_the_hostnames_section(tmp_path: Path, store: Path, backend: Backend,
                                                  logged: list[str]) -> None:
    """Like the ingress, the section (and the front's port) stays until a restart; projects reload."""
    path = tmp_path / "routes.yaml"

    def write(domain: str, project: str) -> None:
        path.write_text(json.dumps({
            "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
            "tls": {"certificates": str(store)},
            "hostnames": {"domains": [domain]},
            "projects": [{"name": project, "backend": backend.address}],
        }))

    write(DOMAIN, "k1")
    router = RouterService(load(str(path)), reactor, Front, lambda: load(str(path)))
    router.privilegedStartService()
    router.startService()
    try:
        port = router.port_of()
        write("elsewhere.test", "k2")
        await router.reload()
        await log_line(logged, "the hostnames section stay as they are until a restart")
        assert headers_seen(await in_thread(curl, f"http://k2.{DOMAIN}:{port}/headers"))["path"] == "/headers"
        result = await in_thread(curl, f"http://k1.{DOMAIN}:{port}/", "-w", "%{http_code}")
        assert result.stdout.endswith("404")
    finally:
        await router.stopService()


@pytest.mark.parametrize("reuse_port", [True, False])
@pytest_twisted.ensureDeferred
async def test_reuse_port_lets_two_routers_bind_one_tls_front_and_one_manhole(tmp_path: Path, store: Path,
                                                                              reuse_port: bool) -> None:
    """
    README: reuse_port sets SO_REUSEPORT on every tcp: listener, the TLS
    front and the manhole too: two routers bind the same ones. Without it,
    the second router cannot bind, and leaves nothing bound.
    """
    keys = tmp_path / "authorized_keys"
    keys.write_text("")
    front, manhole = free_port(), free_port()

    def router(name: str) -> RouterService:
        return RouterService(parse({
            "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / name), "reuse_port": reuse_port,
            "tls": {"certificates": str(store)},
            "hostnames": {"domains": [DOMAIN], "listen": f"tcp:{front}:interface={LOOPBACK}"},
            "manhole": {"listen": f"tcp:{manhole}:interface={LOOPBACK}", "authorized_keys": str(keys)},
        }), reactor, Front)

    first, second = router("a"), router("b")
    first.privilegedStartService()
    try:
        if reuse_port:
            second.privilegedStartService()
            for r in (first, second):
                assert r.tls_front is not None and r.manhole is not None
                assert (r.tls_front.port.getHost().port, r.manhole.port.getHost().port) == (front, manhole)
            await second.stopService()
        else:
            with pytest.raises(Exception, match=f"{front}.* in use|{manhole}.* in use"):
                second.privilegedStartService()
            assert (second.ingress, second.tls_front, second.manhole) == (None, None, None)
    finally:
        await first.stopService()
