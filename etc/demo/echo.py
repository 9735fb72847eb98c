"""
The demo's TCP service: answers every line in upper case, so you can see
that it went through. Closes when the client has sent everything.

    python3 etc/demo/echo.py PORT
"""

import socketserver
import sys


class Upper(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    port = int(sys.argv[1])
    with Server(("127.0.0.1", port), Upper) as server:
        print(f"echo: listening on 127.0.0.1:{port}", flush=True)
        server.serve_forever()
