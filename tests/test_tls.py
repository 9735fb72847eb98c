"""
TLS on every listener (SPEC 9), with real clients over loopback: curl (which
offers ALPN), Python's C{ssl}, websocat with C{wss://}, the real ``twistd``.

Certificates come from a test CA (L{tests.pki}); clients trust that CA only,
so a handshake that succeeds with the name asked for proves which
certificate was served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport

from portrouter.front import Front
from portrouter.certs import ContextTLS, TLSFactory, load_certificate
from portrouter.config import load, parse
from portrouter.model import Listen
from portrouter.relay import StreamSide, pair_streams
from portrouter.sessions import Session
from portrouter.router import RouterService
from tests.httpbackend import Backend
from tests.pki import CA, serial_of
from tests.support import (
    LOOPBACK, MiB, ThreadServer, Twistd, backendai_python, free_port, in_thread, pattern, read_until, recv_all_and_hash,
    start_router, wait_for,
)
from tests.test_operations import roundtrip
from tests.test_hostnames import read_to_the_end
from tests.test_service_ports import (
    ACCESS_KEY, SECRET_KEY, SIZE, Process, both_ways_service, echo, service_config, tool, tunnel_64_mib,
)
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)

NAMES = {
    "localhost.pem": ("localhost",),
    "exact.pem": ("a.example.test",),
    "wild.pem": ("*.apps.example.test",),
    "default.pem": ("default.example.test",),
}


class PKI:
    """A CA and a store directory with one file per entry of L{NAMES}."""

    def __init__(self, root: Path):
        self.root = root
        self.ca = CA(str(root))
        self.dir = root / "certs"
        self.dir.mkdir()
        self.serials: dict[str, int] = {}
        for file, names in NAMES.items():
            self.issue(file, *names)

    def issue(self, file: str, *names: str) -> int:
        leaf = self.ca.issue(str(self.dir / file), *names)
        self.serials[file] = leaf.serial_number
        return leaf.serial_number

    @property
    def cafile(self) -> str:
        return self.ca.path

    def strport(self, port: int = 0, file: str = "localhost.pem") -> str:
        """An ``ssl:`` strport with one of the store's files (chain and key in one)."""
        pem = self.dir / file
        return f"ssl:{port}:interface={LOOPBACK}:privateKey={pem}:certKey={pem}"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)


# -- clients ------------------------------------------------------------------------------


def curl(url: str, cafile: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """curl as a user runs it: ALPN offered, the certificate verified against C{cafile}."""
    host_port = url.split("/")[2]
    host, port = host_port.rsplit(":", 1)
    argv = ["curl", "-sS", "-v", "--max-time", "30", "--cacert", cafile,
            "--resolve", f"{host}:{port}:{LOOPBACK}", *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def client_context(cafile: str, *, alpn: list[str] | None = None, check_name: bool = True,
                   newest: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_name
    ctx.maximum_version = newest
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, cafile: str, server_name: str | None, *, alpn: list[str] | None = None,
              send: bytes = b"", check_name: bool = False,
              newest: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED) -> dict[str, Any]:
    """
    One TLS connection: the serial of the certificate served (its chain
    verified, its name if C{check_name}), the version, the ALPN choice, and
    the echo of C{send}.
    """
    ctx = client_context(cafile, alpn=alpn, check_name=check_name, newest=newest)
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            result = {
                "serial": serial_of(tls.getpeercert(binary_form=True)),
                "version": tls.version(),
                "alpn": tls.selected_alpn_protocol(),
            }
            if send:
                result["echo"] = roundtrip(tls, send)  # type: ignore[arg-type]
            return result


# -- the failure of the issue, through the real twistd ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_ssl_listeners_answer_clients_that_offer_alpn(tmp_path: Path, pki: PKI) -> None:
    """
    curl offers ALPN (h2, http/1.1); every ``ssl:`` listener used to answer
    it with an internal_error alert. Now: http/1.1 on the HTTP listeners, no
    protocol on the TCP route, and a client offering only h2 still connects.
    """
    backend = Backend()
    service = ThreadServer(echo)
    config = tmp_path / "routes.yaml"
    config.write_text(json.dumps({"projects": [{"name": "web", "backend": backend.address}]}))
    ssl_ = pki.strport()
    twistd = Twistd("--config", str(config), "--state", str(tmp_path / "state"), "--ingress", ssl_,
                    "--http", f"{ssl_} -> {backend.address}", "--tcp", f"{ssl_} -> {service.address}")
    try:
        ingress = await twistd.ingress_port()
        http = await twistd.port_of("http-0")
        tcp = await twistd.port_of("tcp-0")
        for url in (f"https://localhost:{ingress}/web/headers", f"https://localhost:{http}/headers"):
            done = await in_thread(curl, url, pki.cafile)
            assert done.returncode == 0, done.stderr
            assert "ALPN: server accepted http/1.1" in done.stderr, done.stderr
            seen = dict((k.lower(), v) for k, v in json.loads(done.stdout)["headers"])
            assert seen["x-forwarded-proto"] == "https"
        done = await in_thread(curl, f"https://localhost:{ingress}/_api/health", pki.cafile, "--http2")
        assert done.returncode == 0 and json.loads(done.stdout) == {"status": "ok"}, done.stderr
        for port in (ingress, http):
            only_h2 = await in_thread(handshake, port, pki.cafile, "localhost", alpn=["h2"])
            assert only_h2["alpn"] is None
        both = await in_thread(handshake, tcp, pki.cafile, "localhost", alpn=["h2", "http/1.1"], send=b"ping")
        assert both["alpn"] is None and both["echo"] == b"ping"
        await twistd.wait_line(r"tcp tcp-0 .*: client closed; 4 bytes in, 4 bytes out, .* tls=TLSv1\.3 sni=localhost")
        await twistd.wait_line(r"GET /web/headers 200 .* web tls=TLSv1\.3 sni=localhost")
    finally:
        twistd.stop()
        backend.close()
        service.close()


# -- the certificate store, in process ----------------------------------------------------------


def store_config(pki: PKI, *projects: dict[str, Any], default: str | None = "default.pem") -> dict[str, Any]:
    tls: dict[str, Any] = {"certificates": str(pki.dir)}
    if default is not None:
        tls["default"] = default
    return {"ingress": pki.strport(), "state": str(pki.root / "state"), "drain_timeout": 5,
            "tls": tls, "projects": list(projects)}


def tls_project(name: str, protocol: str, backend: str) -> dict[str, Any]:
    # Port 1 here; start_tls_router binds it on port 0 (the OS picks).
    return {"name": name, "backend": backend, "listen": {"port": 1, "protocol": protocol, "tls": True}}


async def start_tls_router(data: dict[str, Any], path: Path | None = None) -> RouterService:
    """
    A router from C{data} (written to C{path} and reloadable from it, if
    given), its own-port projects on ports the OS picks.
    """
    if path is not None:
        path.write_text(json.dumps(data))
        config = load(str(path))
    else:
        config = parse(data)
    projects = tuple(
        replace(p, listen=Listen(p.listen.protocol, 0, LOOPBACK, f"tcp:0:interface={LOOPBACK}", p.listen.tls))
        if p.listen is not None else p for p in config.projects
    )
    config = replace(config, projects=projects)
    if path is None:
        return await start_router(config=config)

    def reread() -> Any:
        fresh = load(str(path))
        return replace(fresh, projects=tuple(
            replace(p, listen=config.projects[i].listen) for i, p in enumerate(fresh.projects)))

    router = RouterService(config, reactor, Front, reload_config=reread)
    router.privilegedStartService()
    router.startService()
    return router


@pytest_twisted.ensureDeferred
async def test_sni_chooses_exact_then_wildcard_then_default(pki: PKI) -> None:
    service = ThreadServer(echo)
    # A certificate with no SAN is known by its CN.
    pki.serials["zz-cn-only.pem"] = pki.ca.issue(str(pki.dir / "zz-cn-only.pem"), "cn.example.test",
                                                 san=False).serial_number
    router = await start_tls_router(store_config(pki, tls_project("echo", "tcp", service.address)))
    port = router.port_of("echo")
    serials = pki.serials
    try:
        for asked, served in [
            ("cn.example.test", "zz-cn-only.pem"),
            ("a.example.test", "exact.pem"),
            ("A.Example.Test", "exact.pem"),  # names are compared without case
            ("x.apps.example.test", "wild.pem"),
            ("y.x.apps.example.test", "default.pem"),  # a wildcard covers one label only
            ("apps.example.test", "default.pem"),
            ("unknown.test", "default.pem"),
            (None, "default.pem"),  # no SNI at all
        ]:
            got = await in_thread(handshake, port, pki.cafile, asked, send=b"hi")
            assert got["serial"] == serials[served], (asked, served)
            assert got["echo"] == b"hi"
        # Verified by name too, as a client that checks it does.
        for name in ("a.example.test", "x.apps.example.test"):
            got = await in_thread(handshake, port, pki.cafile, name, check_name=True)
            assert got["version"] == "TLSv1.3"
    finally:
        await router.stopService()
        service.close()


def test_default_is_the_first_file_without_tls_default(pki: PKI) -> None:
    config = parse(store_config(pki, default=None))
    assert config.tls is not None
    assert config.tls.store.default.path.endswith("default.pem")  # "default" < "exact" < ...
    (pki.dir / "0-first.pem").write_bytes((pki.dir / "wild.pem").read_bytes())
    assert parse(store_config(pki, default=None)).tls.store.default.path.endswith("0-first.pem")


def upgrade_echo(conn: socket.socket) -> None:
    """A backend that says 101 to any request, then echoes."""
    request = read_until(conn, b"\r\n\r\n")
    if request is None:
        return
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    rest = request[1]
    if rest:
        conn.sendall(rest)
    echo(conn)


def upgraded_roundtrip(port: int, cafile: str, name: str, message: bytes) -> tuple[bytes, bytes]:
    ctx = client_context(cafile)
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(b"GET /up/ HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        head, early = head.split(b"\r\n\r\n", 1)
        return head.split(b"\r\n")[0], early + roundtrip(tls, message)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_path_routes_http_routes_upgrades_and_the_api_over_tls(pki: PKI, logged: list[str]) -> None:
    backend = Backend()
    upgrader = ThreadServer(upgrade_echo)
    data = store_config(pki, {"name": "web", "backend": backend.address},
                        {"name": "up", "backend": upgrader.address},
                        tls_project("site", "http", backend.address))
    router = await start_tls_router(data)
    ingress, site = router.port_of(), router.port_of("site")
    try:
        for url, sni in [(f"https://localhost:{ingress}/web/headers", "localhost"),
                         (f"https://a.example.test:{site}/headers", "a.example.test"),
                         (f"https://x.apps.example.test:{site}/headers", "x.apps.example.test")]:
            done = await in_thread(curl, url, pki.cafile)
            assert done.returncode == 0, done.stderr
            assert "ALPN: server accepted http/1.1" in done.stderr
            seen = {k.lower(): v for k, v in json.loads(done.stdout)["headers"]}
            assert seen["x-forwarded-proto"] == "https", url
            await log_line(logged, rf"GET /(web/)?headers 200 .* tls=TLSv1\.3 sni={sni}$")
        # An HTTP upgrade is tunnelled byte for byte over TLS.
        status, echoed = await in_thread(upgraded_roundtrip, ingress, pki.cafile, "localhost", b"after 101")
        assert status == b"HTTP/1.1 101 Switching Protocols" and echoed == b"after 101"
        await log_line(logged, r"upgrade up 127\.0\.0\.1: .* tls=TLSv1\.3 sni=localhost$")
        # The API over TLS: a project deployed with tls: true answers TLS at once.
        done = await in_thread(curl, f"https://localhost:{ingress}/_api/routes", pki.cafile)
        assert done.returncode == 0 and "site" in done.stdout, done.stderr
        service = ThreadServer(echo)
        deployed = free_port()
        body = json.dumps({"backend": service.address,
                           "listen": {"port": deployed, "protocol": "tcp", "tls": True, "interface": LOOPBACK}})
        done = await in_thread(curl, f"https://localhost:{ingress}/_api/projects/dep", pki.cafile,
                               "-X", "PUT", "-H", "Content-Type: application/json", "--data-binary", body)
        assert done.returncode == 0 and json.loads(done.stdout)["name"] == "dep", done.stdout + done.stderr
        got = await in_thread(handshake, deployed, pki.cafile, "a.example.test", send=b"dep")
        assert (got["serial"], got["echo"]) == (pki.serials["exact.pem"], b"dep")
        service.close()
    finally:
        await router.stopService()
        backend.close()
        upgrader.close()


def old_tls_refused(port: int, cafile: str) -> str:
    """A TLS 1.1 client (allowed to, at any security level): the server's answer."""
    ctx = client_context(cafile, check_name=False)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        with socket.create_connection((LOOPBACK, port), timeout=30) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost"):
            return "accepted"
    except ssl.SSLError as e:
        return str(e)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_1_1_is_refused_on_every_kind_of_listener_1_2_and_1_3_spoken(pki: PKI, logged: list[str]) -> None:
    service = ThreadServer(echo)
    router = await start_tls_router(store_config(pki, tls_project("echo", "tcp", service.address)))
    try:
        for port in (router.port_of(), router.port_of("echo")):  # ssl: strport, the store
            assert "TLSV1_ALERT_PROTOCOL_VERSION" in await in_thread(old_tls_refused, port, pki.cafile)
            await log_line(logged, rf"tls 127\.0\.0\.1:\d+ to port {port}: handshake failed \(unsupported protocol\); "
                                   r"closed")
            got = await in_thread(handshake, port, pki.cafile, "localhost", send=b"ok")
            assert got["version"] == "TLSv1.3"
            got = await in_thread(handshake, port, pki.cafile, "localhost", send=b"ok",
                                  newest=ssl.TLSVersion.TLSv1_2)
            assert got["version"] == "TLSv1.2"
        # The tcp route's session, opened before the handshake, says how it ended too.
        await log_line(logged, r"tcp echo 127\.0\.0\.1:\d+: client closed; 0 bytes in, 0 bytes out, .* tls=no-handshake$")
    finally:
        await router.stopService()
        service.close()


def client_hello() -> bytes:
    """The ClientHello Python's TLS client sends first."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def failed_handshakes(port: int, cafile: str, stranger: str) -> None:
    """
    A port check, a ClientHello cut short, a ClientHello and then at once a
    close_notify, plain HTTP, a client that trusts only C{stranger} (a CA
    that signed nothing of ours), then a good one.
    """
    with socket.create_connection((LOOPBACK, port), timeout=30):
        pass
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(client_hello() + b"\x15\x03\x03\x00\x02\x01\x00")  # and at once a close_notify alert
        read_to_the_end(sock)
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100)  # the alert, or the close
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(port, stranger, "localhost")
    handshake(port, cafile, "localhost")


@pytest_twisted.ensureDeferred
async def test_a_failed_handshake_is_said_once_and_a_client_gone_during_one_is_not(pki: PKI, logged: list[str],
                                                                                   tmp_path: Path) -> None:
    """
    A client that speaks no TLS, or refuses our certificate, gets one line
    saying why (as HAProxy logs its handshake failures); one gone before or
    during its handshake (a port check; a close_notify, which Twisted's TLS
    raised out of the reactor on) is no error and says nothing.
    """
    service = ThreadServer(echo)
    router = await start_tls_router(store_config(pki, tls_project("vnc", "ws", service.address)))
    try:
        (tmp_path / "stranger").mkdir()
        stranger = CA(str(tmp_path / "stranger"), "a stranger").path
        for port in (router.port_of(), router.port_of("vnc")):  # the ingress, a ws route (Autobahn's)
            await in_thread(failed_handshakes, port, pki.cafile, stranger)
            await log_line(logged, rf"tls 127\.0\.0\.1:\d+ to port {port}: handshake failed \(http request\); closed")
            await log_line(logged, rf"tls 127\.0\.0\.1:\d+ to port {port}: handshake failed \(tlsv1 alert unknown ca\); "
                                   r"closed")
        said = [line for line in logged if "handshake failed" in line]
        assert len(said) == 4, said
        assert not any("Traceback" in line or "Unhandled" in line or "SSL error" in line for line in logged), logged
    finally:
        await router.stopService()
        service.close()


# -- byte streams: TCP routes, ws routes, service ports ---------------------------------------


def tls_both_ways(port: int, cafile: str, name: str) -> tuple[str, tuple[int, str]]:
    """
    Send 64 MiB while reading until the server closes, on one TLS
    connection (asyncio: one thread drives both directions of the TLS state).
    """
    async def run() -> tuple[str, tuple[int, str]]:
        reader, writer = await asyncio.open_connection(LOOPBACK, port, ssl=client_context(cafile),
                                                       server_hostname=name)

        async def send() -> str:
            digest = hashlib.sha256()
            for block in pattern(1, SIZE):
                writer.write(block)
                digest.update(block)
                await writer.drain()
            return digest.hexdigest()

        async def receive() -> tuple[int, str]:
            digest, total = hashlib.sha256(), 0
            while data := await reader.read(MiB):
                digest.update(data)
                total += len(data)
            return total, digest.hexdigest()

        sent, got = await asyncio.gather(send(), receive())
        writer.close()
        return sent, got

    return asyncio.run(run())


@pytest_twisted.ensureDeferred
async def test_tcp_route_over_tls_64_mib_each_way(pki: PKI, logged: list[str]) -> None:
    service = ThreadServer(both_ways_service)
    router = await start_tls_router(store_config(pki, tls_project("bulk", "tcp", service.address)))
    try:
        sent, got = await in_thread(tls_both_ways, router.port_of("bulk"), pki.cafile, "a.example.test")
        await wait_for(lambda: service.results or service.errors, 60, "the service to finish")
        assert not service.errors, service.errors
        service_got, service_sent = service.results[0]
        assert service_got == (SIZE, sent), "the service did not get what the client sent"
        assert got == (SIZE, service_sent), "the client did not get what the service sent"
        await log_line(logged, rf"tcp bulk 127\.0\.0\.1:\d+: backend closed; {SIZE} bytes in, {SIZE} bytes out, "
                               r".* tls=TLSv1\.3 sni=a\.example\.test$")
    finally:
        await router.stopService()
        service.close()


def send_then_close_notify(port: int, cafile: str, size: int) -> str:
    """Send C{size} bytes, then TLS's own end of data (close_notify), as a TLS client half-closes."""
    ctx = client_context(cafile)
    with socket.create_connection((LOOPBACK, port), timeout=30) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="a.example.test")
        digest = hashlib.sha256()
        for block in pattern(3, size):
            tls.sendall(block)
            digest.update(block)
        tls.unwrap()  # sends close_notify; returns on the server's
        return digest.hexdigest()


@pytest_twisted.ensureDeferred
async def test_close_notify_reaches_the_backend_as_eof_after_all_data(pki: PKI) -> None:
    def backend(conn: socket.socket) -> tuple[int, str]:
        digest, total = hashlib.sha256(), 0
        while data := conn.recv(MiB):
            digest.update(data)
            total += len(data)
        return total, digest.hexdigest()

    service = ThreadServer(backend)
    router = await start_tls_router(store_config(pki, tls_project("sink", "tcp", service.address)))
    try:
        sent = await in_thread(send_then_close_notify, router.port_of("sink"), pki.cafile, 8 * MiB)
        await wait_for(lambda: service.results or service.errors, 60, "the backend to see EOF")
        assert service.results == [(8 * MiB, sent)], service.errors
    finally:
        await router.stopService()
        service.close()


def websocat_wss(url: str, local: int, tmp_path: Path, cafile: str | None) -> Process:
    """
    websocat as a local TCP-to-wss tunnel. It has no CA option; its TLS
    (native-tls, OpenSSL) trusts C{SSL_CERT_FILE}, so the CA goes there.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    if cafile is not None:
        env["SSL_CERT_FILE"] = cafile
    argv = [tool("websocat"), "--binary", f"tcp-l:{LOOPBACK}:{local}", url]
    return Process(argv, tmp_path / f"websocat-{local}.log", env=env)


def say_through(port: int, message: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        return roundtrip(sock, message)


def nothing_through(port: int) -> bool:
    """Nothing comes back: the tunnel closed (or reset) the connection."""
    try:
        return say_through(port, b"nothing") == b""
    except ConnectionResetError:
        return True


@pytest_twisted.ensureDeferred
async def test_websocat_wss_to_a_ws_route_and_a_service_port(tmp_path: Path, pki: PKI, logged: list[str]) -> None:
    service = ThreadServer(echo)
    data = store_config(pki, tls_project("vnc", "ws", service.address),
                        {"name": "k1", "host": LOOPBACK,
                         "services": [{"name": "echo", "protocol": "tcp", "port": service.port}]})
    router = await start_tls_router(data)
    urls = {
        "ws route": f"wss://localhost:{router.port_of('vnc')}/websockify",
        "service port": f"wss://localhost:{router.port_of()}/stream/session/k1/tcpproxy?app=echo",
    }
    tunnels: list[Process] = []
    try:
        for what, url in urls.items():
            local = free_port()
            tunnels.append(tunnel := websocat_wss(url, local, tmp_path, pki.cafile))
            await tunnel.listening_on(local)
            assert await in_thread(say_through, local, f"via {what}".encode()) == f"via {what}".encode()
        await log_line(logged, r"ws vnc 127\.0\.0\.1:\d+: .* tls=TLSv1\.3 sni=localhost$")
        await log_line(logged, r"ws k1/echo 127\.0\.0\.1:\d+: .* tls=TLSv1\.3 sni=localhost$")
        # The CA is what makes it work: without it websocat refuses the certificate.
        local = free_port()
        tunnels.append(untrusting := websocat_wss(urls["ws route"], local, tmp_path, None))
        await untrusting.listening_on(local)
        assert await in_thread(nothing_through, local)
        await wait_for(lambda: "certificate verify failed" in untrusting.output(), what="websocat's refusal")
    finally:
        for tunnel in tunnels:
            tunnel.stop()
        await router.stopService()
        service.close()


# -- reload: new certificates for new connections; broken files refused -----------------------------


def open_tls(port: int, cafile: str, name: str) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, port), timeout=30)
    return client_context(cafile).wrap_socket(raw, server_hostname=name)


@pytest_twisted.ensureDeferred
async def test_reload_swaps_certificates_and_refuses_broken_files(tmp_path: Path, pki: PKI,
                                                                   logged: list[str]) -> None:
    service = ThreadServer(echo)
    router = await start_tls_router(store_config(pki, tls_project("echo", "tcp", service.address)),
                                    tmp_path / "routes.yaml")
    ingress, port = router.port_of(), router.port_of("echo")
    first = pki.serials["exact.pem"]
    kept = await in_thread(open_tls, port, pki.cafile, "a.example.test")

    async def reload() -> tuple[int, dict[str, Any]]:
        done = await in_thread(curl, f"https://localhost:{ingress}/_api/reload", pki.cafile, "-X", "POST",
                               "-w", "\n%{http_code}")
        body, _, status = done.stdout.rpartition("\n")
        return int(status), json.loads(body)

    async def served() -> int:
        got = await in_thread(handshake, port, pki.cafile, "a.example.test", send=b"new", check_name=True)
        assert got["echo"] == b"new"
        return int(got["serial"])

    try:
        assert serial_of(kept.getpeercert(binary_form=True)) == first
        second = pki.issue("exact.pem", "a.example.test")
        assert await reload() == (200, {"reloaded": True,
                                        "changed": {"added": [], "removed": [], "changed": []}})
        assert await served() == second
        # The connection opened before goes on, on its own session.
        assert await in_thread(roundtrip, kept, b"still here") == b"still here"

        # A file that does not parse, then a key that does not match: refused,
        # one line naming the file, and the store that serves stays.
        broken = pki.dir / "broken.pem"
        broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        status, body = await reload()
        assert status == 400 and body["error"]["field"] == "tls.certificates"
        assert f"{broken}: holds no PEM certificate that can be read" in body["error"]["message"]
        await log_line(logged, rf"reload refused: .*{broken}: holds no PEM certificate")
        broken.unlink()
        pki.ca.mismatched(str(pki.dir / "exact.pem"), "a.example.test")
        status, body = await reload()
        assert status == 400
        assert body["error"]["message"].endswith(f"{pki.dir / 'exact.pem'}: the private key does not match "
                                                 "the certificate")
        assert await served() == second
        assert await in_thread(roundtrip, kept, b"and still") == b"and still"
    finally:
        kept.close()
        await router.stopService()
        service.close()


@pytest_twisted.ensureDeferred
async def test_twistd_refuses_to_start_on_a_broken_certificate(tmp_path: Path, pki: PKI) -> None:
    pki.ca.mismatched(str(pki.dir / "wild.pem"), "*.apps.example.test")
    config = tmp_path / "routes.yaml"
    config.write_text(json.dumps(store_config(pki)))
    ingress = free_port()
    twistd = Twistd("--config", str(config), "--ingress", pki.strport(ingress))
    try:
        assert await twistd.wait_exit() != 0
        errors = [line for line in twistd.errors if line.strip()]
        assert errors == [f"{config}: tls.certificates: {pki.dir / 'wild.pem'}: "
                          "the private key does not match the certificate"], twistd.errors
        assert not twistd.find("listening on")
    finally:
        twistd.stop()


@pytest.mark.parametrize("data, message", [
    ({"projects": [{"name": "s", "backend": "tcp:127.0.0.1:1", "listen": {"port": 443, "tls": True}}]},
     "projects[0].listen.tls: needs a top-level 'tls' section (tls: {certificates: DIR})"),
    ({"projects": [{"name": "s", "backend": "127.0.0.1:1", "listen": {"port": 53, "protocol": "udp", "tls": True}}]},
     "projects[0].listen.tls: UDP routes cannot use TLS"),
    ({"projects": [{"name": "s", "backend": "tcp:127.0.0.1:1", "listen": {"port": 443, "tls": "yes"}}]},
     "projects[0].listen.tls: expected true or false, got 'yes'"),
    ({"tls": {"default": "x.pem"}}, "tls.certificates: is required (a directory of *.pem files)"),
])
def test_tls_config_errors_name_the_field(data: dict[str, Any], message: str) -> None:
    from portrouter.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse(data, "routes.yaml")
    assert str(caught.value) == f"routes.yaml: {message}"


def test_tls_default_must_be_a_file_of_the_store(pki: PKI) -> None:
    from portrouter.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse(store_config(pki, default="nosuch.pem"))
    assert str(caught.value) == (f"tls.certificates: {pki.dir}: tls.default 'nosuch.pem' is not a *.pem file "
                                 "there (there are: default.pem, exact.pem, localhost.pem, wild.pem)")


@pytest_twisted.ensureDeferred
async def test_api_refuses_tls_without_a_store(tmp_path: Path) -> None:
    router = await start_router(config=parse({"ingress": f"tcp:0:interface={LOOPBACK}",
                                              "state": str(tmp_path / "state")}))
    try:
        body = json.dumps({"backend": "tcp:127.0.0.1:1", "listen": {"port": free_port(), "tls": True}})
        done = await in_thread(subprocess.run, [
            "curl", "-sS", "-X", "PUT", "--data-binary", body, "-w", "\n%{http_code}",
            f"http://{LOOPBACK}:{router.port_of()}/_api/projects/s"], capture_output=True, text=True, timeout=60)
        answer, _, status = done.stdout.rpartition("\n")
        assert (int(status), json.loads(answer)) == (400, {"error": {
            "code": "invalid", "field": "listen.tls",
            "message": "needs a top-level 'tls' section (tls: {certificates: DIR})"}})
        assert "s" not in router.table.projects
    finally:
        await router.stopService()


def test_tls_1_1_is_refused_by_our_contexts_not_only_by_openssl_defaults(pki: PKI) -> None:
    """
    OpenSSL 3's default security level alone refuses TLS 1.1; lowered to 0
    (as a system openssl.cnf may), only the context's own minimum refuses it.
    """
    from OpenSSL import SSL

    server_ctx = load_certificate(str(pki.dir / "localhost.pem")).context
    server_ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client_ctx.set_min_proto_version(SSL.TLS1_VERSION)
    client_ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    with pytest.raises(SSL.Error) as caught:
        for _ in range(10):
            for me, peer in ((client, server), (server, client)):
                try:
                    me.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    peer.bio_write(me.bio_read(65536))
                except SSL.WantReadError:
                    pass
    assert "unsupported protocol" in str(caught.value) or "protocol version" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_backendai_app_through_a_tls_ingress(tmp_path: Path, pki: PKI, logged: list[str]) -> None:
    """
    The real ``backend.ai app`` against ``https://``: its SDK (aiohttp with
    the default SSL context) trusts what C{SSL_CERT_FILE} names.
    """
    service = ThreadServer(echo)
    config = replace(service_config(tmp_path, {"echo": service.port}), ingress=pki.strport())
    router = await start_router(config=config)
    local = free_port()
    bai = os.path.join(os.path.dirname(backendai_python()), "backend.ai")
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update(BACKEND_ENDPOINT=f"https://localhost:{router.port_of()}", BACKEND_ACCESS_KEY=ACCESS_KEY,
               BACKEND_SECRET_KEY=SECRET_KEY, SSL_CERT_FILE=pki.cafile)
    app = Process([bai, "app", "k1", "echo", "-b", f"{LOOPBACK}:{local}"], tmp_path / "backend.ai.log",
                  env=env, cwd=tmp_path)
    try:
        await app.listening_on(local, timeout=40)
        message = b"hello through the Backend.AI client over TLS " * 1000
        assert await in_thread(say_through, local, message) == message, app.output()
        await log_line(logged, r"GET /stream/session/k1/tcpproxy\?app=echo 101 .* tls=TLSv1\.3 sni=localhost$")
        app.proc.terminate()
        await wait_for(lambda: app.proc.poll() is not None, 20, "backend.ai app to exit")
    finally:
        app.stop()
        service.close()
        await router.stopService()


@pytest_twisted.ensureDeferred
async def test_a_port_turns_tls_on_and_off_in_place(pki: PKI) -> None:
    """A replace that only switches TLS (or the kind of route) keeps the port bound and answers the new way."""
    service, backend = ThreadServer(echo), Backend()
    router = await start_tls_router(store_config(pki))
    ingress, port = router.port_of(), free_port()

    async def deploy(protocol: str, tls: bool, address: str) -> None:
        body = json.dumps({"backend": address,
                           "listen": {"port": port, "protocol": protocol, "tls": tls, "interface": LOOPBACK}})
        done = await in_thread(curl, f"https://localhost:{ingress}/_api/projects/x", pki.cafile,
                               "-X", "PUT", "--data-binary", body, "-w", "\n%{http_code}")
        assert done.stdout.endswith(("\n200", "\n201")), done.stdout + done.stderr

    try:
        await deploy("tcp", True, service.address)
        assert (await in_thread(handshake, port, pki.cafile, "a.example.test", send=b"1"))["echo"] == b"1"
        bound = router.listeners["x"].port
        await deploy("tcp", False, service.address)
        assert await in_thread(say_through, port, b"plain") == b"plain"
        await deploy("http", True, backend.address)
        done = await in_thread(curl, f"https://a.example.test:{port}/headers", pki.cafile)
        assert done.returncode == 0 and "ALPN: server accepted http/1.1" in done.stderr, done.stderr
        assert bound.doRead.name == "http route x"  # what its accept loop's lines call it now
        await deploy("tcp", True, service.address)
        got = await in_thread(handshake, port, pki.cafile, "a.example.test", alpn=["http/1.1"], send=b"2")
        assert (got["echo"], got["alpn"]) == (b"2", None)  # a TCP route chooses no protocol
        assert router.listeners["x"].port is bound and bound.doRead.name == "tcp route x"
    finally:
        await router.stopService()
        service.close()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_large_bodies_both_ways_over_tls_skip_the_splice(tmp_path: Path, pki: PKI) -> None:
    """
    A response body large enough for the splice fast path, and an upload,
    through TLS on the ingress and on an HTTP route: bytes intact, so no
    plain socket write went around TLS.
    """
    backend = Backend()
    router = await start_tls_router(store_config(pki, {"name": "web", "backend": backend.address},
                                                 tls_project("site", "http", backend.address)))
    size = 8 * MiB
    expected = hashlib.sha256(b"".join(pattern(5, size))).hexdigest()
    upload = tmp_path / "upload"
    upload.write_bytes(b"".join(pattern(6, size)))
    try:
        for base in (f"https://localhost:{router.port_of()}/web", f"https://a.example.test:{router.port_of('site')}"):
            out = tmp_path / "download"
            done = await in_thread(curl, f"{base}/blob?size={size}&seed=5", pki.cafile, "-o", str(out))
            assert done.returncode == 0, done.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == expected, base
            done = await in_thread(curl, f"{base}/upload", pki.cafile, "--data-binary", f"@{upload}")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout) == {"size": size,
                                               "sha256": hashlib.sha256(upload.read_bytes()).hexdigest()}
    finally:
        await router.stopService()
        backend.close()


@pytest_twisted.ensureDeferred
async def test_wss_ws_route_64_mib_each_way(tmp_path: Path, pki: PKI) -> None:
    service = ThreadServer(both_ways_service)
    router = await start_tls_router(store_config(pki, tls_project("vnc", "ws", service.address)))
    local = free_port()
    websocat = websocat_wss(f"wss://localhost:{router.port_of('vnc')}/", local, tmp_path, pki.cafile)
    await tunnel_64_mib(router, service, websocat, local)


@pytest.mark.filterwarnings("ignore:Passing method to twisted.internet.ssl.CertificateOptions:DeprecationWarning")
def test_an_ssl_strport_that_names_an_old_method_is_refused(pki: PKI) -> None:
    from twisted.internet.endpoints import serverFromString

    from portrouter.certs import CertificateError, strport_tls

    assert strport_tls(serverFromString(reactor, pki.strport() + ":sslmethod=TLSv1_2_METHOD")) is not None
    with pytest.raises(CertificateError) as caught:
        strport_tls(serverFromString(reactor, pki.strport() + ":sslmethod=TLSv1_METHOD"))
    assert str(caught.value) == "sslmethod=TLSv1_METHOD: portrouter speaks TLS 1.2 and 1.3 only"


def half_close_over_tls(port: int, cafile: str, size: int) -> tuple[str, bytes]:
    """
    Send C{size} bytes, then close_notify (TLS 1.3's end of our writing,
    the TCP connection left open, as Go's CloseWrite does), and read the
    reply that comes after it. Memory BIOs: Python's socket API cannot.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cafile).wrap_bio(incoming, outgoing, server_hostname="a.example.test")
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        def flush() -> None:
            if outgoing.pending:
                sock.sendall(outgoing.read())

        def more() -> bool:
            data = sock.recv(MiB)
            if not data:
                incoming.write_eof()
            incoming.write(data) if data else None
            return bool(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                more()
        flush()
        digest = hashlib.sha256()
        for block in pattern(4, size):
            tls.write(block)
            digest.update(block)
            flush()
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the server's comes after its reply
        flush()
        reply = b""
        while True:
            try:
                reply += tls.read(MiB)
            except ssl.SSLWantReadError:
                if not more():
                    break
            except ssl.SSLZeroReturnError:
                break
        return digest.hexdigest(), reply


@pytest_twisted.ensureDeferred
async def test_tls13_half_close_eof_reaches_the_backend_and_the_reply_still_flows(pki: PKI) -> None:
    def backend(conn: socket.socket) -> None:
        digest, total = hashlib.sha256(), 0
        while data := conn.recv(MiB):  # until the client's close_notify, as EOF
            digest.update(data)
            total += len(data)
        conn.sendall(f"got {total} bytes, {digest.hexdigest()}".encode())

    service = ThreadServer(backend)
    router = await start_tls_router(store_config(pki, tls_project("half", "tcp", service.address)))
    try:
        sent, reply = await in_thread(half_close_over_tls, router.port_of("half"), pki.cafile, 4 * MiB)
        assert reply == f"got {4 * MiB} bytes, {sent}".encode()
        await wait_for(lambda: not router.sessions.live, what="the session to end")
    finally:
        await router.stopService()
        service.close()


@pytest_twisted.ensureDeferred
async def test_close_notify_read_while_the_backend_is_full_still_reaches_it_as_eof(pki: PKI) -> None:
    """
    Deterministically, the race behind the flaky half-close tests: data and
    close_notify arrive in one read; the data fills the backend's write
    buffer, which pauses the client, and the close_notify is read in the
    same loop, so the backend's FIN is asked for while its producer is
    paused. Twisted's TCP transport, once the buffer drains, resumes a
    paused producer *instead of* half-closing (C{FileDescriptor.doWrite}),
    and nothing writes again: the backend never saw EOF.
    """
    service = ThreadServer(recv_all_and_hash)
    backend_side = await TCP4ClientEndpoint(reactor, LOOPBACK, service.port).connect(
        Factory.forProtocol(StreamSide))
    client_side = StreamSide()
    factory = TLSFactory(ContextTLS(load_certificate(str(pki.dir / "exact.pem")).context), False,
                         Factory.forProtocol(lambda: client_side))
    tls = factory.buildProtocol(IPv4Address("TCP", LOOPBACK, 1))
    wire = StringTransport()
    tls.makeConnection(wire)
    client_side.transport.pauseProducing()  # as an accepted client waits for its backend
    session = Session("tcp", "p", "127.0.0.1:1", 0.0, lambda _: None)
    pair_streams(session, client_side, backend_side, reactor.seconds)

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(pki.cafile).wrap_bio(incoming, outgoing, server_hostname="a.example.test")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            tls.dataReceived(outgoing.read())
            incoming.write(wire.value())
            wire.clear()
    assert client.version() == "TLSv1.3"
    digest = hashlib.sha256()
    for block in pattern(5, MiB):
        client.write(block)
        digest.update(block)
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # close_notify written; the server's comes later
    tls.dataReceived(outgoing.read())  # all of it, and the close_notify, in one read
    assert backend_side.transport.producerPaused, "the backend's full buffer did not pause the client"
    try:
        await wait_for(lambda: service.results or service.errors, 30, "the backend to see EOF")
        assert service.results == [(MiB, digest.hexdigest())], service.errors
    finally:
        backend_side.transport.abortConnection()
        service.close()
