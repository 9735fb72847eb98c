"""
Logs for machines: one JSON object per line, for log shippers.

    twistd --logger portrouter.logs.json -n portrouter --config routes.yaml

writes to standard output, or to the file named by ``PORTROUTER_JSON_LOG``.
Under ``twistd -n`` with no log option, portrouter uses L{text}: twistd's
own line format, flushed once per reactor turn (see L{BufferedText}).
Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``message``
(the text twistd would print) and every structured field of the event (a
finished connection carries ``protocol``, ``project``, ``peer``, ``bytes_in``,
``bytes_out``, ``duration`` and ``reason``; an HTTP request ``client``,
``method``, ``target``, ``status``, ``bytes``, ``duration``, ``project``).
"""

from __future__ import annotations

import json as _json
import os
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.logger import ILogObserver, formatEvent, formatEventAsClassicLogText
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from portrouter.interfaces import IReactor


@implementer(ILogObserver)
class JSONLines:
    def __init__(self, out: IO[str]):
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and not key.startswith("_"):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(_json.dumps(record, default=repr) + "\n")
        self.out.flush()


@implementer(ILogObserver)
class BufferedText:
    """
    twistd's classic text lines (``TIME [namespace#level] message``), written
    without what makes them cost under load: the timestamp is formatted once
    per second rather than once per line, and the stream is flushed once per
    reactor turn rather than once per line.
    """

    def __init__(self, out: IO[str]):
        self.out = out
        self._second = -1
        self._stamp = ""
        self._flush_scheduled = False

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._fast(event)
        if text is None:
            text = formatEventAsClassicLogText(event, formatTime=self._time)
            if text is None:
                return
        self.out.write(text)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            from twisted.internet import reactor

            if isInIOThread():
                reactor.callLater(0, self._flush)
            else:
                cast(IReactor, reactor).callFromThread(self._flush)

    def _fast(self, event: dict[str, Any]) -> str | None:
        """
        The same line through C{str.format_map} (in C) instead of Twisted's
        pure-Python formatter, for plain events; L{None} for anything else
        (Twisted's call syntax, tracebacks), which takes the general path.
        """
        fmt = event.get("log_format")
        if fmt is None or "log_failure" in event or "()" in fmt:
            return None
        try:
            message = fmt.format_map(event)
        except Exception:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._time(event.get('log_time'))} [{system}] {message}\n"

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self.out.flush()
        except (OSError, ValueError):
            pass  # stdout went away; nothing better to do with a log line


def text() -> BufferedText:
    """The observer portrouter uses under ``twistd -n`` when no log option is given."""
    return BufferedText(sys.stdout)


def json() -> JSONLines:
    """The observer factory named on twistd's ``--logger``."""
    path = os.environ.get("PORTROUTER_JSON_LOG")
    out = open(path, "a", encoding="utf-8") if path else sys.stdout
    return JSONLines(out)
