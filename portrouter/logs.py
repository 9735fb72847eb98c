"""
Logs for machines: one JSON object per line, for log shippers.

    twistd --logger portrouter.logs.json -n portrouter --config routes.yaml

writes to standard output, or to the file named by ``PORTROUTER_JSON_LOG``.
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
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer


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


def json() -> JSONLines:
    """The observer factory named on twistd's ``--logger``."""
    path = os.environ.get("PORTROUTER_JSON_LOG")
    out = open(path, "a", encoding="utf-8") if path else sys.stdout
    return JSONLines(out)
