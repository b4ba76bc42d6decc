"""Lookup throughput and latency: tokend's token endpoint next to two floors and curl.

Not a test: it prints one table, each tokend row next to floors measured in the same run.
Floors, each in its own process on a unix socket, driven by the same load generators:
- "floor": a tiny asyncio server answering every request with the fixed bytes (status line,
  headers, JSON body) tokend answered for the same lookup, with keep-alive; it parses no more
  than the blank line that ends the request head.
- "nginx" (DESIGN §8): nginx, one unprivileged single-process instance run in the foreground with
  a generated config, serving a static JSON file as large as tokend's JSON answer. Skipped, with
  a note, when nginx is not installed (Debian: nginx-light).
Modes: keep-alive (h2load), one request per connection (N forked Python clients, new AF_UNIX
connection each time) and `curl --unix-socket` per request (process wall time: the floor for a
process-per-request job).
Run: python tests/bench/bench_lookups.py [--requests 20000] [--clients 1,32] [--no-curl]
With --uvloop the daemon runs on uvloop's event loop (a generated sitecustomize sets the policy),
to weigh that loop against the stock one; it needs uvloop installed.
Needs h2load (Debian: nghttp2-client) for the keep-alive rows and curl for the curl rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.benchlib import (
    LoadResult,
    conn_per_request_load,
    cpu_s,
    curl_load,
    daemon_with_grants,
    h2load,
    one_request,
    pct,
    request_bytes,
)
from tokend.authserver import AuthServer

TARGET_RPS_PER_CORE = 10_000
TARGET_P99_MS = 5.0
NGINX_RATIO_MIN = 0.25  # DESIGN §8
NGINX_RATIO_AIM = 0.45


def serve_floor(sock_path: str, response_file: str) -> None:
    """The floor server: answer every request head with the same bytes until killed."""
    response = Path(response_file).read_bytes()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(response)
                if b"connection: close" in head.lower():
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path=sock_path, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _floor_response(raw: bytes) -> bytes:
    """tokend's answer turned into a keep-alive response of the same size and shape."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith(b"connection:")  # the floor keeps connections open
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen unix:{root}/nginx.sock backlog=1024;
        location / {{
            root {root};
            default_type application/json;
            add_header Cache-Control no-store;
            try_files /token.json =404;
        }}
    }}
}}
"""


def start_nginx(root: Path, body: bytes) -> tuple[subprocess.Popen[bytes], Path] | None:
    """nginx serving `body` as a static JSON file on `root/nginx.sock`; None when not installed.

    One process (master_process off, like the one-process daemon), in the foreground, and
    unprivileged: as root it drops to nobody, which owns `root`.
    """
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        return None
    root.mkdir(mode=0o755)
    (root / "token.json").write_bytes(body)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root))
    user: int | None = None
    if os.geteuid() == 0:
        user = 65534  # nobody
        os.chmod(root.parent, 0o711)  # nobody may traverse to its own directory
        for path in (root, root / "token.json", conf):
            os.chown(path, user, user)
    proc = subprocess.Popen(
        [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)],
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )
    sock = root / "nginx.sock"
    try:
        _wait_socket(sock)
    except RuntimeError:
        proc.kill()
        proc.wait(10)
        raise
    return proc, sock


def _wait_socket(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        time.sleep(0.02)
    raise RuntimeError(f"floor server did not listen on {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per keep-alive run")
    parser.add_argument(
        "--conn-requests", type=int, default=5000, help="per connection-per-req run"
    )
    parser.add_argument("--curl-requests", type=int, default=300, help="per curl run")
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--no-curl", action="store_true", help="skip the curl rows")
    parser.add_argument("--uvloop", action="store_true", help="run the daemon on uvloop")
    parser.add_argument(
        "--serve-floor", nargs=2, metavar=("SOCKET", "RESPONSE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return 0
    clients_list = [int(c) for c in args.clients.split(",")]
    have_h2load = shutil.which("h2load") is not None
    have_curl = shutil.which("curl") is not None and not args.no_curl

    root = Path(tempfile.mkdtemp(prefix="tkdl", dir="/tmp"))
    daemon_env: dict[str, str] | None = None
    if args.uvloop:
        site = root / "uvsite"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import asyncio\nimport uvloop\n\n"
            "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
        )
        daemon_env = {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        }
    path = "/v1/connectors/c0000/token"
    rows: list[tuple[str, int, str, LoadResult, float]] = []  # target, clients, mode, result, cpu
    floor_proc: subprocess.Popen[bytes] | None = None
    nginx: tuple[subprocess.Popen[bytes], Path] | None = None
    try:
        with (
            AuthServer(lifetime_s=3600.0) as auth,
            daemon_with_grants(
                root, auth, ["c0000"], refresh={"skew": "5m"}, env=daemon_env
            ) as proc,
        ):
            assert proc.proc is not None
            status, raw = one_request(str(proc.socket), request_bytes(path, close=True))
            assert status == 200, raw
            response_file = root / "floor-response"
            response_file.write_bytes(_floor_response(raw))
            floor_sock = root / "floor.sock"
            floor_proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-floor", str(floor_sock), str(response_file)]
            )
            _wait_socket(floor_sock)
            targets = [
                ("tokend", str(proc.socket), proc.proc.pid),
                ("floor", str(floor_sock), floor_proc.pid),
            ]
            nginx = start_nginx(root / "nginx", raw.split(b"\r\n\r\n", 1)[1])
            if nginx is not None:
                targets.append(("nginx", str(nginx[1]), nginx[0].pid))
            log = root / "h2load.log"
            for clients in clients_list:
                for name, sock, pid in targets:
                    if have_h2load:
                        h2load(sock, path, 1000, clients, log)  # warm-up
                        c0 = cpu_s(pid)
                        res = h2load(sock, path, args.requests, clients, log)
                        rows.append((name, clients, "keep-alive", res, cpu_s(pid) - c0))
                    c0 = cpu_s(pid)
                    res = conn_per_request_load(sock, path, args.conn_requests, clients)
                    rows.append((name, clients, "conn/request", res, cpu_s(pid) - c0))
                    if have_curl:
                        c0 = cpu_s(pid)
                        res = curl_load(sock, path, args.curl_requests, clients)
                        rows.append((name, clients, "curl/request", res, cpu_s(pid) - c0))
    finally:
        for server in (floor_proc, nginx[0] if nginx else None):
            if server is not None:
                server.terminate()
                server.wait(10)
        shutil.rmtree(root, ignore_errors=True)

    floors = {(c, m): r for t, c, m, r, _ in rows if t == "floor"}
    nginxes = {(c, m): r for t, c, m, r, _ in rows if t == "nginx"}

    def ratios(res: LoadResult, base: LoadResult | None) -> tuple[str, str]:
        if base is None:
            return "-", "-"
        p99 = pct(res.latencies_ms, 0.99) / pct(base.latencies_ms, 0.99)
        return f"{res.rps / base.rps:.2f}", f"{p99:.2f}"

    header = (
        f"{'target':<7} {'clients':>7} {'mode':<13} {'req/s':>8} {'mean ms':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'fail':>5} {'req/cpu-s':>10} "
        f"{'rps/floor':>9} {'p99/floor':>9} {'rps/nginx':>9} {'p99/nginx':>9}"
    )
    loop_name = "uvloop" if args.uvloop else "stock asyncio"
    print(
        f"tokend on {loop_name}; response body+headers: {len(raw)} bytes; "
        "floor = asyncio fixed-response server; "
        + (
            "nginx = static JSON file of the same body size"
            if nginx is not None
            else "nginx: not installed, its floor skipped (Debian: apt-get install nginx-light)"
        )
    )
    with open("/proc/loadavg") as f:
        print(f"load average before the table: {' '.join(f.read().split()[:3])}")
    print(header)
    print("-" * len(header))
    for target, clients, mode, res, cpu in rows:
        is_floor = target in ("floor", "nginx")
        rps_f, p99_f = ratios(res, None if is_floor else floors.get((clients, mode)))
        rps_n, p99_n = ratios(res, None if target == "nginx" else nginxes.get((clients, mode)))
        p99 = pct(res.latencies_ms, 0.99)
        per_cpu = f"{len(res.latencies_ms) / cpu:.0f}" if cpu > 0 else "-"
        mean = sum(res.latencies_ms) / len(res.latencies_ms) if res.latencies_ms else float("nan")
        print(
            f"{target:<7} {clients:>7} {mode:<13} {res.rps:>8.0f} {mean:>8.2f} "
            f"{pct(res.latencies_ms, 0.5):>8.2f} {p99:>8.2f} {res.failures:>5} {per_cpu:>10} "
            f"{rps_f:>9} {p99_f:>9} {rps_n:>9} {p99_n:>9}"
        )
    print()
    print("req/cpu-s = successful lookups per CPU second the server process used (lookups/s/core)")
    top = max(clients_list)
    for target, clients, mode, res, cpu in rows:
        if target != "tokend" or clients != top:
            continue
        p99 = pct(res.latencies_ms, 0.99)
        ok_p99 = "PASS" if p99 <= TARGET_P99_MS else "FAIL"
        if mode == "keep-alive":
            per_core = len(res.latencies_ms) / cpu if cpu > 0 else float("nan")
            ok_rps = "PASS" if res.rps >= TARGET_RPS_PER_CORE else "FAIL"
            ok_cpu = "PASS" if per_core >= TARGET_RPS_PER_CORE else "FAIL"
            print(
                f"target >= {TARGET_RPS_PER_CORE} lookups/s per core, keep-alive, {clients} clients"
                " (the daemon is one process on one core):"
            )
            print(f"  achieved req/s: {res.rps:.0f} -> {ok_rps}")
            print(f"  lookups per daemon CPU second: {per_core:.0f} -> {ok_cpu}")
            print(f"  p99 <= {TARGET_P99_MS:g} ms: {p99:.2f} ms -> {ok_p99}")
        elif mode == "conn/request":
            base = nginxes.get((clients, mode))
            print(f"DESIGN §8, one request per connection, {clients} clients:")
            if base is None:
                print("  ratio to nginx: not measured (nginx not installed)")
            else:
                ratio = res.rps / base.rps
                verdict = "PASS" if ratio >= NGINX_RATIO_MIN else "FAIL"
                aim = "met" if ratio >= NGINX_RATIO_AIM else "not met"
                print(
                    f"  req/s {ratio:.2f}x nginx (target >= {NGINX_RATIO_MIN}x) -> {verdict}; "
                    f"aim {NGINX_RATIO_AIM}x {aim}"
                )
            print(f"  p99 <= {TARGET_P99_MS:g} ms: {p99:.2f} ms -> {ok_p99}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
