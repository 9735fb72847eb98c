"""
``access_log`` per project (issue 20): every request's and connection's
line (the default), none (``false``), or an even share (``{sample: 0.25}``:
exactly every fourth), for operators who take metrics instead. Metrics
count every request either way, and a request that fails still says why.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from portrouter.config import ConfigError, parse
from portrouter.sessions import Sample
from tests.httpbackend import Backend
from tests.support import LOOPBACK, ThreadServer, UDPEcho, free_port, in_thread, start_router, wait_for
from tests.test_services import logged  # noqa: F401 (a fixture)


def echo(conn: socket.socket) -> None:
    while chunk := conn.recv(65536):
        conn.sendall(chunk)


def exchange(port: int) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def datagram(port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(30)
        sock.sendto(b"hello", (LOOPBACK, port))
        return sock.recv(100)


def curl(*urls: str) -> str:
    """One curl for every URL: a real client, its requests on one kept-alive connection."""
    each = [arg for url in urls for arg in ("-o", "/dev/null", url)]
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "-w", "%{http_code} ", *each],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def count(lines: list[str], regex: str) -> int:
    return sum(1 for line in lines if re.search(regex, line))


@pytest_twisted.ensureDeferred
async def test_lines_written_all_none_or_an_even_share(tmp_path: Path, logged: list[str]) -> None:
    backend = Backend()
    echoer = ThreadServer(echo)
    udp = UDPEcho()
    web_port, quiet_port, tcp_port = free_port(), free_port(), free_port()
    udp_port, loud_udp_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    http = f"tcp:{LOOPBACK}:{backend.port}"
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [
            {"name": "web", "backend": http, "listen": {"port": web_port, "protocol": "http"}},
            {"name": "quiet", "backend": http, "access_log": False,
             "listen": {"port": quiet_port, "protocol": "http"}},
            {"name": "paths", "backend": http, "access_log": {"sample": 0.25}},
            {"name": "gone", "backend": f"tcp:{LOOPBACK}:{free_port()}", "access_log": False},
            {"name": "ssh", "backend": echoer.address, "access_log": {"sample": 0.5},
             "listen": {"port": tcp_port, "protocol": "tcp"}},
            {"name": "game", "backend": f"{LOOPBACK}:{udp.port}", "access_log": False,
             "listen": {"port": udp_port, "protocol": "udp"}},
            {"name": "voice", "backend": f"{LOOPBACK}:{udp.port}",
             "listen": {"port": loud_udp_port, "protocol": "udp"}},
        ]}))
    stats = router.sessions.stats
    ingress = router.port_of()
    try:
        assert await in_thread(curl, *[f"http://{LOOPBACK}:{web_port}/a"] * 3) == "200 200 200"
        assert await in_thread(curl, *[f"http://{LOOPBACK}:{quiet_port}/b"] * 3) == "200 200 200"
        assert await in_thread(curl, *[f"http://{LOOPBACK}:{ingress}/paths/c{i}" for i in range(8)]) == \
            " ".join(["200"] * 8)
        assert await in_thread(curl, f"http://{LOOPBACK}:{ingress}/gone/x") == "502"
        for _ in range(4):
            assert await in_thread(exchange, tcp_port) == b"ping"
        await wait_for(lambda: stats.connections[("tcp", "ssh")] == 4 and not router.sessions.live, 15,
                       "the four TCP connections to end")
        for port in (udp_port, loud_udp_port):
            assert await in_thread(datagram, port) == b"hello"
        # Every request counted whatever was written (metrics stay whole).
        assert stats.http[("web", "2xx")] == 3 and stats.http[("quiet", "2xx")] == 3
        assert stats.http[("paths", "2xx")] == 8 and stats.http[("gone", "5xx")] == 1
        # What the dashboard shows of them too: answers' bytes and the 502, lines or not.
        assert stats.http_out["quiet"] == stats.http_out["web"] > 0 and stats.http_errors[("gone", 502)] == 1
    finally:
        await router.stopService()
        backend.close()
        echoer.close()
        udp.close()
    assert count(logged, r" GET /a 200 .* web") == 3  # the default: every line
    assert count(logged, r" GET /b ") == 0
    assert [line.split()[2] for line in logged if re.search(r" GET /paths/c\d 200 ", line)] == \
        ["/paths/c3", "/paths/c7"]  # every fourth, exactly
    # A failure still says why; only its access line is left out.
    assert count(logged, r"gone: GET /gone/x: 502 ") == 1 and count(logged, r" GET /gone/x 502 ") == 0
    assert count(logged, r"^tcp ssh 127\.0\.0\.1:\d+: ") == 2
    assert count(logged, r"^udp game ") == 0 and count(logged, r"^udp voice ") == 1


@pytest.mark.parametrize("value, message", [
    ("yes", "projects[0].access_log: expected true, false or {sample: 0.1}, got 'yes'"),
    ({}, "projects[0].access_log.sample: is required"),
    ({"sample": 1.5}, "projects[0].access_log.sample: 1.5 is not a share from 0 to 1"),
    ({"sample": "half"}, "projects[0].access_log.sample: expected a share from 0 to 1"),
    ({"sample": 0.1, "every": 10}, "projects[0].access_log.every: unknown key"),
])
def test_access_log_errors_quote_the_value(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"projects": [{"name": "web", "backend": "tcp:127.0.0.1:1", "access_log": value}]})
    assert message in str(caught.value)


@pytest.mark.parametrize("share, every", [(0.1, 10), (0.25, 4), (1 / 3, 3), (0.5, 2)])
def test_a_sample_writes_exactly_its_share(share: float, every: int) -> None:
    sample = Sample(share)
    due = [sample.due() for _ in range(every * 100)]
    assert sum(due) == 100 and due.index(True) == every - 1
    assert all(Sample(1.0).due() for _ in range(10)) and not any(Sample(0.0).due() for _ in range(10))
