"""The real `twistd -n portrouter` process: config file and CLI routes together."""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest_twisted

from portrouter.auth import sign_request
from tests.support import LOOPBACK, RawWebSocket, ThreadServer, Twistd, free_port, in_thread


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def roundtrip(port: int, message: bytes) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
        sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_file_and_cli_routes(tmp_path: Any) -> None:
    file_backend, cli_backend = ThreadServer(echo), ThreadServer(lambda c: c.sendall(b"cli:" + c.recv(100)))
    file_port = free_port()
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\n"
        f"state: {tmp_path / 'state'}\n"
        "projects:\n"
        "  - name: echo\n"
        f"    backend: tcp:{LOOPBACK}:{file_backend.port}\n"
        f"    listen: {{port: {file_port}, protocol: tcp, interface: {LOOPBACK}}}\n"
    )
    daemon = Twistd(
        "--config", str(config),
        "--tcp", f"tcp:0:interface={LOOPBACK} -> tcp:{LOOPBACK}:{cli_backend.port}",
    )
    try:
        assert await daemon.port_of("echo") == file_port
        cli_port = await daemon.port_of("tcp-0")
        assert await in_thread(roundtrip, file_port, b"hello file") == b"hello file"
        assert await in_thread(roundtrip, cli_port, b"hello") == b"cli:hello"
        # One log line per finished connection, with its numbers.
        line = await daemon.wait_line(r"tcp echo 127\.0\.0\.1:\d+: client closed; 10 bytes in, 10 bytes out")
        assert line
        daemon.proc.send_signal(signal.SIGTERM)
        code = await daemon.wait_exit()
        assert code == 0, "\n".join(daemon.output + daemon.errors)
    finally:
        daemon.stop()
        file_backend.close()
        cli_backend.close()


@pytest_twisted.ensureDeferred
async def test_port_in_use_stops_start_up_and_nothing_stays_bound(tmp_path: Any) -> None:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    first, ingress = free_port(), free_port()
    config = tmp_path / "routes.yaml"
    config.write_text(
        f"ingress: tcp:{ingress}:interface={LOOPBACK}\n"
        "projects:\n"
        f"  - {{name: a, backend: 'tcp:{LOOPBACK}:1', listen: {{port: {first}, protocol: tcp, interface: {LOOPBACK}}}}}\n"
        f"  - {{name: b, backend: 'tcp:{LOOPBACK}:1', listen: {{port: {taken}, protocol: tcp, interface: {LOOPBACK}}}}}\n"
    )
    daemon = Twistd("--config", str(config))
    try:
        assert await daemon.wait_exit() != 0
        assert daemon.errors[-1] == (
            f"portrouter: cannot bind port {taken}/tcp for project 'b': Address already in use"
        )
        for port in (first, ingress):
            with socket.socket() as probe:
                probe.bind((LOOPBACK, port))  # released: binds again
    finally:
        daemon.stop()
        holder.close()


@pytest_twisted.ensureDeferred
async def test_secret_files_are_read_relative_to_the_start_directory(tmp_path: Any) -> None:
    """
    ``token_file`` and ``secret_key_file`` given relative are read from the
    directory twistd was started in, not the config file's.
    """
    service = ThreadServer(echo)
    start, conf = tmp_path / "start", tmp_path / "conf"
    (start / "secrets").mkdir(parents=True)
    conf.mkdir()
    (start / "secrets" / "ops.token").write_text("token-from-the-start-directory\n")
    (start / "secrets" / "k1.secret").write_text("secret-from-the-start-directory\n")
    config = conf / "routes.yaml"
    config.write_text(
        f"ingress: tcp:0:interface={LOOPBACK}\nstate: {tmp_path / 'state'}\n"
        "auth:\n"
        "  tokens: [{token_file: secrets/ops.token, admin: true}]\n"
        "  keypairs: [{access_key: AKIARELATIVE, secret_key_file: secrets/k1.secret, projects: [k1]}]\n"
        f"projects:\n  - {{name: k1, host: {LOOPBACK}, services: [{{name: echo, protocol: tcp, port: {service.port}}}]}}\n"
    )
    daemon = Twistd("--config", str(config), cwd=str(start))
    try:
        ingress = await daemon.ingress_port()

        def status_of(target: str, headers: dict[str, str]) -> int:
            raw = RawWebSocket(ingress)
            try:
                return raw.request(target, headers, upgrade=target.startswith("/stream/"))[0]
            finally:
                raw.close()

        bearer = {"Authorization": "Bearer token-from-the-start-directory"}
        assert await in_thread(status_of, "/_api/routes", bearer) == 200
        assert await in_thread(status_of, "/_api/routes", {}) == 401
        target = "/stream/session/k1/tcpproxy?app=echo"
        signed = sign_request("GET", f"http://{LOOPBACK}:{ingress}{target}", "AKIARELATIVE",
                              "secret-from-the-start-directory")
        assert await in_thread(status_of, target, signed) == 101
        wrong = sign_request("GET", f"http://{LOOPBACK}:{ingress}{target}", "AKIARELATIVE", "another-secret")
        assert await in_thread(status_of, target, wrong) == 403
    finally:
        daemon.stop()
        service.close()
