#!/usr/bin/env python3
"""
Stock Twisted as an HTTP reverse proxy, the baseline of the HTTP section:
C{twisted.web.proxy.ReverseProxyResource} on a C{Site}, set up and logging
(one access line per request, to stdout) as C{twistd -n web} would run it.

It speaks HTTP/1.0 to the backend on a new connection per request, which is
what portrouter's pooled HTTP/1.1 client is measured against.

    python3 bench/stock_http_proxy.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.python import log
from twisted.web import proxy, server

LOOPBACK = "127.0.0.1"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write(__doc__ or "")
        return 2
    port, backend = int(argv[1]), int(argv[2])
    log.startLogging(sys.stdout)
    # Path b"": /x on the proxy is /x on the backend, as with portrouter's own HTTP port.
    site = server.Site(proxy.ReverseProxyResource(LOOPBACK, backend, b""))
    endpoints.serverFromString(reactor, f"tcp:{port}:interface={LOOPBACK}").listen(site)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
