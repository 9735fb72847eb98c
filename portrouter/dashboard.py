"""
``GET /_dashboard/``: one page (HTML, CSS, JavaScript from package data, no
external URL) that shows the router live from ``GET /_api/events``.

Who may see it is who may call ``/_api/``: a loopback client without an
C{auth} section, an admin credential otherwise. A browser cannot send a
bearer header with a page load or an C{EventSource}, so it brings the token
once as C{?token=}; it is exchanged for a cookie (C{HttpOnly},
C{SameSite=Strict}, scoped to C{/_dashboard/} and C{/_api/}, so no project
behind the ingress ever sees it) and the browser is sent to the same URL
without it. The cookie is not the token: it is an HMAC of the token under a
key made at start-up, so it is worth nothing once portrouter restarts or the
token leaves the config, and it opens only what reading needs (GET and
HEAD), never a change.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode

from portrouter.api import APIError
from portrouter.auth import Refused
from portrouter.events import Hub
from portrouter.router import RouterService
from portrouter.web import Channel, Fixed, Request

COOKIE = "portrouter_dashboard"
# The page's files and their types: nothing else under /_dashboard/ is served.
FILES = {
    "": ("index.html", b"text/html; charset=utf-8"),
    "dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
    "dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "favicon.svg": ("favicon.svg", b"image/svg+xml"),
}
# The browser enforces what the page promises: it loads and connects to
# nothing but the router itself.
SECURITY = [
    (b"Content-Security-Policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"connect-src 'self'; img-src 'self'; base-uri 'none'; "
                                 b"form-action 'none'; frame-ancestors 'none'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
]


def page_file(name: str) -> bytes:
    """One of the page's files, from the installed package's data."""
    return resources.files("portrouter").joinpath("dashboard", name).read_bytes()


class Dashboard:
    def __init__(self, router: RouterService, hub: Hub):
        self.router = router
        self.hub = hub
        self.key = os.urandom(32)  # for this run only: a restart ends every cookie
        self.files: dict[str, bytes] = {}

    # -- who may look -------------------------------------------------------------

    def cookie_for(self, secret: str) -> str:
        return hmac.new(self.key, secret.encode("utf-8"), hashlib.sha256).hexdigest()

    def admits(self, request: Request) -> bool:
        """A GET or HEAD with the cookie of an admin token still in the config."""
        auth = self.router.credentials.auth
        if auth is None or request.method not in (b"GET", b"HEAD"):
            return False
        given = _cookie(request, COOKIE)
        if given is None:
            return False
        found = False
        # Compare with every admin token, so that timing tells nothing about which matched.
        for token in auth.tokens:
            if token.admin and hmac.compare_digest(self.cookie_for(token.secret).encode(), given.encode("latin-1")):
                found = True
        return found

    def _admin_cookie(self, token: str) -> str | None:
        """
        The cookie for C{token} if it is an admin token: the request may have
        been let in by a header or an older cookie, not by this token.
        """
        auth = self.router.credentials.auth
        if auth is None:
            return None
        found = None
        for configured in auth.tokens:
            if hmac.compare_digest(configured.secret.encode("utf-8"), token.encode("utf-8")) and configured.admin:
                found = configured.secret
        return self.cookie_for(found) if found is not None else None

    def check(self, request: Request) -> None:
        """Let C{request} in, or raise L{Refused}: the API's own rule, or the cookie."""
        if not self.admits(request):
            self.router.credentials.check(request, None, admin=True)

    # -- /_dashboard/ ------------------------------------------------------------

    def handler(self, channel: Channel, request: Request, rest: bytes | None) -> Any:
        """C{rest}: the path past C{/_dashboard/}; L{None} for C{/_dashboard} itself."""
        try:
            self.check(request)
        except Refused as e:
            error = APIError(e.status, "unauthorized" if e.status == 401 else "forbidden", e.detail,
                             headers=e.headers())
            return Fixed(lambda: channel.send(error.status, error.body(), b"application/json", error.headers),
                         early=request.has_body)
        if request.method not in (b"GET", b"HEAD"):
            return Fixed(lambda: channel.send(405, b"the dashboard is read-only: GET it\n",
                                              headers=[(b"Allow", b"GET, HEAD")]))
        query = parse_qsl(request.query.decode("latin-1"), keep_blank_values=True)
        token = next((v for k, v in reversed(query) if k == "token"), None)
        if rest is None or token is not None:
            return Fixed(lambda: self._redirect(channel, request, query, token))
        entry = FILES.get(rest.decode("latin-1"))
        if entry is None:
            return Fixed(lambda: channel.send(404, b"portrouter: no such dashboard file\n"))
        name, content_type = entry
        body = self.files.get(name)
        if body is None:
            body = self.files[name] = page_file(name)
        return Fixed(lambda: channel.send(200, body, content_type, SECURITY))

    def _redirect(self, channel: Channel, request: Request, query: list[tuple[str, str]],
                  token: str | None) -> None:
        """To C{/_dashboard/} without the token; a token (checked already) becomes the cookie."""
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        location = b"/_dashboard/" + (b"?" + rest.encode("latin-1") if rest else b"")
        headers = [(b"Location", location), (b"Cache-Control", b"no-store"), (b"Referrer-Policy", b"no-referrer")]
        value = self._admin_cookie(token) if token is not None else None
        if value is not None:
            secure = b"; Secure" if request.secure else b""
            for path in (b"/_dashboard/", b"/_api/"):
                headers.append((b"Set-Cookie", b"%s=%s; Path=%s; HttpOnly; SameSite=Strict%s"
                                % (COOKIE.encode(), value.encode(), path, secure)))
        channel.send(303, b"", headers=headers)


def _cookie(request: Request, name: str) -> str | None:
    """The value of cookie C{name}, from every Cookie header; the last one wins."""
    found = None
    for header in request.header_values(b"cookie"):
        for pair in header.decode("latin-1").split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                found = value
    return found
