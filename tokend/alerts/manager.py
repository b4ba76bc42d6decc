"""`AlertManager`: alerts for the daemon's connectors, deduplicated, reminded, never blocking.

One alert per entry into an alerting state (`needs_reauth`, `rejected`, `expired`) or a failed
keyring write (`persist_failed`), a reminder every `repeat` while it lasts, one `recovered` when it
ends. Reporting only enqueues: every sink has its own queue and worker task, so a slow, hanging or
failing sink delays neither the daemon nor the other sinks; a failed delivery is logged, never
raised. Every alert is also an ERROR log line naming the connector and the action.

Also the CLI's entry points: `run_alert_command` (`tokend alert --unit NAME`, from a systemd
`OnFailure=` unit) and `run_alert_test` (`tokend check --alerts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from tokend.alerts.event import check_event, describe, encode, make_event
from tokend.alerts.sink import (
    EXEC_TIMEOUT_S,
    WEBHOOK_TIMEOUT_S,
    Sink,
    attempt,
    build_sinks,
)
from tokend.clock import Clock
from tokend.config import AlertSettings
from tokend.model import State

logger = logging.getLogger(__name__)

ALERTING_STATES = frozenset({State.NEEDS_REAUTH, State.REJECTED, State.EXPIRED})
QUEUE_LIMIT = 1000  # events waiting per sink; past it the oldest reminder (else event) is dropped
RECHECK_S = 30.0  # reminders are re-checked against the wall clock this often (suspend, resume)


class _Outbox:
    """One sink's queue and the worker task that delivers from it, in order, one at a time."""

    def __init__(self, sink: Sink, limit: int) -> None:
        self.sink = sink
        self.limit = limit
        self.pending: deque[tuple[Mapping[str, object], bytes]] = deque()
        self.wake = asyncio.Event()
        self.closing = False
        self.task: asyncio.Task[None] | None = None

    def put(self, event: Mapping[str, object], body: bytes) -> None:
        if len(self.pending) >= self.limit:
            dropped = self._drop_one()
            logger.warning(
                "alert sink %s: %d alerts waiting; dropped %s for %s",
                self.sink.name,
                len(self.pending) + 1,
                dropped.get("event"),
                dropped.get("connector"),
            )
        self.pending.append((event, body))
        self.wake.set()

    def _drop_one(self) -> Mapping[str, object]:
        for index, (event, _) in enumerate(self.pending):
            if event.get("reminder"):
                del self.pending[index]
                return event
        return self.pending.popleft()[0]

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"alert sink {self.sink.name}")

    async def _run(self) -> None:
        while True:
            while self.pending:
                event, body = self.pending.popleft()
                error = await attempt(self.sink, event, body)
                if error is None:
                    logger.debug("alert sink %s: delivered %s", self.sink.name, event.get("event"))
                else:
                    logger.error(
                        "alert sink %s: %s for %s not delivered: %s",
                        self.sink.name,
                        event.get("event"),
                        event.get("connector") or "the daemon",
                        error,
                    )
            if self.closing:
                return
            self.wake.clear()
            await self.wake.wait()

    async def close(self, timeout_s: float) -> None:
        """Deliver what is queued for at most `timeout_s`, then stop and release the sink."""
        self.closing = True
        self.wake.set()
        if self.task is not None:
            done, _ = await asyncio.wait([self.task], timeout=timeout_s)
            if not done:
                logger.error(
                    "alert sink %s: %d alerts undelivered at shutdown",
                    self.sink.name,
                    len(self.pending) + 1,
                )
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
        await self.sink.aclose()


@dataclass(slots=True, kw_only=True)
class _Condition:
    """An alerted condition that lasts: what reminders repeat and `recovered` resolves."""

    event: str
    connector: str
    since: datetime
    reason: str | None
    action: str | None
    attempts: int | None
    sent_at: datetime  # wall clock and monotonic reading of the last alert or reminder
    sent_mono: float


class AlertManager:
    """Alerts for the daemon's connectors (see module docstring). Nothing here blocks the caller:
    `observe`, `persist_failed`, `persist_recovered` and `forget` only update state and enqueue.

    Call `start` once (it loads Apprise, raising ConfigError for a URL Apprise refuses) and `close`
    at shutdown. Events reported before `start` wait in the queues.
    """

    def __init__(
        self,
        settings: AlertSettings,
        *,
        clock: Clock,
        host: str | None = None,
        exec_timeout_s: float = EXEC_TIMEOUT_S,
        webhook_attempts: int = 3,
        webhook_backoff_s: float = 1.0,
        webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.host = host or socket.gethostname()
        self._exec_timeout_s = exec_timeout_s
        self._webhook_attempts = webhook_attempts
        self._webhook_backoff_s = webhook_backoff_s
        self._webhook_timeout_s = webhook_timeout_s
        self._queue_limit = queue_limit
        self._outboxes = self._outboxes_for(settings)
        self._retired: list[_Outbox] = []  # replaced by `reconfigure`, still draining
        self._conditions: dict[tuple[str, str], _Condition] = {}  # (connector, "state"/"persist")
        self._reminders: asyncio.Task[None] | None = None
        self._started = False

    def _outboxes_for(self, settings: AlertSettings) -> list[_Outbox]:
        sinks = build_sinks(
            settings,
            exec_timeout_s=self._exec_timeout_s,
            webhook_timeout_s=self._webhook_timeout_s,
            webhook_attempts=self._webhook_attempts,
            webhook_backoff_s=self._webhook_backoff_s,
        )
        return [_Outbox(sink, self._queue_limit) for sink in sinks]

    @property
    def sink_names(self) -> list[str]:
        """The sinks, named without their URLs: "exec", "webhook", "apprise #1 (ntfy)"."""
        return [box.sink.name for box in self._outboxes]

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Prepare the sinks and start their workers and the reminder timer.

        Raises ConfigError when an Apprise URL cannot be used (named by entry number).
        """
        if self._started:
            return
        for box in self._outboxes:
            await box.sink.prepare()
        self._started = True
        for box in self._outboxes:
            box.start()
        self._reminders = asyncio.create_task(self._remind(), name="alert reminders")

    async def reconfigure(self, settings: AlertSettings) -> None:
        """Use new sinks (a reload), keeping what is alerted; the old sinks finish their queues.

        Raises ConfigError, keeping the old sinks, when an Apprise URL cannot be used.
        """
        same_sinks = (settings.exec, settings.webhook, settings.apprise) == (
            self.settings.exec,
            self.settings.webhook,
            self.settings.apprise,
        )
        if same_sinks:
            self.settings = settings  # `repeat` is read at each reminder round
            return
        fresh = self._outboxes_for(settings)
        try:
            for box in fresh:
                await box.sink.prepare()
        except BaseException:
            for box in fresh:
                await box.sink.aclose()
            raise
        old, self._outboxes, self.settings = self._outboxes, fresh, settings
        if self._started:
            for box in fresh:
                box.start()
            for box in old:
                box.closing = True
                box.wake.set()
            self._retired.extend(old)
        else:
            for box in old:
                await box.sink.aclose()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop reminding, deliver what is queued for at most `timeout_s`, release the sinks."""
        if self._reminders is not None:
            self._reminders.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reminders
            self._reminders = None
        boxes, self._retired = [*self._retired, *self._outboxes], []
        await asyncio.gather(*(box.close(timeout_s) for box in boxes))
        self._started = False

    # ----------------------------------------------------------------- what the daemon reports

    def observe(
        self,
        connector: str,
        state: str,
        *,
        reason: str | None,
        action: str | None,
        since: datetime | None,
        attempts: int | None,
    ) -> None:
        """Report a connector's state (on every change; repeats are harmless).

        Entering `needs_reauth`, `rejected` or `expired` alerts once (a move between two of them is
        a new alert); `ok` after an alert sends `recovered`; `unauthorized` clears an alert
        silently (a human removed the grant); `refreshing` and `retrying` change nothing, so an
        `expired` connector whose retries keep failing is not alerted again at each attempt.
        """
        key = (connector, "state")
        current = self._conditions.get(key)
        if state in ALERTING_STATES:
            if current is not None and current.event == state:
                current.reason, current.action, current.attempts = reason, action, attempts
                return
            self._raise(key, str(state), reason=reason, action=action, since=since, tries=attempts)
        elif state == State.OK and current is not None:
            self._resolve(key)
        elif state == State.UNAUTHORIZED and current is not None:
            del self._conditions[key]
            logger.info("alert %s for %s cleared: its grant was removed", current.event, connector)

    def persist_failed(self, connector: str, *, reason: str, since: datetime) -> None:
        """Report refreshed tokens that could not be written to the keyring (held in memory).

        `reason` may be the connector's `last_error` as is ("persist_failed: ...").
        """
        reason = reason.removeprefix("persist_failed: ")
        key = (connector, "persist")
        current = self._conditions.get(key)
        if current is not None:
            current.reason = reason
            return
        self._raise(key, "persist_failed", reason=reason, action="tokend check", since=since)

    def persist_recovered(self, connector: str) -> None:
        """Report a successful keyring write: `recovered` if `persist_failed` was alerted."""
        if (connector, "persist") in self._conditions:
            self._resolve((connector, "persist"))

    def forget(self, connector: str) -> None:
        """Drop a removed connector's alerts silently (a reload removed it from the config)."""
        self._conditions.pop((connector, "state"), None)
        self._conditions.pop((connector, "persist"), None)

    # ----------------------------------------------------------------- direct delivery

    async def send_event(self, event: Mapping[str, object]) -> list[tuple[str, str | None]]:
        """Deliver `event` to every sink now, concurrently, past the queues; (sink, error or None)
        per sink. Raises ConfigError when an Apprise URL cannot be used."""
        boxes = list(self._outboxes)
        for box in boxes:
            await box.sink.prepare()
        body = encode(event)
        errors = await asyncio.gather(*(attempt(box.sink, event, body) for box in boxes))
        return [(box.sink.name, error) for box, error in zip(boxes, errors, strict=True)]

    async def send_test(self) -> list[tuple[str, str | None]]:
        """Deliver a `test` event to every sink now (`tokend check --alerts`)."""
        return await self.send_event(check_event(host=self.host, at=self.clock.now()))

    # ----------------------------------------------------------------- internals

    def _raise(
        self,
        key: tuple[str, str],
        event: str,
        *,
        reason: str | None,
        action: str | None,
        since: datetime | None,
        tries: int | None = None,
    ) -> None:
        now = self.clock.now()
        condition = _Condition(
            event=event,
            connector=key[0],
            since=since or now,
            reason=reason,
            action=action,
            attempts=tries,
            sent_at=now,
            sent_mono=self.clock.monotonic(),
        )
        self._conditions[key] = condition
        self._alert(condition, reminder=False)

    def _alert(self, condition: _Condition, *, reminder: bool) -> None:
        event = make_event(
            condition.event,
            connector=condition.connector,
            message=describe(
                condition.event, condition.connector, condition.reason, condition.attempts
            ),
            since=condition.since,
            attempts=condition.attempts,
            action=condition.action,
            host=self.host,
            at=self.clock.now(),
        )
        if reminder:
            event["reminder"] = True
        label = f"{condition.event} (reminder)" if reminder else condition.event
        sentence = str(event["message"]).rstrip(".")
        if condition.action:
            logger.error("alert %s: %s; run: %s", label, sentence, condition.action)
        else:
            logger.error("alert %s: %s", label, sentence)
        self._enqueue(event)

    def _resolve(self, key: tuple[str, str]) -> None:
        condition = self._conditions.pop(key)
        what = "its tokens are stored" if key[1] == "persist" else "it is ok"
        event = make_event(
            "recovered",
            connector=condition.connector,
            message=f"Connector {condition.connector} recovered from {condition.event}: {what}.",
            since=condition.since,
            attempts=None,
            action=None,
            host=self.host,
            at=self.clock.now(),
        )
        event["resolves"] = condition.event
        logger.info("alert recovered: %s", event["message"])
        self._enqueue(event)

    def _enqueue(self, event: Mapping[str, object]) -> None:
        body = encode(event)
        for box in self._outboxes:
            box.put(event, body)

    async def _remind(self) -> None:
        """Repeat each lasting alert every `repeat`, by wall clock or monotonic time, whichever
        passed more: a suspended machine reminds at resume, a clock set back still reminds."""
        while True:
            repeat = self.settings.repeat.total_seconds()
            wait = min(repeat, RECHECK_S)
            now, mono = self.clock.now(), self.clock.monotonic()
            for condition in list(self._conditions.values()):
                elapsed = max((now - condition.sent_at).total_seconds(), mono - condition.sent_mono)
                if elapsed >= repeat:
                    condition.sent_at, condition.sent_mono = now, mono
                    self._alert(condition, reminder=True)
                else:
                    wait = min(wait, repeat - elapsed)
            await asyncio.sleep(max(wait, 0.001))
