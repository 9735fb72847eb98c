"""
The TLS front (SPEC section 10, ``hostnames.listen``): one public port for
every project, chosen by the name in the ClientHello before anyone answers.

A connection is read until its ClientHello is whole (at most
L{portrouter.sni.MAX_HELLO} bytes, within ``header_timeout``), then handed to
what the name reaches, the bytes read going first:

  - ``<project>[-<port>]``: TLS terminated with the store's certificate;
    HTTP routes and HTTP service ports are proxied request by request (by
    ``Host``, L{portrouter.hosts}), tcp and ws routes answer as on their own
    port, TCP service ports are relayed as bytes (dstack's default);
  - suffix ``s``: passthrough, the raw TLS bytes to the backend, which holds
    its own certificate; nothing is terminated;
  - suffix ``g``: TLS terminated with ALPN ``h2`` offered, then the bytes
    relayed to the backend as HTTP/2 cleartext (gRPC).

Names that reach nothing: no SNI, or a name under no base domain, get the
TLS alert ``unrecognized_name``: there is no certificate to answer with that
the client could accept, and an alert tells it so in one packet rather than
after a handshake it would fail anyway. An unknown name under a base domain
is answered with an HTTP 404 naming the host, behind the wildcard
certificate (what a browser can show), except a passthrough name
(``...-<port>s``), whose client expects another certificate: the alert.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from portrouter.certs import TLSFactory, tls_handle
from portrouter.hostnames import Target, resolve
from portrouter.hosts import HostRouting
from portrouter.model import Project
from portrouter.relay import FirstBytes, FirstBytesDeadlines, hand_over
from portrouter.router import RouterService
from portrouter.sni import UNRECOGNIZED_NAME, BadHello, Hello, read_hello
from portrouter.tcp import TCPRoute
from portrouter.web import Channel, ChannelFactory, Fixed, Request

log = Logger(namespace="portrouter.hostnames")

_PASSTHROUGH = re.compile(r"-[0-9]+s\Z")


class HelloReader(FirstBytes):
    """A connection to the TLS front until its ClientHello has been read."""

    what = "ClientHello"
    where = "tls front"

    def __init__(self, front: TLSFront, addr: IAddress):
        super().__init__(front.reading, front.timeout, addr)
        self.front = front

    def examine(self, data: bytes) -> None:
        try:
            hello = read_hello(self.buffer)
        except BadHello as e:
            self.refuse(str(e))
            return
        if hello is not None:
            self.handed()
            self.front.choose(self, hello)

    def refused(self) -> None:
        self.front.stats.hostnames["refused"] += 1


@implementer(IProtocolNegotiationFactory)
class _H2(Factory):
    """A relay to an h2c backend behind TLS that offers ALPN ``h2`` (suffix ``g``)."""

    noisy = False

    def __init__(self, route: TCPRoute):
        self.route = route

    def acceptableProtocols(self) -> list[bytes]:
        return [b"h2"]

    # A listening port always passes the peer's address.
    def buildProtocol(self, addr: IAddress) -> Protocol:  # type: ignore[override]
        return self.route.buildProtocol(addr)


class FrontSite:
    """HTTP behind the front's TLS: by ``Host``, or by the SNI for a request without one."""

    def __init__(self, router: RouterService, hosts: HostRouting):
        self.hosts = hosts
        self.stats = router.sessions.stats
        defaults = router.config.defaults
        self.header_timeout = defaults.header_timeout
        self.max_header_size = defaults.max_header_size

    def handler(self, channel: Channel, request: Request) -> Any:
        label = self.hosts.label(request)
        if label is None and request.header(b"host") is None:
            handle = tls_handle(channel.transport)
            server_name = handle.get_servername() if handle is not None else None
            if server_name:
                label = self.hosts.names.label(server_name.decode("ascii", "replace"))
        if label is None:
            host = (request.header(b"host") or b"").decode("latin-1")
            domains = ", ".join(self.hosts.names.config.domains)
            why = f"portrouter: host {host!r} is not under {domains}: this port answers for their names only\n"
            return Fixed(lambda: channel.send(421, why.encode("utf-8", "replace")))
        return self.hosts.handler(channel, request, label)


class TLSFront(Factory):
    """The listening side of the TLS front."""

    noisy = False

    def __init__(self, router: RouterService, hosts: HostRouting):
        self.router = router
        self.names = hosts.names
        self.stats = router.sessions.stats
        self.timeout = router.config.defaults.header_timeout
        self.http = ChannelFactory(FrontSite(router, hosts), router.reactor)
        self.reading = FirstBytesDeadlines(router.reactor)  # closed at shutdown, as idle channels are
        self.relays: dict[tuple[str, str], tuple[Project, TCPRoute]] = {}

    @property
    def channels(self) -> set[Channel]:
        """The HTTP connections behind the front, for draining."""
        return self.http.channels

    def buildProtocol(self, addr: IAddress) -> HelloReader:  # type: ignore[override]
        return HelloReader(self, addr)

    def choose(self, reader: HelloReader, hello: Hello) -> None:
        name = hello.server_name
        label = self.names.label(name) if name else None
        if label is None:
            why = "no server name (SNI)" if name is None else f"the server name {name!r} is under no base domain"
            reader.refuse(f"{why}; alert unrecognized_name", UNRECOGNIZED_NAME)
            return
        target = resolve(label, self.router.table.projects)
        if self.router.store_tls.store is None and (target is None or target.mode != "s"):
            # Passthrough needs no certificate of ours; the rest does.
            reader.refuse("no certificate store (tls:) since the last reload; alert unrecognized_name",
                          UNRECOGNIZED_NAME)
            return
        if target is None:
            if _PASSTHROUGH.search(label):
                reader.refuse(f"no project or port for {name!r}; alert unrecognized_name", UNRECOGNIZED_NAME)
                return
            self.stats.hostnames["unknown"] += 1
            self._terminate(reader, self.http)  # the site's 404 names the host
            return
        if target.mode == "s":
            self.stats.hostnames["passthrough"] += 1
            hand_over(reader.transport, self._relay(target).inbound(reader.addr, reader.buffer))
        elif target.mode == "g":
            self.stats.hostnames["h2c"] += 1
            self._terminate(reader, _H2(self._relay(target)))
        else:
            self.stats.hostnames["tls"] += 1
            self._terminate(reader, self.http if target.http else self._bytes(target))

    def _terminate(self, reader: HelloReader, inner: Factory) -> None:
        tls = TLSFactory(self.router.store_tls, False, inner).buildProtocol(reader.addr)
        hand_over(reader.transport, tls, reader.buffer)

    def _bytes(self, target: Target) -> Factory:
        """What a terminated tcp or ws route, or TCP service port, is handed to."""
        if target.service is None:
            listener = self.router.listeners.get(target.project.name)
            if listener is not None and listener.route.protocol in ("tcp", "ws"):
                return listener.factory  # type: ignore[no-any-return]  # as on its own port
        return self._relay(target)

    def _relay(self, target: Target) -> TCPRoute:
        """A relay of bytes to what C{target} names, kept while its project is unchanged."""
        key = (target.project.name, target.service.name if target.service is not None else "")
        cached = self.relays.get(key)
        if cached is not None and cached[0] is target.project:
            return cached[1]
        router = self.router
        projects = router.table.projects
        for gone in [k for k, (p, _) in self.relays.items() if projects.get(p.name) is not p]:
            del self.relays[gone]
        if target.service is None:
            route = TCPRoute(router.reactor, target.project, router.sessions, router.commands)
        else:
            route = TCPRoute.to_service(router.reactor, target.project, target.service, router.sessions,
                                        router.commands)
        self.relays[key] = (target.project, route)
        return route

    def close_reading(self) -> None:
        """Shutting down: connections still reading their hello are closed."""
        for reader in list(self.reading):
            reader.refuse("portrouter is stopping", abort=True)

