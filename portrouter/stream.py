"""
Service ports on the ingress: ``/stream/{kernel,session}/<name>/...``, as
Backend.AI's app proxy serves them, and ``udpproxy`` for UDP services. The caller's credentials are checked
before anything else; an accepted upgrade hands the connection to a
L{portrouter.ws.Bridge} to the project's named service.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.endpoints import clientFromString

from portrouter.auth import Refused
from portrouter.router import RouterService
from portrouter.web import Channel, Fixed, Request
from portrouter.ws import Bridge, BridgeFactory, Target
from portrouter.wsudp import DatagramBridgeFactory

_STREAM = re.compile(rb"/stream/(kernel|session)/([a-z0-9][a-z0-9-]{0,62})/(tcpproxy|httpproxy|udpproxy|apps)\Z")


def problem(channel: Channel, status: int, title: str, kind: str) -> Fixed:
    """An error as Backend.AI answers it: ``application/problem+json``."""
    body = json.dumps({"type": f"https://api.backend.ai/probs/{kind}", "title": title}).encode() + b"\n"
    return Fixed(lambda: channel.send(status, body, b"application/problem+json"))


def is_websocket(request: Request) -> bool:
    connection = {t.strip().lower() for t in (request.header(b"connection") or b"").split(b",")}
    return b"upgrade" in connection and (request.header(b"upgrade") or b"").lower() == b"websocket"


def query_value(query: bytes, name: bytes) -> str | None:
    values = parse_qs(query.decode("latin-1")).get(name.decode())
    return values[-1] if values else None


class _Takeover:
    """The handler of an accepted service-port upgrade: gives the connection to a L{Bridge}."""

    def __init__(self, channel: Channel, request: Request, bridge: Bridge):
        self.channel = channel
        self.request = request
        self.bridge = bridge

    def body(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def lost(self) -> None:
        pass

    def take_over(self, leftover: bytes) -> None:
        channel, request = self.channel, self.request
        channel.flush()
        channel.project = self.bridge.target.project
        channel.status = 101
        channel._log()
        bridge = self.bridge
        bridge.makeConnection(channel.transport)  # type: ignore[no-untyped-call]
        channel.tunnel = bridge
        # Autobahn reads the handshake itself, as its own WebSocketResource
        # arranges it: give it the request as it came.
        head = [b"%s %s HTTP/1.1\r\n" % (request.method, request.target)]
        head += [b"%s: %s\r\n" % (n, v) for n, v in request.headers]
        head.append(b"\r\n")
        bridge.dataReceived(b"".join(head) + leftover)
        channel.transport.resumeProducing()


class StreamEndpoint:
    """
    ``/stream/{kernel,session}/<name>/{tcpproxy,httpproxy,apps}`` on the
    ingress. Checks run in this order: credentials (so an anonymous caller
    learns nothing of which projects exist), then project and service, then
    the upgrade; what goes wrong after the upgrade is told by the close code.
    """

    def __init__(self, router: RouterService):
        self.router = router
        self.factory = BridgeFactory(router.reactor, router.sessions)
        self.datagrams = DatagramBridgeFactory(router.reactor, router.sessions)

    def handler(self, channel: Channel, request: Request) -> Any:
        match = _STREAM.match(request.path)
        name = match.group(2).decode() if match else None
        try:
            self.router.credentials.check(request, name)
        except Refused as e:
            # Python unbinds the name of the exception when the except block
            # ends, and Fixed answers later: keep the refusal under another name.
            refused = e
            return Fixed(lambda: channel.send(
                refused.status, refused.body(), refused.content_type, headers=refused.headers()
            ))
        if match is None or name is None:  # (one is None when the other is)
            return problem(channel, 404, "Not found.", "not-found")
        project = self.router.table.projects.get(name)
        if project is None or not project.services:
            return problem(channel, 404, "No such session.", "session-not-found")
        if match.group(3) == b"apps":
            apps = [{"name": s.name, "protocol": s.protocol, "ports": [s.port]} for s in project.services]
            body = json.dumps(apps).encode() + b"\n"
            return Fixed(lambda: channel.send(200, body, b"application/json"))
        app = query_value(request.query, b"app")
        service = project.service(app) if app else None
        if service is None:
            return problem(channel, 404, "No such app service.", "app-not-found")
        udp = match.group(3) == b"udpproxy"
        if udp != (service.protocol == "udp"):
            title = (f"{service.name!r} is a UDP service: use udpproxy." if service.protocol == "udp"
                     else f"{service.name!r} is a {service.protocol.upper()} service: udpproxy is for UDP services.")
            return problem(channel, 400, title, "invalid-api-params")
        if request.method != b"GET" or not is_websocket(request):
            return problem(channel, 400, "Not a WebSocket request.", "invalid-api-params")
        supervisor = self.router.commands.get(project, service)
        peer = channel.transport.getPeer()
        if udp:
            host = project.host or "127.0.0.1"
            target = Target(project.name, service.name, None, service.limits, supervisor, (host, service.port),
                            service.send_proxy)
            return _Takeover(channel, request, self.datagrams.bridge(target, peer))
        endpoint = clientFromString(self.router.reactor, project.service_endpoint(service))
        target = Target(project.name, service.name, endpoint, service.limits, supervisor,
                        send_proxy=service.send_proxy)
        return _Takeover(channel, request, self.factory.bridge(target, peer))
