"""Real clients through TCP routes: redis-server behind, redis-cli in front."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import pytest_twisted

from tests.support import LOOPBACK, MiB, free_port, in_thread, start_router


@pytest.fixture
def redis_server(tmp_path: Any) -> Any:
    # Installed by .ci/run; missing it is a failure, not a skip.
    assert shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", LOOPBACK, "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def cli(port: int, *args: str, stdin: bytes | None = None) -> bytes:
    for _ in range(250):  # redis-server needs a moment to bind: poll, bounded
        result = subprocess.run(
            ["redis-cli", "-h", LOOPBACK, "-p", str(port), *args],
            input=stdin, capture_output=True, timeout=60,
        )
        if b"Connection refused" not in result.stderr + result.stdout:
            assert result.returncode == 0, result.stderr
            return result.stdout
    raise AssertionError("redis never answered")


@pytest_twisted.ensureDeferred
async def test_redis_through_tcp_route(redis_server: int) -> None:
    await in_thread(cli, redis_server, "PING")  # the server is up
    router = await start_router(("tcp", f"tcp:0:interface={LOOPBACK} -> tcp:{LOOPBACK}:{redis_server}"))
    port = router.port_of("tcp-0")
    try:
        assert await in_thread(cli, port, "PING") == b"PONG\n"
        value = os.urandom(MiB // 2).hex().encode()  # 1 MiB of text
        assert await in_thread(cli, port, "-x", "SET", "big", stdin=value) == b"OK\n"
        got = await in_thread(cli, port, "--raw", "GET", "big")
        assert got.rstrip(b"\n") == value
        assert await in_thread(cli, port, "STRLEN", "big") == f"{MiB}\n".encode()
    finally:
        await router.stopService()
