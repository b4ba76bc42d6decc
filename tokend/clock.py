"""Time as a dependency: `Clock` gives aware UTC wall time and a monotonic reading.

Nothing else in tokend calls `datetime.now()` or `time.monotonic()` directly where a decision
depends on it, so tests can move time with a fake clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Aware UTC wall-clock time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


def isoformat(moment: datetime | None, *, timespec: str = "seconds") -> str | None:
    """RFC 3339 UTC with a `Z`, seconds precision (or `timespec`, e.g. "milliseconds",
    truncated); None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def human_span(secs: int) -> str:
    """A span the way a status line shows it: "45s", "12m", "5h", "3d" (rounded down)."""
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    if secs < 172800:
        return f"{secs // 3600}h"
    return f"{secs // 86400}d"
