"""
What every benchmark section shares: finding tools, pinned child processes
that are always cleaned up, free loopback ports, polling with deadlines, RSS
and CPU accounting, and the result table.

Nothing here installs anything: a missing tool is a L{Missing} error whose
message says what to install.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

LOAD_CORE = 0  # load generators and backends
PROXY_CORE = 1  # the proxy under test
LOOPBACK = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A measurement could not be made; the message says which and why."""


class Missing(BenchError):
    """A tool the benchmark needs is not installed."""


# -- tools ---------------------------------------------------------------------

INSTALL_HINT = {
    "haproxy": "apt-get install -y haproxy",
    "iperf3": "apt-get install -y iperf3",
    "gcc": "apt-get install -y gcc",
    "taskset": "apt-get install -y util-linux",
    "twistd": "pip install /work/main  (installs Twisted and portrouter)",
    "py-spy": "pip install py-spy",
}


def require(*names: str) -> dict[str, str]:
    """Paths of the named executables, or L{Missing} listing every absent one."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        path = _which(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        lines = [f"  {n}: {INSTALL_HINT.get(n, 'install it')}" for n in missing]
        raise Missing("missing tools (nothing is installed for you):\n" + "\n".join(lines))
    return found


def _which(name: str) -> str | None:
    # Prefer the twistd next to this interpreter: a pyenv shim would make the
    # pid we watch a bash process rather than the Python one.
    if name == "twistd":
        beside = Path(sys.executable).parent / "twistd"
        if beside.exists():
            return str(beside)
    return shutil.which(name)


def new_workdir() -> Path:
    """Where logs, configs and the built C tool go: never the source tree."""
    return Path(tempfile.mkdtemp(prefix="portrouter-bench-"))


def pin_self(core: int) -> None:
    """Keep the harness off the proxy's core while it polls."""
    os.sched_setaffinity(0, {core})


def check_cores() -> None:
    cores = os.sched_getaffinity(0)
    if not {LOAD_CORE, PROXY_CORE} <= cores:
        raise BenchError(
            f"needs cores {LOAD_CORE} and {PROXY_CORE} (load vs proxy); this process may use {sorted(cores)}"
        )


def raise_nofile(want: int = 65536) -> int:
    """Enough descriptors for thousands of idle connections; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- processes -----------------------------------------------------------------


def _child_setup() -> None:
    # Die with the harness even if it is SIGKILLed and its finally never runs.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Proc:
    """A child in its own process group, pinned to one core."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    _buf: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join("    " + line for line in text)

    def read_line(self, timeout: float) -> str:
        """One line of stdout (stdout must be a pipe), or L{BenchError} at the deadline."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name}: no output within {timeout:g} s")
                if sel.select(left):
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        raise BenchError(f"{self.name} exited (status {self.popen.wait()})\n{self.log_tail()}")
                    self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()


@dataclass
class Procs:
    """Every child the benchmark starts; L{stop_all} ends each process group."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], core: int, *, pipe: bool = False, stdin: bool = False,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """
        Start C{argv} pinned to C{core}. Output goes to a log file in the work
        directory unless C{pipe}, when stdout is read by the harness.
        """
        log = self.workdir / f"{name}.log"
        logf = open(log, "ab")
        try:
            popen = subprocess.Popen(
                ["taskset", "-c", str(core), *argv],
                cwd=self.workdir,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else logf,
                stderr=logf,
                start_new_session=True,
                preexec_fn=_child_setup,
                env=env,
                bufsize=0,
            )
        finally:
            logf.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 3.0) -> int | None:
        """SIGTERM the group, SIGKILL it after C{grace} seconds."""
        if proc in self.procs:
            self.procs.remove(proc)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return None

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


# -- ports and polling ---------------------------------------------------------


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that nothing holds right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll C{cond} until true; seconds it took, or L{BenchError} naming C{what}."""
    start = time.monotonic()
    deadline = start + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def _tcp_table() -> Iterator[tuple[str, int, str, int]]:
    """(local address, local port, state, inode) of every TCP socket."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, port = parts[1].split(":")
            yield addr, int(port, 16), parts[3], int(parts[9])


def listening(port: int) -> bool:
    """Whether something listens on C{port}, known without connecting to it."""
    return any(p == port and st == "0A" for _, p, st, _ in _tcp_table())


def wait_listening(proc: Proc, port: int, timeout: float = 15.0) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited (status {proc.popen.returncode}) before listening\n{proc.log_tail()}")
        return listening(port)

    wait_until(ready, timeout, f"{proc.name} to listen on port {port}")


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def assert_loopback_only(procs: Sequence[Proc]) -> None:
    """Refuse to go on if any child listens anywhere but 127.0.0.1."""
    inodes: set[int] = set()
    for proc in procs:
        for pid in _group_pids(proc.pid):
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
            except OSError:
                continue
    loopback4 = "0100007F"
    loopback6 = "0000000000000000FFFF00000100007F"
    for addr, port, state, inode in _tcp_table():
        if inode in inodes and state == "0A" and addr not in (loopback4, loopback6):
            raise BenchError(f"a benchmark process listens on {addr}:{port}, not 127.0.0.1; stopping")


def rss_kib(proc: Proc) -> int:
    """VmRSS summed over the process group (HAProxy may run several processes)."""
    total = 0
    for pid in _group_pids(proc.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    # taskset and twistd exec in place, so the group is the proxy itself.
    return total


def settled_rss_kib(proc: Proc, timeout: float = 3.0) -> int:
    """RSS once three reads 100 ms apart agree within 1%, or the last read at the deadline."""
    deadline = time.monotonic() + timeout
    last = [rss_kib(proc)]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        last = (last + [rss_kib(proc)])[-3:]
        if len(last) == 3 and max(last) - min(last) <= 0.01 * max(last):
            break
    return last[-1]


# -- CPU accounting ------------------------------------------------------------


def cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + nums[4]
            out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    res = {}
    for core, (busy, total) in after.items():
        b0, t0 = before.get(core, (0, 0))
        res[core] = round(100.0 * (busy - b0) / max(1, total - t0), 1)
    return res


def listen_drops() -> int:
    """
    The kernel's count of connections dropped at a full listen queue: nonzero
    during a test means SYN retransmits (1 s and up) are in the numbers.
    """
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenDrops", 0))
    return 0


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _foreign_jiffies(ours: set[int]) -> dict[int, int]:
    """
    CPU jiffies (own and reaped children's) of every user process that is not
    the harness, a child of it, or in one of the process groups C{ours}.
    """
    me = os.getpid()
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ppid, pgrp = int(fields[1]), int(fields[2])
        if pid == me or ppid == me or pgrp in ours or pid == 2 or ppid == 2:  # 2: kernel threads
            continue
        out[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return out


class CpuWatch:
    """
    How busy each core was during one measurement, and how much CPU other
    programs took meanwhile: this machine is shared with test runs, and a
    number taken while they ran is not comparable.
    """

    def __init__(self, procs: Procs):
        self.ours = {p.pid for p in procs.procs}
        self.t0 = time.monotonic()
        self.cpu0 = cpu_times()
        self.foreign0 = _foreign_jiffies(self.ours)

    def stop(self) -> dict[str, float]:
        busy = busy_percent(self.cpu0, cpu_times())
        elapsed = max(time.monotonic() - self.t0, 1e-3)
        foreign = sum(
            max(0, j - self.foreign0.get(pid, 0)) for pid, j in _foreign_jiffies(self.ours).items()
        )
        return {
            "busy_load_core": busy.get(LOAD_CORE, 0.0),
            "busy_proxy_core": busy.get(PROXY_CORE, 0.0),
            # Percent of one core taken by other programs, on any core.
            "foreign_cpu": round(100.0 * foreign / _CLK_TCK / elapsed, 1),
        }


def quiet_check(seconds: float = 0.5) -> dict[int, float]:
    """How busy each core is with no benchmark running: other load skews every number."""
    before = cpu_times()
    time.sleep(seconds)
    return busy_percent(before, cpu_times())


def wait_quiet(timeout: float, threshold: float = 10.0) -> dict[int, float]:
    """
    Wait up to C{timeout} seconds for cores 0 and 1 to be under C{threshold}%
    busy (tests or builds running beside the benchmark skew it); the last
    reading either way.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = quiet_check()
        if max(busy.get(LOAD_CORE, 0), busy.get(PROXY_CORE, 0)) < threshold or time.monotonic() >= deadline:
            return busy


# -- output --------------------------------------------------------------------


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(title: str, columns: Sequence[tuple[str, int]], rows: dict[str, Sequence[str]]) -> None:
    """A plain fixed-width table; C{columns} are (header, width)."""
    first = max(len(title), *(len(name) for name in rows))
    header = title.ljust(first) + "".join(h.rjust(w) for h, w in columns)
    print(header)
    print("-" * len(header))
    for name, cells in rows.items():
        print(name.ljust(first) + "".join(c.rjust(w) for c, (_, w) in zip(cells, columns)))


def write_results(section: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{section}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"
