#!/usr/bin/env python3
"""
portrouter's benchmarks in one command: ``python3 bench/run.py [SECTION ...]``.

Each section measures portrouter side by side with the alternatives in the
same run, because only same-run ratios are comparable on this machine. With
no section named, every section runs. A section is a L{section.Section}
subclass in a module of its own, which has C{add_arguments(parser)},
C{preflight(args)} (raises L{harness.Missing} for an absent tool) and
C{run(args, procs)}; add new ones to L{SECTIONS}.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from types import FrameType
from typing import Any

import dashboard_bench
import cluster_bench
import harness
import hostnames_bench
import http_bench
import proxy_bench
import tcp_bench
import tls_bench
import udp_bench
import udp_tunnel_bench
import ws_bench
from section import Section

# Any: each section has rows of its own, and run.py calls only the class
# methods, which do not depend on them.
SECTIONS: dict[str, type[Section[Any]]] = {
    "tcp": tcp_bench.Bench,
    "http": http_bench.Bench,
    "udp": udp_bench.Bench,
    "ws": ws_bench.Bench,
    "tls": tls_bench.Bench,
    "hostnames": hostnames_bench.Bench,
    "proxy": proxy_bench.Bench,
    "udptunnel": udp_tunnel_bench.Bench,
    "dashboard": dashboard_bench.Bench,
    "cluster": cluster_bench.Bench,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Measure portrouter against no proxy and the usual alternatives, side by side.",
    )
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION",
        help=f"which sections to run: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--wait-quiet", type=float, default=20.0, metavar="SECONDS",
        help="before each section, wait up to this long for cores 0 and 1 to be idle (default 20)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, binaries)")
    parser.add_argument(
        "--portrouter-rev", metavar="REV",
        help="measure this commit of the repository (extracted with git archive) instead of the installed portrouter",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="after a section's table, profile portrouter under that section's load with py-spy "
             "(tcp: conn/s; http: 100 B requests); not counted in the results",
    )
    for section in SECTIONS.values():
        section.add_arguments(parser)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM/SIGHUP into an exception so every finally block runs and
    # no proxy or backend is left behind.
    raise SystemExit(128 + signum)


def _preflight(chosen: list[str], args: argparse.Namespace) -> None:
    """
    A missing tool stops the run before any section has spent minutes, and
    every missing tool of every chosen section is named at once.
    """
    lines: list[str] = []
    for name in chosen:
        try:
            SECTIONS[name].preflight(args)
        except harness.Missing as e:
            lines += [line for line in str(e).splitlines()[1:] if line not in lines]
    if lines:
        raise harness.Missing("missing tools (nothing is installed for you):\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    chosen = args.sections or list(SECTIONS)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C must still
    # end the run through the finally blocks.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        harness.check_cores()
    except harness.BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    harness.pin_self(harness.LOAD_CORE)
    limit = harness.raise_nofile()
    if limit < 8192:
        print(f"bench: only {limit} file descriptors allowed; the idle test needs ~8192", file=sys.stderr)
        return 2

    workdir = harness.new_workdir()
    procs = harness.Procs(workdir)
    failed = False
    try:
        _preflight(chosen, args)
        for name in chosen:
            SECTIONS[name].run(args, procs)
    except harness.Missing as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except harness.BenchError as e:
        failed = True
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        failed = True
        print("bench: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        failed = True
        raise
    finally:
        procs.stop_all()
        failed = failed or bool(harness.FAILED)
        if (failed or args.keep) and workdir.is_dir() and any(workdir.iterdir()):
            print(f"bench: logs and configs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if harness.FAILED:
        print(f"bench: {len(harness.FAILED)} measurement(s) failed: {', '.join(harness.FAILED)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
