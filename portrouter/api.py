"""
``/_api/``: the routing table, deploy and undeploy at run time, reload,
health and metrics.

Every change goes through the router's one lock (SIGHUP's too) and follows
one order: validate (the config file's own validator, so the API and the file
say the same thing for the same mistake), check the table for conflicts, bind
the new ports, and only then switch tables and write the state file. A
change refused at any step leaves routes, listeners and the state file as
they were.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from portrouter.auth import Refused
from portrouter.config import ConfigError, JSONProblem, kind_of, needs_tls, parse_project, quote, read_json
from portrouter.metrics import CONTENT_TYPE, registry_for, render
from portrouter.router import ChangeRefused, Listener, RouterService
from portrouter.hostnames import Names, reaching
from portrouter.table import PortConflict, RoutingTable
from portrouter.web import Buffered, Channel, Fixed, Request

log = Logger(namespace="portrouter.api")

JSON = b"application/json"


class APIError(Exception):
    """An answer of the API's error form: ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or []

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return json.dumps({"error": error}).encode() + b"\n"

    @classmethod
    def refused(cls, refusal: ChangeRefused) -> APIError:
        """The answer to a change the router refused."""
        return cls(_STATUS[refusal.kind], refusal.code, refusal.message, refusal.field)


# Whose fault a refused change is, as an HTTP status.
_STATUS = {"invalid": 400, "conflict": 409, "failed": 500, "unavailable": 503}


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2).encode() + b"\n"


def _bound_port(listener: Listener) -> int | None:
    """Port 0, or a socket inherited from systemd: the port it is bound to (none for UNIX)."""
    return getattr(listener.port.getHost(), "port", None)


def route_rows(router: RouterService) -> list[dict[str, Any]]:
    """The table as the API shows it, with the ports actually bound."""
    rows = []
    ingress_port = _bound_port(router.ingress) if router.ingress is not None else None
    for route in router.table.routes:
        port = route.port
        if route.project is None or route.path is not None:
            port = ingress_port if ingress_port is not None else port
        elif not route.port and route.project in router.listeners:
            port = _bound_port(router.listeners[route.project])
        row: dict[str, Any] = {
            "port": port, "protocol": route.protocol, "project": route.project,
            "backend": route.backend,
        }
        if route.path is not None:
            row["path"] = route.path
        if route.interface is not None:
            row["interface"] = route.interface
        proxy = route.proxy if route.project is not None and route.path is None else router.config.proxy_protocol
        if proxy is not None:
            row["proxy_protocol"] = {"trusted": [str(n) for n in proxy.trusted], "header_timeout": proxy.header_timeout}
        project = router.table.projects.get(route.project) if route.project is not None else None
        if project is not None and project.send_proxy is not None:
            row["send_proxy"] = project.send_proxy
        rows.append(row)
    if router.table.hostnames is not None:
        rows[1:1] = _hostname_rows(router, rows)
    head, rest = rows[:1], rows[1:]
    # By port; on the ingress's port its path routes come first.
    rest.sort(key=lambda r: (r["port"] if isinstance(r["port"], int) else 1 << 17, "path" not in r,
                             r["project"] or "", r.get("service", "")))
    return head + rest


def _hostname_rows(router: RouterService, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Hostnames into the rows of the routes they reach; a row for the TLS
    front and one for each service port that has a hostname.
    """
    hostnames = router.table.hostnames
    assert hostnames is not None
    names = Names(hostnames)
    projects = router.table.projects
    front = _bound_port(router.tls_front) if router.tls_front is not None else None
    ingress_port = rows[0]["port"]
    by_project = {row["project"]: row for row in rows if row["project"] is not None}
    extra: list[dict[str, Any]] = []
    if router.tls_front is not None:
        extra.append({"port": front, "protocol": "sni", "project": None, "backend": "hostname routing (TLS front)"})
    for project in projects.values():
        for label, target in reaching(project, projects):
            if target.service is None:
                row = by_project.get(project.name)
                if row is not None:
                    row.setdefault("hostnames", []).extend(names.hostnames(label))
                continue
            service = target.service
            extra.append({
                "port": front if front is not None or service.protocol != "http" else ingress_port,
                "protocol": service.protocol, "project": project.name, "service": service.name,
                "backend": project.service_endpoint(service), "hostnames": names.hostnames(label),
            })
    return extra


def route_text(rows: list[dict[str, Any]]) -> bytes:
    """The table aligned in columns, as an operator reads it in a terminal."""
    named = any("hostnames" in row for row in rows)
    table = [("Host port", "Protocol", "Project", *(("Hostname",) if named else ()), "Backend")]
    for row in rows:
        backend = row["backend"]
        if "path" in row:
            backend = f"{backend} (path {row['path']})"
        if "send_proxy" in row:
            backend = f"{backend} (send PROXY {row['send_proxy']})"
        if "proxy_protocol" in row:
            backend = f"{backend} (PROXY from {', '.join(row['proxy_protocol']['trusted'])})"
        port = "-" if row["port"] is None else str(row["port"])
        project = row["project"] or "-"
        if "service" in row:
            project = f"{project}/{row['service']}"
        hostnames = (",".join(row.get("hostnames", ())) or "-",) if named else ()
        table.append((port, row["protocol"], project, *hostnames, backend))
    last = len(table[0]) - 1
    widths = [max(len(r[i]) for r in table) for i in range(last)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < last else cell for i, cell in enumerate(r)) for r in table]
    return ("\n".join(lines) + "\n").encode()


class API:
    def __init__(self, router: RouterService, dashboard: Any = None):
        self.router = router
        self.registry = registry_for(router)
        self.dashboard = dashboard  # portrouter.dashboard.Dashboard: its cookie reads, its events stream

    def handler(self, channel: Channel, request: Request, rest: bytes) -> Any:
        try:
            if self.dashboard is None or not self.dashboard.admits(request):
                self.router.credentials.check(request, None, admin=True)
        except Refused as e:
            # A 401 carries its challenge (RFC 9110), as Refused provides it.
            refusal = APIError(e.status, "unauthorized" if e.status == 401 else "forbidden", e.detail,
                               headers=e.headers())
            # At once, without reading (or asking for) a body it will not use.
            return self._error(channel, refusal, early=request.has_body)
        method = request.method
        if method == b"HEAD":
            # What GET would answer, without its body (the channel leaves it
            # out), as every HTTP server must (RFC 9110 9.3.2).
            method = b"GET"
        parts = rest.split(b"/")
        try:
            if parts == [b"routes"] and method == b"GET":
                return self._routes(channel, request)
            if parts == [b"projects"] and method == b"GET":
                projects = [self._shown(p) for p in self.router.table.projects.values()]
                return Fixed(lambda: channel.send(200, _json({"projects": projects}), JSON))
            if len(parts) == 2 and parts[0] == b"projects" and parts[1]:
                name = parts[1].decode("latin-1")
                if method == b"GET":
                    project = self._existing(name)
                    return Fixed(lambda: channel.send(200, _json(self._shown(project)), JSON))
                if method == b"PUT":
                    return Buffered(channel, lambda body: self._later(channel, self.router.serialised(
                        lambda: self._deploy(name, body))))
                if method == b"DELETE":
                    return Fixed(lambda: self._later(channel, self.router.serialised(lambda: self._delete(name))))
                raise APIError(405, "method_not_allowed", f"{request.method.decode()} is not allowed here",
                               headers=[(b"Allow", b"GET, HEAD, PUT, DELETE")])  # RFC 9110: a 405 says what is
            if parts == [b"reload"] and method == b"POST":
                # reload() takes the router's lock itself (SIGHUP comes there too).
                return Fixed(lambda: self._later(channel, defer.Deferred.fromCoroutine(self._reload())))
            if parts == [b"events"] and request.method == b"GET" and self.dashboard is not None:
                return self.dashboard.hub.handler(channel, request)
            if parts == [b"nodes"] and method == b"GET":
                return Fixed(lambda: self._later(channel, defer.Deferred.fromCoroutine(self._nodes())))
            if parts == [b"metrics"] and method == b"GET":
                return Fixed(lambda: channel.send(200, render(self.registry), CONTENT_TYPE))
            raise APIError(404, "not_found", "no such API endpoint")
        except APIError as e:
            return self._error(channel, e)

    @staticmethod
    def _error(channel: Channel, error: APIError, early: bool = False) -> Fixed:
        return Fixed(lambda: channel.send(error.status, error.body(), JSON, error.headers), early)

    def _routes(self, channel: Channel, request: Request) -> Fixed:
        rows = route_rows(self.router)
        fmt = None
        for pair in request.query.split(b"&"):
            if pair.startswith(b"format="):
                fmt = pair[len(b"format="):]
        accept = request.header(b"accept") or b""
        if fmt == b"text" or (fmt is None and b"text/plain" in accept and b"json" not in accept):
            return Fixed(lambda: channel.send(200, route_text(rows), b"text/plain; charset=utf-8"))
        return Fixed(lambda: channel.send(200, _json({"routes": rows}), JSON))

    def _shown(self, project: Any) -> dict[str, Any]:
        shown = dict(project.manifest)
        shown["source"] = "config" if project.static else "api"
        return shown

    def _existing(self, name: str) -> Any:
        project = self.router.table.projects.get(name)
        if project is None:
            raise APIError(404, "not_found", f"no project named {name!r}")
        return project

    def _later(self, channel: Channel, d: defer.Deferred[Any]) -> None:
        """Answer with the result of a change (run under the router's lock)."""

        def answer(result: tuple[int, bytes | None]) -> None:
            status, body = result
            if body is None:
                channel.respond(status, [], length=0)
                channel.finish()
            else:
                channel.send(status, body, JSON)

        def failed(failure: Any) -> None:
            if failure.check(ChangeRefused):
                error = APIError.refused(failure.value)
                channel.send(error.status, error.body(), JSON)
            elif failure.check(APIError):
                channel.send(failure.value.status, failure.value.body(), JSON)
            else:
                log.failure("API change failed", failure)
                error = APIError(500, "internal", "the change failed; nothing was changed")
                channel.send(500, error.body(), JSON)

        d.addCallbacks(answer, failed)

    async def _deploy(self, name: str, body: bytes) -> tuple[int, bytes]:
        router = self.router
        try:
            data = read_json(body)
        except json.JSONDecodeError as e:
            raise APIError(400, "invalid", f"the body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except JSONProblem as e:
            raise APIError(400, "invalid", f"the body {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "invalid", f"the body must be a JSON object (a project manifest), got {kind_of(data)}")
        if "name" not in data:
            data = {"name": name, **data}
        elif data["name"] != name:
            raise APIError(400, "invalid", f"the body names project {quote(data['name'])}, the URL {quote(name)}", "name")
        try:
            project = parse_project(data, router.config.defaults, "", static=False)
            needs_tls(project, router.config.tls, "")
        except ConfigError as e:
            raise APIError(400, "invalid", e.problem, e.field or None) from None
        existing = None

        def compute(current: RoutingTable) -> RoutingTable:
            nonlocal existing
            existing = current.projects.get(name)
            if existing is not None and existing.static:
                raise APIError(409, "static_project",
                               f"project {name!r} is defined in the config file; edit the file and reload")
            try:
                router.store.check(project)  # the other routers' projects too, in a cluster
                return current.with_project(project)
            except PortConflict as e:
                raise APIError(409, "port_conflict", f"port {e.port}/{e.namespace} is "
                               f"{'reserved for' if e.holder.startswith('the ') else 'already bound by'} "
                               f"{e.bound_by}", "listen.port") from None

        await router.change_from(compute)
        log.info("deployed project {project}{how}", project=name, how=" (replaced)" if existing else "")
        return (200 if existing is not None else 201), _json(self._shown(project))

    async def _delete(self, name: str) -> tuple[int, None]:
        router = self.router

        def compute(current: RoutingTable) -> RoutingTable:
            project = self._existing(name)
            if project.static:
                raise APIError(409, "static_project",
                               f"project {name!r} is defined in the config file; edit the file and reload")
            return current.without(name)

        await router.change_from(compute)
        log.info("removed project {project}", project=name)
        return 204, None

    async def _nodes(self) -> tuple[int, bytes]:
        nodes = await self.router.store.nodes()
        if nodes is None:
            raise APIError(404, "no_cluster", "this router is not in a cluster (no cluster section in its config)")
        return 200, _json({"nodes": nodes})

    async def _reload(self) -> tuple[int, bytes]:
        changed = await self.router.reload()
        return 200, _json({"reloaded": True, "changed": changed})
