"""
Who may use C{/_api/} and open a project's service ports (SPEC 3 and 4).

Three ways in, decided per request before anything about projects is looked
up, so that an anonymous caller learns nothing about which projects exist:

  - no C{auth} section: loopback clients only;
  - C{Authorization: Bearer <token>}, or C{?token=} for browsers;
  - Backend.AI keypairs, verified exactly as the Backend.AI manager verifies
    what its client SDK (C{backend.ai app}) signs, so that the SDK works
    against portrouter unmodified.

A refusal is a L{Refused} exception carrying the status and an
C{application/problem+json} body shaped like Backend.AI's (C{type},
C{title}), because the SDK's CLI prints those fields. Secrets never appear in
a refusal, a repr or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Iterable
from urllib.parse import parse_qsl

from portrouter.model import Auth, Keypair, Token
from portrouter.web import Request

__all__ = ["Credentials", "Refused", "Verdict", "DATE_WINDOW"]

DATE_WINDOW = timedelta(minutes=15)
"""How far a signed request's date may be from our clock (Backend.AI's rule)."""

UNAUTHORIZED = "https://api.backend.ai/probs/auth-failed"
FORBIDDEN = "https://api.backend.ai/probs/generic-forbidden"

# Backend.AI SDKs since v4.20181215 sign the hash of an empty body, whatever
# the request carries, so that bodies can stream.
_EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

# aiohttp (the manager's server) calls a request without Content-Type this;
# the SDK relies on it: a WebSocket is signed as this with no header sent.
_DEFAULT_CONTENT_TYPE = "application/octet-stream"

# aiohttp leaves a default port out of Host, while the SDK signs the
# endpoint's netloc as configured (http://h:80 signs "h:80", sends "h").
_DEFAULT_PORTS = (":80", ":443")


class Refused(Exception):
    """
    The request may not go on: answer C{status} with L{body} as
    C{application/problem+json} (plus L{headers}), before any upgrade.
    """

    content_type = b"application/problem+json"

    def __init__(self, status: int, title: str, detail: str, type: str | None = None):
        super().__init__(status, title, detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type or (UNAUTHORIZED if status == 401 else FORBIDDEN)

    def __str__(self) -> str:
        return f"{self.status} {self.title}: {self.detail}"

    def problem(self) -> dict[str, object]:
        """RFC 9457 fields, plus C{msg}, which the Backend.AI CLI prints."""
        return {
            "type": self.type, "title": self.title, "status": self.status,
            "detail": self.detail, "msg": self.detail,
        }

    def body(self) -> bytes:
        return json.dumps(self.problem()).encode("utf-8") + b"\n"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """A 401 says which scheme would do (RFC 9110 requires a challenge)."""
        if self.status == 401:
            return [(b"WWW-Authenticate", b'Bearer realm="portrouter"')]
        return []


def _unauthorized(detail: str) -> Refused:
    return Refused(401, "Unauthorized access", detail)


def _forbidden(detail: str) -> Refused:
    return Refused(403, "Forbidden", detail)


@dataclass(frozen=True)
class Verdict:
    """Who was let in, in words fit for a log line (never a secret)."""

    method: str  # "loopback", "token" or "keypair"
    who: str
    admin: bool


def is_loopback(client: str) -> bool:
    """127.0.0.0/8 and ::1, also as an IPv4-mapped address from a dual-stack socket."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False  # "unix" and anything else that is not an IP
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _parse_date(raw: str) -> datetime | None:
    """ISO 8601 (what the SDK sends) or an HTTP date; no zone means UTC."""
    try:
        date = datetime.fromisoformat(raw)
    except ValueError:
        try:
            date = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
    if date.tzinfo is None:
        date = date.replace(tzinfo=timezone.utc)
    return date


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def signature(
    secret_key: str, *, method: str, target: str, raw_date: str, date: datetime,
    host: str, content_type: str, version: str,
) -> str:
    """
    Backend.AI's request signature (HMAC-SHA256), as its manager computes it
    from a request and its SDK from what it is about to send.
    """
    to_sign = (
        f"{method}\n{target}\n{raw_date}\nhost:{host}\ncontent-type:{content_type}\n"
        f"x-backendai-version:{version}\n{_EMPTY_BODY_SHA256}"
    ).encode("utf-8")
    key = hmac.new(secret_key.encode("utf-8"), date.strftime("%Y%m%d").encode(), "sha256").digest()
    key = hmac.new(key, host.encode("utf-8"), "sha256").digest()
    return hmac.new(key, to_sign, "sha256").hexdigest()


def _backendai_params(text: str) -> tuple[str, str, str]:
    """C{signMethod=HMAC-SHA256, credential=AK:SIG} as (sign method, access key, signature)."""
    params: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip()] = value.strip()
    access_key, sep, sig = params.get("credential", "").partition(":")
    if "signMethod" not in params or not sep or not access_key or not sig:
        raise _unauthorized("malformed BackendAI authorization: expected "
                            "'signMethod=HMAC-SHA256, credential=<access key>:<signature>'")
    return params["signMethod"], access_key, sig


class Credentials:
    """
    The C{auth} section, ready to judge requests. C{clock} gives the time in
    seconds since the epoch (C{reactor.seconds}), against which signed dates
    are checked.
    """

    def __init__(self, auth: Auth | None, clock: Callable[[], float] = time.time):
        self.auth = auth
        self.clock = clock
        self._keypairs: dict[str, list[Keypair]] = {}
        for keypair in auth.keypairs if auth is not None else ():
            self._keypairs.setdefault(keypair.access_key, []).append(keypair)

    def __repr__(self) -> str:
        if self.auth is None:
            return "<Credentials: loopback only>"
        return (f"<Credentials: {len(self.auth.tokens)} tokens, "
                f"keypairs {sorted(self._keypairs)}>")

    def check(self, request: Request, project: str | None, *, admin: bool = False) -> Verdict:
        """
        Let C{request} in for C{project} (L{None}: no particular project) and,
        with C{admin}, for the operator API; or raise L{Refused}: 401 when
        credentials are missing or unusable, 403 when they are wrong or do
        not cover what is asked.
        """
        if self.auth is None:
            if is_loopback(request.client):
                return Verdict("loopback", request.client, admin=True)
            raise _forbidden("without an auth section only loopback clients are answered")
        authorization = _text(request.header(b"authorization"))
        if authorization is not None and authorization.strip():
            scheme, _, rest = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                return self._token(rest.strip(), project, admin)
            if scheme.lower() == "backendai":
                return self._keypair(request, rest, project, admin)
            raise _unauthorized(f"unsupported authorization scheme {scheme!r}; "
                                "use Bearer or BackendAI")
        token = self._query_token(request.query)
        if token is not None:
            return self._token(token, project, admin)
        raise _unauthorized("credentials required: Authorization: Bearer <token>, "
                            "?token=<token> or a Backend.AI keypair signature")

    @staticmethod
    def _query_token(query: bytes) -> str | None:
        tokens = [v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                  if k == "token"]
        return tokens[-1] if tokens else None

    def _token(self, given: str, project: str | None, admin: bool) -> Verdict:
        assert self.auth is not None
        if not given:
            raise _unauthorized("empty token")
        given_bytes = given.encode("utf-8")
        found: tuple[int, Token] | None = None
        # Compare with every token, so that timing tells nothing about which matched.
        for index, token in enumerate(self.auth.tokens):
            if hmac.compare_digest(token.secret.encode("utf-8"), given_bytes) and found is None:
                found = (index, token)
        if found is None:
            raise _forbidden("invalid token")
        index, token = found
        who = f"token #{index + 1}"
        self._allow(who, token.projects, project, is_admin=token.admin, admin=admin)
        return Verdict("token", who, admin=token.admin)

    def _keypair(self, request: Request, params: str, project: str | None, admin: bool) -> Verdict:
        sign_method, access_key, given = _backendai_params(params)
        if sign_method.lower() != "hmac-sha256":
            raise _unauthorized(f"unsupported signMethod {sign_method!r}; use HMAC-SHA256")
        raw_date = _text(request.header(b"date")) or _text(request.header(b"x-backendai-date"))
        if not raw_date:
            raise _unauthorized("a signed request needs a Date or X-BackendAI-Date header")
        version = _text(request.header(b"x-backendai-version"))
        if not version:
            raise _unauthorized("a signed request needs an X-BackendAI-Version header")
        date = _parse_date(raw_date)
        if date is None:
            raise _unauthorized(f"unreadable date {raw_date!r}")
        keypairs = self._keypairs.get(access_key)
        if not keypairs:
            raise _forbidden(f"unknown access key {access_key!r}")
        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        if not now - DATE_WINDOW < date < now + DATE_WINDOW:
            raise _forbidden(f"date {raw_date!r} is more than 15 minutes from the server's clock")
        content_type = _text(request.header(b"content-type"))
        content_type = (content_type or "").split(";", 1)[0].strip().lower() or _DEFAULT_CONTENT_TYPE
        host = _text(request.header(b"host")) or ""
        given_bytes = given.encode("latin-1")
        matched: Keypair | None = None
        for keypair in keypairs:
            for candidate in _signed_hosts(host):
                expected = signature(
                    keypair.secret_key, method=request.method.decode("latin-1"),
                    target=request.target.decode("latin-1"), raw_date=raw_date, date=date,
                    host=candidate, content_type=content_type, version=version,
                )
                if hmac.compare_digest(expected.encode("ascii"), given_bytes) and matched is None:
                    matched = keypair
        if matched is None:
            raise _forbidden("signature mismatch")
        who = f"keypair {access_key}"
        self._allow(who, matched.projects, project, is_admin=False, admin=admin)
        return Verdict("keypair", who, admin=False)

    @staticmethod
    def _allow(who: str, projects: Iterable[str], project: str | None, *,
               is_admin: bool, admin: bool) -> None:
        """The same words whether or not the project exists: nothing leaks."""
        if admin and not is_admin:
            raise _forbidden(f"{who} is not an admin credential")
        if project is not None and "*" not in projects and project not in projects:
            raise _forbidden(f"{who} does not open this project")


def _signed_hosts(host: str) -> list[str]:
    """The Host header, and what the SDK signed if aiohttp dropped a default port."""
    if host.endswith("]") or ":" not in host:  # no port (an IPv6 literal ends in "]")
        return [host, *(host + port for port in _DEFAULT_PORTS)]
    return [host]


def sign_request(
    method: str, url: str, access_key: str, secret_key: str, *,
    content_type: str = "application/octet-stream", version: str = "v7.20230615",
    now: datetime | None = None,
) -> dict[str, str]:
    """
    The headers that sign a request as the Backend.AI SDK does (for the
    tunnel client): the same recipe that L{Credentials} checks.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    date = now or datetime.now(timezone.utc)
    raw_date = date.isoformat()
    sig = signature(
        secret_key, method=method.upper(), target=target, raw_date=raw_date, date=date,
        host=parts.netloc, content_type=content_type, version=version,
    )
    return {
        "Date": raw_date,
        "X-BackendAI-Version": version,
        "Authorization": f"BackendAI signMethod=HMAC-SHA256, credential={access_key}:{sig}",
    }
