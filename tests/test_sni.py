"""
The ClientHello reader of the TLS front (SPEC section 10, L{portrouter.sni}):
the first flights of real clients (Python's ssl, ``openssl s_client``) give
their server name, lower-cased, and their ALPN list, whole or split over
records, and need more bytes at every cut; hostile bytes are refused with a
message a user can read; and no input makes it raise anything but
L{BadHello}.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portrouter.sni import MAX_HELLO, MAX_RECORDS, BadHello, Hello, read_hello
from tests.support import LOOPBACK

# -- real first flights ---------------------------------------------------------------------------


def python_hello(server_name: str | None, alpn: list[str] | None = None,
                 minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of Python's ssl client (as tests/test_hostnames.py's client_hello)."""
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_records(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The whole records at the start of C{data} as (header, payload), and what follows them."""
    found = []
    while len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
        end = 5 + int.from_bytes(data[3:5], "big")
        found.append((data[:5], data[5:end]))
        data = data[end:]
    return found, data


def first_message(flight: bytes) -> bytes | None:
    """The first handshake message, with its header, once the whole records of C{flight} hold it."""
    handshake = b"".join(payload for _, payload in split_records(flight)[0])
    if len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        return None
    return handshake[:4 + int.from_bytes(handshake[1:4], "big")]


def openssl_hello(*args: str) -> bytes:
    """
    What ``openssl s_client`` sends first: it connects to a socket of ours
    that records its bytes until its ClientHello is whole, and closes.
    """
    with socket.create_server((LOOPBACK, 0)) as server:
        server.settimeout(30)
        argv = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{server.getsockname()[1]}", *args]
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while first_message(data) is None:
                    chunk = conn.recv(65536)
                    assert chunk, f"openssl closed after {len(data)} bytes"
                    data += chunk
            client.wait(30)  # it gives up when we close
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    return data


def reframe(flight: bytes, *cuts: int) -> bytes:
    """The ClientHello of C{flight} again, in records (TLS 1.0 and 1.2 ones) cut at C{cuts} of its bytes."""
    message = first_message(flight)
    assert message is not None
    bounds = [0, *(cut % len(message) for cut in cuts), len(message)]
    pieces = [message[a:b] for a, b in zip(bounds, bounds[1:])]
    return b"".join(record(piece, version=b"\x03\x01" if i % 2 == 0 else b"\x03\x03") for i, piece in enumerate(pieces))


@dataclass(frozen=True)
class Flight:
    data: bytes
    server_name: str | None
    alpn: tuple[bytes, ...]


H2 = ["h2", "http/1.1"]
CLIENTS: dict[str, Callable[[], Flight]] = {
    "python-tls13-sni-alpn": lambda: Flight(python_hello("K1.Apps.Test", H2), "k1.apps.test", (b"h2", b"http/1.1")),
    "python-no-sni": lambda: Flight(python_hello(None), None, ()),
    "python-tls12-only": lambda: Flight(python_hello("web-8080.apps.test", H2, maximum=ssl.TLSVersion.TLSv1_2),
                                        "web-8080.apps.test", (b"h2", b"http/1.1")),
    "python-tls13-only": lambda: Flight(python_hello("k1-8888s.apps.test", minimum=ssl.TLSVersion.TLSv1_3),
                                        "k1-8888s.apps.test", ()),
    "openssl-sni-h2": lambda: Flight(openssl_hello("-servername", "K1-8888G.Apps.Test", "-alpn", "h2"),
                                     "k1-8888g.apps.test", (b"h2",)),
    "openssl-tls12": lambda: Flight(openssl_hello("-tls1_2", "-servername", "db.apps.test", "-alpn", "h2,http/1.1"),
                                    "db.apps.test", (b"h2", b"http/1.1")),
    "openssl-no-sni": lambda: Flight(openssl_hello("-noservername"), None, ()),
}


@pytest.fixture(scope="module", params=list(CLIENTS))
def flight(request: pytest.FixtureRequest) -> Flight:
    return CLIENTS[request.param]()


def test_a_real_hello_gives_its_name_lower_cased_and_its_alpn(flight: Flight) -> None:
    assert read_hello(flight.data) == Hello(flight.server_name, flight.alpn, len(flight.data))


def test_every_prefix_of_a_real_hello_needs_more(flight: Flight) -> None:
    for n in range(len(flight.data)):
        assert read_hello(flight.data[:n]) is None, n


@pytest.mark.parametrize("cuts", [(1,), (2,), (4,), (5,), (100,), (-1,), (3, 200), (40, 41), (1, 2)])
def test_a_hello_split_over_records_reads_the_same(flight: Flight, cuts: tuple[int, ...]) -> None:
    """Cut inside the handshake header, after it, at the last byte: 2 or 3 records, each prefix needs more."""
    data = reframe(flight.data, *cuts)
    assert len(split_records(data)[0]) == len(cuts) + 1
    assert read_hello(data) == Hello(flight.server_name, flight.alpn, len(data))
    for n in range(len(data)):
        assert read_hello(data[:n]) is None, n


def extensions_of(flight: bytes) -> dict[int, bytes]:
    """The extensions of the ClientHello in C{flight}, read here by hand."""
    body = first_message(flight)
    assert body is not None
    at = 4 + 34
    at += 1 + body[at]  # the session id
    at += 2 + int.from_bytes(body[at:at + 2], "big")  # the cipher suites
    at += 1 + body[at]  # the compression methods
    found, at = {}, at + 2
    while at < len(body):
        kind, size = int.from_bytes(body[at:at + 2], "big"), int.from_bytes(body[at + 2:at + 4], "big")
        found[kind] = body[at + 4:at + 4 + size]
        at += 4 + size
    return found


def test_the_clients_offer_the_versions_they_are_named_for(flight: Flight, request: pytest.FixtureRequest) -> None:
    """So that the tests above read a TLS 1.2 hello (no supported_versions) and a TLS 1.3-only one."""
    versions = extensions_of(flight.data).get(43)  # supported_versions (RFC 8446 4.2.1)
    name = request.node.callspec.id
    if "tls12" in name:
        assert versions is None
    elif "tls13-only" in name:
        assert versions == b"\x02\x03\x04"
    else:
        assert versions is not None and b"\x03\x04" in versions


def test_what_follows_the_hello_is_not_read(flight: Flight) -> None:
    """The client's next record (early data, say) may come with it: the hello is the same."""
    more = flight.data + record(b"\x01\x00", kind=0x14) + record(b"early data", kind=0x17)
    assert read_hello(more) == Hello(flight.server_name, flight.alpn, len(flight.data))


# -- hellos made by hand --------------------------------------------------------------------------


def vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(2, body)


def server_name(*names: bytes, kind: int = 0) -> bytes:
    return extension(0, vector(2, b"".join(bytes([kind]) + vector(2, name) for name in names)))


def alpn(*protocols: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, p) for p in protocols)))


def client_hello(*extensions: bytes, session_id: bytes = b"", suites: bytes = b"\x13\x01",
                 compression: bytes = b"\x00", raw: bytes | None = None) -> bytes:
    """A ClientHello's body: C{raw} as the extensions' bytes if given, else C{extensions} in their vector."""
    body = b"\x03\x03" + bytes(32) + vector(1, session_id) + vector(2, suites) + vector(1, compression)
    if raw is not None:
        return body + raw
    return body + vector(2, b"".join(extensions)) if extensions else body


def message(body: bytes, kind: int = 1) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def record(payload: bytes, kind: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    return bytes([kind]) + version + vector(2, payload)


def hello_record(*extensions: bytes, **fields: bytes) -> bytes:
    return record(message(client_hello(*extensions, **fields)))


@pytest.mark.parametrize("data, name, protocols", [
    (hello_record(server_name(b"k1.apps.test.")), "k1.apps.test", ()),
    (hello_record(server_name(b"K1-8888S.APPS.TEST")), "k1-8888s.apps.test", ()),
    (hello_record(server_name(b"my_host-.apps.test")), "my_host-.apps.test", ()),
    (hello_record(server_name(b"\xff\xff", kind=1), alpn(b"h2")), None, (b"h2",)),
    (hello_record(extension(0, vector(2, b"\x01" + vector(2, b"other") + b"\x00" + vector(2, b"k1.apps.test")))),
     "k1.apps.test", ()),
    (hello_record(extension(0, vector(2, b""))), None, ()),
    (hello_record(), None, ()),  # no extensions at all (SSL 3.0 style)
    (hello_record(raw=b"\x00\x00"), None, ()),  # an empty extensions vector
    (hello_record(extension(0xfafa, b""), alpn(b"h2", b"http/1.1"), extension(21, bytes(300)), server_name(b"x.y")),
     "x.y", (b"h2", b"http/1.1")),
    (hello_record(server_name(b"k1.apps.test"), session_id=bytes(32), suites=bytes(200)), "k1.apps.test", ()),
])
def test_hellos_made_by_hand(data: bytes, name: str | None, protocols: tuple[bytes, ...]) -> None:
    """
    A final dot and upper case go, ``_`` and a label's final ``-`` stay; a
    name type other than host_name (0) is skipped, as OpenSSL does; an empty
    list, no extensions, GREASE and padding are no name.
    """
    assert read_hello(data) == Hello(name, protocols, len(data))


HTTP = b"GET / HTTP/1.1\r\nHost: k1.apps.test\r\n\r\n"
HELLO = message(client_hello(server_name(b"k1.apps.test"), alpn(b"h2")))
LONG_NAME = b".".join([b"a" * 63] * 4)  # 255 characters: each label is one, the whole is not

HOSTILE = {
    "plain HTTP": (HTTP, r"not a TLS handshake: the connection began with b'GET / HTTP/1.1\r\nHost: k1'..."),
    "an SSL 2 hello": (b"\x80\x2e\x01\x00\x02", r"not a TLS handshake: the connection began with b'\x80.\x01\x00\x02'"),
    "an alert first": (record(b"\x02\x28", kind=0x15),
                       r"not a TLS handshake: the connection began with b'\x15\x03\x01\x00\x02\x02('"),
    "application data inside the hello": (
        record(HELLO[:10]) + record(b"GET /", kind=0x17),
        "a record of type 23 inside the ClientHello (only handshake records may carry it)"),
    "a change_cipher_spec inside the hello": (
        record(HELLO[:2]) + record(b"\x01", kind=0x14),
        "a record of type 20 inside the ClientHello (only handshake records may carry it)"),
    "record version 2.0": (b"\x16\x02\x00\x00\x05", "TLS record version 2.0: not TLS 1.x"),
    "record version 4.1": (record(HELLO, version=b"\x04\x01"), "TLS record version 4.1: not TLS 1.x"),
    "a second record of version 2.0": (record(HELLO[:3]) + record(HELLO[3:], version=b"\x02\x00"),
                                       "TLS record version 2.0: not TLS 1.x"),
    "a zero-length record": (b"\x16\x03\x01\x00\x00", "a TLS record of 0 bytes (1 to 16384 may be)"),
    "a zero-length record inside": (record(HELLO[:3]) + b"\x16\x03\x03\x00\x00",
                                    "a TLS record of 0 bytes (1 to 16384 may be)"),
    "a record over 16384": (b"\x16\x03\x01\x40\x01", "a TLS record of 16385 bytes (1 to 16384 may be)"),
    "a record of 65535": (b"\x16\x03\x03\xff\xff", "a TLS record of 65535 bytes (1 to 16384 may be)"),
    "a ServerHello": (record(message(client_hello(), kind=2)),
                      "handshake message type 2 where a ClientHello (1) must come first"),
    "a Finished, its header only": (record(b"\x14\x00\x00\x0c")[:9],
                                    "handshake message type 20 where a ClientHello (1) must come first"),
    "a 64 KiB hello, its header only": (b"\x16\x03\x01\x40\x00\x01\x01\x00\x00",
                                        "a ClientHello of 65536 bytes, longer than the 16384 this port reads"),
    "the largest hello, its header only": (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
                                           "a ClientHello of 16777215 bytes, longer than the 16384 this port reads"),
    "a body cut in the random": (record(message(b"\x03\x03" + bytes(20))),
                                 "a malformed ClientHello: the ClientHello is cut short"),
    "a session id past the end": (record(message(b"\x03\x03" + bytes(32) + b"\x20" + bytes(10))),
                                  "a malformed ClientHello: the session id is cut short"),
    "cipher suites past the end": (record(message(b"\x03\x03" + bytes(32) + b"\x00\x00\x10\x13\x01")),
                                   "a malformed ClientHello: the cipher suites is cut short"),
    "no cipher suites": (hello_record(suites=b""), "a malformed ClientHello: 0 bytes of cipher suites"),
    "an odd cipher suites vector": (hello_record(suites=b"\x13\x01\x13"),
                                    "a malformed ClientHello: 3 bytes of cipher suites"),
    "compression methods past the end": (record(message(b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x05\x00")),
                                         "a malformed ClientHello: the compression methods is cut short"),
    "extensions past the end": (hello_record(raw=b"\x00\x10" + server_name(b"a")[:2]),
                                "a malformed ClientHello: the extensions is cut short"),
    "one byte of extensions left": (hello_record(raw=vector(2, alpn(b"h2") + b"\x00")),
                                    "a malformed ClientHello: the extensions is cut short"),
    "an extension past its vector": (hello_record(raw=vector(2, b"\x00\x10\x00\x08\x00\x06\x02h2")),
                                     "a malformed ClientHello: extension 16 is cut short"),
    "a server name list past its extension": (hello_record(extension(0, b"\x00\x10\x00\x00\x01a")),
                                              "a malformed ClientHello: the server name list is cut short"),
    "a server name past its list": (hello_record(extension(0, vector(2, b"\x00\x00\x20k1.apps.test"))),
                                    "a malformed ClientHello: a server name is cut short"),
    "an empty server_name extension": (hello_record(extension(0, b"")),
                                       "a malformed ClientHello: extension 0 is cut short"),
    "an ALPN list past its extension": (hello_record(extension(16, b"\x00\x05\x02h2")),
                                        "a malformed ClientHello: the ALPN list is cut short"),
    "an ALPN protocol past its list": (hello_record(extension(16, vector(2, b"\x05h2"))),
                                       "a malformed ClientHello: an ALPN protocol is cut short"),
    "two ALPN extensions": (hello_record(alpn(b"h2"), alpn(b"http/1.1")),
                            "extension 16 twice in the ClientHello (RFC 8446 4.2)"),
    "two server_name extensions": (hello_record(server_name(b"a.apps.test"), alpn(b"h2"), server_name(b"b.apps.test")),
                                   "extension 0 twice in the ClientHello (RFC 8446 4.2)"),
    "two padding extensions": (hello_record(extension(21, b""), extension(21, b"")),
                               "extension 21 twice in the ClientHello (RFC 8446 4.2)"),
    "two host names": (hello_record(server_name(b"k1.apps.test", b"evil.apps.test")),
                       "two host names in one server_name extension (RFC 6066 3)"),
    "a non-ASCII name": (hello_record(server_name("ké.apps.test".encode())),
                         r"the server name b'k\xc3\xa9.apps.test' is not a host name"),
    "a Latin-1 name": (hello_record(server_name(b"k\xe9.apps.test")),
                       r"the server name b'k\xe9.apps.test' is not a host name"),
    "an empty name": (hello_record(server_name(b"")), "the server name b'' is not a host name"),
    "a space": (hello_record(server_name(b"k1 .apps.test")), "the server name b'k1 .apps.test' is not a host name"),
    "a NUL": (hello_record(server_name(b"k1.apps.test\x00.evil")),
              r"the server name b'k1.apps.test\x00.evil' is not a host name"),
    "a wildcard": (hello_record(server_name(b"*.apps.test")), "the server name b'*.apps.test' is not a host name"),
    "an empty label": (hello_record(server_name(b"k1..apps.test")),
                       "the server name b'k1..apps.test' is not a host name"),
    "a leading hyphen": (hello_record(server_name(b"-k1.apps.test")),
                         "the server name b'-k1.apps.test' is not a host name"),
    "an IPv6 literal": (hello_record(server_name(b"[::1]")), "the server name b'[::1]' is not a host name"),
    "a label of 64": (hello_record(server_name(b"a" * 64 + b".test")),
                      "the server name b'aaaaaaaaaaaaaaaaaaaaaaaa'... is not a host name"),
    "a name of 255": (hello_record(server_name(LONG_NAME)),
                      "the server name b'aaaaaaaaaaaaaaaaaaaaaaaa'... is not a host name"),
}


@pytest.mark.parametrize("data, why", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_bytes_are_refused_with_a_message(data: bytes, why: str) -> None:
    with pytest.raises(BadHello) as caught:
        read_hello(data)
    assert str(caught.value) == why


def test_a_name_of_253_is_one() -> None:
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
    assert len(name) == 253
    assert read_hello(hello_record(server_name(name))) == Hello(name.decode(), (), len(hello_record(server_name(name))))
    with pytest.raises(BadHello, match=r"^the server name b'aaaa.*'\.\.\. is not a host name$"):
        read_hello(hello_record(server_name(name + b"b")))


def test_a_hello_over_the_limit_is_refused_when_its_header_comes() -> None:
    """Refused at the handshake header, 9 bytes in: the rest is never waited for."""
    data = python_hello("k1.apps.test")
    size = int.from_bytes(data[6:9], "big")
    assert read_hello(data[:8], limit=size - 1) is None
    for n in (9, len(data)):
        with pytest.raises(BadHello) as caught:
            read_hello(data[:n], limit=size - 1)
        assert str(caught.value) == f"a ClientHello of {size} bytes, longer than the {size - 1} this port reads"
    assert read_hello(data, limit=size) == read_hello(data)
    # Split after 2 bytes of the header: refused when the other 2 come.
    split = reframe(data, 2)
    assert read_hello(split[:5 + 2 + 5 + 1], limit=size - 1) is None
    with pytest.raises(BadHello):
        read_hello(split[:5 + 2 + 5 + 2], limit=size - 1)


def padded(size: int) -> bytes:
    """A ClientHello message of C{size} bytes with its header, a real one padded with an unknown extension."""
    body = first_message(python_hello("k1.apps.test"))[4:]  # type: ignore[index]
    at = 34 + 1 + body[34]
    at += 2 + int.from_bytes(body[at:at + 2], "big")
    at += 1 + body[at]
    extensions = body[at + 2:]
    pad = size - 4 - at - 2 - len(extensions) - 4
    body = body[:at] + vector(2, extensions + extension(0x1234, bytes(pad)))
    return message(body)


def test_the_largest_hello_in_the_largest_records() -> None:
    hello = padded(4 + MAX_HELLO)
    data = record(hello[:16384]) + record(hello[16384:])
    assert read_hello(data) == Hello("k1.apps.test", (), len(data))
    assert read_hello(data[:-1]) is None
    with pytest.raises(BadHello, match="a ClientHello of 16385 bytes, longer than the 16384"):
        read_hello(record(padded(4 + MAX_HELLO + 1)[:16384]))


def test_a_hello_in_many_records_is_refused_once_past_the_cap() -> None:
    """
    The front reads its buffer again whenever bytes come (HelloReader), so
    a hello cut into thousands of tiny records (one per segment) would cost
    the one reactor thread the square of their number. Real clients send
    one record, or a few: past MAX_RECORDS the hello is refused, as soon as
    the record past the cap has its header, whatever follows.
    """
    hello = padded(4 + MAX_HELLO)
    data = b"".join(record(hello[i:i + 1]) for i in range(len(hello)))
    for n in range(1, MAX_RECORDS + 1):
        assert read_hello(data[:6 * n]) is None  # each record whole: more is needed
    with pytest.raises(BadHello) as caught:
        read_hello(data[:6 * MAX_RECORDS + 5])
    assert str(caught.value) == f"a ClientHello split over more than {MAX_RECORDS} records"
    # A hello in MAX_RECORDS records is still read.
    cut = len(hello) // MAX_RECORDS + 1
    pieces = b"".join(record(hello[i:i + cut]) for i in range(0, len(hello), cut))
    found = read_hello(pieces)
    assert found is not None and found.server_name == "k1.apps.test"


# -- anything at all ------------------------------------------------------------------------------


def outcome(data: bytes) -> Hello | str | None:
    """What the front learns from C{data}: a hello, None (more is needed), or the refusal's message."""
    try:
        return read_hello(data)
    except BadHello as e:
        return f"refused: {e}"


REAL = [
    python_hello("k1.apps.test", H2),
    python_hello(None, maximum=ssl.TLSVersion.TLSv1_2),
    reframe(python_hello("K1-8888s.apps.test", ["h2"]), 3, 300),
    hello_record(server_name(b"\xff", kind=7), alpn(b"a", b"b"), extension(21, bytes(20))),
]


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A real hello with bytes changed, inserted or removed, and maybe cut short or run on."""
    data = bytearray(draw(st.sampled_from(REAL)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["set", "flip", "insert", "delete"]))
        if how == "set":
            data[at] = draw(st.integers(0, 255))
        elif how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[at]
    data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    return bytes(data) + draw(st.binary(max_size=8))


ANY = st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: b"\x16\x03\x01" + b), mangled())


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(ANY)
def test_anything_is_a_hello_more_needed_or_refused(data: bytes) -> None:
    found = outcome(data)  # BadHello is the only exception let through
    assert found is None or isinstance(found, (Hello, str))


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(ANY, st.data())
def test_more_bytes_never_change_a_verdict(data: bytes, draw: st.DataObject) -> None:
    """
    The front asks again as bytes come: a prefix needs more, or gets the
    whole input's answer (the same hello, the same refusal; only the quote
    of the first bytes may be shorter).
    """
    def verdict(data: bytes) -> Hello | str | None:
        found = outcome(data)
        return found.split(" began with ")[0] if isinstance(found, str) else found

    cut = draw.draw(st.integers(0, len(data)), label="cut")
    assert verdict(data[:cut]) in (None, verdict(data))


def host_names() -> st.SearchStrategy[bytes]:
    label = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
    return st.tuples(st.lists(label, min_size=1, max_size=4), st.booleans()).map(
        lambda t: (".".join(t[0]) + ("." if t[1] else "")).encode())


@st.composite
def made_hellos(draw: st.DrawFn) -> tuple[bytes, str | None, tuple[bytes, ...]]:
    """A well-formed hello in some records, and the name and protocols it asks for."""
    name = draw(st.none() | host_names())
    protocols = tuple(draw(st.lists(st.binary(min_size=1, max_size=10), max_size=4)))
    kinds = draw(st.lists(st.integers(1, 65535).filter(lambda k: k != 16), max_size=4, unique=True))
    extensions = [extension(kind, draw(st.binary(max_size=40))) for kind in kinds]
    if name is not None:
        extensions.append(server_name(name))
    if protocols:
        extensions.append(alpn(*protocols))
    order = draw(st.permutations(extensions))
    hello = message(client_hello(*order, session_id=draw(st.binary(max_size=32)),
                                 suites=draw(st.binary(min_size=1, max_size=20).map(lambda b: b * 2))))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(hello) - 1), max_size=3))))
    bounds = [0, *cuts, len(hello)]
    data = b"".join(record(hello[a:b]) for a, b in zip(bounds, bounds[1:]))
    want = None if name is None else name.decode().lower().rstrip(".")
    return data, want, protocols


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(made_hellos())
def test_a_well_formed_hello_gives_its_name_and_protocols(made: tuple[bytes, str | None, tuple[bytes, ...]]) -> None:
    data, name, protocols = made
    assert read_hello(data) == Hello(name, protocols, len(data))
    assert read_hello(data[:-1]) is None
