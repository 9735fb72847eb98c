"""
The hostnames section (issue 15): what routing by name costs portrouter,
against what it costs HAProxy, in one run. Each proxy is started once per
row with four listeners side by side in front of the HTTP section's nginx
backend (the 100-byte file): HTTPS routed by SNI (portrouter's TLS front,
C{hostnames.listen}) and HTTPS on a per-port route, both with the same
certificate, then plain HTTP routed by C{Host} and by path on the ingress.
The figures to go by are each proxy's own by-name/per-port ratios, and
portrouter's HTTPS-by-SNI figure over HAProxy's.

The load is C{h2load --h1}: it connects to 127.0.0.1 (C{--connect-to}) and
still sends the name of the URL as SNI and C{Host}, with no DNS and no
C{/etc/hosts}; wrk cannot, as its SNI is the host it connects to.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.util
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_bench
from harness import (
    INSTALL_HINT,
    LOAD_CORE,
    LOOPBACK,
    PROXY_CORE,
    BenchError,
    CpuWatch,
    Missing,
    Proc,
    Procs,
    assert_loopback_only,
    attempt,
    attempt_profile,
    blame,
    fmt,
    free_port,
    portrouter_argv,
    print_sampled,
    py_spy_record,
    ratio,
    require,
    run_tool,
    summarize_profile,
    wait_listening,
)
from section import busy_cells, cell, compare, figure, print_tables

# harness names the install of every other section's tools; this one's is said here.
INSTALL_HINT.setdefault("h2load", "apt-get install -y nghttp2-client")

TARGETS = ("portrouter", "haproxy")
DESCRIPTION = {
    "portrouter": "portrouter: the TLS front (hostnames.listen) and the ingress by Host and by path, "
                  "a per-port route with listen.tls: true; one config file, the certificate store",
    "haproxy": "HAProxy, nbthread 1: 'bind ... ssl crt' with use_backend by ssl_fc_sni, the same without a "
               "rule, mode http by hdr(host) and by path_beg (prefix stripped)",
}
DOMAIN = "apps.test"
PROJECT = "k1"  # path-routed: reached by name and by /k1/
PORT_PROJECT = "web"  # has its own HTTPS port: the per-port route
# The four measurements of every row: (key, what it is).
KINDS = (("sni", "HTTPS by SNI k1.apps.test"), ("port", "HTTPS on a per-port route"),
         ("host", "HTTP by Host: k1.apps.test"), ("path", "HTTP by path /k1/"))

# The HTTP section's global and defaults sections, then four frontends.
HAPROXY_CFG = http_bench.HAPROXY_CFG.split("frontend bench")[0] + """\
frontend sni
    bind {listen}:{sni} ssl crt {pem}
    use_backend k1 if {{ ssl_fc_sni -i k1.{domain} }}
    use_backend web if {{ ssl_fc_sni -i web.{domain} }}

frontend port
    bind {listen}:{port} ssl crt {pem}
    default_backend web

frontend host
    bind {listen}:{host}
    use_backend k1 if {{ hdr(host) -i k1.{domain} }}
    use_backend web if {{ hdr(host) -i web.{domain} }}

frontend path
    bind {listen}:{path}
    use_backend k1-path if {{ path_beg /k1/ }}
    use_backend web-path if {{ path_beg /web/ }}

backend k1
    server web {listen}:{web}

backend web
    server web {listen}:{web}

backend k1-path
    http-request replace-path ^/k1(/.*) \\1
    server web {listen}:{web}

backend web-path
    http-request replace-path ^/web(/.*) \\1
    server web {listen}:{web}
"""

PORTROUTER_CONFIG = """\
hostnames:
  domains: [{domain}]
  listen: tcp:{sni}:interface=127.0.0.1
tls:
  certificates: {certs}
projects:
  - name: k1
    backend: tcp:127.0.0.1:{web}
  - name: web
    backend: tcp:127.0.0.1:{web}
    listen: {{port: {port}, protocol: http, interface: 127.0.0.1, tls: true}}
"""

H2LOAD_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s),")
H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")
H2LOAD_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
H2LOAD_REQUEST_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")


@dataclass
class Row:
    """One proxy's four figures, by kind: req/s and its core's CPU time per request."""

    req_per_s: dict[str, float | None] = field(default_factory=dict)
    cpu_us: dict[str, float | None] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def make_certificates(certs: Path, ca_file: Path) -> None:
    """
    A throw-away CA and, signed by it, an EC P-256 certificate for
    C{*.apps.test} and C{apps.test}: the chain and key in one C{.pem} in
    C{certs} (the store's format, and HAProxy's C{crt}), the CA in C{ca_file}
    so the first GET verifies the name each listener answers with.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portrouter bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{DOMAIN}")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{DOMAIN}"), x509.DNSName(DOMAIN)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs.mkdir(exist_ok=True)
    (certs / f"{DOMAIN}.pem").write_bytes(
        leaf.public_bytes(pem) + ca.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_file.write_bytes(ca.public_bytes(pem))


def _seconds(value: str, unit: str) -> float:
    return float(value) / {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]


class Bench(http_bench.Base[Row]):
    """
    One hostnames run. The HTTP section's nginx backend and static files are
    reused as they are; the load (h2load, for its SNI), the certificate and
    the proxies are this section's.
    """

    NAME = "hostnames"
    TARGETS = TARGETS
    SECONDS_HELP = "length of each h2load run (default 5)"
    PORTROUTER = frozenset({"portrouter"})
    DESCRIPTION = DESCRIPTION
    TOOLS = ("taskset", "h2load", "nginx")
    TARGET_TOOLS = {"portrouter": ("twistd",), "haproxy": ("haproxy",)}
    VERSIONS = {"h2load": "--version", "nginx": "-v", "haproxy": "-v"}

    @classmethod
    def require(cls, args: argparse.Namespace) -> dict[str, str]:
        """The tools, and the C{cryptography} package that makes the certificate."""
        try:
            tools = require(*cls.tool_names(set(cls.targets(args)), args.profile))
        except Missing as e:
            missing = str(e)
        else:
            missing = "missing tools (nothing is installed for you):"
        if importlib.util.find_spec("cryptography") is None:
            missing += "\n  cryptography (Python package, for the certificate): pip install cryptography"
        if "\n" in missing:
            raise Missing(missing)
        return tools

    def __init__(self, procs: Procs, tools: dict[str, str], args: argparse.Namespace,
                 portrouter_env: dict[str, str] | None):
        super().__init__(procs, tools, args, portrouter_env)
        self.certs = self.work / "hostnames-certs"  # the store: one .pem, chain and key
        self.ca = self.work / "hostnames-ca.pem"

    def parameters(self) -> dict[str, Any]:
        return {"connections": http_bench.CONNECTIONS, "h2load_threads": 1, "http_size": 100,
                "warmup_s": http_bench.WARMUP, "load": "h2load --h1 (ALPN http/1.1), keep-alive, no pipelining",
                "certificate": f"EC P-256 for *.{DOMAIN} and {DOMAIN}, signed by a throw-away CA; "
                               "chain and key in one .pem, for both proxies"}

    def prepare(self) -> None:
        super().prepare()
        make_certificates(self.certs, self.ca)

    # -- the contenders ------------------------------------------------------------

    def proxies(self, target: str, web: int) -> tuple[Proc, dict[str, int]]:
        """C{target} on the proxy core with its four listeners: the process and the port of each kind."""
        ports = {kind: free_port() for kind, _ in KINDS}
        env = None
        if target == "portrouter":
            cfg = self.work / "hostnames-portrouter.yaml"
            cfg.write_text(PORTROUTER_CONFIG.format(domain=DOMAIN, certs=self.certs, web=web, **ports))
            argv = portrouter_argv(self.tools["twistd"], [], ingress=f"tcp:{ports['host']}:interface={LOOPBACK}",
                                   config=cfg)
            # One ingress answers by Host and by path.
            ports["path"] = ports["host"]
            env = self.portrouter_env
        elif target == "haproxy":
            cfg = self.work / "hostnames-haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(listen=LOOPBACK, web=web, domain=DOMAIN,
                                              pem=self.certs / f"{DOMAIN}.pem", **ports))
            argv = [self.tools["haproxy"], "-db", "-f", str(cfg)]
        else:
            raise ValueError(target)
        proc = self.procs.start(target, argv, PROXY_CORE, env=env)
        for port in set(ports.values()):
            wait_listening(proc, port, timeout=20)
        assert_loopback_only([proc])
        return proc, ports

    @staticmethod
    def address(kind: str, port: int) -> tuple[str, str, str]:
        """The scheme, the name sent as SNI and Host, and the path of C{kind}'s requests to C{port}."""
        if kind == "sni":
            return "https", f"{PROJECT}.{DOMAIN}", "/100b.bin"
        if kind == "port":
            # The name of that very route (section 10), should the listener look at it at all.
            return "https", f"{PORT_PROJECT}-{port}.{DOMAIN}", "/100b.bin"
        if kind == "host":
            return "http", f"{PROJECT}.{DOMAIN}", "/100b.bin"
        return "http", f"{LOOPBACK}:{port}", f"/{PROJECT}/100b.bin"

    # -- measurements ------------------------------------------------------------------

    def get_check(self, kind: str, port: int) -> None:
        """
        One GET as h2load will send it, before the load: status 200, the
        file's exact bytes, and over TLS a certificate valid for the name
        sent (the CA's), so a listener answering with the wrong one or with
        errors cannot look fast.
        """
        scheme, name, path = self.address(kind, port)
        conn = http.client.HTTPConnection(name.split(":")[0], port, timeout=10)
        try:
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            if scheme == "https":
                context = ssl.create_default_context(cafile=str(self.ca))
                sock = context.wrap_socket(sock, server_hostname=name)
            conn.sock = sock  # connected to 127.0.0.1 whatever the name: no DNS
            conn.request("GET", path, headers={"Host": name})
            response = conn.getresponse()
            status, body = response.status, response.read()
        except (OSError, http.client.HTTPException) as e:
            raise BenchError(f"GET {scheme}://{name}{path} on port {port} failed: {e}") from None
        finally:
            conn.close()
        want = self.files["100b"]
        if status != 200 or body != want:
            raise BenchError(f"GET {scheme}://{name}{path} on port {port}: status {status}, {len(body)} bytes, "
                             f"not the {len(want)} served")

    def h2load(self, kind: str, port: int, seconds: float) -> dict[str, Any]:
        """
        C{h2load --h1 -t1 -c50} on the load core, connecting to 127.0.0.1
        whatever the URL's name; req/s, the proxy core's CPU time per
        request, and how busy each core was.
        """
        scheme, name, path = self.address(kind, port)
        url = f"{scheme}://{name}{path}"
        argv = [
            "taskset", "-c", str(LOAD_CORE), self.tools["h2load"], "--h1", "-t1", f"-c{http_bench.CONNECTIONS}",
            f"-D{round(seconds * 1000)}ms", f"--connect-to={LOOPBACK}:{port}", url,
        ]
        watch = CpuWatch(self.procs)
        out = run_tool(argv, seconds + 30, "h2load")
        cpu = watch.stop()
        finished = H2LOAD_FINISHED.search(out.stdout)
        requests = H2LOAD_REQUESTS.search(out.stdout)
        status = H2LOAD_STATUS.search(out.stdout)
        if out.returncode != 0 or not (finished and requests and status):
            raise BenchError(f"h2load failed on {url}: {(out.stderr or out.stdout).strip()[-500:]}")
        seconds_run = max(_seconds(*finished.groups()), 1e-3)
        total, _started, done, succeeded, failed, errored, timeout = (int(n) for n in requests.groups())
        s2xx, s3xx, s4xx, s5xx = (int(n) for n in status.groups())
        if succeeded == 0:
            raise BenchError(f"h2load completed no request on {url} (port {port})")
        if s4xx + s5xx > 0.01 * done:
            raise BenchError(f"{s4xx + s5xx} of {done} answers from {url} (port {port}) were 4xx/5xx")
        request_time = H2LOAD_REQUEST_TIME.search(out.stdout)
        return {
            "req_per_s": round(succeeded / seconds_run),
            # The proxy core's busy time per request, however busy the core looked.
            "cpu_us_per_request": round(cpu["busy_proxy_core"] / 100 * seconds_run / succeeded * 1e6, 1),
            "url": url, "port": port, "requests": done, "succeeded": succeeded, "seconds": seconds_run,
            "errors": failed + errored + timeout, "status": {"2xx": s2xx, "3xx": s3xx, "4xx": s4xx, "5xx": s5xx},
            "request_time_mean": request_time.group(3) if request_time else None,
            **cpu,
        }

    def measure(self, target: str) -> Row:
        row = Row()
        print(f"[hostnames] {target} ...", flush=True)
        web, web_port = self.backend(target)
        proxy: Proc | None = None
        try:
            proxy, ports = self.proxies(target, web_port)
            for kind, _ in KINDS:
                port = ports[kind]

                def one(kind: str = kind, port: int = port) -> dict[str, Any]:
                    with blame(proxy):
                        self.get_check(kind, port)
                        self.h2load(kind, port, http_bench.WARMUP)
                        return self.retry.quietly(f"{target} {kind}", lambda: self.h2load(kind, port, self.seconds))

                result = attempt("hostnames", target, row.errors, kind, one)
                if result is not None:
                    row.req_per_s[kind] = result["req_per_s"]
                    row.cpu_us[kind] = result["cpu_us_per_request"]
                    row.detail[kind] = result
        finally:
            if proxy is not None:
                self.procs.stop(proxy)
            self.procs.stop(web)
        return row

    # -- profiling (optional) ----------------------------------------------------------

    def profile(self, py_spy: str) -> dict[str, Any]:
        """Where portrouter's time goes on the TLS front under the SNI load (py-spy, 500 Hz, 4 s)."""

        def record() -> dict[str, Any]:
            web, web_port = self.backend("profile")
            proxy, ports = self.proxies("portrouter", web_port)
            raw = self.work / "portrouter-hostnames-profile.txt"
            try:
                self.h2load("sni", ports["sni"], http_bench.WARMUP)
                with blame(proxy):
                    load = py_spy_record(py_spy, proxy.pid, raw, 4, lambda: self.h2load("sni", ports["sni"], 5))
            finally:
                self.procs.stop(proxy)
                self.procs.stop(web)
            return {"req_per_s_under_profiler": load["req_per_s"], **summarize_profile(raw)}

        return attempt_profile("hostnames", "profile", record)

    def print_profile(self, profile: dict[str, Any]) -> None:
        if "error" not in profile:  # else it was reported as it failed
            print_sampled("portrouter's TLS front under the HTTPS-by-SNI load", profile,
                          f"{profile['req_per_s_under_profiler']:,} req/s")

    # -- the report ----------------------------------------------------------------------

    def ratios(self, rows: dict[str, Row]) -> list[dict[str, Any]]:
        """Issue 15 asks for the figures and ratios, with no target: see L{references}."""
        return []

    @staticmethod
    def _own(rows: dict[str, Row], target: str, by_name: str, by_port: str) -> float | None:
        """C{target}'s req/s routed by name over the same routed by port or path (1.0: naming costs nothing)."""
        return ratio(figure(rows, target, "req_per_s", by_name), figure(rows, target, "req_per_s", by_port))

    @staticmethod
    def _extra(rows: dict[str, Row], target: str, by_name: str, by_port: str) -> float | None:
        """The CPU microseconds per request that routing by name adds on C{target}'s core."""
        a, b = figure(rows, target, "cpu_us", by_name), figure(rows, target, "cpu_us", by_port)
        return None if a is None or b is None else round(a - b, 1)

    def references(self, rows: dict[str, Row]) -> list[tuple[str, float | None]]:
        own, extra = self._own, self._extra
        sni = own(rows, "portrouter", "sni", "port")
        sni_haproxy = own(rows, "haproxy", "sni", "port")
        host = own(rows, "portrouter", "host", "path")
        host_haproxy = own(rows, "haproxy", "host", "path")
        return [
            ("HTTPS by SNI req/s: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "req_per_s", "sni")),
            # HAProxy's req/s are a lower bound when the load core is the limit; its CPU time per request is not.
            ("HTTPS by SNI us/req: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "cpu_us", "sni")),
            *[(f"{what} req/s: portrouter / haproxy", compare(rows, "portrouter", "haproxy", "req_per_s", kind))
              for kind, what in (("port", "HTTPS per-port"), ("host", "HTTP by Host"), ("path", "HTTP by path"))],
            *[(f"HTTPS SNI/per-port req/s: {t}", own(rows, t, "sni", "port")) for t in TARGETS],
            *[(f"HTTP Host/path req/s: {t}", own(rows, t, "host", "path")) for t in TARGETS],
            ("(HTTPS SNI/per-port) portrouter / haproxy", ratio(sni, sni_haproxy)),
            ("(HTTP Host/path) portrouter / haproxy", ratio(host, host_haproxy)),
            *[(f"us/req added by SNI over per-port: {t}", extra(rows, t, "sni", "port")) for t in TARGETS],
            *[(f"us/req added by Host over path: {t}", extra(rows, t, "host", "path")) for t in TARGETS],
        ]

    def print_report(self, rows: dict[str, Row], checks: list[dict[str, Any]],
                     references: list[tuple[str, float | None]] | None) -> None:
        print_tables(
            rows, "hostnames (h2load --h1 -t1 -c50, 100 B)",
            [(f"{label} req/s", 12) for label in ("SNI", "port", "Host", "path")]
            + [("us/req SNI/port/Host/path", 29)],
            lambda r: [
                *[cell(r, r.req_per_s.get(kind), kind, 0) for kind, _ in KINDS],
                " / ".join(fmt(r.cpu_us.get(kind), 1) for kind, _ in KINDS) + " ",
            ],
            [("SNI", 16), ("port", 16), ("Host", 16), ("path", 16)],
            lambda r: busy_cells(r, [kind for kind, _ in KINDS]),
        )
        print("  SNI: HTTPS, k1.apps.test on the TLS front (HAProxy: ssl_fc_sni); port: HTTPS on a per-port route;")
        print("  Host: HTTP, Host: k1.apps.test on the ingress (HAProxy: hdr(host)); path: HTTP, /k1/ stripped;")
        print("  us/req: the proxy core's busy time per request")
        print()
        for what, value in references or ():
            shown = "-" if value is None else (f"{value:+.1f}us" if what.startswith("us/req") else f"{value:.2f}x")
            print(f"{what:<44} {shown:>8}   (reference)")
