"""
``twistd portrouter``: options and the service they make.

A bad config or a port the OS refuses ends the process before anything is
bound, with one line on stderr that names the problem, and a non-zero exit.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from dataclasses import replace
from typing import Any, cast

from twisted.application.service import IService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from portrouter import logs
from portrouter.cluster import cluster_store
from portrouter.config import ConfigError, load, with_cli
from portrouter.eventloop import lean_dispatch
from portrouter.model import Config
from portrouter.front import Front
from portrouter.interfaces import IReactor
from portrouter.router import BindError, ChangeRefused, RouterService
from portrouter.state import StateError

log = Logger(namespace="portrouter")


class Options(usage.Options):
    synopsis = "[--config routes.yaml] [options]"
    longdesc = (
        "Routes HTTP by path on the ingress, and HTTP, TCP, UDP and WebSocket "
        "on per-project ports. Every route given here joins those of the file. "
        "LISTEN is a strports description (tcp:3000, ssl:443:..., unix:/path); "
        "BACKEND is a client endpoint (tcp:127.0.0.1:3001, unix:/run/app.sock); "
        "a UDP route is 'udp:PORT[:interface=ADDR] -> HOST:PORT'."
    )
    optParameters = [
        ["config", "c", None, "The routes file (YAML)."],
        ["ingress", None, None, "Where the ingress listens (default tcp:8080)."],
        ["manhole", None, None, "Where the SSH admin shell listens."],
        ["state", None, None, "Where API-deployed projects are kept (default ./portrouter-state)."],
        ["node", None, None, "This router's name in its cluster, over cluster.node (several routers on one host "
                             "share a config file and differ by this)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["routes"] = []

    def _route(protocol: str) -> Any:  # type: ignore[misc]
        def opt(self: Options, value: str) -> None:
            self["routes"].append((protocol, value))

        opt.__doc__ = f"A {protocol.upper()} route 'LISTEN -> BACKEND' (repeatable)."
        return opt

    opt_http = _route("http")
    opt_tcp = _route("tcp")
    opt_udp = _route("udp")
    opt_ws = _route("ws")
    del _route

    def read_config(self) -> Config:
        """The file (if any) and the CLI, joined; again on every reload."""
        config = load(self["config"]) if self["config"] else Config()
        config = with_cli(
            config,
            ingress=self["ingress"],
            state=self["state"],
            manhole=self["manhole"],
            routes=self["routes"],
        )
        if self["node"] is not None:
            if not self["node"]:
                raise ConfigError("--node", "must not be empty")
            if config.cluster is None:
                raise ConfigError("--node", f"{self['node']!r} names a router of a cluster, and the config has "
                                            "no cluster section")
            config = replace(config, cluster=replace(config.cluster, node=self["node"]))
        return config

    def postOptions(self) -> None:
        twistd = getattr(self, "parent", None)
        if twistd is not None and not twistd.get("logger") and not twistd.get("syslog"):
            # Log where twistd would, in its format, but without a write (and
            # for a file a system call) per line: at thousands of requests
            # per second one log line each, that alone halved the rate.
            logfile = twistd.get("logfile")
            if twistd.get("nodaemon") and (not logfile or logfile == "-"):
                twistd["logger"] = "portrouter.logs.text"
            elif logfile != "-":  # a daemon logging to stdout: twistd's own refusal stands
                logs.FILE = os.path.abspath(logfile or "twistd.log")
                twistd["logger"] = "portrouter.logs.text_file"
        try:
            self["parsed"] = self.read_config()
        except ConfigError as e:
            # One line an operator can act on, not a usage screen.
            sys.stderr.write(f"{e}\n")
            raise SystemExit(1) from None


class _Daemon(RouterService):
    """The router as twistd runs it: one-line start-up errors, our own signals."""

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.reactor.callWhenRunning(self._install_signals)

    def _install_signals(self) -> None:
        # twistd re-raises the signal that stopped it (exit status -15); a
        # SIGTERM is how operators ask for a normal stop, which exits 0.
        def stop(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stopping:
                log.info("Received {signal} again, stopping at once", signal=name)
                self.reactor.callFromThread(self.force_stop)
                return
            log.info("Received {signal}, shutting down", signal=name)
            self.stopping = True
            self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        def hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._reload)

        signal.signal(signal.SIGHUP, hup)

    def _reload(self) -> None:
        log.info("Received SIGHUP, reloading")
        d = defer.Deferred.fromCoroutine(self.reload())
        # A refused reload is logged by reload() itself; nothing changed.
        d.addErrback(lambda f: None if f.check(ChangeRefused) else log.failure("reload", f))

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except BindError as e:
            # twistd has redirected sys.stderr into the log by now.
            if sys.__stderr__ is not None:  # None only without any stderr at all
                sys.__stderr__.write(f"portrouter: {e}\n")
            raise SystemExit(1) from None


def _raise_fd_limit() -> None:
    # Each relayed connection holds two sockets (and two pipes while data
    # flows); the usual soft limit of 1024 would cap us at a few hundred.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(IReactor, default_reactor)  # the installed reactor has every facet
        lean_dispatch(reactor)  # the daemon's own reactor: nobody else's code depends on its log context
    _raise_fd_limit()
    try:
        cluster = options["parsed"].cluster
        return _Daemon(options["parsed"], reactor, Front,
                       reload_config=options.read_config if options["config"] else None,
                       store=cluster_store(cluster) if cluster is not None else None)
    except StateError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(1) from None
