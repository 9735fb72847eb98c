"""
Credential checks (SPEC 3 "Auth", 4): loopback-only without an auth section,
bearer tokens, and Backend.AI keypair signatures checked against what the real
Backend.AI client SDK (backend.ai-client 23.09.10) signs.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.support import backendai_python
from twisted.internet.task import Clock

from portrouter.auth import Credentials, Refused, Verdict
from portrouter.model import Auth, Keypair, Token
from portrouter.web import Request, redact_target

OPS = "ops-token-0123456789"
K1 = "k1-token-abcdefghij"
AUTH = Auth(
    tokens=(
        Token(secret=OPS, admin=True, projects=("*",)),
        Token(secret=K1, admin=False, projects=("k1",)),
    ),
    keypairs=(
        # The keypairs the vectors below were signed with.
        Keypair(access_key="AKIAEXAMPLE", secret_key="SECRETKEYEXAMPLE0123456789", projects=("k1",)),
        Keypair(access_key="AKIAOTHER", secret_key="s3cr3t-example-key", projects=("*",)),
    ),
)
ALL_SECRETS = (OPS, K1, "SECRETKEYEXAMPLE0123456789", "s3cr3t-example-key")


def request(
    target: bytes = b"/stream/session/k1/tcpproxy?app=sshd",
    headers: list[tuple[bytes, bytes]] | None = None,
    client: str = "203.0.113.7",
    method: bytes = b"GET",
) -> Request:
    """A parsed request head, as the channel hands it over."""
    r = Request(client, False, 0.0)
    r.method = method
    r.target = target
    r.path, _, r.query = target.partition(b"?")
    r.headers = list(headers or [])
    return r


def clock_at(iso: str) -> Clock:
    clock = Clock()
    clock.advance(datetime.fromisoformat(iso).timestamp())
    return clock


def refused(credentials: Credentials, r: Request, project: str | None, *, admin: bool = False) -> Refused:
    with pytest.raises(Refused) as info:
        credentials.check(r, project, admin=admin)
    return info.value


# -- no auth section: loopback only -------------------------------------------------


@pytest.mark.parametrize("client", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_without_auth_section_loopback_is_let_in(client: str) -> None:
    verdict = Credentials(None).check(request(client=client), "k1")
    assert verdict == Verdict("loopback", client, admin=True)
    assert Credentials(None).check(request(client=client), None, admin=True).admin


@pytest.mark.parametrize("client", ["203.0.113.7", "10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "unix", ""])
def test_without_auth_section_other_clients_get_403(client: str) -> None:
    # Even with a token: without an auth section there is nothing to check it against.
    r = request(client=client, headers=[(b"Authorization", b"Bearer " + OPS.encode())])
    e = refused(Credentials(None), r, "k1")
    assert e.status == 403
    assert e.problem()["title"] == "Forbidden"


# -- tokens ------------------------------------------------------------------------


def test_bearer_token_lets_in() -> None:
    r = request(headers=[(b"Authorization", b"Bearer " + K1.encode())])
    assert Credentials(AUTH).check(r, "k1") == Verdict("token", "token #2", admin=False)


def test_bearer_scheme_is_case_insensitive() -> None:
    r = request(headers=[(b"authorization", b"bearer  " + K1.encode())])
    assert Credentials(AUTH).check(r, "k1").method == "token"


def test_query_token_for_browsers() -> None:
    r = request(target=b"/stream/session/k1/httpproxy?app=notebook&token=" + K1.encode())
    assert Credentials(AUTH).check(r, "k1").who == "token #2"
    encoded = OPS.replace("-", "%2D").encode()
    r = request(target=b"/stream/session/k1/httpproxy?token=" + encoded + b"&app=notebook")
    assert Credentials(AUTH).check(r, "k1").who == "token #1"


def test_no_credentials_is_401_with_a_challenge() -> None:
    e = refused(Credentials(AUTH), request(client="127.0.0.1"), "k1")
    assert e.status == 401
    assert e.headers() == [(b"WWW-Authenticate", b'Bearer realm="portrouter"')]
    assert e.content_type == b"application/problem+json"
    body = json.loads(e.body())
    assert body["type"] == "https://api.backend.ai/probs/auth-failed"
    assert body["title"] == "Unauthorized access"
    assert body["status"] == 401
    assert body["msg"] == body["detail"]


@pytest.mark.parametrize("header", [b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Token abc"])
def test_unusable_authorization_is_401(header: bytes) -> None:
    e = refused(Credentials(AUTH), request(headers=[(b"Authorization", header)]), "k1")
    assert e.status == 401


def test_wrong_token_is_403() -> None:
    for r in (request(headers=[(b"Authorization", b"Bearer nope")]),
              request(target=b"/stream/session/k1/tcpproxy?app=sshd&token=nope"),
              request(headers=[(b"Authorization", b"Bearer " + K1[:-1].encode())])):
        e = refused(Credentials(AUTH), r, "k1")
        assert e.status == 403
        body = json.loads(e.body())
        assert body["type"] == "https://api.backend.ai/probs/generic-forbidden"
        assert body["title"] == "Forbidden"


def test_token_for_another_project_is_403_and_says_nothing_about_projects() -> None:
    r = request(target=b"/stream/session/k2/tcpproxy?app=sshd",
                headers=[(b"Authorization", b"Bearer " + K1.encode())])
    e = refused(Credentials(AUTH), r, "k2")
    assert e.status == 403
    # The same answer whether or not "nosuch" exists: the auth check cannot tell.
    e2 = refused(Credentials(AUTH), r, "nosuch")
    assert (e.status, e.detail) == (e2.status, e2.detail)
    assert "k2" not in e.detail and "k1" not in e.detail


def test_star_token_opens_every_project() -> None:
    r = request(headers=[(b"Authorization", b"Bearer " + OPS.encode())])
    assert Credentials(AUTH).check(r, "anything").who == "token #1"


def test_admin_calls_need_an_admin_token() -> None:
    credentials = Credentials(AUTH)
    api = b"/_api/routes"
    assert refused(credentials, request(target=api, client="127.0.0.1"), None, admin=True).status == 401
    non_admin = request(target=api, headers=[(b"Authorization", b"Bearer " + K1.encode())])
    assert refused(credentials, non_admin, None, admin=True).status == 403
    admin = request(target=api, headers=[(b"Authorization", b"Bearer " + OPS.encode())])
    assert credentials.check(admin, None, admin=True) == Verdict("token", "token #1", admin=True)


def test_header_wins_over_query_token() -> None:
    r = request(target=b"/stream/session/k1/tcpproxy?app=sshd&token=" + K1.encode(),
                headers=[(b"Authorization", b"Bearer nope")])
    assert refused(Credentials(AUTH), r, "k1").status == 403


def test_auth_section_without_credentials_refuses_everyone() -> None:
    credentials = Credentials(Auth())
    assert refused(credentials, request(client="127.0.0.1"), "k1").status == 401
    r = request(headers=[(b"Authorization", b"Bearer " + K1.encode())])
    assert refused(credentials, r, "k1").status == 403


# -- Backend.AI keypairs: vectors from the real SDK ------------------------------------

# Captured on the wire: the real `backend.ai app k1 sshd -b 127.0.0.1:18932`
# (backend.ai-client 23.09.10, yarl 1.16.0, aiohttp 3.8.6) run with
# BACKEND_ENDPOINT=http://127.0.0.1:18931 BACKEND_ACCESS_KEY=AKIAEXAMPLE
# BACKEND_SECRET_KEY=SECRETKEYEXAMPLE0123456789 against a recording aiohttp
# server, which also verified each signature with the manager's algorithm.
# The headers are exactly what it sent (less Accept/Accept-Encoding/User-Agent).
CLI_APPS = [
    (b"Host", b"127.0.0.1:18931"),
    (b"X-BackendAI-Domain", b"default"),
    (b"X-BackendAI-Version", b"v7.20230615"),
    (b"Date", b"2026-11-21T21:17:04.350767+00:00"),
    (b"Content-Type", b"text/plain"),
    (b"Authorization", b"BackendAI signMethod=HMAC-SHA256, credential=AKIAEXAMPLE:"
                       b"b09d375b821a55f702a1efeb026687fd5340448de099306e0216fc971f9210c0"),
    (b"Content-Length", b"0"),
]
CLI_WS = [  # signed as application/octet-stream, sent without Content-Type
    (b"Host", b"127.0.0.1:18931"),
    (b"X-BackendAI-Domain", b"default"),
    (b"X-BackendAI-Version", b"v7.20230615"),
    (b"Date", b"2026-11-21T21:17:04.549335+00:00"),
    (b"Authorization", b"BackendAI signMethod=HMAC-SHA256, credential=AKIAEXAMPLE:"
                       b"7a190c6f6092565a0b80d7ea23d381f5a0a681c484bec74fb06ef92d75294fdd"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"upgrade"),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Key", b"dY5dBOygOIdKb/aq+kMjaw=="),
]
CLI_TIME = "2026-11-21T21:17:05+00:00"
APPS = b"/stream/session/k1/apps"
WS = b"/stream/session/k1/tcpproxy?app=sshd"


def cli(target: bytes = WS, headers: list[tuple[bytes, bytes]] = CLI_WS, *,
        at: str = CLI_TIME, project: str | None = "k1") -> Verdict:
    return Credentials(AUTH, clock_at(at).seconds).check(request(target, headers), project)


def cli_refused(target: bytes = WS, headers: list[tuple[bytes, bytes]] = CLI_WS, *,
                at: str = CLI_TIME, project: str | None = "k1", admin: bool = False) -> Refused:
    return refused(Credentials(AUTH, clock_at(at).seconds), request(target, headers), project, admin=admin)


def replace(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes | None) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != name.lower()]
    return kept if value is None else [*kept, (name, value)]


def test_real_cli_apps_listing_signed_as_text_plain() -> None:
    assert cli(APPS, CLI_APPS) == Verdict("keypair", "keypair AKIAEXAMPLE", admin=False)


def test_real_cli_websocket_signed_as_octet_stream_without_content_type() -> None:
    assert cli(WS, CLI_WS).who == "keypair AKIAEXAMPLE"


def test_content_type_parameters_and_case_do_not_matter() -> None:
    headers = replace(CLI_APPS, b"Content-Type", b"Text/Plain; charset=utf-8")
    assert cli(APPS, headers).method == "keypair"


def test_content_type_is_part_of_the_signature() -> None:
    # The WebSocket was signed as application/octet-stream: a declared JSON body is not it.
    headers = replace(CLI_WS, b"Content-Type", b"application/json")
    assert cli_refused(WS, headers).status == 403


def test_x_backendai_date_when_there_is_no_date() -> None:
    headers = replace(CLI_WS, b"Date", None) + [(b"X-BackendAI-Date", b"2026-11-21T21:17:04.549335+00:00")]
    assert cli(WS, headers).method == "keypair"


# Produced by the SDK's own signer, run once in the throwaway venv
# (/tmp/bai, backend.ai-client 23.09.10 + yarl 1.16.0):
#   from ai.backend.client.auth import generate_signature
#   generate_signature(method="GET", version="v7.20230615", endpoint=URL(endpoint),
#       date=datetime(2024, 5, 1, 23, 59, 58, 123456, tzinfo=tzutc()), rel_url=rel_url,
#       content_type=content_type, access_key="AKIAEXAMPLE",
#       secret_key="s3cr3t-example-key", hash_type="sha256")
# The access key is not part of the signature, so here the credential names
# AKIAOTHER, the keypair holding that secret. The Host header is what aiohttp
# sends for that endpoint: without a default port, although the SDK signed
# the endpoint's netloc with it ("127.0.0.1:80").
SDK_DATE = "2024-05-01T23:59:58.123456+00:00"
SDK_VECTORS = [
    # (endpoint, Host header aiohttp sends, rel_url, content type signed, header sent, signature)
    ("http://127.0.0.1:8080", b"127.0.0.1:8080", b"/manager/announcement", b"text/plain",
     "60fed73b81ae52206a83464d96168f5c302867c3c730cf346fdce5a8d63f464d"),
    ("http://127.0.0.1:80", b"127.0.0.1", b"/stream/session/k1/apps", b"text/plain",
     "bf499fd77d2d0f83bbfede5fad8843bc0943066a20e94c0b0eeacc210e0f0cf4"),
    ("http://127.0.0.1:8080", b"127.0.0.1:8080",
     b"/stream/session/k1/tcpproxy?app=sshd&arguments=%7B%22a%22:+1%7D", None,
     "d2e759f857974ce5cb90a1aec7bb46ef72851514c7313985965a68bdbead62af"),
    ("https://portrouter.example:443", b"portrouter.example", b"/stream/kernel/k1/tcpproxy?app=jupyter", None,
     "4ff63646cfbad1692d6adeffc73c2745dfc617b8400ac17efb8280e19aa3fac6"),
]


def sdk_headers(host: bytes, content_type: bytes | None, sig: str, date: str = SDK_DATE) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"Host", host),
        (b"X-BackendAI-Version", b"v7.20230615"),
        (b"Date", date.encode()),
        (b"Authorization", b"BackendAI signMethod=HMAC-SHA256, credential=AKIAOTHER:" + sig.encode()),
    ]
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    return headers


@pytest.mark.parametrize("endpoint, host, target, content_type, sig", SDK_VECTORS)
def test_sdk_generate_signature_vectors(endpoint: str, host: bytes, target: bytes,
                                        content_type: bytes | None, sig: str) -> None:
    verdict = cli(target, sdk_headers(host, content_type, sig), at=SDK_DATE, project=None)
    assert verdict.who == "keypair AKIAOTHER"


def sdk_python() -> Path:
    return Path(backendai_python())


SIGN_WITH_SDK = """
import json, sys
from datetime import datetime
from yarl import URL
from ai.backend.client.auth import generate_signature
a = json.loads(sys.argv[1])
headers, _ = generate_signature(
    method=a["method"], version=a["version"], endpoint=URL(a["endpoint"]),
    date=datetime.fromisoformat(a["date"]), rel_url=a["rel_url"], content_type=a["content_type"],
    access_key=a["access_key"], secret_key=a["secret_key"], hash_type="sha256")
print(json.dumps(headers))
"""


@pytest.mark.parametrize("rel_url, content_type, sent", [
    ("/stream/session/k1/apps", "text/plain", b"text/plain"),
    ("/stream/session/k1/tcpproxy?app=sshd", "application/octet-stream", None),
])
def test_live_sdk_signature(rel_url: str, content_type: str, sent: bytes | None) -> None:
    """The installed SDK's generate_signature, run in its own interpreter (no mixed sys.path)."""
    python = sdk_python()
    assert python is not None
    date = "2025-02-03T04:05:06.789012+00:00"
    args = {"method": "GET", "version": "v7.20230615", "endpoint": "http://127.0.0.1:8080",
            "date": date, "rel_url": rel_url, "content_type": content_type,
            "access_key": "AKIAEXAMPLE", "secret_key": "SECRETKEYEXAMPLE0123456789"}
    out = subprocess.run([str(python), "-c", SIGN_WITH_SDK, json.dumps(args)],
                         capture_output=True, check=True, timeout=120, cwd="/")
    authorization = json.loads(out.stdout)["Authorization"].encode()
    headers = [(b"Host", b"127.0.0.1:8080"), (b"X-BackendAI-Version", b"v7.20230615"),
               (b"Date", date.encode()), (b"Authorization", authorization)]
    if sent is not None:
        headers.append((b"Content-Type", sent))
    assert cli(rel_url.encode(), headers, at=date).who == "keypair AKIAEXAMPLE"


# -- Backend.AI keypairs: refusals ----------------------------------------------------


def test_wrong_signature_is_403() -> None:
    auth = dict(CLI_WS)[b"Authorization"]
    flipped = auth[:-1] + (b"0" if auth[-1:] != b"0" else b"1")
    e = cli_refused(WS, replace(CLI_WS, b"Authorization", flipped))
    assert (e.status, e.title) == (403, "Forbidden")


@pytest.mark.parametrize("target, name, value", [
    (b"/stream/session/k1/tcpproxy?app=notebook", None, None),  # another service
    (WS, b"Host", b"127.0.0.1:18999"),  # another host
    (WS, b"X-BackendAI-Version", b"v6.20220615"),
])
def test_signature_covers_path_host_and_version(target: bytes, name: bytes | None, value: bytes | None) -> None:
    headers = CLI_WS if name is None else replace(CLI_WS, name, value)
    assert cli_refused(target, headers).status == 403


def test_date_within_the_window_both_ways() -> None:
    sent = datetime.fromisoformat("2026-11-21T21:17:04.549335+00:00")
    assert cli(at=(sent + timedelta(minutes=14, seconds=59)).isoformat()).method == "keypair"
    assert cli(at=(sent - timedelta(minutes=14, seconds=59)).isoformat()).method == "keypair"


def test_stale_date_is_403() -> None:
    sent = datetime.fromisoformat("2026-11-21T21:17:04.549335+00:00")
    e = cli_refused(at=(sent + timedelta(minutes=16)).isoformat())
    assert e.status == 403
    assert "15 minutes" in e.detail


def test_date_in_the_future_beyond_the_window_is_403() -> None:
    sent = datetime.fromisoformat("2026-11-21T21:17:04.549335+00:00")
    assert cli_refused(at=(sent - timedelta(minutes=16)).isoformat()).status == 403


def test_no_date_is_401() -> None:
    e = cli_refused(WS, replace(CLI_WS, b"Date", None))
    assert e.status == 401


def test_unreadable_date_is_401() -> None:
    assert cli_refused(WS, replace(CLI_WS, b"Date", b"yesterday")).status == 401


def test_no_version_is_401() -> None:
    assert cli_refused(WS, replace(CLI_WS, b"X-BackendAI-Version", None)).status == 401


def test_unknown_access_key_is_403() -> None:
    auth = dict(CLI_WS)[b"Authorization"].replace(b"AKIAEXAMPLE", b"AKIANOBODY")
    e = cli_refused(WS, replace(CLI_WS, b"Authorization", auth))
    assert e.status == 403


@pytest.mark.parametrize("value", [
    b"BackendAI",
    b"BackendAI signMethod=HMAC-SHA256",
    b"BackendAI signMethod=HMAC-SHA256, credential=AKIAEXAMPLE",
    b"BackendAI credential=AKIAEXAMPLE:abc",
    b"BackendAI signMethod=HMAC-MD5, credential=AKIAEXAMPLE:abc",
])
def test_malformed_or_unsupported_signature_header_is_401(value: bytes) -> None:
    assert cli_refused(WS, replace(CLI_WS, b"Authorization", value)).status == 401


def test_keypair_for_another_project_is_403() -> None:
    # AKIAEXAMPLE opens k1 only; the signature is right, the project is not.
    e = cli_refused(WS, CLI_WS, project="k2")
    assert e.status == 403
    assert "k2" not in e.detail


def test_keypair_is_never_admin() -> None:
    assert cli_refused(WS, CLI_WS, project=None, admin=True).status == 403


def test_signed_request_needs_an_auth_section_keypair_not_loopback() -> None:
    # Without an auth section a signed request from elsewhere is still refused.
    r = request(WS, CLI_WS, client="198.51.100.1")
    assert refused(Credentials(None, clock_at(CLI_TIME).seconds), r, "k1").status == 403


# -- secrets stay secret ---------------------------------------------------------------


def test_secrets_never_appear_in_reprs_or_refusals() -> None:
    credentials = Credentials(AUTH)
    texts = [repr(credentials), repr(AUTH), str(AUTH)]
    attempts = [
        request(headers=[(b"Authorization", b"Bearer " + K1.encode())]),
        request(headers=[(b"Authorization", b"Bearer wrong")]),
        request(),
    ]
    for r in attempts:
        for project, admin in (("k2", False), (None, True)):
            try:
                texts.append(repr(credentials.check(r, project, admin=admin)))
            except Refused as e:
                texts += [str(e), repr(e), e.body().decode()]
    for e in (cli_refused(project="k2"), cli_refused(at="2030-01-01T00:00:00+00:00")):
        texts += [str(e), repr(e), e.body().decode()]
    joined = "\n".join(texts)
    for secret in ALL_SECRETS:
        assert secret not in joined


def test_redact_target_hides_query_tokens() -> None:
    assert redact_target(b"/stream/session/k1/httpproxy?app=nb&token=" + K1.encode()) == \
        b"/stream/session/k1/httpproxy?app=nb&token=***"
    assert redact_target(b"/x?token=abc&mytoken=keep&token=def") == b"/x?token=***&mytoken=keep&token=***"
    assert redact_target(b"/x/token=abc") == b"/x/token=abc"
    assert redact_target(b"/x") == b"/x"
