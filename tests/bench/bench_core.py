"""Core benchmarks: socket lookups (h2load), `tokend token` wall time, idle RSS and time to READY.

Not a test: it prints figures, each next to a floor measured in the same run on the same machine.
Run: python tests/bench/bench_core.py [--connectors 100] [--requests 20000] [--clients 32]
Needs h2load (Debian: nghttp2-client) for the lookup figures; the rest needs nothing extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.benchlib import LoadResult, cpu_s, h2load, pct, rss_mb
from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get
from tokend.authserver import AuthServer


def _median_wall(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connectors", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to measure idle CPU")
    args = parser.parse_args()

    # A regular install byte-compiles the package (pip does); an editable one under
    # PYTHONDONTWRITEBYTECODE would recompile tokend on every CLI call, unlike the stdlib floor.
    package = Path(__file__).resolve().parents[2] / "tokend"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    root = Path(tempfile.mkdtemp(prefix="tkdb", dir="/tmp"))
    names = [f"c{i:04d}" for i in range(args.connectors)]
    try:
        with AuthServer(lifetime_s=3600.0) as auth:
            config = config_dict(
                root,
                auth.token_url,
                connectors={n: {} for n in names},
                daemon={"keyring_backend": FILE_BACKEND},
                refresh={"skew": "5m"},
            )
            proc = DaemonProcess(root, config).start(verbose=False)
            for name in names:
                status, _ = get(
                    proc.socket, f"/v1/connectors/{name}/grant", "PUT", auth.issue_grant()
                )
                assert status == 200
            proc.stop()
            started = time.perf_counter()
            proc.start(verbose=False)  # waits until /v1/health answers
            ready_s = time.perf_counter() - started
            assert proc.proc is not None
            pid = proc.proc.pid
            time.sleep(2.0)
            rss = rss_mb(pid)
            cpu0 = cpu_s(pid)
            time.sleep(args.idle)
            idle_cpu_per_hour = (cpu_s(pid) - cpu0) * 3600 / args.idle

            env = {**proc.env, "TOKEND_SOCKET": str(proc.socket)}
            tokend = shutil.which("tokend") or ""
            floor = _median_wall(
                [sys.executable, "-c", "import http.client, socket"], args.runs, env
            )
            token_cli = _median_wall([tokend, "token", names[0]], args.runs, env) if tokend else 0.0
            token_m = _median_wall(
                [sys.executable, "-m", "tokend", "token", names[0]], args.runs, env
            )

            h2: LoadResult | None = None
            if shutil.which("h2load"):
                h2load_log = root / "h2load.log"
                path = f"/v1/connectors/{names[0]}/token"
                h2load(str(proc.socket), path, 2000, args.clients, h2load_log)  # warm-up
                h2 = h2load(str(proc.socket), path, args.requests, args.clients, h2load_log)
            rss_after = rss_mb(pid)
            proc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("connectors", f"{args.connectors}"),
        ("time to READY (start -> /v1/health answers)", f"{ready_s * 1000:.0f} ms"),
        ("daemon RSS, idle", f"{rss:.1f} MB"),
        ("daemon CPU while idle", f"{idle_cpu_per_hour:.2f} s per hour (over {args.idle:g} s)"),
        ("floor: python3 -c 'import http.client, socket'", f"{floor * 1000:.1f} ms (median)"),
    ]
    if token_cli:
        rows.append(
            (
                "tokend token NAME (console script)",
                f"{token_cli * 1000:.1f} ms = {token_cli / floor:.2f}x floor",
            )
        )
    rows.append(
        ("python -m tokend token NAME", f"{token_m * 1000:.1f} ms = {token_m / floor:.2f}x floor")
    )
    if h2 is not None:
        rows += [
            (
                f"lookups, keep-alive, {args.clients} clients (h2load)",
                f"{h2.rps:.0f} req/s, p50 {pct(h2.latencies_ms, 0.5):.2f} ms, "
                f"p99 {pct(h2.latencies_ms, 0.99):.2f} ms, max {h2.latencies_ms[-1]:.2f} ms",
            ),
            ("  failed lookups", f"{h2.failures} of {args.requests}"),
            ("daemon RSS after the load", f"{rss_after:.1f} MB"),
        ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
