"""
What portrouter's own ports answer with, put together: the ingress (path
and hostname routes, ``/_api/``, ``/stream/``), the TLS front and the manhole. The router binds them
and reconciles the projects' ports; it imports none of this, so the API and
the ingress may import the router and nothing points back up.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from portrouter.api import API, route_rows, route_text
from portrouter.dashboard import Dashboard
from portrouter.events import Hub
from portrouter.hostnames import Names
from portrouter.hosts import HostRouting
from portrouter.ingress import make_ingress
from portrouter.manhole import make_manhole
from portrouter.router import RouterService
from portrouter.stream import StreamEndpoint
from portrouter.tlsfront import TLSFront


class Front:
    """The router's own ports, for one L{RouterService}: pass the class as its C{front}."""

    def __init__(self, router: RouterService):
        self.router = router
        self.hub = Hub(router)
        # A child of the router: stopped with it, so open streams end before it drains.
        # Named as no project can be (names are slugs), beside the listeners named after projects.
        self.hub.setName("_events")  # type: ignore[no-untyped-call]
        self.hub.setServiceParent(router)  # type: ignore[no-untyped-call]
        self.dashboard = Dashboard(router, self.hub)
        self.api = API(router, self.dashboard)
        self.stream = StreamEndpoint(router)
        hostnames = router.config.hostnames
        self.hosts = HostRouting(router, Names(hostnames)) if hostnames is not None else None

    def ingress(self) -> Factory:
        return make_ingress(self.router, self.api.handler, self.stream.handler, self.hosts, self.dashboard.handler)

    def tls_front(self) -> TLSFront | None:
        if self.hosts is None or self.hosts.names.config.listen is None:
            return None
        return TLSFront(self.router, self.hosts)

    def manhole(self) -> Factory | None:
        config = self.router.config
        if config.manhole is None:
            return None
        return make_manhole(self.router, config.manhole.authorized_keys, config.state,
                            lambda: route_text(route_rows(self.router)).decode())
