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

from portrouter.config import Listen, load, parse
from portrouter.router import RouterService
from tests.httpbackend import Backend
from tests.pki import CA, serial_of
from tests.support import LOOPBACK, MiB, ThreadServer, Twistd, in_thread, pattern, start_router, wait_for
from tests.test_operations import roundtrip
from tests.test_service_ports import SIZE, Process, both_ways_service, echo, tool
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


def client_context(cafile: str, *, alpn: list[str] | None = None, check_name: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_name
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, cafile: str, server_name: str | None, *, alpn: list[str] | None = None,
              send: bytes = b"") -> dict[str, Any]:
    """
    One TLS connection: the serial of the certificate served (chain verified;
    the name only when asked for one), the version, the ALPN choice, and what
    came back for C{send} until the server closed.
    """
    ctx = client_context(cafile, alpn=alpn, check_name=False)
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
