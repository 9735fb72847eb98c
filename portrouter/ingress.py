"""
The default ingress (``tcp:8080``): the HTTP front door of the router.

For now it answers ``/_api/health`` and 404 for everything else; path
routing, the API and service ports mount here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from portrouter.router import RouterService


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"status": "ok"}\n'


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return _Text(b"no such project\n")


class _Text(Resource):
    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        return self.body


def make_ingress(router: RouterService) -> Site:
    root = _Root()
    api = Resource()
    api.putChild(b"health", _Health())
    root.putChild(b"_api", api)
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
