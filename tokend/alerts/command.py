"""The CLI's alert commands: `tokend alert --unit NAME` (from an `OnFailure=` unit) and
`tokend check --alerts`, each delivering one event to every sink now, past the queues."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import TextIO

from tokend.alerts.event import check_event, daemon_failed_event
from tokend.alerts.manager import AlertManager
from tokend.clock import SystemClock
from tokend.config import AlertSettings, Config
from tokend.errors import ExitCode

logger = logging.getLogger(__name__)


def _monitor_result(env: Mapping[str, str]) -> str | None:
    """What systemd (v251+) tells an `OnFailure=` unit about the failed one, as one phrase."""
    result = env.get("MONITOR_SERVICE_RESULT")
    code, status = env.get("MONITOR_EXIT_CODE"), env.get("MONITOR_EXIT_STATUS")
    exit_text = " ".join(part for part in (code, status) if part)
    if result and exit_text:
        return f"{result}: {exit_text}"
    return result or exit_text or None


async def _deliver_once(
    settings: AlertSettings, event: Mapping[str, object]
) -> list[tuple[str, str | None]]:
    manager = AlertManager(settings, clock=SystemClock())
    try:
        return await manager.send_event(event)
    finally:
        await manager.close()


def _report(results: list[tuple[str, str | None]], out: TextIO) -> int:
    for name, error in results:
        out.write(f"{name}: ok\n" if error is None else f"{name}: failed: {error}\n")
    return int(ExitCode.OK if all(error is None for _, error in results) else ExitCode.TEMPORARY)


def run_alert_command(
    config: Config,
    unit: str,
    result: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """`tokend alert --unit NAME [--result R]`: send `daemon_failed` to every sink now.

    `result` defaults to what systemd passes an `OnFailure=` unit (`$MONITOR_SERVICE_RESULT`...).
    Logs the alert, prints one line per sink; returns 0 when all delivered (or none is
    configured: the log line is then the alert), 75 when a sink failed. Raises ConfigError.
    """
    out = out or sys.stdout
    if result is None:
        result = _monitor_result(os.environ if env is None else env)
    host = socket.gethostname()
    event = daemon_failed_event(unit, host=host, at=SystemClock().now(), result=result)
    sentence = str(event["message"]).rstrip(".")
    logger.error("alert daemon_failed: %s; run: %s", sentence, event["action"])
    if not (config.alerts.exec or config.alerts.webhook or config.alerts.apprise):
        out.write("no alert sinks configured (alerts.exec, alerts.webhook, alerts.apprise)\n")
        return int(ExitCode.OK)
    return _report(asyncio.run(_deliver_once(config.alerts, event)), out)


def run_alert_test(config: Config, *, out: TextIO | None = None) -> int:
    """`tokend check --alerts`: send a `test` event to every sink now, print one line per sink.

    Returns 0 when all delivered, 75 when a sink failed, 78 when none is configured.
    Raises ConfigError.
    """
    out = out or sys.stdout
    if not (config.alerts.exec or config.alerts.webhook or config.alerts.apprise):
        out.write("no alert sinks configured (alerts.exec, alerts.webhook, alerts.apprise)\n")
        return int(ExitCode.CONFIG)
    event = check_event(host=socket.gethostname(), at=SystemClock().now())
    return _report(asyncio.run(_deliver_once(config.alerts, event)), out)
