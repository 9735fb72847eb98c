"""What portrouter needs from the reactor and from a connection's transport.

Only for the type checker: Twisted's interfaces each cover one facet, and the
code uses several of them on the same object.  Nothing declares these with
``@implementer``; the real reactor and transports (tcp.Connection, TLS) simply
have every member listed.
"""

from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IReactorCore,
    IReactorFDSet,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    ITCPTransport,
)


class IReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUDP, IReactorFDSet,
               IReactorFromThreads, IReactorProcess):
    """The facets of the reactor portrouter uses; tests pass a Clock or a MemoryReactor."""


class IConnection(ITCPTransport, IPushProducer, IConsumer):
    """A stream transport: tcp.Connection, or TLSMemoryBIOProtocol over one."""

    # Both set by Twisted's transports; read to tell a live peer from a closing one.
    connected: bool
    disconnecting: bool
