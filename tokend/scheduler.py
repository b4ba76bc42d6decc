"""APScheduler 3.x wrapper: one `DateTrigger` job per connector plus a wall-clock re-check.

Why the re-check: asyncio waits on CLOCK_MONOTONIC, which stops while the host is suspended, so a
timer armed before a suspend fires late by the length of the suspend. Every `recheck_s` the
scheduler is woken to compare due times against the wall clock, and any connector whose refresh
became due without a job running is started. Why `misfire_grace_time=None`: APScheduler's default
grace of 1 s silently drops a one-shot job that runs late (after SIGSTOP, suspend or a busy loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from tokend.clock import Clock

logger = logging.getLogger(__name__)

JOB_DEFAULTS = {"misfire_grace_time": None, "coalesce": True, "max_instances": 1}


class RefreshScheduler:
    """Runs `run(name)` at each connector's planned time, and whatever `due()` says is overdue."""

    def __init__(
        self,
        run: Callable[[str], Awaitable[None]],
        due: Callable[[datetime], Iterable[str]],
        clock: Clock,
        *,
        recheck_s: float = 30.0,
    ) -> None:
        self._run = run
        self._due = due
        self._clock = clock
        self.recheck_s = recheck_s
        self._scheduler = AsyncIOScheduler(job_defaults=dict(JOB_DEFAULTS), timezone=UTC)
        self._recheck_task: asyncio.Task[None] | None = None
        self._started: set[asyncio.Task[None]] = set()
        self.last_recheck: float | None = None  # monotonic; the watchdog reads it

    def start(self) -> None:
        """Start on the running event loop."""
        self._scheduler.start()
        self._recheck_task = asyncio.create_task(self._recheck_loop(), name="wall-clock re-check")

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running) and self._recheck_task is not None

    def schedule(self, name: str, when: datetime | None) -> None:
        """Plan `name`'s next run at `when` (replacing any plan); None cancels it."""
        if when is None:
            self.cancel(name)
            return
        self._scheduler.add_job(
            self._job,
            DateTrigger(run_date=when, timezone=UTC),
            args=[name],
            id=name,
            name=f"refresh {name}",
            replace_existing=True,
        )

    def cancel(self, name: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(name)

    def planned(self, name: str) -> datetime | None:
        job = self._scheduler.get_job(name)
        return None if job is None else job.next_run_time

    async def _job(self, name: str) -> None:
        try:
            await self._run(name)
        except Exception:
            # One connector never stops the others.
            logger.exception("%s: refresh job failed", name)

    async def _recheck_loop(self) -> None:
        while True:
            try:
                self.recheck_now()
            except Exception:
                # A bug here stops the re-checks; the watchdog then stops pinging and systemd
                # restarts the daemon, which beats refreshing on a broken schedule.
                logger.exception("wall-clock re-check failed; stopping it")
                raise
            await asyncio.sleep(self.recheck_s)

    def recheck_now(self) -> None:
        """Wake APScheduler and start every connector that became due without running."""
        self.last_recheck = self._clock.monotonic()
        self._scheduler.wakeup()
        for name in self._due(self._clock.now()):
            logger.debug("%s: due by the wall clock, refreshing now", name)
            task = asyncio.create_task(self._job(name), name=f"due {name}")
            self._started.add(task)
            task.add_done_callback(self._started.discard)

    async def shutdown(self) -> None:
        """Stop planning new runs; runs in flight are the caller's to await."""
        if self._recheck_task is not None:
            self._recheck_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recheck_task
            self._recheck_task = None
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler shuts down via call_soon_threadsafe
