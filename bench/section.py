"""
What every benchmark section does the same way, written once: its options,
the targets it was asked for, the tools they need, and the steps of a run
(portrouter loaded, a quiet machine, every row measured, the report, the
results file, then the optional profile). A section is a subclass of
L{Section} that says only what is its own: its targets, how it starts the
contenders and measures them, its ratios and its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, ClassVar, Generic, Mapping, Protocol, Sequence, TypeVar

from harness import (
    LOAD_CORE,
    NOISY,
    PROXY_CORE,
    BenchError,
    Procs,
    Retry,
    busy_cell,
    fmt,
    host_info,
    portrouter_under_test,
    print_checks,
    print_errors,
    print_table,
    quiet_check,
    ratio,
    require,
    require_portrouter,
    wait_quiet,
    warn_if_busy,
    write_results,
)


class Row(Protocol):
    """A section's row: a dataclass of its figures, with each measurement's raw detail by key."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    detail: dict[str, Any]


R = TypeVar("R", bound=Row)


class Section(Generic[R]):
    """
    One run of a section, whose rows are C{R}. run.py calls the class
    methods; the class attributes without a value and the methods that raise
    C{NotImplementedError} are what a section must say.
    """

    NAME: ClassVar[str]  # "tcp": the --tcp-* options, "[tcp]" on progress lines, bench/results/tcp-*.json
    TARGETS: ClassVar[tuple[str, ...]]  # every row it can measure, in the table's order
    SECONDS_HELP: ClassVar[str]  # the help of --NAME-seconds
    SECONDS: ClassVar[float] = 5.0  # --NAME-seconds unless given
    OPTIONS: ClassVar[dict[str, dict[str, Any]]] = {}  # its other options: --NAME-KEY, add_argument's keywords
    # The targets that run portrouter: with any of them, portrouter must load, and the run says which one it is.
    PORTROUTER: ClassVar[frozenset[str]] = frozenset({"portrouter"})
    DESCRIPTION: ClassVar[dict[str, str] | None] = None  # what each row is: the JSON's "targets"
    TOOLS: ClassVar[tuple[str, ...]]  # the executables every run of it needs
    TARGET_TOOLS: ClassVar[dict[str, tuple[str, ...]]] = {}  # target: the executables it needs besides
    VERSIONS: ClassVar[dict[str, str]] = {}  # tool: the flag that prints its version, for the JSON

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        self.procs = procs
        self.tools = tools
        self.seconds: float = getattr(args, f"{self.NAME}_seconds")
        self.work = procs.workdir
        self.portrouter_env = portrouter_env
        self.retry = Retry(self.NAME)

    # -- what run.py asks of every section -------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(cls.NAME)
        group.add_argument(f"--{cls.NAME}-seconds", type=float, default=cls.SECONDS, help=cls.SECONDS_HELP)
        for option, keywords in cls.OPTIONS.items():
            group.add_argument(f"--{cls.NAME}-{option}", **keywords)
        known = ",".join(cls.TARGETS)
        group.add_argument(f"--{cls.NAME}-targets", default=known, help=f"comma-separated subset of {known}")

    @classmethod
    def targets(cls, args: argparse.Namespace) -> list[str]:
        """The targets --NAME-targets asks for, in its order; a misspelt one stops the run at once."""
        targets = [t.strip() for t in getattr(args, f"{cls.NAME}_targets").split(",") if t.strip()]
        unknown = set(targets) - set(cls.TARGETS)
        if unknown:
            raise BenchError(
                f"unknown {cls.NAME.upper()} targets: {', '.join(sorted(unknown))} (known: {', '.join(cls.TARGETS)})"
            )
        return targets

    @classmethod
    def tool_names(cls, targets: set[str], profile: bool) -> list[str]:
        """
        The executables C{targets} need; with C{profile}, py-spy and what the
        portrouter row needs, since the profile runs portrouter as that row does.
        """
        if profile:
            targets = targets | {"portrouter"}
        names = list(cls.TOOLS)
        for target, tools in cls.TARGET_TOOLS.items():
            if target in targets:
                names += [tool for tool in tools if tool not in names]
        if profile:
            names.append("py-spy")
        return names

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        """The path of every tool the chosen targets need, or L{harness.Missing} naming each absent one."""
        return require(*cls.tool_names(set(cls.targets(args)), args.profile))

    @classmethod
    def preflight(cls, args: argparse.Namespace) -> None:
        """Every missing tool named before any section starts."""
        cls.require(args)

    @classmethod
    def run(cls, args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
        """Measure every requested target; print the table and write the JSON."""
        targets = cls.targets(args)
        tools = cls.require(args)
        py_spy = tools.get("py-spy")
        env, source = portrouter_under_test(procs.workdir, args.portrouter_rev)
        measures_portrouter = bool(cls.PORTROUTER & set(targets))
        if measures_portrouter or py_spy:
            require_portrouter(tools["twistd"], env)
        bench = cls(procs, tools, args, env)
        found = bench.probe()

        quiet_before = wait_quiet(args.wait_quiet)
        warn_if_busy(quiet_before)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if measures_portrouter:
            print(f"[{cls.NAME}] portrouter from {source}", flush=True)
        t0 = time.monotonic()
        rows = bench.measure_all(targets)
        quiet_after = quiet_check()
        warn_if_busy(quiet_after)

        checks = bench.ratios(rows)
        references = bench.references(rows)
        bench.print_report(rows, checks, references)
        data: dict[str, Any] = {
            "section": cls.NAME,
            "started": started,
            "duration_s": round(time.monotonic() - t0, 1),
            "host": host_info(source, **bench.versions()),
            "parameters": {"seconds": bench.seconds, **bench.parameters(), "load_core": LOAD_CORE,
                           "proxy_core": PROXY_CORE},
        }
        if cls.DESCRIPTION is not None:
            data["targets"] = {t: cls.DESCRIPTION[t] for t in targets}
        data.update(found)
        data["other_load_busy_percent"] = {"before": quiet_before, "after": quiet_after}
        data["rows"] = {name: asdict(r) for name, r in rows.items()}
        data["ratios"] = checks
        if references is not None:
            data["references"] = dict(references)
        data["profile"] = None
        path = write_results(cls.NAME, data)
        print(f"\nresults: {path}")
        if py_spy:
            # After the results are safe: a profiling failure must not lose them.
            data["profile"] = bench.profile(py_spy)
            bench.print_profile(data["profile"])
            path.write_text(json.dumps(data, indent=2) + "\n")
        return data

    # -- the steps of a run that are the section's own -------------------------------

    def probe(self) -> dict[str, Any]:
        """What the section finds out before the machine is quiet, as entries of the JSON."""
        return {}

    def prepare(self) -> None:
        """What is made once before the first row (a C tool, files to serve)."""

    def measure(self, target: str) -> R:
        """C{target}'s row."""
        raise NotImplementedError

    def measure_all(self, targets: list[str]) -> dict[str, R]:
        """Every target's row, one target after the other."""
        self.prepare()
        return {target: self.measure(target) for target in targets}

    def parameters(self) -> dict[str, Any]:
        """What the run was asked to do besides --NAME-seconds, for the JSON."""
        return {}

    def versions(self) -> dict[str, list[str]]:
        """The command that prints the version of each tool in L{VERSIONS} that the run used."""
        return {name: [self.tools[name], flag] for name, flag in self.VERSIONS.items() if name in self.tools}

    def ratios(self, rows: dict[str, R]) -> list[dict[str, Any]]:
        """The comparisons the section is judged by (L{harness.check}), with their targets."""
        raise NotImplementedError

    def references(self, rows: dict[str, R]) -> list[tuple[str, float | None]] | None:
        """Same-run comparisons with no target; None for none (and no "references" in the JSON)."""
        return None

    def print_report(self, rows: dict[str, R], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        raise NotImplementedError

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes under the section's load, after the results are written."""
        raise NotImplementedError

    def print_profile(self, profile: dict[str, Any]) -> None:
        raise NotImplementedError


# -- what the sections' ratios and reports share -----------------------------------------


def figure(rows: Mapping[str, Row], target: str, attr: str, key: str | None = None) -> float | None:
    """
    C{attr} of C{target}'s row (C{key} of it, for figures kept by size), or
    None for a target not measured: a ratio with it is then n/a.
    """
    row = rows.get(target)
    if row is None:
        return None
    value = getattr(row, attr)
    found = value if key is None else value.get(key)
    return None if found is None else float(found)


def compare(rows: Mapping[str, Row], a: str, b: str, attr: str, key: str | None = None) -> float | None:
    """C{a}'s L{figure} over C{b}'s, or None where either is missing."""
    return ratio(figure(rows, a, attr, key), figure(rows, b, attr, key))


def cell(row: Row, value: float | None, key: str, digits: int) -> str:
    """
    A figure of the table, from measurement C{key} of C{row}: marked C{*} if
    other programs were busy meanwhile, C{FAILED} if it did not complete.
    """
    if key in getattr(row, "errors", {}):
        return "FAILED "
    noisy = row.detail.get(key, {}).get("foreign_cpu", 0) > NOISY
    return fmt(value, digits) + ("*" if noisy else " ")


def print_tables(
    rows: Mapping[str, R], title: str, columns: Sequence[tuple[str, int]], cells: Callable[[R], list[str]],
    busy_columns: Sequence[tuple[str, int]], busy_cells: Callable[[R], list[str]],
) -> None:
    """
    The section's table, then how busy each core was during each measurement
    (which side was the limit), then every measurement that failed and why.
    """
    print()
    print_table(title, columns, {name: cells(r) for name, r in rows.items()})
    if any(d.get("foreign_cpu", 0) > NOISY for r in rows.values() for d in r.detail.values()):
        print(f"* other programs used more than {NOISY:g}% of a core meanwhile: rerun on a quiet machine")
    print()
    print_table("core busy %: load / proxy (others)", busy_columns, {name: busy_cells(r) for name, r in rows.items()})
    print_errors(rows)


def print_ratios(checks: Sequence[dict[str, Any]], references: Sequence[tuple[str, float | None]] | None,
                 width: int = 40) -> None:
    """The checks the section is judged by, then the comparisons that have no target, aligned."""
    width = max([width, *(len(c["what"]) + 1 for c in checks), *(len(what) + 1 for what, _ in references or ())])
    print()
    print_checks(checks, width)
    for what, value in references or ():
        shown = "-" if value is None else f"{value:.2f}x"
        print(f"{what:<{width}} {shown:>7}   (reference)")


def busy_cells(row: Row, keys: Sequence[str]) -> list[str]:
    """L{busy_cell} of each measurement C{keys} of C{row}."""
    return [busy_cell(row.detail.get(key)) for key in keys]


def paired(mine: Mapping[int, float], other: Mapping[int, float]) -> tuple[float | None, list[float]]:
    """
    For rows that took turns in rounds (rates by round): C{mine} over
    C{other} within each round both have, and the median of those ratios,
    which the machine's drift from minute to minute does not move.
    """
    each = [round(rate / other[r], 3) for r, rate in sorted(mine.items()) if other.get(r)]
    return (statistics.median(each) if each else None), each
