"""
``/_api/metrics``: Prometheus text, via prometheus-client.

The hot paths only bump plain counters in L{portrouter.sessions.Stats} (a
dict increment per connection or request, nothing per byte); a custom
collector turns them, the live sessions and the UDP routes into metric
families when scraped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from portrouter.proxyproto import ProxyGate
from portrouter.router import RouterService

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class _Collector:
    def __init__(self, router: RouterService):
        self.router = router

    def collect(self) -> Iterator[Any]:
        router = self.router
        stats = router.sessions.stats
        active = GaugeMetricFamily("portrouter_connections_active", "Open relayed connections",
                                   labels=["project", "protocol"])
        live: Counter[tuple[str, str]] = Counter((s.protocol, s.project) for s in router.sessions.live)
        for (protocol, project), n in sorted(live.items()):
            active.add_metric([project, protocol], n)
        yield active

        total = CounterMetricFamily("portrouter_connections", "Relayed connections accepted",
                                    labels=["project", "protocol"])
        for (protocol, project), n in sorted(stats.connections.items()):
            total.add_metric([project, protocol], n)
        yield total

        moved = CounterMetricFamily("portrouter_bytes", "Bytes relayed, counted when a connection ends",
                                    labels=["project", "protocol", "direction"])
        for (protocol, project), n in sorted(stats.bytes_in.items()):
            moved.add_metric([project, protocol, "in"], n)
        for (protocol, project), n in sorted(stats.bytes_out.items()):
            moved.add_metric([project, protocol, "out"], n)
        yield moved

        http = CounterMetricFamily("portrouter_http_requests", "HTTP requests answered",
                                   labels=["project", "code"])
        for (project, code), n in sorted(stats.http.items()):
            http.add_metric([project, code], n)
        yield http

        failures = CounterMetricFamily("portrouter_backend_connect_failures",
                                       "Backend connections that failed", labels=["project", "reason"])
        for (project, reason), n in sorted(stats.connect_failures.items()):
            failures.add_metric([project, reason], n)
        yield failures

        limited = CounterMetricFamily("portrouter_connections_refused_at_limit",
                                      "Connections closed at once by max_connections",
                                      labels=["project", "protocol"])
        for (protocol, project), n in sorted(stats.refused_at_limit.items()):
            limited.add_metric([project, protocol], n)
        yield limited

        hostnames = CounterMetricFamily("portrouter_hostname_routing",
                                        "HTTP requests by Host and TLS front connections by SNI, by outcome: "
                                        "host, tls, passthrough, h2c, unknown, refused", labels=["kind"])
        for kind, n in sorted(stats.hostnames.items()):
            hostnames.add_metric([kind], n)
        yield hostnames

        dropped = CounterMetricFamily("portrouter_service_datagrams_dropped",
                                      "Datagrams a UDP service port dropped (a full buffer either way, "
                                      "or while the service started), counted when its session ends",
                                      labels=["project"])
        for name, n in sorted(stats.datagrams_dropped.items()):
            dropped.add_metric([name], n)
        yield dropped

        udp_sessions = GaugeMetricFamily("portrouter_udp_sessions", "Open UDP sessions", labels=["project"])
        udp_dropped = CounterMetricFamily("portrouter_udp_dropped", "Datagrams from new clients dropped "
                                          "at udp_max_sessions, or with no socket to the backend to be had",
                                          labels=["project"])
        for name, listener in sorted(router.listeners.items()):
            route = listener.factory
            if hasattr(route, "dropped") and hasattr(route, "sessions"):
                udp_sessions.add_metric([name], len(route.sessions))
                udp_dropped.add_metric([name], route.dropped)
        yield udp_sessions
        yield udp_dropped

        refused = CounterMetricFamily("portrouter_proxy_headers_refused",
                                      "Connections closed for their PROXY header (from a trusted address: "
                                      "none, one Twisted's parser refuses, or a slow one), and datagrams "
                                      "dropped for theirs, by listener", labels=["listener"])
        shared: list[tuple[str, Any]] = [("ingress", router.ingress), ("tls front", router.tls_front)]
        for name, listener in [*shared, *sorted(router.listeners.items())]:
            if listener is None:
                continue
            gate = getattr(getattr(listener, "port", None), "factory", None)
            if isinstance(gate, ProxyGate):
                refused.add_metric([name], gate.refused)
            elif hasattr(listener.factory, "proxy_refused"):  # a UDP route's
                refused.add_metric([name], listener.factory.proxy_refused)
        yield refused

        starts = CounterMetricFamily("portrouter_service_starts", "Backends started on demand",
                                     labels=["project", "service"])
        for (project, service), supervisor in sorted(router.commands.supervisors.items(),
                                                      key=lambda kv: (kv[0][0], kv[0][1] or "")):
            starts.add_metric([project, service or ""], supervisor.starts)
        yield starts

        nodes = router.store.seen_nodes()
        if nodes is not None:
            # The cluster's routers as this one last heard of them (section 13).
            version = GaugeMetricFamily("portrouter_cluster_table_version", "The table version a node has applied",
                                        labels=["node"])
            failed = GaugeMetricFamily("portrouter_cluster_failed_changes",
                                       "Projects of the cluster a node could not serve", labels=["node"])
            seen = GaugeMetricFamily("portrouter_cluster_last_seen_seconds", "Seconds since a node's heartbeat",
                                     labels=["node"])
            for node in nodes:
                version.add_metric([node["node"]], node["table_version"])
                failed.add_metric([node["node"]], len(node["failed"]))
                seen.add_metric([node["node"]], node["last_seen"])
            yield version
            yield failed
            yield seen


def registry_for(router: RouterService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(router))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
