"""
Hostname routing (SPEC section 10, issue 15) with the clients users run,
on loopback, every name set by the client (SNI, ``Host``) and never looked
up: OpenSSH through ``openssl s_client`` on the TLS front, a grpcio client
and server through suffix ``g``, websocat by hostname (``wss://`` on the
front, an upgrade on the plain ingress), an on-demand service reached by
``Host`` and by a tunnel, a drain on delete, the real ``twistd`` and the
manhole's ``routes()``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
import pytest_twisted

from portrouter.router import RouterService
from tests.pki import CA
from tests.support import LOOPBACK, free_port, in_thread, start_router, wait_for
from tests.test_hostnames import DOMAIN, ca, config, front_port, store  # noqa: F401 (fixtures)
from tests.test_service_ports import Process, tool
from tests.test_services import log_line, logged  # noqa: F401 (a fixture)


# -- OpenSSH through openssl s_client ------------------------------------------------------------


class Sshd:
    """A real OpenSSH server on 127.0.0.1 (a port of its own), with a user key that may log in."""

    def __init__(self, tmp_path: Path):
        sshd_path = "/usr/sbin/sshd"
        assert os.path.exists(sshd_path), "OpenSSH sshd is not installed (.ci/run installs openssh-server)"
        for key in ("host_key", "user_key"):
            subprocess.run([tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)],
                           check=True, timeout=30)
        shutil.copy(tmp_path / "user_key.pub", tmp_path / "authorized_keys")
        self.user_key = tmp_path / "user_key"
        self.port = free_port()
        (tmp_path / "sshd_config").write_text(
            f"ListenAddress {LOOPBACK}\n"
            f"Port {self.port}\n"
            f"HostKey {tmp_path / 'host_key'}\n"
            f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "UsePAM no\n"
            "StrictModes no\n"
            f"PidFile {tmp_path / 'sshd.pid'}\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.process = Process([sshd_path, "-D", "-e", "-f", str(tmp_path / "sshd_config")], tmp_path / "sshd.log")

    @property
    def address(self) -> str:
        return f"tcp:{LOOPBACK}:{self.port}"


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
