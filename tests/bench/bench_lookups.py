"""Lookup throughput and latency: tokend's token endpoint next to a minimal server and curl.

Not a test: it prints one table, each tokend row next to a floor measured in the same run.
Floor server: a tiny asyncio server in its own process on a unix socket, answering every request
with the fixed bytes (status line, headers, JSON body) tokend answered for the same lookup, with
keep-alive; it parses no more than the blank line that ends the request head. Modes: keep-alive
(h2load), one request per connection (N forked Python clients, new AF_UNIX connection each time)
and `curl --unix-socket` per request (process wall time: the floor for a process-per-request job).
Run: python tests/bench/bench_lookups.py [--requests 20000] [--clients 1,32]
Needs h2load (Debian: nghttp2-client) for the keep-alive rows and curl for the curl rows.
"""

from __future__ import annotations

import argparse
import asyncio
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
    parser.add_argument(
        "--serve-floor", nargs=2, metavar=("SOCKET", "RESPONSE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return 0
    clients_list = [int(c) for c in args.clients.split(",")]
    have_h2load = shutil.which("h2load") is not None
    have_curl = shutil.which("curl") is not None

    root = Path(tempfile.mkdtemp(prefix="tkdl", dir="/tmp"))
    path = "/v1/connectors/c0000/token"
    rows: list[tuple[str, int, str, LoadResult, float]] = []  # target, clients, mode, result, cpu
    floor_proc: subprocess.Popen[bytes] | None = None
    try:
        with (
            AuthServer(lifetime_s=3600.0) as auth,
            daemon_with_grants(root, auth, ["c0000"], refresh={"skew": "5m"}) as proc,
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
        if floor_proc is not None:
            floor_proc.terminate()
            floor_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)

    floors = {(c, m): r for t, c, m, r, _ in rows if t == "floor"}
    header = (
        f"{'target':<7} {'clients':>7} {'mode':<13} {'req/s':>8} {'mean ms':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} "
        f"{'fail':>5} {'req/cpu-s':>10} {'rps/floor':>9} {'p99/floor':>9}"
    )
    print(f"response body+headers: {len(raw)} bytes; floor = asyncio fixed-response server")
    print(header)
    print("-" * len(header))
    for target, clients, mode, res, cpu in rows:
        floor = floors.get((clients, mode))
        p99 = pct(res.latencies_ms, 0.99)
        rps_ratio = f"{res.rps / floor.rps:.2f}" if floor and target != "floor" else "-"
        p99_ratio = (
            f"{p99 / pct(floor.latencies_ms, 0.99):.2f}" if floor and target != "floor" else "-"
        )
        per_cpu = f"{len(res.latencies_ms) / cpu:.0f}" if cpu > 0 else "-"
        mean = sum(res.latencies_ms) / len(res.latencies_ms) if res.latencies_ms else float("nan")
        print(
            f"{target:<7} {clients:>7} {mode:<13} {res.rps:>8.0f} {mean:>8.2f} "
            f"{pct(res.latencies_ms, 0.5):>8.2f} {p99:>8.2f} {res.failures:>5} {per_cpu:>10} "
            f"{rps_ratio:>9} {p99_ratio:>9}"
        )
    print()
    print("req/cpu-s = successful lookups per CPU second the server process used (lookups/s/core)")
    for target, clients, mode, res, cpu in rows:
        if target == "tokend" and mode == "keep-alive" and clients == max(clients_list):
            per_core = len(res.latencies_ms) / cpu if cpu > 0 else float("nan")
            p99 = pct(res.latencies_ms, 0.99)
            ok_rps = "PASS" if res.rps >= TARGET_RPS_PER_CORE else "FAIL"
            ok_cpu = "PASS" if per_core >= TARGET_RPS_PER_CORE else "FAIL"
            ok_p99 = "PASS" if p99 <= TARGET_P99_MS else "FAIL"
            print(
                f"target >= {TARGET_RPS_PER_CORE} lookups/s per core, keep-alive, {clients} clients"
                " (the daemon is one process on one core):"
            )
            print(f"  achieved req/s: {res.rps:.0f} -> {ok_rps}")
            print(f"  lookups per daemon CPU second: {per_core:.0f} -> {ok_cpu}")
            print(
                f"target p99 <= {TARGET_P99_MS:g} ms at {clients} clients: {p99:.2f} ms -> {ok_p99}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
