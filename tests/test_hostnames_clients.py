"""
Hostname routing (SPEC section 10, issue 15) with the clients users run,
on loopback, every name set by the client (SNI, ``Host``) and never looked
up: OpenSSH through ``openssl s_client`` on the TLS front, a grpcio client
and server through suffix ``g``, websocat by hostname (``wss://`` on the
front, upgrades by ``Host`` and by SNI), an on-demand service reached by
``Host``, by SNI and by a tunnel, a drain on delete, the real ``twistd``
and the manhole's ``routes()``.
"""

from __future__ import annotations

import ast
import getpass
import os
import signal
import socket
import ssl
import subprocess
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from portrouter.model import Manhole
from tests.httpbackend import Backend
from tests.pki import CA
from tests.support import (
    LOOPBACK, ClockedReactor, ThreadServer, Twistd, free_port, in_thread, start_router, stop_clocked, wait_for,
)
from tests.test_api import api, closed_by_peer, refuses, say
from tests.test_hostnames import (  # noqa: F401 (fixtures: backend, ca, store)
    DOMAIN, alert_for, backend, ca, config, curl, echo, front_port, headers_seen, store, tls_connect,
)
from tests.test_http_clients import WebSocketEcho
from tests.test_operations import Shell, everything, manhole_files, ssh_argv
from tests.test_service_ports import Process, Sshd, stream_url, tool, websocat_tunnel
from tests.test_services import (  # noqa: F401 (fixtures: logged; no_child_left is autouse here too)
    Service, let_go, log_line, logged, no_child_left, stop_router,
)
from tests.test_tls import say_through


# -- OpenSSH through openssl s_client ------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path)
    yield server
    server.process.stop()


def ssh_by_sni(sshd: Sshd, front: int, name: str, cafile: str, command: str) -> subprocess.CompletedProcess[str]:
    """
    OpenSSH as the issue runs it: its connection is ``openssl s_client`` to
    the TLS front with C{name} as SNI, which verifies the front's certificate
    for that name against C{cafile}.
    """
    proxy = (f"{tool('openssl')} s_client -quiet -verify_return_error -CAfile {cafile} -verify_hostname {name} "
             f"-servername {name} -connect {LOOPBACK}:{front}")
    return subprocess.run([
        tool("ssh"), "-F", "/dev/null", "-i", str(sshd.user_key), "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", f"ProxyCommand={proxy}",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
        f"{getpass.getuser()}@{name}", command,
    ], capture_output=True, text=True, timeout=60)


@pytest_twisted.ensureDeferred
async def test_ssh_through_the_tls_front_to_a_service_port_and_a_tcp_route(
        tmp_path: Path, store: Path, ca: CA, sshd: Sshd, logged: list[str]) -> None:
    """
    dstack's default: TLS terminated, then the SSH bytes relayed, to service
    port ``k1-<sshd's port>`` and to a project's tcp route by its name and by
    ``<name>-<port>``.
    """
    await sshd.process.listening_on(sshd.port)
    tcp_port = free_port()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "k1", "host": LOOPBACK, "services": [{"name": "sshd", "protocol": "tcp", "port": sshd.port}]},
        {"name": "git", "backend": sshd.address, "listen": {"port": tcp_port, "protocol": "tcp"}},
    ]))
    try:
        front = front_port(router)
        for name, session in ((f"k1-{sshd.port}.{DOMAIN}", "k1/sshd"), (f"git.{DOMAIN}", "git"),
                              (f"git-{tcp_port}.{DOMAIN}", "git")):
            result = await in_thread(ssh_by_sni, sshd, front, name, ca.path, f"echo hello-{name}; uname -s")
            assert result.returncode == 0, (name, result.stderr, sshd.process.output())
            assert result.stdout == f"hello-{name}\n{os.uname().sysname}\n"
            await log_line(logged, rf"^tcp {session} 127\.0\.0\.1:\d+: .* tls=TLSv1\.3 sni={name}$")
        assert router.sessions.stats.connections[("tcp", "k1/sshd")] == 1
        assert router.sessions.stats.connections[("tcp", "git")] == 2
        await wait_for(lambda: not router.sessions.live, what="the relays to end")
    finally:
        await router.stopService()


# -- gRPC through suffix g ----------------------------------------------------------------------

SERVICE = "portrouter.test.Echo"


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"echo:" + request


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for i, request in enumerate(requests):
        yield b"%d:" % i + request[::-1]


class GRPCServer:
    """
    A real grpcio server speaking h2c on 127.0.0.1: no .proto, generic
    handlers with raw bytes in and out (no serializers), one unary and one
    bidirectional streaming method.
    """

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        }),))
        self.port = self.server.add_insecure_port(f"{LOOPBACK}:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None).wait(30)


def grpc_calls(port: int, name: str, cafile: str, messages: list[bytes]) -> tuple[bytes, list[bytes]]:
    """
    A grpcio client over TLS to 127.0.0.1:C{port} with C{name} as the
    server's name: grpc sends it as SNI and checks the certificate against
    it (C{grpc.ssl_target_name_override}), and needs ALPN ``h2`` chosen.
    One unary call, then one bidirectional stream of C{messages}.
    """
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(cafile).read_bytes())
    options = [("grpc.ssl_target_name_override", name), ("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(f"{LOOPBACK}:{port}", credentials, options=options) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")(b"hello over h2c", timeout=30)
        stream = list(channel.stream_stream(f"/{SERVICE}/Stream")(iter(messages), timeout=30))
    return unary, stream


@pytest_twisted.ensureDeferred
async def test_grpc_unary_and_streaming_through_suffix_g(tmp_path: Path, store: Path, ca: CA,
                                                         logged: list[str]) -> None:
    """
    ``k1-<port>g`` (a service port) and ``rpcg`` (a project's backend): TLS
    terminated with ALPN ``h2``, the HTTP/2 bytes relayed to an h2c server.
    """
    server = GRPCServer()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "k1", "host": LOOPBACK, "services": [{"name": "grpc", "protocol": "tcp", "port": server.port}]},
        {"name": "rpc", "backend": f"tcp:{LOOPBACK}:{server.port}"},
    ]))
    messages = [b"one", b"", bytes(range(256)) * 4096, b"last"]
    try:
        port = front_port(router)
        for name, session in ((f"k1-{server.port}g.{DOMAIN}", "k1/grpc"), (f"rpcg.{DOMAIN}", "rpc")):
            unary, stream = await in_thread(grpc_calls, port, name, ca.path, messages)
            assert unary == b"echo:hello over h2c"
            assert stream == [b"%d:" % i + m[::-1] for i, m in enumerate(messages)], name
            # The session's line names the SNI the client sent, and the ALPN is what made grpc talk.
            await log_line(logged, rf"^tcp {session} 127\.0\.0\.1:\d+: .* tls=TLSv1\.3 sni={name}$")
        assert router.sessions.stats.hostnames["h2c"] == 2
    finally:
        await router.stopService()
        server.close()


# -- WebSocket by hostname: websocat --------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 1024  # every byte value, 256 KiB: several frames each way


def websocat_by_name(url: str, connect: str, local: int, tmp_path: Path, cafile: str | None = None) -> Process:
    """
    websocat as a local TCP-to-WebSocket tunnel that asks for C{url} (its
    ``Host`` and path) over the connection C{connect} describes, so that
    the name in C{url} is never looked up: ``ws-c:`` is websocat's WebSocket
    client over any stream, and with ``ssl-connect:`` under it the name is
    the SNI and the name the certificate is checked for (``--tls-domain``),
    against C{cafile} (websocat's OpenSSL trusts C{SSL_CERT_FILE}).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    argv = [tool("websocat"), "--binary", "--ws-c-uri", url]
    if cafile is not None:
        env["SSL_CERT_FILE"] = cafile
        argv += ["--tls-domain", url.split("/")[2].rsplit(":", 1)[0]]
    argv += [f"tcp-l:{LOOPBACK}:{local}", connect]
    return Process(argv, tmp_path / f"websocat-{local}.log", env=env)


async def echoed_by_name(tunnels: list[Process], url: str, connect: str, tmp_path: Path,
                         cafile: str | None = None) -> None:
    """L{PAYLOAD} through a new websocat tunnel (kept in C{tunnels}, to be stopped) comes back intact."""
    local = free_port()
    tunnels.append(tunnel := websocat_by_name(url, connect, local, tmp_path, cafile))
    await tunnel.listening_on(local)
    assert await in_thread(say_through, local, PAYLOAD) == PAYLOAD, tunnel.output()


@pytest_twisted.ensureDeferred
async def test_websocat_wss_by_sni_to_a_ws_route_on_the_tls_front(
        tmp_path: Path, store: Path, ca: CA, logged: list[str]) -> None:
    """
    ``wss://vnc.<domain>`` on the front: TLS terminated with the wildcard
    certificate (websocat verifies it for the name), then the ws route
    answers the upgrade as on its own port and bridges to its TCP backend.
    """
    server = ThreadServer(echo)
    ws_port = free_port()
    router = await start_router(config=config(tmp_path, store, [
        {"name": "vnc", "backend": server.address, "listen": {"port": ws_port, "protocol": "ws"}},
    ]))
    tunnels: list[Process] = []
    try:
        front = front_port(router)
        for name in (f"vnc.{DOMAIN}", f"vnc-{ws_port}.{DOMAIN}"):
            await echoed_by_name(tunnels, f"wss://{name}:{front}/websockify",
                                 f"ws-c:ssl-connect:tcp:{LOOPBACK}:{front}", tmp_path, ca.path)
            await log_line(logged, rf"^ws vnc 127\.0\.0\.1:\d+: .* tls=TLSv1\.3 sni={name}$")
        assert router.sessions.stats.hostnames["tls"] == 2
    finally:
        for tunnel in tunnels:
            tunnel.stop()
        await router.stopService()
        server.close()


@pytest_twisted.ensureDeferred
async def test_websocat_upgrade_by_host_on_the_plain_ingress_and_by_sni(tmp_path: Path, store: Path, ca: CA) -> None:
    """
    An HTTP route's WebSocket upgrade, chosen by ``Host`` on the plain
    ingress (a path-routed project by its name, a project with its own HTTP
    port by ``<name>-<port>``) and by SNI on the TLS front (``wss://``),
    relayed after the 101 to a real WebSocket echo server (Autobahn's, as
    tests.test_http_clients.WebSocketEcho says why).
    """
    server = WebSocketEcho()
    await server.ready()
    own = free_port()
    backend = f"tcp:{LOOPBACK}:{server.port}"
    router = await start_router(config=config(tmp_path, store, [
        {"name": "chat", "backend": backend},
        {"name": "live", "backend": backend, "listen": {"port": own, "protocol": "http"}},
    ]))
    tunnels: list[Process] = []
    try:
        ingress, front = router.port_of(), front_port(router)
        for name in (f"chat.{DOMAIN}", f"live-{own}.{DOMAIN}"):
            await echoed_by_name(tunnels, f"ws://{name}:{ingress}/socket", f"ws-c:tcp:{LOOPBACK}:{ingress}", tmp_path)
        assert router.sessions.stats.hostnames["host"] == 2
        await echoed_by_name(tunnels, f"wss://chat.{DOMAIN}:{front}/socket",
                             f"ws-c:ssl-connect:tcp:{LOOPBACK}:{front}", tmp_path, ca.path)
        assert router.sessions.stats.hostnames["tls"] == 1
        assert router.sessions.stats.connections[("upgrade", "chat")] == 2
    finally:
        for tunnel in tunnels:
            tunnel.stop()
        await router.stopService()
        server.close()

# -- on-demand start by hostname ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_first_request_by_host_starts_the_service_and_a_tunnel_shares_it(
        tmp_path: Path, store: Path, ca: CA) -> None:
    """
    ``Host: k1-<port>.<domain>`` on the plain ingress reaches an HTTP
    service port with a ``command``: the first request starts it (and waits
    for it); the same service by SNI on the TLS front and through a
    ``/stream/`` tunnel then uses that one supervisor and that one process.
    """
    service = Service(tmp_path, "web", "http", "--gate")
    router = await start_router(config=config(tmp_path, store, [
        {"name": "k1", "host": LOOPBACK,
         "services": [{"name": "web", "protocol": "http", "port": service.port, "command": service.command}]},
    ]))
    tunnel = None
    try:
        ingress = router.port_of()
        assert router.commands.supervisors == {} and service.starts() == [], "started before anyone asked"
        reply = in_thread(curl, f"http://k1-{service.port}.{DOMAIN}:{ingress}/by-host")
        # The request started the service, which waits to be let go: the request waits with it.
        await wait_for(service.starts, what="the service to be started")
        sup = router.commands.supervisors[("k1", "web")]
        assert not sup.ready and not reply.called
        let_go(sup)
        result = await reply
        assert (result.returncode, result.stdout) == (0, f"pid {sup.pid} saw /by-host\n"), result.stderr

        result = await in_thread(curl, f"https://k1-{service.port}.{DOMAIN}:{front_port(router)}/by-sni",
                                 cafile=ca.path)
        assert (result.returncode, result.stdout) == (0, f"pid {sup.pid} saw /by-sni\n"), result.stderr
        local = free_port()
        tunnel = websocat_tunnel(stream_url(ingress, "web"), local, tmp_path)
        await tunnel.listening_on(local)
        result = await in_thread(curl, f"http://{LOOPBACK}:{local}/by-tunnel")
        assert (result.returncode, result.stdout) == (0, f"pid {sup.pid} saw /by-tunnel\n"), result.stderr
        assert list(router.commands.supervisors.items()) == [(("k1", "web"), sup)]
        assert sup.starts == 1 and service.starts() == [sup.pid]
    finally:
        if tunnel is not None:
            tunnel.stop()
        await stop_router(router, *service.starts())


# -- a deleted project drains on the TLS front ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_drains_relays_on_the_tls_front_and_the_names_go(
        tmp_path: Path, store: Path, ca: CA, logged: list[str]) -> None:
    """
    A project deployed through the API, reached on the front by SNI (its tcp
    route and a TCP service port, TLS terminated): after DELETE the open
    relays keep working until ``drain_timeout`` and are closed then, saying
    why; new connections by its names get the 404 naming the host, or the
    alert for a passthrough name.
    """
    server = ThreadServer(echo)
    clock = Clock()
    router = await start_router(config=replace(config(tmp_path, store, []), drain_timeout=5.0),
                                using=ClockedReactor(clock))
    ingress, front, tcp_port = router.port_of(), front_port(router), free_port()
    names = {"db": f"db.{DOMAIN}", "db/admin": f"db-{server.port}.{DOMAIN}"}
    relays: dict[str, ssl.SSLSocket] = {}
    try:
        status, _ = await api(ingress, "PUT", "/_api/projects/db", {
            "backend": server.address, "listen": {"port": tcp_port, "protocol": "tcp", "interface": LOOPBACK},
            "host": LOOPBACK, "services": [{"name": "admin", "protocol": "tcp", "port": server.port}],
        })
        assert status == 201
        for session, name in names.items():
            relays[session] = await in_thread(tls_connect, front, name, ca.path)
            assert await in_thread(say, relays[session], b"hello") == b"hello"
        assert sorted(s.project for s in router.sessions.live) == ["db", "db/admin"]

        assert await api(ingress, "DELETE", "/_api/projects/db") == (204, b"")
        assert await in_thread(refuses, tcp_port)
        # New connections by its names: nothing there any more.
        for name in names.values():
            result = await in_thread(curl, f"https://{name}:{front}/", "-w", "%{http_code}", cafile=ca.path)
            assert result.stdout == f"portrouter: no project or port for host '{name}:{front}'\n404", result.stdout
        assert "UNRECOGNIZED_NAME" in await in_thread(alert_for, front, f"db-{tcp_port}s.{DOMAIN}", ca.path)
        # The open relays go on until the drain timeout...
        clock.advance(4.9)
        for relay in relays.values():
            assert await in_thread(say, relay, b"still here") == b"still here"
        # ...and are closed then, their lines saying why.
        clock.advance(0.1)
        for session, relay in relays.items():
            assert await in_thread(closed_by_peer, relay), session
            await log_line(logged, rf"^tcp {session} 127\.0\.0\.1:\d+: project removed; "
                                   rf"closed after the drain timeout \(5 s\); .* sni={names[session]}$")
        assert not router.sessions.live
    finally:
        for relay in relays.values():
            relay.close()
        await stop_clocked(router, clock)
        server.close()


# -- the real daemon, and the manhole -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twistd_serves_https_by_sni_and_http_by_host(tmp_path: Path, store: Path, ca: CA,
                                                           backend: Backend) -> None:
    """``twistd -n portrouter --config routes.yaml`` with a hostnames section and a TLS front."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        f"tls:\n  certificates: {store}\n"
        f"hostnames:\n  domains: [{DOMAIN}]\n  listen: tcp:0:interface={LOOPBACK}\n"
        f"projects:\n  - name: k1\n    backend: {backend.address}\n"
    )
    daemon = Twistd("--config", str(routes), cwd=str(tmp_path))
    try:
        front = int((await daemon.wait_line(r"TLS front listening on [\d.]+:(\d+)")).group(1))
        ingress = await daemon.ingress_port()
        seen = headers_seen(await in_thread(curl, f"https://k1.{DOMAIN}:{front}/headers?by=sni", cafile=ca.path))
        assert (seen["path"], seen["headers"]["X-Forwarded-Proto"]) == ("/headers?by=sni", "https")
        assert seen["headers"]["X-Forwarded-Host"] == f"k1.{DOMAIN}:{front}"
        seen = headers_seen(await in_thread(curl, f"http://k1.{DOMAIN}:{ingress}/headers?by=host"))
        assert (seen["path"], seen["headers"]["X-Forwarded-Proto"]) == ("/headers?by=host", "http")
        daemon.proc.send_signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0, everything(daemon)
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_the_manhole_routes_show_the_hostnames(tmp_path: Path, store: Path, backend: Backend) -> None:
    """``routes()`` at the manhole's prompt: the table as the API's text shows it, Hostname column included."""
    key, _ = manhole_files(tmp_path)
    conf = config(tmp_path, store, [
        {"name": "k1", "backend": backend.address},
        {"name": "k2", "host": LOOPBACK, "services": [{"name": "ssh", "protocol": "tcp", "port": 2200}]},
    ])
    manhole = Manhole(f"tcp:0:interface={LOOPBACK}", str(tmp_path / "authorized_keys"))
    router = await start_router(config=replace(conf, manhole=manhole))
    shell = None
    try:
        port = int(router.manhole.port.getHost().port)  # type: ignore[union-attr]
        shell = Shell(ssh_argv(port, tmp_path / "known_hosts", "StrictHostKeyChecking=accept-new", key=key, tty=True))
        await shell.expect(r">>> ")
        api_text = (await in_thread(curl, f"http://{LOOPBACK}:{router.port_of()}/_api/routes?format=text")).stdout
        shown = ast.literal_eval(await shell.evaluate("ascii(str(routes()))", "ROUTES"))
        assert shown.rstrip("\n") == api_text.rstrip("\n")
        lines = shown.splitlines()
        assert lines[0].split() == ["Host", "port", "Protocol", "Project", "Hostname", "Backend"]
        assert any(line.split()[2:4] == ["k1", f"k1.{DOMAIN}"] for line in lines), shown
        assert any(line.split()[2:4] == ["k2/ssh", f"k2-2200.{DOMAIN}"] for line in lines), shown
        # Typed at the prompt, it reads as a table, not as a quoted string.
        shell.type("routes()")
        await shell.expect(r"\n\s*Host port +Protocol +Project +Hostname +Backend *\r?\n")
    finally:
        if shell is not None:
            shell.stop()
        await router.stopService()


@pytest.mark.parametrize("where", ["tls front", "plain ingress"])
@pytest_twisted.ensureDeferred
async def test_delete_cuts_a_request_in_flight_by_hostname_at_the_drain_timeout(
        tmp_path: Path, store: Path, ca: CA, backend: Backend, where: str) -> None:
    """SPEC 3: a removed project's open requests finish until drain_timeout, on the shared ports too."""
    clock = Clock()
    router = await start_router(config=replace(config(tmp_path, store, []), drain_timeout=5.0),
                                using=ClockedReactor(clock))
    ingress, name = router.port_of(), f"web.{DOMAIN}"
    front = router.tls_front.factory if where == "tls front" else router.ingress.factory  # type: ignore[union-attr]
    sock: socket.socket | None = None
    try:
        assert (await api(ingress, "PUT", "/_api/projects/web", {"backend": backend.address}))[0] == 201
        if where == "tls front":
            sock = await in_thread(tls_connect, front_port(router), name, ca.path)
        else:
            sock = await in_thread(socket.create_connection, (LOOPBACK, ingress), 30)
        sock.sendall(f"GET /slow HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        await wait_for(lambda: any(line.startswith("GET /slow ") for conn in backend.stats.lines for line in conn),
                       what="the request to reach the backend")
        assert await api(ingress, "DELETE", "/_api/projects/web") == (204, b"")
        clock.advance(4.9)
        assert [c.project for c in front.channels if c.busy] == ["web"]
        clock.advance(0.1)
        await wait_for(lambda: not any(c.busy for c in front.channels), 10, "the request to be cut")
        assert await in_thread(closed_by_peer, sock)
    finally:
        if sock is not None:
            sock.close()
        await stop_clocked(router, clock)
