"""Shared pieces of the benchmarks: a daemon with grants, raw socket clients, percentiles, /proc.

Not a test module. Every helper is blocking and stdlib-only, so benchmark processes can fork.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get
from tokend.authserver import AuthServer


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values)) - 1))
    return sorted_values[rank]


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds `pid` (all its threads) has used so far.

    From schedstat (nanoseconds, exact) where the kernel has it; /proc/PID/stat counts in
    clock ticks, too coarse for runs of a second or two.
    """
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def daemon_with_grants(
    root: Path,
    auth: AuthServer,
    names: Sequence[str],
    *,
    refresh: dict[str, Any] | None = None,
    own_client_ids: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[DaemonProcess]:
    """A real `tokend run` process (file keyring) with one installed grant per connector name.

    With `own_client_ids`, connector NAME uses client id NAME (the auth server must know it), so
    the auth server's recorded requests tell the connectors apart.
    """
    config = config_dict(
        root,
        auth.token_url,
        connectors={n: ({"client_id": n} if own_client_ids else {}) for n in names},
        daemon={"keyring_backend": FILE_BACKEND},
        refresh=refresh,
    )
    proc = DaemonProcess(root, config, env).start(verbose=False)
    try:
        for name in names:
            grant = auth.issue_grant(name) if own_client_ids else auth.issue_grant()
            status, body = get(proc.socket, f"/v1/connectors/{name}/grant", "PUT", grant)
            if status != 200:
                raise RuntimeError(f"grant for {name}: {status} {body}")
        yield proc
    finally:
        proc.stop()


def request_bytes(path: str, *, close: bool) -> bytes:
    """An HTTP/1.1 GET for `path`, keep-alive or `Connection: close`."""
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: tokend\r\n{extra}\r\n".encode()


def one_request(sock_path: str, raw: bytes) -> tuple[int, bytes]:
    """One request on a fresh AF_UNIX connection, read to EOF; returns (status, whole response)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(sock_path)
        conn.sendall(raw)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    try:
        status = int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, data


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load run measured: latencies in ms (sorted), failures, wall seconds."""

    latencies_ms: list[float]
    failures: int
    wall_s: float

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s if self.wall_s > 0 else float("nan")


def _conn_per_request_worker(args: tuple[str, bytes, int, float]) -> tuple[list[float], int]:
    sock_path, raw, count, start_at = args
    while time.time() < start_at:  # every worker starts together
        time.sleep(0.001)
    lat: list[float] = []
    failures = 0
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            status, _ = one_request(sock_path, raw)
        except OSError:
            status = 0
        if status == 200:
            lat.append((time.perf_counter() - t0) * 1000)
        else:
            failures += 1
    return lat, failures


def conn_per_request_load(sock_path: str, path: str, requests: int, clients: int) -> LoadResult:
    """`clients` processes, each opening a new connection per request; `requests` in total."""
    raw = request_bytes(path, close=True)
    per = max(1, requests // clients)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(clients) as pool:
        start_at = time.time() + 0.5
        jobs = [(sock_path, raw, per, start_at) for _ in range(clients)]
        async_result = pool.map_async(_conn_per_request_worker, jobs)
        parts = async_result.get(600)
        wall = time.time() - start_at
    lat = sorted(x for part, _ in parts for x in part)
    return LoadResult(lat, sum(f for _, f in parts), wall)


def h2load(sock_path: str, path: str, requests: int, clients: int, log: Path) -> LoadResult:
    """Keep-alive HTTP/1.1 load with h2load; latencies from its per-request log."""
    log.unlink(missing_ok=True)  # h2load appends: an old log would mix in earlier runs
    started = time.perf_counter()
    done = subprocess.run(
        [
            "h2load",
            "--h1",
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            "1",
            "-B",
            f"unix:{sock_path}",
            "--log-file",
            str(log),
            f"http://tokend{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    rps = next(
        (
            float(line.split()[3])
            for line in done.stdout.splitlines()
            if line.startswith("finished")
        ),
        float("nan"),
    )
    lat: list[float] = []
    failures = 0
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if fields[1] == "200":
            lat.append(int(fields[2]) / 1000)
        else:
            failures += 1
    lat.sort()
    # h2load's own duration excludes process start; use it for req/s.
    return LoadResult(lat, failures, len(lat) / rps if rps == rps and rps > 0 else wall)


def curl_load(sock_path: str, path: str, requests: int, clients: int) -> LoadResult:
    """`curl --unix-socket` once per request, `clients` at a time; latency = process wall time."""
    argv = ["curl", "-sf", "-o", "/dev/null", "--unix-socket", sock_path, f"http://tokend{path}"]
    per = max(1, requests // clients)

    def run(_: int) -> tuple[list[float], int]:
        lat: list[float] = []
        failures = 0
        for _ in range(per):
            t0 = time.perf_counter()
            code = subprocess.run(argv, check=False).returncode
            if code == 0:
                lat.append((time.perf_counter() - t0) * 1000)
            else:
                failures += 1
        return lat, failures

    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(run, range(clients)))
    wall = time.perf_counter() - started
    lat = sorted(x for part, _ in parts for x in part)
    return LoadResult(lat, sum(f for _, f in parts), wall)
