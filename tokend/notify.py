"""sd_notify messages to systemd (`NOTIFY_SOCKET`): READY, STATUS, WATCHDOG, STOPPING.

sdnotify swallows every error and silently drops a datagram it cannot encode, so messages are
sanitised to printable latin-1 here and the first failure to send is logged once. Outside systemd
(no `NOTIFY_SOCKET`) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import sdnotify

logger = logging.getLogger(__name__)


def _clean(text: str) -> str:
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return printable.encode("latin-1", "replace").decode("latin-1")[:400]


class Notifier:
    """Sends sd_notify messages when systemd listens; remembers the last STATUS sent."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._warned = False
        self.last_status: str | None = None

    def _send(self, message: str) -> None:
        if self._notifier is None:
            return
        sock = self._notifier.socket
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            # sdnotify's own notify() hides failures; send directly so the first one is logged.
            sock.sendto(message.encode("latin-1"), address)
        except OSError as exc:
            if not self._warned:
                logger.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc)
                self._warned = True

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" + (f"\nSTATUS={_clean(status)}" if status else ""))
        if status:
            self.last_status = _clean(status)

    def status(self, text: str) -> None:
        text = _clean(text)
        if text != self.last_status:
            self.last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def close(self) -> None:
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (253+) asks for."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval_s(env: dict[str, str] | None = None) -> float | None:
    """Half of `WATCHDOG_USEC` when systemd set it for this process, else None."""
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2_000_000)
    except ValueError:
        return None


class Watchdog:
    """Sends WATCHDOG=1 every `interval_s` while `healthy()` says so, from the event loop.

    A wedged loop sends nothing because this task cannot run; a wedged scheduler sends nothing
    because `healthy()` says so: either way systemd's WatchdogSec= restarts the daemon.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float,
        healthy: Callable[[], str | None],
    ) -> None:
        self._notifier = notifier
        self.interval_s = interval_s
        self._healthy = healthy  # None when healthy, else the reason it is not
        self._withheld: str | None = None
        self.pings = 0

    async def run(self) -> None:
        while True:
            problem = self._healthy()
            if problem is None:
                if self._withheld is not None:
                    logger.warning("watchdog: healthy again; pinging systemd")
                    self._withheld = None
                self._notifier.watchdog()
                self.pings += 1
            elif problem != self._withheld:
                logger.error("watchdog: %s; withholding WATCHDOG=1 so systemd restarts us", problem)
                self._withheld = problem
            await asyncio.sleep(self.interval_s)
