"""
The daemon's event loop, without the cost of Twisted's legacy log context.

Twisted's epoll reactor calls every ready descriptor through
C{twisted.python.log.callWithLogger}: a C{logPrefix()} call, a context dict
copied and pushed on a thread-local stack, and popped again. That context
only names the "system" of lines written with the legacy
C{twisted.python.log} API; portrouter's lines (C{twisted.logger}) never read
it. Under load it was a sixth of the router's CPU: a new TCP connection is
five such calls, an HTTP request two or three (measured: 13% more
connections/s, 17% more small requests/s without it).

L{lean_dispatch} gives the daemon's reactor a poll that calls each ready
descriptor's read or write directly, as Twisted's does inside that wrapper.
A descriptor that is readable and not writable (most events: data, a FIN,
or a FIN after ours, which epoll reports as hung up too) is read at once,
as Twisted's C{_doReadOrWrite} reads it; that sorts out the rest (writable,
hung up with nothing to read), and its checks cost a relayed TCP
connection 1 us each time. What is skipped for those: Twisted's check
that the descriptor's C{fileno()} is not -1 (a closed descriptor still
registered, which no code of ours leaves).
What changes: a line written through the legacy API while a descriptor is
handled (Twisted's own "Unhandled Error" after a protocol raised, say) says
C{-} where it said the connection's log prefix; its traceback names the
protocol as before. An error escaping the handling itself is logged with
the descriptor, as Twisted's wrapper does, and the loop goes on.
"""

from __future__ import annotations

import enum
import errno
import select
import sys
from typing import Any, Callable

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log as legacy_log

log = Logger()


def lean_dispatch(reactor: Any) -> bool:
    """
    Give C{reactor} the lean poll, if it is Twisted's epoll reactor with its
    own poll (another reactor, or one whose poll was changed, is left as it
    is). Whether it was given.
    """
    if not isinstance(reactor, EPollReactor) or type(reactor).doPoll is not EPollReactor.doPoll:
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    readable = select.EPOLLIN
    readable_or_writable = select.EPOLLIN | select.EPOLLOUT
    after = reactor._lean_round = _Round()  # type: ignore[attr-defined]  # after_round finds it here

    def doPoll(timeout: float | None) -> None:
        # Twisted's EPollReactor.doPoll, minus callWithLogger.
        try:
            ready = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise  # a programming error, as Twisted says: loudly
        after.phase = _Phase.EVENTS
        try:
            for fd, event in ready:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed by a descriptor handled before it in this round
                try:
                    if event & readable_or_writable == readable:
                        # What _doReadOrWrite does with it: read, and
                        # disconnect the descriptor if the read says so
                        # (a read that ended) or raises (not in a read, as
                        # Twisted has it; logged as Twisted logs it).
                        try:
                            why = selectable.doRead()
                            in_read = True
                        except BaseException:
                            why = sys.exc_info()[1]
                            in_read = False
                            legacy_log.err()
                        if why:
                            disconnect(selectable, why, in_read)  # type: ignore[no-untyped-call]
                    else:
                        handle(selectable, fd, event)  # type: ignore[no-untyped-call]
                except BaseException:
                    log.failure("while handling {selectable!r}", selectable=selectable)
            if after.calls:  # most rounds ask for nothing: no passes set up
                after.phase = _Phase.AFTER
                # What these calls ask for at the round's end (at_round_end)
                # comes after them, in a pass of its own; a few passes at most,
                # whatever a call asks for, and the rest a turn later.
                for _ in range(_PASSES):
                    if not after.calls:
                        break
                    calls, after.calls = after.calls, []
                    for call in calls:
                        try:
                            call()
                        except BaseException:
                            log.failure("after a round of events, in {call!r}", call=call)
        finally:
            after.phase = _Phase.IDLE
            if after.calls:
                calls, after.calls = after.calls, []
                for call in calls:
                    reactor.callLater(0, call)

    reactor.doPoll = reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


class _Phase(enum.Enum):
    """Where the lean poll is."""

    IDLE = "handling no round"
    EVENTS = "handling a round's events"
    AFTER = "making the calls asked for at the round's end (after_round, at_round_end)"


# Passes over the calls at a round's end: the calls asked for by the round's
# events, then those that they ask for (a relay started once connected).
_PASSES = 3


class _Round:
    """What the lean poll calls once it has handled the round of events it is in (L{after_round}, L{at_round_end})."""

    __slots__ = ("phase", "calls")

    def __init__(self) -> None:
        self.phase = _Phase.IDLE
        self.calls: list[Callable[[], object]] = []


# The two ways to ask for a call at the end of a round, side by side (each
# is four lines on a per-connection path: written out, not shared):
#   asked while the round's...   events    its end's calls   no round
#   after_round                  queued    a reactor turn    a reactor turn
#   at_round_end                 queued    queued (a pass)   at once
def after_round(reactor: Any, call: Callable[[], object]) -> None:
    """
    C{reactor.callLater(0, call)}: once the events being handled are all
    handled. Within the lean poll's round it is called at the end of the
    round, without a DelayedCall (made, put in the reactor's heap and taken
    out again: 3 to 8 us, which was most of what receiving a PROXY header
    cost a direct TCP connection); anywhere else, by callLater.
    """
    round_: _Round | None = getattr(reactor, "_lean_round", None)
    if round_ is not None and round_.phase is _Phase.EVENTS:
        round_.calls.append(call)
    else:
        reactor.callLater(0, call)


def at_round_end(reactor: Any, call: Callable[[], object]) -> None:
    """
    C{call()} once the lean poll has handled the round of events it is in,
    as L{after_round}, and after the calls that asked for it, when one did
    (the relays that a round of PROXY headers read start after all of their
    connects); anywhere else (another reactor, or no round being handled),
    now: there is no round to gather work from, and waiting for a turn
    would only add one. A call asked for at the end of a round that asks
    for itself again is made a turn later (L{_PASSES}), not in a loop.
    """
    round_: _Round | None = getattr(reactor, "_lean_round", None)
    if round_ is not None and round_.phase is not _Phase.IDLE:
        round_.calls.append(call)
    else:
        call()


def watch_reading(reactor: Any, selectable: Any, fd: int) -> None:
    """
    C{reactor.addReader(selectable)}, for a socket's descriptor C{fd} (its
    C{fileno()}, which the caller knows): on Twisted's epoll reactor, its
    tables and epoll_ctl as its addReader sets them, without the calls
    around them (a relayed connection adds two readers).
    """
    if isinstance(reactor, EPollReactor):
        reads = reactor._reads
        if fd in reads:
            return
        if fd in reactor._writes:
            reactor._poller.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        else:
            reactor._poller.register(fd, select.EPOLLIN)
        reads.add(fd)
        reactor._selectables[fd] = selectable
    else:
        reactor.addReader(selectable)


def unwatch_reading(reactor: Any, selectable: Any, fd: int) -> None:
    """C{reactor.removeReader(selectable)}, as L{watch_reading} is its addReader."""
    if isinstance(reactor, EPollReactor):
        reads = reactor._reads
        if fd not in reads:
            return
        if fd in reactor._writes:
            reactor._poller.modify(fd, select.EPOLLOUT)
        else:
            del reactor._selectables[fd]
            reactor._poller.unregister(fd)
        reads.remove(fd)
    else:
        reactor.removeReader(selectable)


def forget(reactor: Any, selectable: Any, fd: int) -> None:
    """
    Stop watching C{selectable}, whose socket the caller closes next, without
    telling epoll: closing a socket's last descriptor takes it out of the
    epoll set (epoll(7)), so the epoll_ctl calls Twisted's removeReader and
    removeWriter make are spent for nothing (a relayed TCP connection now
    makes three, as HAProxy's do; it made six before). Should another process
    hold the socket for a moment (a service forked, not posix_spawned,
    before its exec closes what it inherited close-on-exec), its events
    still come under the old number until then: a descriptor no longer
    watched is skipped, and one that has the number since finds nothing to
    read. Any reactor but Twisted's epoll reactor (a test's memory reactor)
    is asked the usual way.
    """
    if isinstance(reactor, EPollReactor):
        reactor._reads.discard(fd)
        reactor._writes.discard(fd)
        reactor._selectables.pop(fd, None)
    else:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
