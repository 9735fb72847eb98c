"""
The model: what a configuration says, as frozen, validated values.

Parsed by L{portrouter.config} (file, CLI, API manifests) and read by
everything else. It imports nothing from portrouter, so every other module
may import it without a circle.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_INGRESS = "tcp:8080"
DEFAULT_STATE = "./portrouter-state"


@dataclass(frozen=True)
class Limits:
    """Timeouts and bounds; global ``defaults`` overridden per project or service."""

    connect_timeout: float = 10.0
    idle_timeout: float | None = None
    udp_timeout: float = 60.0
    udp_max_sessions: int = 10000
    # How long the reactor keeps polling instead of sleeping after a UDP
    # datagram, when datagrams have been following each other that closely:
    # waking a sleeping CPU costs tens of microseconds on a virtual machine.
    udp_busy_poll: float = 0.0001
    max_connections: int | None = None
    start_timeout: float = 30.0
    # HTTP: the backend's response head (504 past it), the client's request
    # head (408, against slowloris), and the largest request head (431).
    response_timeout: float = 60.0
    header_timeout: float = 30.0
    max_header_size: int = 65536


@dataclass(frozen=True)
class ProxyProtocol:
    """
    Receiving the PROXY protocol (section 12): connections from C{trusted}
    networks must start with a v1 or v2 header, within C{header_timeout}.
    """

    trusted: tuple[Any, ...]  # ipaddress.IPv4Network / IPv6Network
    header_timeout: float

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # a UNIX socket's peer: no address to trust
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 peer on a dual-stack listener
        return any(address in network for network in self.trusted)


@dataclass(frozen=True)
class Listen:
    """
    Where a project is bound of its own.

    @ivar endpoint: the strports description that is bound (for UDP,
        ``udp:PORT[:interface=ADDR]``, parsed by portrouter itself).
    @ivar port: the port number, or L{None} for a UNIX socket or an inherited
        descriptor; 0 (CLI only) lets the OS pick.
    """

    protocol: str
    port: int | None
    interface: str | None
    endpoint: str
    tls: bool = False  # terminated with the certificate store (section 9)
    proxy_protocol: ProxyProtocol | None = None

    @property
    def namespace(self) -> str:
        return "udp" if self.protocol == "udp" else "tcp"


@dataclass(frozen=True)
class Command:
    """A backend that portrouter starts on demand (SPEC section 5)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    idle_stop: float | None = None


@dataclass(frozen=True)
class Service:
    """A service port: a named TCP, HTTP or UDP service inside a project, reached by tunnel."""

    name: str
    protocol: str
    port: int
    command: Command | None
    limits: Limits
    send_proxy: str | None = None  # "v1" or "v2": a PROXY header to the service (section 12)


@dataclass(frozen=True)
class Project:
    """
    A deployed project, validated.

    @ivar manifest: the manifest as given (file or API), shown back as is.
    @ivar static: defined in the config file or on the CLI, not through the API.
    """

    name: str
    backend: str | None
    listen: Listen | None
    host: str | None
    services: tuple[Service, ...]
    command: Command | None
    limits: Limits
    runtime: str | None = None
    entry: str | None = None
    manifest: Mapping[str, Any] = field(default_factory=dict, compare=False)
    static: bool = True
    preserve_host: bool = True
    send_proxy: str | None = None  # "v1" or "v2": a PROXY header to the backend (section 12)
    access_log: float = 1.0  # the share of its request and connection lines written (1: all, 0: none)

    @property
    def path_routed(self) -> bool:
        return self.listen is None and self.backend is not None

    def service_endpoint(self, service: Service) -> str:
        """
        The client endpoint of one of its service ports, on the project's
        host; ``udp:HOST:PORT`` for a UDP service (not a strport: Twisted
        has none for UDP clients).
        """
        host = (self.host or "127.0.0.1").replace(":", "\\:")  # an IPv6 address, escaped for strports
        return f"{'udp' if service.protocol == 'udp' else 'tcp'}:{host}:{service.port}"

    def service(self, name: str) -> Service | None:
        for service in self.services:
            if service.name == name:
                return service
        return None


@dataclass(frozen=True)
class Token:
    secret: str = field(repr=False)
    admin: bool
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Keypair:
    access_key: str
    secret_key: str = field(repr=False)
    projects: tuple[str, ...]


@dataclass(frozen=True)
class Auth:
    tokens: tuple[Token, ...] = ()
    keypairs: tuple[Keypair, ...] = ()


@dataclass(frozen=True)
class Manhole:
    listen: str
    authorized_keys: str


@dataclass(frozen=True)
class TLS:
    """The certificate store (section 9), read when the file is."""

    certificates: str
    default: str | None
    store: Any = field(compare=False, repr=False)  # portrouter.certs.CertificateStore


@dataclass(frozen=True)
class Hostnames:
    """
    Hostname routing (section 10): ``<project>[-<port>][s|g].<domain>`` for
    each base domain, on the ingress by ``Host`` and on the TLS front
    (C{listen}, if any) by SNI.
    """

    domains: tuple[str, ...]
    listen: str | None = None


@dataclass(frozen=True)
class Cluster:
    """
    Several routers, one table (section 13): API-deployed projects kept in
    the Redis at C{redis} (a Twisted client endpoint), under C{prefix}; this
    router heartbeats as C{node}.
    """

    redis: str
    prefix: str = "portrouter"
    node: str = ""


@dataclass(frozen=True)
class Config:
    """Everything portrouter is told at start-up, file and CLI together."""

    source: str | None = None
    ingress: str = DEFAULT_INGRESS
    state: str = DEFAULT_STATE
    drain_timeout: float = 30.0
    defaults: Limits = Limits()
    auth: Auth | None = None
    manhole: Manhole | None = None
    projects: tuple[Project, ...] = ()
    tls: TLS | None = None
    hostnames: Hostnames | None = None
    proxy_protocol: ProxyProtocol | None = None  # for the ingress and the TLS front
    cluster: Cluster | None = None
    reuse_port: bool = False  # SO_REUSEPORT on every listener: several routers per host on one port
