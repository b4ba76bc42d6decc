"""Lookup latency during a soak: short-lived tokens rotating while clients look up continuously.

Not a test: it prints one table. A real daemon (file keyring) serves `--connectors` connectors
whose tokens live `--lifetime` seconds (default 10), so each is refreshed every ~6 s; `--workers`
forked client processes each look up a random connector on a new connection, pause `--pause-ms`,
and repeat for `--minutes`. A lookup fails unless it answers 200 with `expires_in` > 0; the main
process also checks one looked-up token a second against the authorization server itself.
Run: python tests/bench/bench_soak.py [--minutes 10] [--connectors 4] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.benchlib import cpu_s, daemon_with_grants, one_request, pct, request_bytes, rss_mb
from tests.harness import get
from tokend.authserver import AuthServer

SLOW_MS = 50.0
# Mean refresh interval as a share of the lifetime: 2/3, minus the mean jitter (half of 10 %).
MEAN_REFRESH_FRACTION = 2 / 3 - 0.05


def _worker(args: tuple[str, list[str], float, float, int]) -> tuple[list[float], int, list[str]]:
    sock_path, names, until, pause_s, seed = args
    rng = random.Random(seed)
    lat: list[float] = []
    failures = 0
    samples: list[str] = []
    while time.time() < until:
        name = rng.choice(names)
        t0 = time.perf_counter()
        try:
            status, data = one_request(
                sock_path, request_bytes(f"/v1/connectors/{name}/token", close=True)
            )
        except OSError as exc:
            status, data = 0, str(exc).encode()
        ms = (time.perf_counter() - t0) * 1000
        ok = False
        if status == 200:
            body = json.loads(data.split(b"\r\n\r\n", 1)[1])
            ok = body.get("expires_in", 0) > 0
        if ok:
            lat.append(ms)
        else:
            failures += 1
            if len(samples) < 5:
                samples.append(f"{status} {data[-200:]!r}")
        if pause_s:
            time.sleep(pause_s)
    return lat, failures, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connectors", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lifetime", type=float, default=10.0, help="token lifetime, seconds")
    parser.add_argument(
        "--pause-ms", type=float, default=2.0, help="pause between a worker's lookups"
    )
    args = parser.parse_args()

    duration = args.minutes * 60
    names = [f"c{i:03d}" for i in range(args.connectors)]
    root = Path(tempfile.mkdtemp(prefix="tkds", dir="/tmp"))
    invalid_at_auth = 0
    checked_at_auth = 0
    try:
        with (
            AuthServer(lifetime_s=args.lifetime) as auth,
            daemon_with_grants(root, auth, names) as proc,
        ):
            assert proc.proc is not None
            pid = proc.proc.pid
            refreshes0 = auth.refreshes_ok
            cpu0 = cpu_s(pid)
            started = time.time()
            until = started + duration
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(args.workers) as pool:
                jobs = [
                    (str(proc.socket), names, until, args.pause_ms / 1000, i)
                    for i in range(args.workers)
                ]
                pending = pool.map_async(_worker, jobs)
                rng = random.Random(0)
                while time.time() < until:  # the auth server's own word on served tokens
                    status, body = get(proc.socket, f"/v1/connectors/{rng.choice(names)}/token")
                    checked_at_auth += 1
                    if status != 200 or not auth.is_valid_access_token(body["access_token"]):
                        invalid_at_auth += 1
                    time.sleep(1.0)
                parts = pending.get(duration + 120)
            elapsed = time.time() - started
            refreshes = auth.refreshes_ok - refreshes0
            token_calls = auth.token_calls
            cpu = cpu_s(pid) - cpu0
            rss = rss_mb(pid)
            _, statuses = get(proc.socket, "/v1/connectors")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lat = sorted(x for part, _, _ in parts for x in part)
    failures = sum(f for _, f, _ in parts)
    samples = [s for _, _, ss in parts for s in ss][:5]
    expected = args.connectors * elapsed / (args.lifetime * MEAN_REFRESH_FRACTION)
    states: dict[str, int] = {}
    for item in statuses if isinstance(statuses, list) else statuses.get("connectors", []):
        states[item["state"]] = states.get(item["state"], 0) + 1
    rows = [
        ("duration", f"{elapsed:.0f} s, {args.connectors} connectors, {args.lifetime:g} s tokens"),
        (
            "clients",
            f"{args.workers} processes, new connection per lookup, {args.pause_ms:g} ms pause",
        ),
        ("lookups ok", f"{len(lat)} ({len(lat) / elapsed:.0f}/s)"),
        ("failed lookups (not 200 or expires_in <= 0)", f"{failures}"),
        (
            "latency p50 / p99 / max",
            f"{pct(lat, 0.5):.2f} / {pct(lat, 0.99):.2f} / {lat[-1]:.2f} ms",
        ),
        (f"lookups slower than {SLOW_MS:g} ms", f"{sum(1 for x in lat if x > SLOW_MS)}"),
        (
            "served tokens the auth server rejected",
            f"{invalid_at_auth} of {checked_at_auth} checked",
        ),
        ("refreshes done (auth.refreshes_ok)", f"{refreshes}"),
        (
            "refreshes expected (2/3 life - mean jitter)",
            f"{expected:.0f} ({refreshes / expected:.2f}x)",
        ),
        ("token endpoint calls (all)", f"{token_calls}"),
        ("connector states at the end", json.dumps(states)),
        ("daemon CPU during the soak", f"{cpu:.1f} s ({100 * cpu / elapsed:.0f} % of one core)"),
        ("daemon RSS at the end", f"{rss:.1f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for sample in samples:
        print("failure sample:", sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
