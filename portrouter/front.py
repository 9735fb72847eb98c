"""
What portrouter's own ports answer with, put together: the ingress (path
routes, ``/_api/``, ``/stream/``) and the manhole. The router binds them
and reconciles the projects' ports; it imports none of this, so the API and
the ingress may import the router and nothing points back up.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory

from portrouter.api import API
from portrouter.ingress import make_ingress
from portrouter.manhole import make_manhole
from portrouter.router import RouterService
from portrouter.stream import StreamEndpoint


class Front:
    """The router's own ports, for one L{RouterService}: pass the class as its C{front}."""

    def __init__(self, router: RouterService):
        self.router = router
        self.api = API(router)
        self.stream = StreamEndpoint(router)

    def ingress(self) -> Factory:
        return make_ingress(self.router, self.api.handler, self.stream.handler)

    def manhole(self) -> Factory | None:
        config = self.router.config
        if config.manhole is None:
            return None
        return make_manhole(self.router, config.manhole.authorized_keys, config.state)
