"""What the daemon says about its own health: the one-line summary for systemd's STATUS= (and
`tokend status`), the body of /v1/health, and the watchdog's reason to withhold its ping.

Pure functions over the connectors and the scheduler; the daemon passes the time in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from datetime import datetime

from tokend import __version__
from tokend.clock import human_span
from tokend.model import State
from tokend.refresher.connector import Connector
from tokend.scheduler import RefreshScheduler

# A connector in one of these states serves nothing (or soon won't): health says "degraded".
_BAD = {State.EXPIRED, State.NEEDS_REAUTH, State.REJECTED, State.UNAUTHORIZED}


def summary(connectors: Collection[Connector], *, now: datetime, config_error: str | None) -> str:
    """One line: counts by state, a failed reload, and the next refresh."""
    counts = Counter(c.state.value for c in connectors)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda i: -i[1]))
    nxt = min(
        ((c.record.next_refresh_at, c.name) for c in connectors if c.record.next_refresh_at),
        default=None,
    )
    text = parts or "no connectors"
    if config_error is not None:
        text = f"config reload failed, previous config runs: {config_error}; " + text
    if nxt is not None:
        secs = max(0, int((nxt[0] - now).total_seconds()))
        text += f"; next refresh {nxt[1]} in {human_span(secs)}"
    return text


def watchdog_problem(scheduler: RefreshScheduler | None, *, monotonic: float) -> str | None:
    """Why the daemon is not healthy (the scheduler stopped or its re-check stalled), or None."""
    if scheduler is None or not scheduler.running:
        return "the scheduler is not running"
    last = scheduler.last_recheck
    stalled = 0.0 if last is None else monotonic - last
    if last is None or stalled > 3 * scheduler.recheck_s + 1:
        return f"the wall-clock re-check has not run for {stalled:.0f}s"
    return None


def report(
    connectors: Collection[Connector],
    *,
    scheduler: RefreshScheduler | None,
    config_error: str | None,
    store_backend: str,
    uptime_s: int,
    summary: str,
    notify_dropped: int = 0,
) -> dict[str, object]:
    """The /v1/health body: "degraded" unless the scheduler runs, the last reload succeeded and
    every connector can serve."""
    counts = Counter(c.state.value for c in connectors)
    healthy_scheduler = scheduler is not None and scheduler.running
    degraded = (
        not healthy_scheduler or config_error is not None or any(State(s) in _BAD for s in counts)
    )
    return {
        "status": "degraded" if degraded else "ok",
        "version": __version__,
        "uptime_s": uptime_s,
        "connectors": dict(sorted(counts.items())),
        "keyring_backend": store_backend,
        "scheduler": "running" if healthy_scheduler else "stopped",
        "config_error": config_error,
        "summary": summary,
        "notify_dropped": notify_dropped,  # sd_notify datagrams systemd could not take at once
    }
