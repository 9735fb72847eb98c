"""
The TLS section's bulk pair, both ends on the load core.

``serve PORT``: a plain TCP server; each connection gets an endless stream
of bytes (the same 1 MiB block, so the server costs one kernel copy per
send) until the client goes.

``fetch PORT SECONDS [--tls]``: connects to 127.0.0.1:PORT (with ``--tls``
a TLS 1.3 client that does not check the certificate: the bench makes a
throw-away one), reads for a 0.5 s warm-up and then SECONDS, and prints one
JSON line: the bytes and seconds of the measured part. Python is enough on
the client side: the decryption is OpenSSL's (AES-GCM with AES-NI, several
GB/s on one core), and one C{recv_into} per 16 KiB TLS record is a small
part of a core at the rates measured here, so the proxy stays the limit
(the harness reports each core's load to show it).
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time

BLOCK = b"\x5a" * (1 << 20)
WARMUP = 0.5


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)

    def stream(conn: socket.socket) -> None:
        view = memoryview(BLOCK)
        try:
            while True:
                conn.sendall(view)
        except OSError:
            pass  # the client went: that is the end of a measurement
        finally:
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=stream, args=(conn,), daemon=True).start()


def fetch(port: int, seconds: float, tls: bool) -> dict[str, float]:
    sock = socket.create_connection(("127.0.0.1", port))
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        sock = context.wrap_socket(sock, server_hostname="localhost")
    buf = bytearray(1 << 20)
    read = sock.recv_into
    start = time.monotonic()
    warm_until, end = start + WARMUP, start + WARMUP + seconds
    counted = 0
    measuring = False
    t0 = start
    while True:
        n = read(buf)
        if not n:
            raise SystemExit("the proxy closed the stream early")
        now = time.monotonic()
        if measuring:
            counted += n
            if now >= end:
                break
        elif now >= warm_until:
            measuring, t0 = True, now
    elapsed = time.monotonic() - t0
    version = sock.version() if tls else None  # type: ignore[attr-defined]
    sock.close()
    return {"bytes": counted, "seconds": elapsed, "version": version}  # type: ignore[dict-item]


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(int(argv[1]))
        return 0
    if argv[:1] == ["fetch"] and len(argv) in (3, 4):
        result = fetch(int(argv[1]), float(argv[2]), argv[3:] == ["--tls"])
        print(json.dumps(result), flush=True)
        return 0
    print("usage: tls_bulk.py serve PORT | fetch PORT SECONDS [--tls]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
