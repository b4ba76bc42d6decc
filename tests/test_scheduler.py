"""RefreshScheduler: one APScheduler job per planned refresh, replaced and cancelled, and the
wall-clock re-check that starts what became due while timers slept (suspend, clock jumps)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from tokend.scheduler import RefreshScheduler

pytestmark = pytest.mark.anyio


class ShiftClock:
    """The real clocks, with the wall clock shifted by `offset` (a wall-clock jump)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


class Recorder:
    """The scheduler's `run` and `due` callbacks, recording what ran and when."""

    def __init__(self, clock: ShiftClock) -> None:
        self.clock = clock
        self.ran: list[tuple[str, datetime]] = []
        self.due_names: list[str] = []
        self.ran_event = asyncio.Event()

    async def run(self, name: str) -> None:
        self.ran.append((name, self.clock.now()))
        self.ran_event.set()
        if name == "boom":
            raise RuntimeError("a bug in one connector")

    def due(self, now: datetime) -> Iterable[str]:
        names, self.due_names = self.due_names, []
        return names

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.ran) < count:
                self.ran_event.clear()
                await self.ran_event.wait()


def _make(recheck_s: float = 30.0) -> tuple[ShiftClock, Recorder, RefreshScheduler]:
    clock = ShiftClock()
    recorder = Recorder(clock)
    return clock, recorder, RefreshScheduler(recorder.run, recorder.due, clock, recheck_s=recheck_s)


async def test_plans_run_once_at_their_time_in_order() -> None:
    """Each plan runs once, not before its time, in time order; a past plan runs at once."""
    clock, recorder, scheduler = _make()
    scheduler.start()
    try:
        now = clock.now()
        scheduler.schedule("late", now + timedelta(seconds=0.3))
        scheduler.schedule("soon", now + timedelta(seconds=0.1))
        scheduler.schedule("past", now - timedelta(hours=1))
        assert scheduler.planned("late") == now + timedelta(seconds=0.3)
        await recorder.wait_for(3)
        assert [name for name, _ in recorder.ran] == ["past", "soon", "late"]
        assert recorder.ran[2][1] >= now + timedelta(seconds=0.3)
        assert scheduler.planned("late") is None  # one-shot: the run plans the next one
        await asyncio.sleep(0.2)
        assert len(recorder.ran) == 3
    finally:
        await scheduler.shutdown()


async def test_replanning_replaces_and_none_cancels() -> None:
    """A new plan replaces the old one; None (or cancel) removes it."""
    clock, recorder, scheduler = _make()
    scheduler.start()
    try:
        now = clock.now()
        scheduler.schedule("a", now + timedelta(seconds=0.1))
        scheduler.schedule("a", now + timedelta(seconds=0.3))
        scheduler.schedule("b", now + timedelta(seconds=0.1))
        scheduler.schedule("b", None)
        scheduler.schedule("c", now + timedelta(seconds=0.1))
        scheduler.cancel("c")
        await recorder.wait_for(1)
        await asyncio.sleep(0.3)
        assert [name for name, _ in recorder.ran] == ["a"]
        assert recorder.ran[0][1] >= now + timedelta(seconds=0.3)
    finally:
        await scheduler.shutdown()


async def test_plans_made_before_start_are_armed_at_start() -> None:
    """Connectors plan while the daemon starts; their timers are armed when the scheduler is."""
    clock, recorder, scheduler = _make()
    scheduler.schedule("early", clock.now() + timedelta(seconds=0.05))
    assert not scheduler.running
    await asyncio.sleep(0.1)
    assert recorder.ran == []
    scheduler.start()
    try:
        assert scheduler.running
        await recorder.wait_for(1)
    finally:
        await scheduler.shutdown()
    assert not scheduler.running


async def test_recheck_runs_plans_overtaken_by_a_wall_clock_jump() -> None:
    """When the wall clock jumps forward past a plan, the next re-check runs it at once (the
    daemon's `due` names every connector whose plan is in the past, as this one does)."""
    clock, recorder, scheduler = _make(recheck_s=0.1)

    def due(now: datetime) -> Iterable[str]:
        planned = scheduler.planned("a")
        return ["a"] if planned is not None and planned <= now and not recorder.ran else []

    scheduler = RefreshScheduler(recorder.run, due, clock, recheck_s=0.1)
    scheduler.start()
    try:
        scheduler.schedule("a", clock.now() + timedelta(hours=1))
        await asyncio.sleep(0.15)
        assert recorder.ran == []
        clock.offset = timedelta(hours=2)  # as after a suspend: the timer would wait an hour
        await recorder.wait_for(1, timeout=5.0)
        assert scheduler.last_recheck is not None
    finally:
        await scheduler.shutdown()


async def test_recheck_starts_what_became_due_and_failures_stay_contained() -> None:
    """The re-check starts the connectors `due` names; one failing run stops nothing else."""
    clock, recorder, scheduler = _make(recheck_s=0.05)
    recorder.due_names = ["boom", "fine"]
    scheduler.start()
    try:
        await recorder.wait_for(2)
        scheduler.schedule("later", clock.now())
        await recorder.wait_for(3)
        assert sorted(name for name, _ in recorder.ran) == ["boom", "fine", "later"]
    finally:
        await scheduler.shutdown()


async def test_shutdown_cancels_every_timer() -> None:
    """After shutdown nothing planned runs any more."""
    clock, recorder, scheduler = _make()
    scheduler.start()
    scheduler.schedule("a", clock.now() + timedelta(seconds=0.1))
    await scheduler.shutdown()
    await asyncio.sleep(0.2)
    assert recorder.ran == []
