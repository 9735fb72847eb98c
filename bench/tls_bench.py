"""
The TLS section (issue 13): what terminating TLS costs portrouter, against
what it costs HAProxy and nginx, in one run. Each proxy is started once per
row with four listeners side by side: HTTP and HTTPS in front of the same
nginx serving a 100-byte file (C{wrk -t1 -c50}, keep-alive), and a plain and
a TLS-terminating TCP route in front of the same endless byte stream
(C{bench/tls_bulk.py}). The figures to go by are each proxy's own
TLS/plain ratios, compared between proxies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import http_bench
from harness import (
    BENCH_DIR,
    LOAD_CORE,
    LOOPBACK,
    NGINX_HTTP_TEMP,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Proc,
    Procs,
    assert_loopback_only,
    attempt,
    blame,
    check,
    free_port,
    nginx_argv,
    portrouter_argv,
    require,
    run_tool,
    wait_listening,
)
from section import busy_cells, cell, compare, print_ratios, print_tables

TARGETS = ("portrouter", "haproxy", "nginx")
DESCRIPTION = {
    "portrouter": "portrouter: --http and --tcp routes, plain (tcp:) and TLS (ssl:...:privateKey=:certKey=)",
    "haproxy": "HAProxy, nbthread 1: mode http and mode tcp frontends, plain and 'bind ... ssl crt'",
    "nginx": "nginx, 1 worker: http proxy_pass (upstream keepalive) and stream proxy_pass, plain and 'listen ... ssl'",
}
# The four measurements of every row: (key, what it is).
KINDS = (("http", "100 B req/s over HTTP"), ("https", "100 B req/s over HTTPS"),
         ("tcp", "bulk MB/s, plain TCP"), ("tls", "bulk MB/s, TLS"))

# The HTTP section's global and defaults sections, then four frontends.
HAPROXY_CFG = http_bench.HAPROXY_CFG.split("frontend bench")[0] + """\
frontend http
    bind {listen}:{http}
    default_backend web

frontend https
    bind {listen}:{https} ssl crt {pem}
    default_backend web

frontend tcp
    mode tcp
    bind {listen}:{tcp}
    default_backend bulk

frontend tls
    mode tcp
    bind {listen}:{tls} ssl crt {pem}
    default_backend bulk

backend web
    server web {listen}:{web}

backend bulk
    mode tcp
    server bulk {listen}:{bulk}
"""

NGINX_CFG = """\
http {
    access_log off;
""" + NGINX_HTTP_TEMP + """\
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    upstream web {
        server 127.0.0.1:{web};
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:{http};
        listen 127.0.0.1:{https} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
stream {
    server {
        listen 127.0.0.1:{tcp};
        proxy_pass 127.0.0.1:{bulk};
    }
    server {
        listen 127.0.0.1:{tls} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        proxy_pass 127.0.0.1:{bulk};
    }
}
"""


@dataclass
class Row:
    """One proxy's four figures: req/s by http/https, MB/s by tcp/tls."""

    req_per_s: dict[str, float | None] = field(default_factory=dict)
    mb_per_s: dict[str, float | None] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class Bench(http_bench.Base[Row]):
    """
    One TLS run. The HTTP section's nginx backend, static files, wrk and
    first-GET check are reused as they are; the proxies and the bulk pair
    are this section's.
    """

    NAME = "tls"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each wrk run and each bulk read (default 5)"
    PORTROUTER = frozenset({"portrouter"})
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "wrk", "nginx", "openssl")
    TARGET_TOOLS = {"portrouter": ("twistd",), "haproxy": ("haproxy",)}
    VERSIONS = {"wrk": "-v", "nginx": "-v", "haproxy": "-v", "openssl": "version"}

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        """The tools, and nginx's stream module when the nginx row is chosen."""
        targets = set(cls.targets(args))
        return require(*cls.tool_names(targets, args.profile), nginx_stream="nginx" in targets)

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.cert = self.work / "tls-cert.pem"
        self.key = self.work / "tls-key.pem"
        self.pem = self.work / "tls-haproxy.pem"  # HAProxy wants the chain and the key in one file

    def parameters(self) -> dict[str, Any]:
        return {"connections": http_bench.CONNECTIONS, "wrk_threads": 1, "http_size": 100,
                "warmup_s": http_bench.WARMUP, "certificate": "EC P-256, self-signed, CN=localhost",
                "bulk": "bench/tls_bulk.py: one connection, backend to client"}

    def prepare(self) -> None:
        super().prepare()
        made = subprocess.run(
            [self.tools["openssl"], "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
             "-keyout", str(self.key), "-out", str(self.cert)],
            capture_output=True, text=True, timeout=60,
        )
        if made.returncode != 0:
            raise BenchError(f"openssl could not make the certificate: {made.stderr.strip()}")
        self.pem.write_text(self.cert.read_text() + self.key.read_text())

    # -- the contenders ------------------------------------------------------------

    def bulk_backend(self, tag: str) -> tuple[Proc, int]:
        port = free_port()
        proc = self.procs.start(f"bulk-{tag}", [sys.executable, str(BENCH_DIR / "tls_bulk.py"), "serve", str(port)],
                                LOAD_CORE)
        wait_listening(proc, port)
        return proc, port

    def proxies(self, target: str, web: int, bulk: int) -> tuple[Proc, dict[str, int]]:
        """C{target} on the proxy core with its four listeners: the process and the port of each kind."""
        ports = {kind: free_port() for kind, _ in KINDS}
        env = None
        if target == "portrouter":
            tls = f"privateKey={self.key}:certKey={self.cert}"
            argv = portrouter_argv(self.tools["twistd"], [
                ("http", f"tcp:{ports['http']}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{web}"),
                ("http", f"ssl:{ports['https']}:interface={LOOPBACK}:{tls} -> tcp:{LOOPBACK}:{web}"),
                ("tcp", f"tcp:{ports['tcp']}:interface={LOOPBACK} -> tcp:{LOOPBACK}:{bulk}"),
                ("tcp", f"ssl:{ports['tls']}:interface={LOOPBACK}:{tls} -> tcp:{LOOPBACK}:{bulk}"),
            ])
            env = self.portrouter_env
        elif target == "haproxy":
            cfg = self.work / "tls-haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(listen=LOOPBACK, web=web, bulk=bulk, pem=self.pem, **ports))
            argv = [self.tools["haproxy"], "-db", "-f", str(cfg)]
        elif target == "nginx":
            body = NGINX_CFG
            for name, value in {**ports, "web": web, "bulk": bulk, "cert": self.cert, "key": self.key}.items():
                body = body.replace("{" + name + "}", str(value))
            argv = nginx_argv(self.tools["nginx"], self.work, "tls-nginx", body, stream_module=True)
        else:
            raise ValueError(target)
        proc = self.procs.start(target, argv, PROXY_CORE, env=env)
        for port in ports.values():
            wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, ports

    # -- measurements ------------------------------------------------------------------

    def bulk(self, port: int, tls: bool, seconds: float) -> dict[str, Any]:
        """One connection read for C{seconds} on the load core; MB/s plus how busy each core was."""
        argv = ["taskset", "-c", str(LOAD_CORE), sys.executable, str(BENCH_DIR / "tls_bulk.py"), "fetch",
                str(port), f"{seconds:g}", *(["--tls"] if tls else [])]
        watch = CpuWatch(self.procs)
        out = run_tool(argv, seconds + 30, "tls_bulk.py fetch")
        cpu = watch.stop()
        if out.returncode != 0 or not out.stdout.strip():
            raise BenchError(f"tls_bulk.py fetch failed: {(out.stderr or out.stdout).strip()[-500:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["mb_per_s"] = round(result["bytes"] / max(result["seconds"], 1e-3) / 1e6, 1)
        return {**result, **cpu}

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[tls] {target} ...", flush=True)
        web, web_port = self.backend(target)
        bulk, bulk_port = self.bulk_backend(target)
        proxy: Proc | None = None
        try:
            proxy, ports = self.proxies(target, web_port, bulk_port)
            for kind, _ in KINDS:
                port = ports[kind]

                def one(kind: str = kind, port: int = port) -> dict[str, Any]:
                    with blame(proxy):
                        if kind in ("http", "https"):
                            url = f"{kind}://{LOOPBACK}:{port}/100b.bin"
                            self.fetch_check(url, "100b")
                            self.wrk(url, http_bench.WARMUP)
                            return self.retry.quietly(f"{target} {kind}", lambda: self.wrk(url, self.seconds))
                        return self.retry.quietly(f"{target} {kind}",
                                                  lambda: self.bulk(port, kind == "tls", self.seconds))

                result = attempt("tls", target, row.errors, kind, one)
                if result is not None:
                    if kind in ("http", "https"):
                        row.req_per_s[kind] = result["req_per_s"]
                    else:
                        row.mb_per_s[kind] = result["mb_per_s"]
                    row.detail[kind] = result
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(bulk)
            self.procs.stop(web)
        return row

    def profile(self, py_spy: str) -> dict[str, Any]:
        return {"error": "no profile for the tls section: bench/run.py http --profile profiles the HTTP path"}

    def print_profile(self, profile: dict[str, Any]) -> None:
        print(f"[tls] {profile['error']}")

    # -- the report ----------------------------------------------------------------------

    @staticmethod
    def _own(rows: dict[str, Row], target: str, attr: str, tls: str, plain: str) -> float | None:
        """C{target}'s TLS figure over its plain one (1.0: TLS costs nothing)."""
        row = rows.get(target)
        if row is None:
            return None
        values = getattr(row, attr)
        a, b = values.get(tls), values.get(plain)
        return None if not a or not b else a / b

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """Issue 13's targets: TLS costs portrouter no more, proportionally, than it costs HAProxy."""
        own = self._own
        https = own(rows, "portrouter", "req_per_s", "https", "http")
        https_haproxy = own(rows, "haproxy", "req_per_s", "https", "http")
        tls = own(rows, "portrouter", "mb_per_s", "tls", "tcp")
        tls_haproxy = own(rows, "haproxy", "mb_per_s", "tls", "tcp")
        return [
            check("(HTTPS/HTTP req/s): portrouter / haproxy",
                  None if https is None or not https_haproxy else https / https_haproxy, ">=", 1.0),
            check("(TLS/TCP bulk MB/s): portrouter / haproxy",
                  None if tls is None or not tls_haproxy else tls / tls_haproxy, ">=", 1.0),
        ]

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        own = self._own
        return [
            *[(f"HTTPS/HTTP req/s: {t}", own(rows, t, "req_per_s", "https", "http")) for t in TARGETS],
            *[(f"TLS/TCP bulk MB/s: {t}", own(rows, t, "mb_per_s", "tls", "tcp")) for t in TARGETS],
            ("HTTPS req/s: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "req_per_s", "https")),
            ("TLS bulk MB/s: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "mb_per_s", "tls")),
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "TLS (wrk -t1 -c50, 100 B; one bulk stream)",
            [("HTTP req/s", 12), ("HTTPS req/s", 12), ("TCP MB/s", 10), ("TLS MB/s", 10)],
            lambda r: [
                cell(r, r.req_per_s.get("http"), "http", 0), cell(r, r.req_per_s.get("https"), "https", 0),
                cell(r, r.mb_per_s.get("tcp"), "tcp", 0), cell(r, r.mb_per_s.get("tls"), "tls", 0),
            ],
            [("HTTP", 16), ("HTTPS", 16), ("TCP", 16), ("TLS", 16)],
            lambda r: busy_cells(r, ("http", "https", "tcp", "tls")),
        )
        print_ratios(checks, references, width=44)
