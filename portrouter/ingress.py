"""
The default ingress (``tcp:8080``): a ``Host`` under a base domain goes by
hostname (L{portrouter.hosts}); otherwise ``/<name>/...`` goes to project
``<name>`` with the prefix stripped; ``/_api/`` and ``/stream/`` are
portrouter's own.

The project is chosen from the raw first path segment, before any decoding,
so an encoded slash (``%2F``) can never change which project a request goes
to; dot segments in the rest are resolved within the project's prefix.
"""

from __future__ import annotations

from typing import Any, Callable

from portrouter.hosts import HostRouting
from portrouter.http import NAME
from portrouter.router import RouterService
from portrouter.web import Channel, ChannelFactory, Fixed, Request

# What the ingress mounts under paths of its own: the API's handler for a
# request (with the path past /_api/), and the service ports' (/stream/...).
APIHandler = Callable[[Channel, Request, bytes], Any]
StreamHandler = Callable[[Channel, Request], Any]
# /_dashboard/...: the path past it (None for /_dashboard itself).
DashboardHandler = Callable[[Channel, Request, "bytes | None"], Any]

# What the Backend.AI SDK needs from GET /: an API version it can speak
# (v7.20230615 is what 23.09 clients use at most).
VERSION = b'{"version": "v7.20230615", "manager": "portrouter"}\n'


class IngressSite:
    def __init__(self, router: RouterService, api: APIHandler, stream: StreamHandler,
                 hosts: HostRouting | None = None, dashboard: DashboardHandler | None = None):
        self.router = router
        self.dashboard = dashboard
        self.api = api
        self.stream = stream
        self.hosts = hosts
        self.stats = router.sessions.stats
        defaults = router.config.defaults
        self.header_timeout = defaults.header_timeout
        self.max_header_size = defaults.max_header_size

    def handler(self, channel: Channel, request: Request) -> Any:
        hosts = self.hosts
        if hosts is not None:
            label = hosts.label(request)
            if label is not None:
                return hosts.handler(channel, request, label)
        path = request.path
        if not path.startswith(b"/"):
            return Fixed(lambda: channel.error(400, "the request target must be a path"))
        segment, slash, rest = path[1:].partition(b"/")
        if path == b"/":
            # The Backend.AI client asks for the API version before anything else.
            return Fixed(lambda: channel.send(200, VERSION, b"application/json"))
        if path == b"/manager/announcement" and b"manager" not in self._path_routed():
            return Fixed(lambda: channel.send(200, b'{"enabled": false, "message": ""}\n', b"application/json"))
        if segment == b"_api" and slash:
            return self._api(channel, request, rest)
        if segment == b"_dashboard" and self.dashboard is not None:
            return self.dashboard(channel, request, rest if slash else None)
        if segment == b"stream":
            return self.stream(channel, request)
        project = self.router.table.projects.get(segment.decode("latin-1")) if NAME.match(segment) else None
        if project is None or not project.path_routed:
            return Fixed(lambda: channel.send(404, b"portrouter: no such project\n"))
        if not slash:
            location = b"/%s/" % segment + (b"?" + request.query if request.query else b"")
            return Fixed(lambda: channel.send(
                301, b"", headers=[(b"Location", location)]
            ))
        return self.router.http.proxy(channel, request, project, b"/" + rest, b"/" + segment)

    def _path_routed(self) -> set[bytes]:
        return {n.encode() for n, p in self.router.table.projects.items() if p.path_routed}

    def _api(self, channel: Channel, request: Request, rest: bytes) -> Any:
        if rest == b"health":
            return Fixed(lambda: channel.send(200, b'{"status": "ok"}\n', b"application/json"))
        return self.api(channel, request, rest)


def make_ingress(router: RouterService, api: APIHandler, stream: StreamHandler,
                 hosts: HostRouting | None = None, dashboard: DashboardHandler | None = None) -> ChannelFactory:
    return ChannelFactory(IngressSite(router, api, stream, hosts, dashboard), router.reactor)
