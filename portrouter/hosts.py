"""
HTTP by hostname (SPEC section 10): a request whose ``Host`` is under a base
domain goes to what its first label names (L{portrouter.hostnames}): the
project's HTTP route with the whole path, or an HTTP service port, started
on demand as any backend. The ingress asks this first; behind the TLS front
it answers every request.
"""

from __future__ import annotations

from typing import Any

from portrouter.hostnames import Names, Target, resolve
from portrouter.router import RouterService
from portrouter.web import Channel, Fixed, Request


class HostRouting:
    """The requests for names under the base domains."""

    def __init__(self, router: RouterService, names: Names):
        self.router = router
        self.names = names
        self.stats = router.sessions.stats

    def label(self, request: Request) -> str | None:
        """The first label of the request's host under a base domain; L{None} for other hosts."""
        host = request.header(b"host")
        if host is None:
            return None
        return self.names.label(host.decode("latin-1"))

    def handler(self, channel: Channel, request: Request, label: str) -> Any:
        """Answer a request for C{label}: proxied to what it names, or a 404 naming the host."""
        host = (request.header(b"host") or b"").decode("latin-1")
        target = resolve(label, self.router.table.projects)
        if target is None or not target.http:
            self.stats.hostnames["unknown"] += 1
            why = _why_not(host, target)
            return Fixed(lambda: channel.send(404, why.encode("utf-8", "replace")))
        self.stats.hostnames["host"] += 1
        if not request.path.startswith(b"/"):
            return Fixed(lambda: channel.error(400, "the request target must be a path"))
        return self.router.http.proxy(channel, request, target.project, request.path, None, target.service)


def _why_not(host: str, target: Target | None) -> str:
    if target is None:
        return f"portrouter: no project or port for host {host!r}\n"
    if target.mode:
        return (f"portrouter: host {host!r} is for the TLS front "
                f"({'TLS passthrough' if target.mode == 's' else 'gRPC (h2c)'}), not for HTTP requests\n")
    what = f"service port {target.port} ({target.service.protocol})" if target.service is not None else (
        f"its {target.project.listen.protocol} route" if target.project.listen is not None else "its route")
    return (f"portrouter: host {host!r} names {what} of project {target.project.name!r}, "
            "which is not HTTP: reach it on the TLS front\n")
