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


def isoformat(moment: datetime | None) -> str | None:
    """RFC 3339 UTC with a `Z`, seconds precision; None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
