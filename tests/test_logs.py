"""
A log observer that fails does not stop the router (issue 20): an event no
line can be made of leaves a line in its place and the next lines go on; a
destination whose writes fail, or another observer that raises on every
event, loses lines at most, never a request.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from portrouter import logs
from portrouter.config import parse
from portrouter.logs import BufferedText, JSONLines
from tests.httpbackend import Backend
from tests.support import LOOPBACK, in_thread, start_router, wait_for


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __format__(self, spec: str) -> str:
        raise RuntimeError("no format")


def event(fmt: str, **fields: Any) -> dict[str, Any]:
    return {"log_format": fmt, "log_time": 1.0, "log_namespace": "portrouter.test", **fields}


@pytest.mark.parametrize("kind", [BufferedText, JSONLines])
def test_an_event_no_line_can_be_made_of_leaves_one_in_its_place(kind: type[Any]) -> None:
    out = io.StringIO()
    observer = kind(out)
    observer(event("first {n}", n=1))
    observer(event("bad {thing}", thing=Unprintable()))
    observer(event("last {n}", n=3))
    observer.flush()
    lines = out.getvalue().splitlines()
    if kind is JSONLines:
        records = [json.loads(line) for line in lines]  # every line still one JSON object
        assert [r["message"] for r in records][::2] == ["first 1", "last 3"]
        assert "a log event could not be written (RuntimeError: no repr); its format: 'bad {thing}'" \
            == records[1]["message"]
    else:
        assert lines[0].endswith("first 1") and lines[-1].endswith("last 3")
        assert any("no format" in line for line in lines[1:-1])


class BrokenFile:
    """A destination every write to fails (a full disk, a closed pipe, a bug in a writer)."""

    def __init__(self) -> None:
        self.tries = 0

    def write(self, text: str) -> None:
        self.tries += 1
        raise RuntimeError("the disk is on fire")

    def flush(self) -> None:
        raise RuntimeError("the disk is on fire")


def curl(url: str) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}", url],
                          capture_output=True, text=True, timeout=60).stdout


@pytest_twisted.ensureDeferred
async def test_failing_observers_do_not_stop_the_router(tmp_path: Path, no_tracebacks: list[Any]) -> None:
    backend = Backend()
    broken = BrokenFile()
    failing = BufferedText(broken)
    good_out = io.StringIO()
    good = BufferedText(good_out)

    def raising(event: dict[str, Any]) -> None:
        raise ValueError("an observer with a bug")

    for observer in (failing, raising, good):
        globalLogPublisher.addObserver(observer)
    router = await start_router(config=parse({
        "ingress": f"tcp:0:interface={LOOPBACK}", "state": str(tmp_path / "state"),
        "projects": [{"name": "web", "backend": f"tcp:{LOOPBACK}:{backend.port}"}]}))
    try:
        for i in range(3):
            assert await in_thread(curl, f"http://{LOOPBACK}:{router.port_of()}/web/{i}") == "200"
        await wait_for(lambda: " GET /web/2 200 " in good_out.getvalue(), 15, "the good observer's line")
        assert broken.tries > 0  # it was tried, failed, and nothing stopped
    finally:
        await router.stopService()
        for observer in (failing, raising, good):
            globalLogPublisher.removeObserver(observer)
        backend.close()
    assert [n for n in range(3) if f" GET /web/{n} 200 " in good_out.getvalue()] == [0, 1, 2]
    # Twisted reports the raising observer to the others, as it should: expected here.
    assert no_tracebacks and all("disabling observer" in e.get("log_format", "") for e in no_tracebacks)
    no_tracebacks.clear()


class Point:
    x = 3

    def who(self) -> str:
        return "me"


@pytest.mark.parametrize("fmt, fields", [
    ("{client} {method} {target} {status} {bytes} {duration:.4f}s {project}{aborted}{tls}",
     {"client": "127.0.0.1", "method": "GET", "target": "/x", "status": 200, "bytes": 100,
      "duration": 0.000123, "project": "web", "aborted": "", "tls": ""}),
    ("{a[0]} and {p.x}", {"a": [7], "p": Point()}),
    ("{p.who()} calls", {"p": Point()}),  # Twisted's call syntax: its own formatter
    ("{missing} field", {}),  # Twisted says it cannot format it, and so do we
    ("braces {{literal}} {n!r}", {"n": "x"}),
])
def test_json_and_text_lines_say_what_twisteds_formatter_says(fmt: str, fields: dict[str, Any]) -> None:
    """The fast message (str.format_map) is Twisted's text, or Twisted's path is taken."""
    when = 1_764_800_000.123456
    one = event(fmt, **fields)
    one["log_time"] = when
    out = io.StringIO()
    observer = JSONLines(out)
    observer(one)
    observer.flush()
    record = json.loads(out.getvalue())
    assert record["message"] == formatEvent(one)
    assert abs(datetime.fromisoformat(record["time"]).timestamp() - when) < 1e-5
    text = io.StringIO()
    plain = BufferedText(text)
    plain(one)
    plain.flush()
    assert text.getvalue().rstrip("\n").endswith(formatEvent(one))


# Field values a template writes (text, ints, floats), with what makes it
# give way: text that needs escaping (quotes, backslashes, control and
# non-ASCII characters), floats json writes its own way (NaN, Infinity); and
# values of other types (bools, None, lists) for an event after the first.
simple = st.one_of(
    st.sampled_from(["127.0.0.1", "GET", "/", "", " (aborted)", 'a"b', "a\\b", "é", "\x7f", "\n", "{x}", "100%",
                     "%s"]),
    st.text(max_size=6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.25, float("nan"), float("inf"), float("-inf"), 1e16]),
)
values = st.one_of(simple, st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
names = st.sampled_from(["client", "status", "duration", "project", "message", "x", "a-b", "p%s"])


@st.composite
def shaped_events(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    """A format, and events of one shape (the same keys in the same order) whose values differ."""
    keys = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    pieces = draw(st.lists(st.one_of(st.sampled_from(keys).map(lambda k: "{%s}" % k),
                                     st.sampled_from(["{%s!r}" % keys[0], "{%s:.2f}" % keys[0], "{%s:>4}" % keys[0],
                                                      "{%s!a}" % keys[0], "{%s:.4f}s" % keys[0], "100%% {%s}" % keys[0]]),
                                     st.text(max_size=4).map(lambda t: t.replace("{", "{{").replace("}", "}}"))),
                           max_size=5))
    fmt = " ".join(pieces)
    namespace = draw(st.sampled_from(["portrouter.http", "portrouter.tcp", 'odd"name', "é"]))
    events = []
    for n, when in enumerate(draw(st.lists(st.floats(min_value=0, max_value=2e9), min_size=2, max_size=5))):
        one = {key: draw(simple if n == 0 else st.one_of(simple, values)) for key in keys}
        one.update(log_format=fmt, log_namespace=namespace, log_level=LogLevel.info, log_time=when, log_source=None)
        events.append(one)
    return fmt, events


@settings(max_examples=400, deadline=None)
@given(shaped_events())
def test_a_json_line_written_through_its_shapes_template_is_the_general_one(case: tuple[str, list[dict[str, Any]]]) -> None:
    """
    Events of a shape seen before are written through a template (one
    printf-style %, no json encoder); whatever their values, the line is
    the one the general way writes, and one JSON object.
    """
    fmt, events = case
    observer = JSONLines(io.StringIO())
    for one in events:
        through_shape = observer.line(one)
        general = observer._general(one)
        assert through_shape == general
        json.loads(general, parse_constant=lambda name: name)  # NaN and Infinity as json writes them


@pytest.mark.parametrize("value", ["it's", 'say "hi"', "back\\slash", "tab\there", "café", "plain"])
def test_a_value_repr_or_json_would_escape_takes_the_general_way(value: str) -> None:
    """repr writes a value holding a single quote in double quotes: inside a JSON string, they need escaping."""
    observer = JSONLines(io.StringIO())
    for target in ("plain", value):  # the first makes the shape, the second takes it or not
        one = event("{target!r} {target}", target=target)
        line = observer.line(one)
        assert line == observer._general(one)
        assert json.loads(line)["message"] == f"{target!r} {target}"


@pytest.mark.parametrize("fmt", [
    "{client} {method} {target} {status} {bytes} {duration:.4f}s {project}{aborted}{tls}",
    "{client} 100% %s %d%% {duration!r} {status:.2f}",  # percent signs of the format's own
])
def test_the_access_line_is_written_through_its_template(fmt: str) -> None:
    """The per-request line does take the template (the test above cannot fail by never taking it)."""
    fields = {"client": "127.0.0.1", "method": "GET", "target": "/x", "status": 200, "bytes": 100,
              "duration": 0.000123, "project": "web", "aborted": "", "tls": ""}
    if ":.2f" in fmt:
        fields["status"] = 200.0
    observer = JSONLines(io.StringIO())
    one = event(fmt, **fields)
    observer.line(one)
    [shape] = observer._shapes.values()
    assert shape is not None and shape.fill(one) is not None
    assert observer.line(one) == observer._general(one)


class Writes(io.StringIO):
    """A destination that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.mark.parametrize("kind", [BufferedText, JSONLines])
@pytest_twisted.ensureDeferred
async def test_lines_are_made_and_written_once_per_reactor_turn(kind: type[Any]) -> None:
    """Events emitted in one turn wait as they are; the next turn makes their lines, in order, in one write."""
    from twisted.internet import reactor, task

    out = Writes()
    observer = kind(out)
    made: list[str] = []
    general = observer.line
    observer.line = lambda one: made.append(one["log_format"]) or general(one)  # type: ignore[method-assign]
    for n in range(3):
        observer(event(f"line {n}"))
    assert made == [] and out.writes == 0  # nothing made or written within the turn
    await task.deferLater(reactor, 0, lambda: None)
    assert made == ["line 0", "line 1", "line 2"]
    assert out.writes == 1
    lines = out.getvalue().splitlines()
    if kind is JSONLines:
        assert [json.loads(line)["message"] for line in lines] == ["line 0", "line 1", "line 2"]
    else:
        assert [line.rsplit("] ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]


@pytest.mark.parametrize("kind", [BufferedText, JSONLines])
def test_a_busy_router_writes_at_most_once_per_interval(kind: type[Any]) -> None:
    """
    After a write, the next waits until WRITE_INTERVAL has passed since it
    (lines of several turns in one write, in order); a flood of events is
    written without waiting once PENDING_MAX are pending.
    """
    from twisted.internet.task import Clock

    clock = Clock()
    clock.running = True  # type: ignore[attr-defined]  # as a running reactor says
    out = Writes()
    observer = kind(out, clock)
    observer(event("first"))
    clock.advance(0)  # nothing written before: at the end of the turn
    assert out.writes == 1
    clock.advance(0.01)
    observer(event("second"))
    clock.advance(0)
    observer(event("third"))  # another turn, the same write
    clock.advance(0.039)
    assert out.writes == 1
    clock.advance(0.001)  # WRITE_INTERVAL after the first write
    assert out.writes == 2
    assert out.getvalue().count("\n") == 3 and out.getvalue().index("second") < out.getvalue().index("third")
    for n in range(logs.PENDING_MAX - 1):
        observer(event(f"flood {n}"))
    assert out.writes == 2
    observer(event("the last of the flood"))
    assert out.writes == 3 and not observer.pending
    clock.advance(logs.WRITE_INTERVAL)  # the write scheduled before finds nothing to write
    assert out.writes == 3


def test_the_log_file_rotates_by_size_and_keeps_a_few_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    twistd's own rotation kept every old file and renamed each at every
    rotation: a busy router's reactor spent its time renaming, and the disk
    filled. The newest lines are in twistd.log, the older ones in .1, .2, .3.
    """
    monkeypatch.setattr(logs, "FILE", str(tmp_path / "twistd.log"))
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    monkeypatch.setattr(logs, "KEEP_ROTATED", 3)
    before = signal.getsignal(signal.SIGUSR1)
    try:
        observer = logs.text_file()
        for n in range(200):  # about 60 bytes a line: enough for six files
            observer(event("line {n:04d}", n=n))
            observer.flush()  # a write each (LogFile rotates before a write)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twistd.log", "twistd.log.1", "twistd.log.2", "twistd.log.3"]
    numbers = [int(m) for name in ("twistd.log.3", "twistd.log.2", "twistd.log.1", "twistd.log")
               for m in re.findall(r"line (\d{4})", (tmp_path / name).read_text())]
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0  # the oldest are gone, the rest in order
