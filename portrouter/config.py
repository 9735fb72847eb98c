"""
The configuration: ``routes.yaml``, CLI routes and API manifests, parsed into
frozen, validated objects.

Every problem is a L{ConfigError} whose message can be shown to an operator as
is: the file, the field path (0-based, ``projects[2].listen.port``) and what is
wrong. Strports and client endpoint strings are checked by Twisted's own
parsers, so what validates here is what binds and connects later.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import reprlib
import socket
from dataclasses import fields, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, overload

import yaml
from twisted.internet.endpoints import clientFromString, serverFromString

from portrouter.certs import CertificateError, CertificateStore
from portrouter.model import (
    TLS,
    Auth,
    Cluster,
    Command,
    Hostnames,
    ProxyProtocol,
    Config,
    Keypair,
    Limits,
    Listen,
    Manhole,
    Project,
    Service,
    Token,
)
from portrouter.table import PortConflict, RoutingTable

PROTOCOLS = ("http", "tcp", "udp", "ws")
SERVICE_PROTOCOLS = ("http", "tcp", "udp")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")


class ConfigError(Exception):
    """
    A configuration problem, printable as is.

    @ivar field: the dotted field path (``projects[2].listen.port``), or ``""``
        for the document as a whole.
    @ivar problem: what is wrong, without the field path.
    @ivar source: the file name, or L{None} for an API body or the CLI.
    """

    def __init__(self, field: str, problem: str, source: str | None = None):
        self.field = field
        self.problem = problem
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.field) if p]
        return ": ".join(parts + [self.problem])

    def within(self, source: str) -> ConfigError:
        return ConfigError(self.field, self.problem, source)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _PLAIN_KEY.match(key):
        # A key is the user's text too: quoted (and short), never a raw
        # newline or a megabyte in the field path.
        return f"{path}[{_show(key)}]"
    return f"{path}.{key}" if path else key


# The longest string any field takes: names, endpoints, paths and tokens are
# far shorter, and a longer one would only be shown back, logged and stored.
MAX_STRING = 4096
# A command's arguments and environment values: Linux's MAX_ARG_STRLEN, past
# which exec refuses them anyway. They may hold tabs and newlines (scripts).
MAX_ARG = 131072
# JSON (API bodies, the state file) nested deeper than any manifest is.
MAX_DEPTH = 32


class BigNumber:
    """
    An integer too long for Python to read (over 4300 digits, CVE-2020-10735):
    kept as text so that the field it was given for can refuse it by name.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return _long_digits(self.digits)


def _long_digits(digits: str) -> str:
    return f"{digits[:12]}...{digits[-3:]} ({len(digits.lstrip('+-'))} digits)"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, BigNumber)):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date"  # YAML reads 2001-12-14 as one
    if isinstance(value, bytes):
        return "binary data"
    return type(value).__name__


_SHORT = reprlib.Repr()
_SHORT.maxstring = 80
_SHORT.maxother = 80
_SHORT.maxlevel = 2


def _show(value: object) -> str:
    """
    A value as it is written in YAML (C{true}, C{null}, C{.inf}), not in
    Python, and short: a megabyte string or a 5000-digit number is quoted by
    its ends, so that an error message stays one readable line.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, int):
        if value.bit_length() > 14000:  # too long for str() (4300 digits)
            return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
        digits = str(value)
        return digits if len(digits) <= 40 else _long_digits(digits)
    return _SHORT.repr(value)


def quote(value: object) -> str:
    """L{_show} for the API's own messages: the same short quoting."""
    return _show(value)


def kind_of(value: object) -> str:
    """What sort of value it is, as error messages name it (C{a list}, C{null})."""
    return _kind(value)


def _got(value: object) -> str:
    """What was given instead: a scalar quoted, a list or mapping by its kind."""
    if value is None or isinstance(value, (str, int, float, BigNumber)):
        return _show(value)
    return _kind(value)


def _expect_mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {_got(value)}")
    return value


def _expect_list(value: object, path: str) -> Sequence[Any]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {_got(value)}")
    return value


# Control characters: none in one-line fields (they would forge log lines and
# never name a host, a file or a token); tabs and newlines in a command.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_ARG = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _check_text(text: str, path: str, limit: int, control: re.Pattern[str], *, quoted: bool = True) -> str:
    """Length, control characters, encodability; C{quoted=False} for a secret, never shown."""
    what = f"{_show(text)} " if quoted else ""
    if len(text) > limit:
        raise ConfigError(path, f"{what}is longer than {limit} characters")
    bad = control.search(text)
    if bad:
        raise ConfigError(path, f"{what}contains a control character (0x{ord(bad.group()):02x})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(path, f"{what}is not valid Unicode (a lone surrogate)") from None
    return text


def _expect_str(value: object, path: str, *, arg: bool = False) -> str:
    """A one-line string; with C{arg}, a command's argument (longer, may hold tabs and newlines)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_got(value)}")
    if not value:
        raise ConfigError(path, "must not be empty")
    if arg:
        return _check_text(value, path, MAX_ARG, _CONTROL_IN_ARG)
    return _check_text(value, path, MAX_STRING, _CONTROL)


def _expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_got(value)}")
    return value


# --- JSON, as strict as the YAML file ---------------------------------------------


class JSONProblem(ValueError):
    """A JSON text a manifest may not be; the message completes "the body ..."."""


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str) -> None:
    opening = text.count("[") + text.count("{")
    if opening <= MAX_DEPTH:
        return  # every manifest: no need to look closer
    depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_DEPTH:
            raise JSONProblem(f"nests deeper than {MAX_DEPTH} levels")


def _abbrev(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _no_constant(name: str) -> Any:
    raise JSONProblem(f"holds {name}, which is not a finite number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise JSONProblem(f"holds {_abbrev(text)}, which is not a finite number")
    return number


def _any_int(text: str) -> int | BigNumber:
    try:
        return int(text)
    except ValueError:
        return BigNumber(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONProblem(f"holds the key {_show(key)} twice in one object")
            seen.add(key)
    return data


def read_json(data: bytes) -> Any:
    """
    Parse a JSON document as a manifest's source (an API body, the state
    file): UTF-8 only, finite numbers only (Python's json reads C{NaN},
    C{Infinity} and C{1e999}, which no other JSON reader takes back), no key
    twice in one object, at most L{MAX_DEPTH} levels.

    @raise json.JSONDecodeError: not JSON at all.
    @raise JSONProblem: JSON that is refused; the message says why.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONProblem(f"is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    _check_depth(text)
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          parse_int=_any_int, object_pairs_hook=_unique_keys)
    except RecursionError:  # _check_depth should have refused it first
        raise JSONProblem(f"nests deeper than {MAX_DEPTH} levels") from None


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    allowed = list(allowed)
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, allowed, n=1)
                if close:
                    hint = f" (did you mean '{close[0]}'?)"
            raise ConfigError(_join(path, str(key)), f"unknown key{hint}")


def _port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(path, f"{_show(value)} is not a port (1-65535)")
    return value


def _finite(value: object, path: str, what: str) -> float:
    """An int or float given for C{what}, as a finite float; anything else refused, quoted."""
    if isinstance(value, BigNumber):
        raise ConfigError(path, f"{_show(value)} is too large")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected {what}, got {_got(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(path, f"{_show(value)} is too large") from None
    if not math.isfinite(number):
        raise ConfigError(path, f"{_show(value)} is not a finite number of seconds")
    return number


@overload
def _number(value: object, path: str, *, optional: Literal[False] = False) -> float: ...
@overload
def _number(value: object, path: str, *, optional: bool) -> float | None: ...
def _number(value: object, path: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    number = _finite(value, path, "a number of seconds or null" if optional else "a number of seconds")
    if not number > 0:
        raise ConfigError(path, f"{_show(value)} must be greater than 0")
    return number


# More than this would spend a core waiting rather than shorten a round trip.
MAX_BUSY_POLL = 0.01


def _busy_poll(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number of seconds (0 to turn polling off), got {_got(value)}")
    if not 0 <= value <= MAX_BUSY_POLL:  # NaN too: every comparison with it is false
        raise ConfigError(path, f"{_show(value)} must be from 0 to {MAX_BUSY_POLL:g} seconds")
    return float(value)


def _count(value: object, path: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        what = "a whole number or null" if optional else "a whole number"
        raise ConfigError(path, f"expected {what}, got {_got(value)}")
    if value < 1:
        raise ConfigError(path, f"{_show(value)} must be at least 1")
    return value


def _interface(value: object, path: str) -> str:
    text = _expect_str(value, path)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(path, f"{_show(text)} is not an IP address") from None
    return text


# RFC 1123 labels; '_' too, as container runtimes name hosts (``app_web_1``).
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


def _host(value: object, path: str, shown: str | None = None) -> str:
    """
    A hostname or an IP address (v4 or v6, without brackets), nothing else:
    it is put into an endpoint string, where a ``:`` would start options.
    """
    text = _expect_str(value, path)
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if len(text) > 253 or not all(_LABEL.match(label) for label in labels):
        prefix = f"{shown}: " if shown else ""
        raise ConfigError(path, f"{prefix}{_show(text)} is not a hostname or an IP address")
    return text


def _endpoint_problem(exc: Exception) -> str:
    # Twisted's parsers speak Python (``__init__() missing 1 required
    # positional argument: 'port'``); keep the part an operator can act on.
    text = str(exc) or str(getattr(exc, "originalException", "")) or type(exc).__name__
    missing = re.search(r"missing \d+ required positional arguments?: (.*)", text)
    if missing:
        return "missing " + missing.group(1).replace("'", "")
    number = re.search(r"invalid literal for int\(\) with base 10: (.*)", text)
    if number:
        return f"{number.group(1)} is not a number"
    option = re.search(r"got an unexpected keyword argument (.*)", text)
    if option:
        return f"unknown option {option.group(1)}"
    return text


def _checked_port(endpoint: object, desc: str, path: str, *, allow_zero: bool) -> None:
    port = getattr(endpoint, "_port", None)
    low = 0 if allow_zero else 1
    if isinstance(port, int) and not low <= port <= 65535:
        raise ConfigError(path, f"{_show(desc)}: {_show(port)} is not a port ({low}-65535)")


def _check_inherited(desc: str, path: str) -> None:
    """
    A ``systemd:`` strport names a socket systemd passed down; Twisted looks
    it up as it parses, and says only "list index out of range" (or the
    name) when there is none.
    """
    from twisted.internet import reactor

    if not desc.startswith("systemd:"):
        return
    try:
        serverFromString(reactor, desc)
    except (IndexError, KeyError):
        raise ConfigError(path, f"{desc!r} is not a listening endpoint: no such socket was inherited from "
                          "systemd (LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID describe those it passes down)") from None
    except Exception:
        pass  # any other problem is worded by the general check


def check_server_strport(value: object, path: str, *, allow_zero: bool = False) -> str:
    """Check a listening strports description (``tcp:8080``) with Twisted's parser."""
    from twisted.internet import reactor

    desc = _expect_str(value, path)
    _check_inherited(desc, path)
    try:
        endpoint = serverFromString(reactor, desc)
    except Exception as e:
        raise ConfigError(
            path, f"{_show(desc)} is not a listening endpoint: {_endpoint_problem(e)}"
        ) from None
    _checked_port(endpoint, desc, path, allow_zero=allow_zero)
    return desc


def check_client_endpoint(value: object, path: str) -> str:
    """Check a client endpoint string (``tcp:127.0.0.1:3000``) with Twisted's parser."""
    from twisted.internet import reactor

    desc = _expect_str(value, path)
    try:
        endpoint = clientFromString(reactor, desc)
    except Exception as e:
        raise ConfigError(
            path, f"{_show(desc)} is not a client endpoint: {_endpoint_problem(e)}"
        ) from None
    _checked_port(endpoint, desc, path, allow_zero=False)
    return desc


def split_hostport(value: object, path: str) -> tuple[str, int]:
    """Check a UDP backend ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals)."""
    text = _expect_str(value, path)
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ConfigError(path, f"{_show(text)} is not HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ConfigError(path, f"{_show(text)}: {_show(port)} is not a port (1-65535)")
    return _host(host, path, _show(text)), port


# --- limits ---------------------------------------------------------------


_LIMIT_PARSERS: dict[str, Callable[[object, str], Any]] = {
    "connect_timeout": _number,
    "idle_timeout": lambda v, p: _number(v, p, optional=True),
    "udp_timeout": _number,
    "udp_max_sessions": _count,
    "udp_busy_poll": _busy_poll,
    "max_connections": lambda v, p: _count(v, p, optional=True),
    "start_timeout": _number,
    "response_timeout": _number,
    "header_timeout": _number,
    "max_header_size": _count,
}
LIMIT_KEYS = tuple(f.name for f in fields(Limits))


def _limits(data: Mapping[str, Any], base: Limits, path: str) -> Limits:
    """Apply the limit keys present in C{data} on top of C{base}."""
    changes = {
        key: _LIMIT_PARSERS[key](data[key], _join(path, key))
        for key in LIMIT_KEYS
        if key in data
    }
    return replace(base, **changes) if changes else base


# --- projects ---------------------------------------------------------------


def _escape_strport(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_from(protocol: str, port: int, interface: str | None, tls: bool = False) -> Listen:
    if protocol == "udp":
        endpoint = f"udp:{port}"
    else:
        endpoint = f"tcp:{port}"
    if interface:
        endpoint += f":interface={_escape_strport(interface)}"
    return Listen(protocol, port, interface, endpoint, tls)


_COMMAND_KEYS = ("command", "env", "cwd", "idle_stop")
_PROJECT_KEYS = (
    "name", "backend", "listen", "runtime", "entry", "host", "services", "preserve_host", "send_proxy",
    "access_log",
) + _COMMAND_KEYS + LIMIT_KEYS
_SERVICE_KEYS = ("name", "protocol", "port", "send_proxy") + _COMMAND_KEYS + LIMIT_KEYS
_LISTEN_KEYS = ("port", "protocol", "interface", "tls", "proxy_protocol")


def proxy_protocol(value: object, path: str, defaults: Limits) -> ProxyProtocol:
    """``{trusted: [CIDR, ...], header_timeout: S}``: who must send a PROXY header, and how soon."""
    data = _expect_mapping(value, path)
    _check_keys(data, ("trusted", "header_timeout"), path)
    if "trusted" not in data:
        raise ConfigError(_join(path, "trusted"), "is required (the addresses that send PROXY headers: "
                          "[10.0.0.0/8, 127.0.0.1])")
    items = _expect_list(data["trusted"], _join(path, "trusted"))
    networks = []
    for i, item in enumerate(items):
        where = _join(_join(path, "trusted"), i)
        text = _expect_str(item, where)
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(where, f"{_show(text)} is not an IP address or network (10.0.0.0/8)") from None
    timeout = defaults.header_timeout
    if data.get("header_timeout") is not None:
        timeout = _number(data["header_timeout"], _join(path, "header_timeout"))
    return ProxyProtocol(tuple(networks), timeout)


def _send_proxy(data: Mapping[str, Any], path: str, udp: bool) -> str | None:
    value = data.get("send_proxy")
    if value is None:
        return None
    where = _join(path, "send_proxy")
    if value not in ("v1", "v2"):
        raise ConfigError(where, f"{_show(value)} is not a PROXY protocol version (v1 or v2)")
    if udp and value == "v1":
        raise ConfigError(where, "'v1' cannot go with UDP (a text header has no datagram form): use 'v2'")
    return str(value)


def _access_log(value: object, path: str) -> float:
    """``true`` (every line), ``false`` (none) or ``{sample: 0.1}``: the share of lines written."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected true, false or {{sample: 0.1}}, got {_got(value)}")
    _check_keys(value, ("sample",), path)
    where = _join(path, "sample")
    if "sample" not in value:
        raise ConfigError(where, "is required (the share of lines written, 0 to 1: 0.1 writes every tenth)")
    share = _finite(value["sample"], where, "a share from 0 to 1")
    if not 0 <= share <= 1:
        raise ConfigError(where, f"{_show(value['sample'])} is not a share from 0 to 1 (0.1 writes every tenth line)")
    return share


def _name(value: object, path: str) -> str:
    text = _expect_str(value, path)
    if not NAME_RE.match(text):
        raise ConfigError(
            path, f"{_show(text)} is not a valid name (lower-case letters, digits and "
            "'-', starting with a letter or digit, at most 63)"
        )
    return text


# What exec passes on: no '=' in a name (it ends the name), no NUL anywhere;
# no control characters in a name either (they would only forge log lines).
_ENV_NAME = re.compile(r"[^=\x00-\x1f\x7f]{1,256}\Z")


# First path segments the ingress keeps for itself (SPEC 2): a project of
# that name could never be reached by path. (``_api`` is no valid name.)
RESERVED_NAMES = {"stream": "the ingress keeps /stream/ for service ports"}


def _project_name(value: object, path: str) -> str:
    name = _name(value, path)
    if name in RESERVED_NAMES:
        raise ConfigError(path, f"{_show(name)} is reserved: {RESERVED_NAMES[name]}, "
                          "so no project of that name could be reached by path")
    return name


def _command(data: Mapping[str, Any], path: str) -> Command | None:
    if data.get("command") is None:
        for key in ("env", "cwd", "idle_stop"):
            if data.get(key) is not None:
                raise ConfigError(_join(path, key), "only makes sense with 'command'")
        return None
    cpath = _join(path, "command")
    argv = _expect_list(data["command"], cpath)
    if not argv:
        raise ConfigError(cpath, "must name a program to run")
    args = tuple(_expect_str(a, _join(cpath, i), arg=True) for i, a in enumerate(argv))
    env = None
    if data.get("env") is not None:
        epath = _join(path, "env")
        raw = _expect_mapping(data["env"], epath)
        env = {}
        for k, v in raw.items():
            vpath = _join(epath, str(k))
            if not isinstance(k, str) or not _ENV_NAME.match(k):
                raise ConfigError(vpath, f"{_show(k)} is not an environment variable name")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(vpath, f"{_show(v)} is not a finite number")
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(vpath, f"expected a string, got {_got(v)}")
            if isinstance(v, str):
                _check_text(v, vpath, MAX_ARG, _CONTROL_IN_ARG)
            env[k] = str(v)
    cwd = _expect_str(data["cwd"], _join(path, "cwd")) if data.get("cwd") is not None else None
    idle_stop = _number(data.get("idle_stop"), _join(path, "idle_stop"), optional=True)
    return Command(args, env, cwd, idle_stop)


def _listen(value: object, path: str, defaults: Limits = Limits()) -> Listen | None:
    if value is None:
        return None
    data = _expect_mapping(value, path)
    _check_keys(data, _LISTEN_KEYS, path)
    if "port" not in data:
        raise ConfigError(_join(path, "port"), "is required")
    port = _port(data["port"], _join(path, "port"))
    protocol = data.get("protocol", "http")
    if protocol not in PROTOCOLS:
        raise ConfigError(
            _join(path, "protocol"),
            f"{_show(protocol)} is not a protocol ({', '.join(PROTOCOLS)})",
        )
    interface = None
    if data.get("interface") is not None:
        interface = _interface(data["interface"], _join(path, "interface"))
    tls = _expect_bool(data.get("tls", False), _join(path, "tls"))
    if tls and protocol == "udp":
        raise ConfigError(_join(path, "tls"), "UDP routes cannot use TLS")
    listen = listen_from(protocol, port, interface, tls)
    if data.get("proxy_protocol") is not None:
        received = proxy_protocol(data["proxy_protocol"], _join(path, "proxy_protocol"), defaults)
        listen = replace(listen, proxy_protocol=received)
    return listen


def _service(value: object, path: str, defaults: Limits) -> Service:
    data = _expect_mapping(value, path)
    _check_keys(data, _SERVICE_KEYS, path)
    for key in ("name", "port"):
        if key not in data:
            raise ConfigError(_join(path, key), "is required")
    name = _name(data["name"], _join(path, "name"))
    protocol = data.get("protocol", "tcp")
    if protocol not in SERVICE_PROTOCOLS:
        raise ConfigError(
            _join(path, "protocol"),
            f"{_show(protocol)} is not a service protocol ({', '.join(SERVICE_PROTOCOLS)})",
        )
    port = _port(data["port"], _join(path, "port"))
    return Service(name, protocol, port, _command(data, path), _limits(data, defaults, path),
                   _send_proxy(data, path, protocol == "udp"))


def parse_project(
    value: object, defaults: Limits = Limits(), path: str = "", *, static: bool = True
) -> Project:
    """
    Validate one manifest. C{path} prefixes field paths in errors
    (``projects[2]`` in a file, ``""`` for an API body).
    """
    data = _expect_mapping(value, path)
    _check_keys(data, _PROJECT_KEYS, path)
    if "name" not in data:
        raise ConfigError(_join(path, "name"), "is required")
    name = _project_name(data["name"], _join(path, "name"))
    listen = _listen(data.get("listen"), _join(path, "listen"), _limits(data, defaults, path))

    backend: str | None = None
    bpath = _join(path, "backend")
    if data.get("backend") is not None:
        if listen is not None and listen.protocol == "udp":
            split_hostport(data["backend"], bpath)  # only to refuse a bad one here
            backend = data["backend"]
        else:
            backend = check_client_endpoint(data["backend"], bpath)

    services: tuple[Service, ...] = ()
    if data.get("services") is not None:
        spath = _join(path, "services")
        items = _expect_list(data["services"], spath)
        seen: dict[str, int] = {}
        parsed = []
        for i, item in enumerate(items):
            service = _service(item, _join(spath, i), _limits(data, defaults, path))
            if service.name in seen:
                raise ConfigError(
                    _join(_join(spath, i), "name"),
                    f"{service.name!r} is already the name of {spath}[{seen[service.name]}]",
                )
            seen[service.name] = i
            parsed.append(service)
        services = tuple(parsed)

    if backend is None and not services:
        raise ConfigError(path, "needs 'backend', 'services', or both")
    if listen is not None and backend is None:
        raise ConfigError(bpath, "is required for a project with 'listen'")

    host: str | None = None
    if data.get("host") is not None:
        host = _host(data["host"], _join(path, "host"))
    elif services:
        host = "127.0.0.1"

    command = _command(data, path)
    if command is not None and backend is None:
        raise ConfigError(_join(path, "command"), "needs a 'backend' to start")

    for key in ("runtime", "entry"):
        if data.get(key) is not None:
            _expect_str(data[key], _join(path, key))

    return Project(
        name=name,
        backend=backend,
        listen=listen,
        host=host,
        services=services,
        command=command,
        limits=_limits(data, defaults, path),
        runtime=data.get("runtime"),
        preserve_host=_expect_bool(data.get("preserve_host", True), _join(path, "preserve_host")),
        entry=data.get("entry"),
        manifest=dict(data),
        static=static,
        send_proxy=_send_proxy(data, path, listen is not None and listen.protocol == "udp"),
        access_log=_access_log(data.get("access_log", True), _join(path, "access_log")),
    )


# --- CLI routes -------------------------------------------------------------


def _udp_listen(desc: str, path: str) -> Listen:
    """``udp:PORT[:interface=ADDR]``: Twisted has no UDP strports, so parse it here."""
    match = re.fullmatch(r"udp:(?:port=)?(\d+)(?::interface=(.+))?", _expect_str(desc, path))
    if not match:
        raise ConfigError(path, f"{_show(desc)} is not a UDP listen description (udp:PORT[:interface=ADDR])")
    port = int(match.group(1))  # at most 4096 characters: int() reads it
    if not 0 <= port <= 65535:
        raise ConfigError(path, f"{_show(desc)}: {_show(port)} is not a port (0-65535)")
    interface = match.group(2).replace("\\:", ":") if match.group(2) else None
    if interface is not None:
        _interface(interface, path)
    return Listen("udp", port, interface, desc)


def parse_cli_route(protocol: str, text: str, defaults: Limits = Limits()) -> Project:
    """
    Turn ``--tcp 'tcp:5000 -> tcp:127.0.0.1:6000'`` into a project named for
    its protocol and port (``tcp-5000``). Port 0 is allowed here: the OS picks.
    """
    path = f"--{protocol}"
    if "->" not in text:
        raise ConfigError(path, f"{_show(text)} is not 'LISTEN -> BACKEND'")
    listen_desc, backend = (part.strip() for part in text.split("->", 1))
    if protocol == "udp":
        listen = _udp_listen(listen_desc, path)
        split_hostport(backend, path)
    else:
        check_server_strport(listen_desc, path, allow_zero=True)
        from twisted.internet import reactor

        endpoint = serverFromString(reactor, listen_desc)
        port = getattr(endpoint, "_port", None)
        interface = getattr(endpoint, "_interface", None) or None
        listen = Listen(protocol, port, interface, listen_desc)
        check_client_endpoint(backend, path)
    tag = listen.port if listen.port is not None else re.sub(r"[^a-z0-9]+", "-", listen_desc.lower()).strip("-")
    name = f"{protocol}-{tag}"[:63].rstrip("-")
    manifest = {"name": name, "backend": backend, "listen": {"endpoint": listen_desc, "protocol": protocol}}
    return Project(
        name=name, backend=backend, listen=listen, host=None, services=(),
        command=None, limits=defaults, manifest=manifest,
    )


# --- the whole file -----------------------------------------------------------


def _tls(value: object, path: str) -> TLS:
    data = _expect_mapping(value, path)
    _check_keys(data, ("certificates", "default"), path)
    if "certificates" not in data:
        raise ConfigError(_join(path, "certificates"), "is required (a directory of *.pem files)")
    directory = os.path.expanduser(_expect_str(data["certificates"], _join(path, "certificates")))
    default = None
    if data.get("default") is not None:
        default = _expect_str(data["default"], _join(path, "default"))
    try:
        store = CertificateStore.load(directory, default)
    except CertificateError as e:
        raise ConfigError(_join(path, "certificates"), str(e)) from None
    return TLS(directory, default, store)


def needs_tls(project: Project, tls: TLS | None, path: str) -> None:
    """A project with C{listen.tls} needs the store: say so where it is asked for."""
    if tls is None and project.listen is not None and project.listen.tls:
        raise ConfigError(_join(_join(path, "listen"), "tls"),
                          "needs a top-level 'tls' section (tls: {certificates: DIR})")


def _hostnames(value: object, path: str, tls: TLS | None) -> Hostnames:
    data = _expect_mapping(value, path)
    _check_keys(data, ("domains", "listen"), path)
    if "domains" not in data:
        raise ConfigError(_join(path, "domains"), "is required (a list of base domains: [apps.example.com])")
    items = _expect_list(data["domains"], _join(path, "domains"))
    if not items:
        raise ConfigError(_join(path, "domains"), "names no domain (a list of base domains: [apps.example.com])")
    domains: list[str] = []
    for i, item in enumerate(items):
        where = _join(_join(path, "domains"), i)
        text = _expect_str(item, where)
        domain = text.lower().rstrip(".")
        labels = domain.split(".")
        if len(domain) > 253 or not all(_DOMAIN_LABEL.match(label) for label in labels):
            raise ConfigError(where, f"{_show(text)} is not a domain name (apps.example.com)")
        if domain in domains:
            raise ConfigError(where, f"{_show(text)} is already domains[{domains.index(domain)}]")
        domains.append(domain)
    listen = None
    if data.get("listen") is not None:
        where = _join(path, "listen")
        text = _expect_str(data["listen"], where)
        if text.split(":", 1)[0].strip().lower() == "ssl":
            raise ConfigError(where, f"{_show(text)}: the TLS front terminates TLS itself with the "
                              "certificate store; give it a plain endpoint (tcp:8443)")
        listen = check_server_strport(text, where, allow_zero=True)
        if tls is None:
            raise ConfigError(where, "the TLS front needs a top-level 'tls' section (tls: {certificates: DIR}) "
                              "holding a certificate for *.<domain> of each domain")
        for i, domain in enumerate(domains):
            if not tls.store.covers_below(domain):
                raise ConfigError(_join(_join(path, "domains"), i),
                                  f"{domain!r}: no certificate in {tls.certificates} covers *.{domain} "
                                  "(the TLS front needs one for the names under each domain)")
    return Hostnames(tuple(domains), listen)


# Domain labels as DNS has them (no '_': these names are looked up and certified).
_DOMAIN_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

_TOP_KEYS = ("ingress", "state", "drain_timeout", "defaults", "auth", "manhole", "projects", "tls", "hostnames",
             "proxy_protocol", "cluster", "reuse_port")
# Redis keys are built from the prefix: keep it to what reads well in redis-cli.
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")


def _inline_secret(value: object, path: str) -> str:
    """L{_expect_str} for a secret: every problem said without quoting it (it would end up in a log)."""
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_kind(value)} (quote it)")
    if not value:
        raise ConfigError(path, "must not be empty")
    return _check_text(value, path, MAX_STRING, _CONTROL, quoted=False)


def _secret(data: Mapping[str, Any], key: str, path: str) -> str:
    """A secret given inline (C{key}) or, preferably, in a file (C{key}_file)."""
    file_key = f"{key}_file"
    if (data.get(key) is None) == (data.get(file_key) is None):
        raise ConfigError(path, f"needs exactly one of '{key}' and '{file_key}'")
    if data.get(key) is not None:
        return _inline_secret(data[key], _join(path, key))
    fpath = _join(path, file_key)
    name = os.path.expanduser(_expect_str(data[file_key], fpath))
    try:
        with open(name, "rb") as f:
            # Bounded: a device named by mistake (/dev/zero) never ends.
            raw = f.read(MAX_STRING + 1)
    except OSError as e:
        raise ConfigError(fpath, f"cannot read {_show(name)}: {e.strerror}") from None
    if len(raw) > MAX_STRING:
        raise ConfigError(fpath, f"{_show(name)} is longer than {MAX_STRING} bytes: not a secret")
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(fpath, f"{_show(name)} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(fpath, f"{_show(name)} is empty")
    bad = _CONTROL.search(secret)
    if bad:
        raise ConfigError(fpath, f"{_show(name)} holds a control character (0x{ord(bad.group()):02x})")
    return secret


def _or_empty(value: object) -> object:
    """An absent or null list is an empty one; C{{}} or C{""} stays an error."""
    return [] if value is None else value


def _project_list(value: object, path: str) -> tuple[str, ...]:
    items = _expect_list(value, path)
    names = []
    for i, item in enumerate(items):
        text = _expect_str(item, _join(path, i))
        if text != "*":
            _name(text, _join(path, i))
        names.append(text)
    return tuple(names)


def _auth(value: object, path: str) -> Auth:
    data = _expect_mapping(value, path)
    _check_keys(data, ("tokens", "keypairs"), path)
    tokens = []
    tpath = _join(path, "tokens")
    for i, item in enumerate(_expect_list(_or_empty(data.get("tokens")), tpath)):
        ipath = _join(tpath, i)
        item = _expect_mapping(item, ipath)
        _check_keys(item, ("token", "token_file", "admin", "projects"), ipath)
        tokens.append(Token(
            secret=_secret(item, "token", ipath),
            admin=_expect_bool(item.get("admin", False), _join(ipath, "admin")),
            projects=_project_list(item.get("projects", []), _join(ipath, "projects")),
        ))
    keypairs = []
    kpath = _join(path, "keypairs")
    for i, item in enumerate(_expect_list(_or_empty(data.get("keypairs")), kpath)):
        ipath = _join(kpath, i)
        item = _expect_mapping(item, ipath)
        _check_keys(item, ("access_key", "secret_key", "secret_key_file", "projects"), ipath)
        if "access_key" not in item:
            raise ConfigError(_join(ipath, "access_key"), "is required")
        keypairs.append(Keypair(
            access_key=_expect_str(item["access_key"], _join(ipath, "access_key")),
            secret_key=_secret(item, "secret_key", ipath),
            projects=_project_list(item.get("projects", []), _join(ipath, "projects")),
        ))
    return Auth(tuple(tokens), tuple(keypairs))


def _manhole(value: object, path: str) -> Manhole:
    data = _expect_mapping(value, path)
    _check_keys(data, ("listen", "authorized_keys"), path)
    for key in ("listen", "authorized_keys"):
        if key not in data:
            raise ConfigError(_join(path, key), "is required")
    return Manhole(
        listen=check_server_strport(data["listen"], _join(path, "listen")),
        authorized_keys=os.path.expanduser(
            _expect_str(data["authorized_keys"], _join(path, "authorized_keys"))
        ),
    )


def _cluster(value: object, path: str) -> Cluster:
    data = _expect_mapping(value, path)
    _check_keys(data, ("redis", "prefix", "node"), path)
    if "redis" not in data:
        raise ConfigError(_join(path, "redis"), "is required (a client endpoint, e.g. tcp:127.0.0.1:6379)")
    redis = check_client_endpoint(data["redis"], _join(path, "redis"))
    prefix = "portrouter"
    if data.get("prefix") is not None:
        prefix = _expect_str(data["prefix"], _join(path, "prefix"))
        if not _PREFIX.match(prefix):
            raise ConfigError(_join(path, "prefix"), f"{_show(prefix)} is not a key prefix "
                              "(1 to 64 letters, digits, '_', '.', ':' or '-')")
    node = socket.gethostname()
    if data.get("node") is not None:
        node = _expect_str(data["node"], _join(path, "node"))
    return Cluster(redis, prefix, node)


def parse(data: object, source: str | None = None) -> Config:
    """Validate a whole config document (already loaded from YAML)."""
    try:
        return _parse(data, source)
    except ConfigError as e:
        raise e.within(source) if source else e


def parse_projects(items: Sequence[object], defaults: Limits, *, static: bool = True,
                   check: Callable[[Project, str], None] | None = None) -> list[Project]:
    """
    The manifests of a ``projects`` list (the config file's, the state
    file's): each valid, then C{check}ed, and no name twice.
    """
    projects: list[Project] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path = _join("projects", i)
        project = parse_project(item, defaults, path, static=static)
        if check is not None:
            check(project, path)
        if project.name in seen:
            raise ConfigError(
                _join(path, "name"),
                f"{project.name!r} is already the name of projects[{seen[project.name]}]",
            )
        seen[project.name] = i
        projects.append(project)
    return projects


def _parse(data: object, source: str | None) -> Config:
    if data is None:
        data = {}
    data = _expect_mapping(data, "")
    _check_keys(data, _TOP_KEYS, "")
    config = Config(source=source)
    if data.get("ingress") is not None:
        config = replace(config, ingress=check_server_strport(data["ingress"], "ingress", allow_zero=True))
    if data.get("state") is not None:
        config = replace(config, state=_expect_str(data["state"], "state"))
    if "drain_timeout" in data:
        config = replace(config, drain_timeout=_number(data["drain_timeout"], "drain_timeout"))
    if data.get("defaults") is not None:
        defaults = _expect_mapping(data["defaults"], "defaults")
        _check_keys(defaults, LIMIT_KEYS, "defaults")
        config = replace(config, defaults=_limits(defaults, Limits(), "defaults"))
    if data.get("auth") is not None:
        config = replace(config, auth=_auth(data["auth"], "auth"))
    if data.get("manhole") is not None:
        config = replace(config, manhole=_manhole(data["manhole"], "manhole"))
    if data.get("tls") is not None:
        config = replace(config, tls=_tls(data["tls"], "tls"))
    if data.get("hostnames") is not None:
        config = replace(config, hostnames=_hostnames(data["hostnames"], "hostnames", config.tls))
    if data.get("proxy_protocol") is not None:
        config = replace(config, proxy_protocol=proxy_protocol(data["proxy_protocol"], "proxy_protocol",
                                                               config.defaults))

    if data.get("cluster") is not None:
        config = replace(config, cluster=_cluster(data["cluster"], "cluster"))
    if data.get("reuse_port") is not None:
        config = replace(config, reuse_port=_expect_bool(data["reuse_port"], "reuse_port"))

    tls = config.tls
    items = _expect_list(_or_empty(data.get("projects")), "projects")
    projects = parse_projects(items, config.defaults, check=lambda project, path: needs_tls(project, tls, path))
    config = replace(config, projects=tuple(projects))

    # Conflicts are the routing table's to judge; run it once here so that a
    # file that cannot be served is refused before anything binds.
    try:
        RoutingTable.build(config.ingress, config.manhole, config.projects, config.hostnames)
    except PortConflict as e:
        if e.claimant == "the TLS front":
            raise ConfigError("hostnames.listen", str(e)) from None
        index = next(i for i, project in enumerate(projects) if project.name == e.claimant)
        raise ConfigError(f"projects[{index}].listen.port", str(e)) from None
    return config


class _Loader(yaml.SafeLoader):
    """
    PyYAML keeps the last of two equal keys; a second C{projects:} section
    would silently drop the first, so a repeated key is an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.get(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {_show(key)} (first on line {first + 1})",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_big_int(self, node: yaml.ScalarNode) -> int | BigNumber:
        """An integer too long for int() is kept as text, for its field to refuse by name."""
        try:
            return self.construct_yaml_int(node)
        except ValueError:
            return BigNumber(str(self.construct_scalar(node)).replace("_", ""))


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_big_int)

# YAML 1.1 reads ``1:20`` as 80 (base 60) and ``010`` as 8 (octal); YAML 1.2
# dropped both, and an operator writing ``port: 1:20`` meant neither. Such
# scalars stay strings here, so a number field refuses them, quoted.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0|[-+]?[1-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def load(path: str) -> Config:
    """Read and validate a config file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read the file: {e.strerror}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", path) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.reader.ReaderError as e:  # its own text is two lines
        code = e.character if isinstance(e.character, int) else ord(e.character)
        problem = f"unacceptable character #x{code:04x} at offset {e.position}: {e.reason}"
        raise ConfigError("", f"invalid YAML: {problem}", path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = " ".join((getattr(e, "problem", None) or str(e)).split())  # one line, always
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(where, f"invalid YAML: {problem}", path) from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError("", "invalid YAML: nested too deeply", path) from None
    return parse(data, path)


def with_cli(
    config: Config,
    *,
    ingress: str | None = None,
    state: str | None = None,
    manhole: str | None = None,
    routes: Sequence[tuple[str, str]] = (),
) -> Config:
    """Join CLI options to a config: CLI values win, CLI routes join the file's."""
    if ingress is not None:
        config = replace(config, ingress=check_server_strport(ingress, "--ingress", allow_zero=True))
    if state is not None:
        config = replace(config, state=state)
    if manhole is not None:
        keys = config.manhole.authorized_keys if config.manhole else os.path.expanduser("~/.ssh/authorized_keys")
        config = replace(config, manhole=Manhole(check_server_strport(manhole, "--manhole", allow_zero=True), keys))
    projects = list(config.projects)
    names = {p.name for p in projects}
    options: dict[str, str] = {}
    for protocol, text in routes:
        project = parse_cli_route(protocol, text, config.defaults)
        name, n = project.name, 1
        while name in names:
            n += 1
            name = f"{project.name}-{n}"
        names.add(name)
        options[name] = f"--{protocol}"
        projects.append(replace(project, name=name, manifest={**project.manifest, "name": name}))
    config = replace(config, projects=tuple(projects))
    try:
        RoutingTable.build(config.ingress, config.manhole, config.projects, config.hostnames)
    except PortConflict as e:
        # Name what the operator wrote: the CLI option, or the file's field.
        if e.claimant in options:
            raise ConfigError(options[e.claimant], str(e)) from None
        if e.holder == "the ingress" and ingress is not None:
            raise ConfigError("--ingress", str(e)) from None
        if e.holder == "the manhole" and manhole is not None:
            raise ConfigError("--manhole", str(e)) from None
        if e.claimant == "the TLS front":
            raise ConfigError("hostnames.listen", str(e), config.source) from None
        index = [p.name for p in config.projects].index(e.claimant)
        raise ConfigError(f"projects[{index}].listen.port", str(e), config.source) from None
    return config
