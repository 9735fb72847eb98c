"""
The daemon's lean event loop (portrouter.eventloop): each ready descriptor's
read or write is called as Twisted's reactor calls it, without the legacy
log context; a handler that raises is disconnected as before, an error
escaping the handling is logged, and the other descriptors of the round
are still handled. The daemon runs with it (every test that starts
``twistd -n portrouter`` goes through it).
"""

from __future__ import annotations

import select
import socket
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.pollreactor import PollReactor

from portrouter.eventloop import after_round, at_round_end, forget, lean_dispatch, unwatch_reading, watch_reading


class Reader:
    """A readable end of a socket pair, counting its reads; C{fail} makes it raise."""

    def __init__(self, sock: socket.socket, fail: BaseException | None = None, lost_fails: bool = False):
        self.sock = sock
        self.fail = fail
        self.lost_fails = lost_fails
        self.reads = 0
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(100)
        if self.fail is not None:
            raise self.fail

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        if self.lost_fails:
            raise RuntimeError("connectionLost broke too")


@pytest.fixture
def loop() -> Any:
    reactor = EPollReactor()  # not installed: driven by hand, one round at a time
    yield reactor
    for selectable in list(reactor._selectables.values()):
        reactor.removeReader(selectable)


def ready_reader(reactor: EPollReactor, **kw: Any) -> tuple[Reader, socket.socket]:
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    reader = Reader(mine, **kw)
    reactor.addReader(reader)
    theirs.send(b"x")
    return reader, theirs


def test_an_epoll_reactor_gets_the_lean_poll_and_reads_what_is_ready(loop: EPollReactor) -> None:
    assert lean_dispatch(loop)
    assert loop.doIteration == loop.doPoll and loop.doPoll.__name__ == "doPoll"
    assert loop.doPoll.__qualname__.startswith("lean_dispatch")
    one, keep1 = ready_reader(loop)
    two, keep2 = ready_reader(loop)
    loop.doIteration(0)
    assert (one.reads, two.reads) == (1, 1)
    loop.doIteration(0)  # nothing new: nothing read
    assert (one.reads, two.reads) == (1, 1)


def test_readable_and_hung_up_is_read_at_once_and_only_writable_goes_through_twisted(loop: EPollReactor) -> None:
    """
    A descriptor that is readable and not writable is read by the lean poll
    itself, a peer's close reported as hung up too; Twisted's
    C{_doReadOrWrite} still sorts out whatever is writable.
    """
    handled: list[tuple[int, int]] = []
    twisted_handles = loop._doReadOrWrite

    def handle(selectable: Any, fd: int, event: int) -> None:
        handled.append((fd, event))
        twisted_handles(selectable, fd, event)

    loop._doReadOrWrite = handle  # type: ignore[method-assign]
    lean_dispatch(loop)
    hung_up, theirs = ready_reader(loop)
    theirs.close()  # data, then the peer gone: readable and hung up
    assert dict(loop._poller.poll(0))[hung_up.fileno()] & (select.EPOLLIN | select.EPOLLHUP) == (
        select.EPOLLIN | select.EPOLLHUP)
    mine, other = socket.socketpair()
    writer = Writer(mine)
    loop.addWriter(writer)
    loop.doIteration(0)
    assert hung_up.reads == 1
    assert handled == [(writer.fileno(), select.EPOLLOUT)] and writer.writes == 1
    loop.removeWriter(writer)
    for sock in (mine, other):
        sock.close()


def test_a_reader_that_raises_is_disconnected_and_the_others_are_still_read(
        loop: EPollReactor, no_tracebacks: list[dict[str, Any]]) -> None:
    lean_dispatch(loop)
    bad, keep1 = ready_reader(loop, fail=RuntimeError("a protocol bug"))
    worse, keep2 = ready_reader(loop, fail=RuntimeError("another"), lost_fails=True)
    good, keep3 = ready_reader(loop)
    loop.doIteration(0)
    assert good.reads == 1
    assert len(bad.lost) == 1 and bad not in loop.getReaders()  # Twisted's handling, as before
    assert worse not in loop.getReaders()
    # The error escaping Twisted's handling (connectionLost raised too) is
    # logged with its descriptor, and the loop went on.
    [escaped] = [e for e in no_tracebacks if e.get("log_format") == "while handling {selectable!r}"]
    assert escaped["selectable"] is worse
    assert escaped["log_failure"].getErrorMessage() == "connectionLost broke too"
    no_tracebacks.clear()  # all expected


class Done(Reader):
    """A reader whose read says the connection is over, as Twisted's transports do at EOF."""

    def doRead(self) -> Any:
        super().doRead()
        return ConnectionDone()


class Writer(Reader):
    """A writable end, counting its writes."""

    writes = 0

    def doWrite(self) -> None:
        self.writes += 1


def test_a_read_that_says_the_connection_is_over_disconnects_it_and_writes_go_as_before(loop: EPollReactor) -> None:
    lean_dispatch(loop)
    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    over = Done(mine)
    loop.addReader(over)
    theirs.send(b"x")
    other, keep = socket.socketpair()
    writer = Writer(other)
    loop.addWriter(writer)  # writable, nothing else: Twisted's own handling
    loop.doIteration(0)
    assert over.reads == 1 and [r.type for r in over.lost] == [ConnectionDone]
    assert over not in loop.getReaders()
    assert writer.writes == 1 and writer in loop.getWriters()
    loop.removeWriter(writer)
    for sock in (mine, theirs, other, keep):
        sock.close()


def test_other_reactors_are_left_as_they_are() -> None:
    poll = PollReactor()
    assert not lean_dispatch(poll)
    assert "doIteration" not in vars(poll)

    class Changed(EPollReactor):
        def doPoll(self, timeout: float | None) -> None:  # type: ignore[override]
            super().doPoll(timeout)

    changed = Changed()
    assert not lean_dispatch(changed)
    assert "doPoll" not in vars(changed)


def test_forget_leaves_a_closed_socket_to_the_kernel(loop: EPollReactor) -> None:
    """
    forget drops a descriptor from the reactor's tables without epoll_ctl;
    closing its socket takes it out of the epoll set: its peer's close
    (readable, hung up) is reported no more, and a socket given the same
    number is watched as any other.
    """
    lean_dispatch(loop)
    gone, peer = socket.socketpair()
    gone.setblocking(False)
    old = Reader(gone)
    loop.addReader(old)
    loop.addWriter(old)
    fd = gone.fileno()
    forget(loop, old, old.fileno())
    gone.close()
    assert fd not in loop._selectables and fd not in loop._reads and fd not in loop._writes
    peer.close()
    assert loop._poller.poll(0) == []  # nothing registered is left for the old socket
    reader, theirs = ready_reader(loop)
    loop.doPoll(0)
    assert reader.reads == 1 and old.reads == 0
    theirs.close()


def test_watch_and_unwatch_reading_are_add_and_remove_reader_without_their_calls(loop: EPollReactor) -> None:
    lean_dispatch(loop)
    reader, theirs = ready_reader(loop)  # Twisted's addReader, for comparison
    mine, other = socket.socketpair()
    mine.setblocking(False)
    both = Writer(mine)
    loop.addWriter(both)
    watch_reading(loop, both, both.fileno())  # writing already: now reading too
    watch_reading(loop, both, both.fileno())  # twice is once
    other.send(b"x")
    assert both in loop.getReaders() and both in loop.getWriters()
    assert dict(loop._poller.poll(0))[both.fileno()] == select.EPOLLIN | select.EPOLLOUT
    assert loop._selectables[both.fileno()] is both
    loop.doIteration(0)
    assert (reader.reads, both.reads, both.writes) == (1, 1, 1)
    unwatch_reading(loop, both, both.fileno())  # still writing: epoll is told to report that only
    unwatch_reading(loop, both, both.fileno())
    assert both not in loop.getReaders() and both in loop.getWriters()
    assert dict(loop._poller.poll(0))[both.fileno()] == select.EPOLLOUT
    watch_reading(loop, both, both.fileno())
    loop.removeWriter(both)
    unwatch_reading(loop, both, both.fileno())  # reading only: gone from the reactor and from epoll
    assert both.fileno() not in loop._selectables and both.fileno() not in dict(loop._poller.poll(0))
    for sock in (theirs, mine, other):
        sock.close()


def test_forget_asks_any_other_reactor_the_usual_way() -> None:
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    one, other = socket.socketpair()
    reader = Reader(one)
    reactor.addReader(reader)
    reactor.addWriter(reader)
    forget(reactor, reader, reader.fileno())
    assert not reactor.readers and not reactor.writers
    watch_reading(reactor, reader, reader.fileno())
    assert reactor.readers == {reader}
    unwatch_reading(reactor, reader, reader.fileno())
    assert not reactor.readers
    one.close()
    other.close()


def test_calls_after_a_round_wait_for_its_end_and_elsewhere_take_a_turn(
        loop: EPollReactor, no_tracebacks: list[dict[str, Any]]) -> None:
    lean_dispatch(loop)
    said: list[tuple[int, int]] = []
    readers: list[Reader] = []

    def broken() -> None:
        raise RuntimeError("a call after the round broke")

    class Asks(Reader):
        """A reader that asks for a call after the round: the one that breaks, or one that notes the reads."""

        def doRead(self) -> None:
            super().doRead()
            after_round(loop, broken if self is readers[0] else lambda: said.append((one.reads, two.reads)))

    socks = [socket.socketpair() for _ in range(2)]
    for mine, theirs in socks:
        mine.setblocking(False)
        readers.append(Asks(mine))
        loop.addReader(readers[-1])
        theirs.send(b"x")
    one, two = readers
    loop.doIteration(0)
    assert said == [(1, 1)]  # after both were read, before the poll returned, whatever broke beside it
    [escaped] = [e for e in no_tracebacks if e.get("log_format") == "after a round of events, in {call!r}"]
    assert escaped["log_failure"].getErrorMessage() == "a call after the round broke"
    no_tracebacks.clear()  # expected
    at_round_end(loop, lambda: said.append((2, 2)))  # the round is over, whatever broke in it: at once
    assert said == [(1, 1), (2, 2)]
    del said[1:]

    after_round(loop, lambda: said.append((0, 0)))  # no round open: a turn of the reactor's
    [later] = loop.getDelayedCalls()
    assert later.getTime() <= loop.seconds() and said == [(1, 1)]
    later.cancel()
    for reader in readers:
        loop.removeReader(reader)
    for pair in socks:
        for sock in pair:
            sock.close()


def test_calls_at_a_rounds_end_come_after_the_calls_asking_for_them_and_elsewhere_now(loop: EPollReactor) -> None:
    """
    at_round_end: in a round of the lean poll, after the round's events and
    the calls asked for then (a relay started after the connects of every
    PROXY header read at the round's end); anywhere else, at once.
    """
    lean_dispatch(loop)
    order: list[str] = []

    def first() -> None:
        order.append("first")
        at_round_end(loop, lambda: order.append("asked for by first"))

    class Asks(Reader):
        def doRead(self) -> None:
            super().doRead()
            after_round(loop, first)
            at_round_end(loop, lambda: order.append("asked for by the reader"))
            after_round(loop, lambda: order.append("second"))
            order.append("read")

    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    reader = Asks(mine)
    loop.addReader(reader)
    theirs.send(b"x")
    loop.doIteration(0)
    assert order == ["read", "first", "asked for by the reader", "second", "asked for by first"]
    assert not loop.getDelayedCalls()

    # after_round asked for at the round's end keeps its meaning: a turn of
    # the reactor's. A call that asks for itself again and again at the
    # round's end is made in a few passes, then a turn later: no loop.
    asked: list[int] = []

    def again() -> None:
        asked.append(len(asked))
        at_round_end(loop, again)

    def in_the_after_phase() -> None:
        after_round(loop, lambda: order.append("a turn later"))
        again()

    class AsksAgain(Reader):
        def doRead(self) -> None:
            super().doRead()
            after_round(loop, in_the_after_phase)

    loop.removeReader(reader)
    reader = AsksAgain(mine)
    loop.addReader(reader)
    theirs.send(b"x")
    loop.doIteration(0)
    assert asked == [0, 1, 2] and len(loop.getDelayedCalls()) == 2
    for call in loop.getDelayedCalls():
        call.cancel()
    at_round_end(loop, lambda: order.append("now"))
    assert order[-1] == "now"
    loop.removeReader(reader)
    mine.close()
    theirs.close()
