"""
Logs for machines: one JSON object per line, for log shippers.

    twistd --logger portrouter.logs.json -n portrouter --config routes.yaml

writes to standard output, or to the file named by ``PORTROUTER_JSON_LOG``.
With no ``--logger``, portrouter writes twistd's own line format itself:
to stdout under ``twistd -n`` (L{text}), else to ``--logfile`` or a
daemon's ``twistd.log`` (L{text_file}). Every destination is written in
one write per reactor turn, at most one every L{WRITE_INTERVAL} seconds
(L{_Buffered}), not once per line.
Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message``
(the text twistd would print) and every structured field of the event (a
finished connection carries ``protocol``, ``project``, ``peer``, ``bytes_in``,
``bytes_out``, ``duration`` and ``reason``; an HTTP request ``client``,
``method``, ``target``, ``status``, ``bytes``, ``duration``, ``project``).
"""

from __future__ import annotations

import atexit
import json as _json
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from string import Formatter
from typing import IO, Any, Callable, cast

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from portrouter.interfaces import IReactor


def emitter(logger: Logger, level: LogLevel, format: str) -> Callable[..., None]:
    """
    C{logger.emit(level, format, **fields)} for a line written per request
    or per connection: the same event to the same observer, without what
    Twisted's C{emit} does on every call that such a line need not (it
    checks the level against a freshly sorted list of every level: a third
    of the call's cost).
    """
    namespace, source, observer = logger.namespace, logger.source, logger.observer

    def emit(**event: Any) -> None:
        event["log_logger"] = logger
        event["log_level"] = level
        event["log_namespace"] = namespace
        event["log_source"] = source
        event["log_format"] = format
        event["log_time"] = time.time()
        observer(event)

    return emit


# A busy router writes its log at most this often (seconds): a write to a
# file on ext4 cost a new TCP connection 5% of its rate when made once per
# reactor turn (about one per five connections); nginx's buffered access
# log does the same (flush=). An idle router writes at the end of the turn.
WRITE_INTERVAL = 0.05
PENDING_MAX = 4096  # events that wait no longer for the interval: memory stays bounded under a flood


class _Buffered:
    """
    Lines made and written together, in one write, rather than a write
    (and, for Twisted's log file, a system call) per line: at the end of
    the reactor turn, or, when the last write was less than
    L{WRITE_INTERVAL} ago, that long after it. Before the reactor runs and
    after it stops, at once; and whatever is pending at exit. The events
    wait as they are and are made into lines all together, in one loop: a
    line made between two requests' work costs two to three times what the
    same line costs next to the others (measured: the JSON encoder's code
    and data are no longer in the processor's caches).
    """

    def __init__(self, out: IO[str] | Any, reactor: Any = None):
        self.out = out
        self.reactor = reactor  # None: Twisted's global reactor, looked up when first needed
        self.pending: list[dict[str, Any]] = []
        self._flush_scheduled = False
        self.written = float("-inf")  # the reactor's time of the last write
        atexit.register(self.flush)

    def line(self, event: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def unwritable(self, event: dict[str, Any], why: str) -> str:
        """The line in place of an event L{line} failed on."""
        return f"portrouter: {why}\n"

    def __call__(self, event: dict[str, Any]) -> None:
        pending = self.pending
        pending.append(event)
        if self._flush_scheduled:
            if len(pending) >= PENDING_MAX:
                self.flush()  # the one scheduled finds nothing, or the next few
            return
        reactor = self._reactor()
        if not getattr(reactor, "running", False):
            self.flush()  # start-up, shutdown: nobody would flush later
            return
        self._flush_scheduled = True
        if isInIOThread():
            # Bounded by the interval: a clock set back does not hold lines for longer.
            wait = min(WRITE_INTERVAL, self.written + WRITE_INTERVAL - reactor.seconds())
            reactor.callLater(max(0.0, wait), self.flush)
        else:
            cast(IReactor, reactor).callFromThread(self.flush)

    def _reactor(self) -> Any:
        """The reactor given, or Twisted's global one (imported here: this module is loaded before twistd installs it)."""
        if self.reactor is not None:
            return self.reactor
        from twisted.internet import reactor

        return reactor

    def lines(self, events: list[dict[str, Any]]) -> list[str]:
        made = []
        line = self.line
        for event in events:
            try:
                text = line(event)
            except Exception as e:
                # An event no line can be made of (a field whose repr raises,
                # say) still leaves a trace, in its place, and the next lines go on.
                text = self.unwritable(event, f"a log event could not be written ({type(e).__name__}: {e}); "
                                              f"its format: {event.get('log_format')!r}")
            if text is not None:
                made.append(text)
        return made

    def flush(self) -> None:
        self._flush_scheduled = False
        events, self.pending = self.pending, []
        try:
            if events:
                self.written = self._reactor().seconds()
                self.out.write("".join(self.lines(events)))
            self.out.flush()
        except Exception:
            # The destination went away (or its writer broke): a router that
            # stopped serving over a log line would be worse than a lost line.
            pass


_NOT_FIELDS = ("log_", "_")  # Twisted's own keys, and private ones: not the event's fields
# json.dumps(..., default=repr) would build an encoder for every line.
_encode = _json.JSONEncoder(default=repr).encode


def fast_message(event: dict[str, Any]) -> str | None:
    """
    An event's message through C{str.format_map} (in C) instead of Twisted's
    pure-Python formatter, for plain events; L{None} for anything else
    (Twisted's call syntax, tracebacks, a format that fails), which takes
    Twisted's path: the same text either way, at a tenth of the cost.
    """
    fmt = event.get("log_format")
    if fmt is None or "log_failure" in event or "()" in fmt:
        return None
    try:
        return str(fmt.format_map(event))
    except Exception:
        return None


_HEAD = frozenset({"time", "level", "namespace", "message"})  # a JSON line's own keys, before the event's fields
_SLOT = {str: '"%s"', int: "%s", float: "%r"}  # field types a template writes as json would
_FIXED = re.compile(r"\.[0-9]{1,2}f")  # the one format spec a template takes (durations): printf's own


class _Shape:
    """
    The JSON line of every event of one shape (one format, namespace,
    level and key order: the per-request and per-connection lines) as one
    printf-style template, message and fields in one C{%}, instead of
    building a dict for json's encoder (C{%} with a tuple costs half of
    C{str.format_map}). The values are put in unescaped, so a line whose
    values would need escaping (quotes, backslashes, control or non-ASCII
    characters, a number json writes otherwise) fails L{fill}'s checks and is
    written the general way: the same line either way. The checks look at
    the values, not at the line made of them: the template's own text is
    known good, and scanning the whole line cost a third of it.
    """

    __slots__ = ("template", "values", "args", "types", "strings", "reals")

    def __init__(self, template: str, fields: list[str], names: list[str], types: tuple[type, ...]):
        self.template = template
        self.values = _getter(fields)  # the fields, in order: their types are checked
        self.args = _getter(names)  # what the template's places take, in order
        self.types = types
        typed = list(zip(fields, types))
        strings = [field for field, t in typed if t is str]
        reals = [field for field, t in typed if t is float]
        self.strings = _getter(strings) if strings else None  # written as they are: nothing json would escape
        self.reals = _getter(reals) if reals else None  # finite: json writes NaN and Infinity its own way

    @classmethod
    def of(cls, event: dict[str, Any], fmt: str, level: str, namespace: str) -> _Shape | None:
        """The template for events like C{event}, or L{None}: such events take the general way."""
        fields = [key for key in event if not key.startswith(_NOT_FIELDS) and key not in _HEAD]
        types = tuple(type(event[key]) for key in fields)
        if not fields or not all(t in _SLOT for t in types):
            return None  # a value json writes its own way
        typed = dict(zip(fields, types))
        message = []
        names = []
        for literal, name, spec, conversion in Formatter().parse(fmt):
            message.append(encode_basestring_ascii(literal)[1:-1].replace("%", "%%"))
            if name is None:
                continue
            if name not in typed or conversion not in (None, "r", "s", "a"):
                return None  # an attribute or index, or a field of no type checked: Twisted's way
            if spec:
                if conversion is not None or typed[name] is not float or not _FIXED.fullmatch(spec):
                    return None  # alignment, widths...: str.format's own language, Twisted's way
                message.append("%" + spec)
            else:
                message.append("%" + (conversion or "s"))  # format(x, "") is str(x) for str, int and float
            names.append(name)
        head = f'", "level": {encode_basestring_ascii(level)}, "namespace": {encode_basestring_ascii(namespace)}'
        body = "".join(f", {encode_basestring_ascii(key).replace('%', '%%')}: {_SLOT[t]}"
                       for key, t in zip(fields, types))
        return cls(head.replace("%", "%%") + ', "message": "' + "".join(message) + '"' + body,
                   fields, names + fields, types)

    def fill(self, event: dict[str, Any]) -> str | None:
        """Everything after the time, or L{None} when a value needs what only json's encoder does."""
        if tuple(map(type, self.values(event))) != self.types:
            return None
        if self.strings is not None:
            # Printable ASCII but quotes and backslashes: json's own text,
            # and repr's too (a !r conversion: in single quotes, unless the
            # value holds one).
            joined = "".join(self.strings(event))
            if not (joined.isascii() and joined.isprintable()) or '"' in joined or "\\" in joined \
                    or "'" in joined:
                return None
        if self.reals is not None:
            for real in self.reals(event):
                if real - real != 0.0:  # NaN or an infinity
                    return None
        try:
            return self.template % self.args(event)
        except Exception:
            return None


def _getter(keys: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The values of C{keys} in an event, as a tuple (itemgetter gives one key's value as it is)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda event: (event[key],)
    return itemgetter(*keys)


@implementer(ILogObserver)
class JSONLines(_Buffered):
    """
    One JSON object a line. Built for lines written per request: events of a
    shape seen before are written through that shape's template (L{_Shape}),
    the time's seconds are formatted once per second, and anything else
    takes the general way: the message through L{fast_message} or Twisted's
    formatter, and json's C encoder.
    """

    _SHAPES = 256  # templates kept: the router's own lines are a few dozen shapes

    def __init__(self, out: IO[str] | Any, reactor: Any = None):
        super().__init__(out, reactor)
        self._second = -1
        self._stamp = ""
        self._shapes: dict[tuple[Any, ...], _Shape | None] = {}

    def line(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        if fmt is not None and "log_failure" not in event:
            key = (fmt, event.get("log_namespace"), event.get("log_level"), tuple(event))
            try:
                shape = self._shapes[key]
            except KeyError:
                shape = self._learn(key, event, fmt)
            if shape is not None:
                text = shape.fill(event)
                if text is not None:
                    return f'{{"time": "{self._time(event.get("log_time", 0))}{text}}}\n'
        return self._general(event)

    def _learn(self, key: tuple[Any, ...], event: dict[str, Any], fmt: str) -> _Shape | None:
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        shape = None
        if "()" not in fmt and isinstance(namespace, str):
            shape = _Shape.of(event, fmt, getattr(level, "name", "info"), namespace)
        if len(self._shapes) < self._SHAPES:
            self._shapes[key] = shape
        return shape

    def _general(self, event: dict[str, Any]) -> str:
        message = fast_message(event)
        record = self._record(event, formatEvent(event) if message is None else message)
        for key, value in event.items():
            if not key.startswith(_NOT_FIELDS) and key not in record:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        return _encode(record) + "\n"

    def _time(self, when: float) -> str:
        """ISO 8601 in UTC, to the microsecond: C{datetime.isoformat} for the second, once a second."""
        second = int(when)
        if second != self._second:
            self._second = second
            # The second's text with a place for the microseconds (%d truncates as int() does).
            self._stamp = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%%06d+00:00")
        return self._stamp % ((when - second) * 1_000_000)

    def _record(self, event: dict[str, Any], message: str) -> dict[str, Any]:
        return {
            "time": self._time(event.get("log_time", 0)),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": message,
        }

    def unwritable(self, event: dict[str, Any], why: str) -> str:
        return _json.dumps(self._record(event, why), default=str) + "\n"  # still one JSON object a line


@implementer(ILogObserver)
class BufferedText(_Buffered):
    """
    twistd's classic text lines (``TIME [namespace#level] message``), written
    without what makes them cost under load: the timestamp is formatted once
    per second rather than once per line, and the lines go out together
    (L{_Buffered}).
    """

    def __init__(self, out: IO[str] | Any, reactor: Any = None):
        super().__init__(out, reactor)
        self._second = -1
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp

    def line(self, event: dict[str, Any]) -> str | None:
        text = self._fast(event)
        if text is None:
            text = formatEventAsClassicLogText(event, formatTime=self._time)
        return text

    def _fast(self, event: dict[str, Any]) -> str | None:
        """The same line as Twisted writes it, the message through L{fast_message}; L{None}: Twisted's path."""
        message = fast_message(event)
        if message is None:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._time(event.get('log_time'))} [{system}] {message}\n"


# Set by portrouter.tap from twistd's --logfile (a daemon's default: twistd.log),
# for text_file, which twistd calls with no arguments.
FILE: str | None = None

# twistd's own log file rotates at 1 MB and keeps every old file, renaming
# each one at every rotation, in the reactor's thread. A router that logs
# 10,000 connections a second writes over a megabyte a second: a rotation
# a second, each renaming every file before it (after an hour, thousands
# of renames a second, and a disk that fills). Rotated at 100 MB, ten kept.
ROTATE_BYTES = 100_000_000
KEEP_ROTATED = 10


def text() -> BufferedText:
    """The observer portrouter uses under ``twistd -n`` when no log option is given."""
    return BufferedText(sys.stdout)


def text_file() -> BufferedText:
    """
    The observer for twistd's ``--logfile`` (and a daemon's ``twistd.log``):
    Twisted's own L{LogFile}, rotated at L{ROTATE_BYTES} and on SIGUSR1 (as
    twistd's is), L{KEEP_ROTATED} old files kept, written as every
    destination is (L{_Buffered}).
    """
    assert FILE is not None, "portrouter.tap names the file before twistd asks for the observer"
    log_file = LogFile.fromFullPath(FILE, rotateLength=ROTATE_BYTES, maxRotatedFiles=KEEP_ROTATED)
    observer = BufferedText(log_file)
    if not signal.getsignal(signal.SIGUSR1):  # as twistd: unless someone else handles it

        def rotate() -> None:
            observer.flush()
            log_file.rotate()

        def on_usr1(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            cast(IReactor, reactor).callFromThread(rotate)

        signal.signal(signal.SIGUSR1, on_usr1)
    return observer


def json() -> JSONLines:
    """The observer factory named on twistd's ``--logger``."""
    path = os.environ.get("PORTROUTER_JSON_LOG")
    out = open(path, "a", encoding="utf-8") if path else sys.stdout
    return JSONLines(out)
