"""sd_notify messages to systemd (`NOTIFY_SOCKET`): READY, STATUS, WATCHDOG, STOPPING.

Every send is non-blocking: these calls run on the event loop, and a datagram socket whose reader
has stopped draining (the kernel queues only `net.unix.max_dgram_qlen` datagrams, 10 by default)
would otherwise block the loop, signals and all. A datagram that cannot be sent at once is dropped
and counted (`Notifier.dropped`, shown in /v1/health and /metrics); the first failure is logged
once. A state message (READY, STATUS, RELOADING, STOPPING) that could not go waits, in order, for
the next send or watchdog tick; a WATCHDOG=1 ping that cannot go is simply dropped. The
protocol is one datagram per message on a stdlib socket (sd_notify(3)); messages are sanitised
to printable latin-1. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

_MAX_PENDING = 8  # state messages kept for a later send; older ones are given up


def _clean(text: str) -> str:
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    return printable.encode("latin-1", "replace").decode("latin-1")[:400]


class Notifier:
    """Sends sd_notify messages when systemd listens; remembers the last STATUS sent."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        address = environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        # An abstract-namespace address is written with a leading "@" (sd_notify(3)).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self.enabled:
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
            )
        self._warned = False
        self.dropped = 0  # sends the socket refused: queue full (nobody drains it), no socket
        self._pending: list[str] = []  # state messages not yet taken, oldest first
        self.last_status: str | None = None

    def _send(self, message: str) -> bool:
        """Send one datagram without blocking; False when it was dropped."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto(message.encode("latin-1"), self._address)
        except OSError as exc:  # BlockingIOError when the reader's queue is full
            self.dropped += 1
            if not self._warned:
                logger.warning(
                    "cannot notify systemd at NOTIFY_SOCKET (%s); dropping messages it cannot "
                    "take at once, counted as notify_dropped in /v1/health",
                    exc.strerror or type(exc).__name__,
                )
                self._warned = True
            return False
        return True

    def _post(self, message: str) -> None:
        """Send a state message (READY, STATUS, RELOADING, STOPPING), in order: one the socket
        cannot take now waits for the next send or watchdog tick; a newer STATUS replaces a
        waiting one."""
        if message.startswith("STATUS="):
            self._pending = [m for m in self._pending if not m.startswith("STATUS=")]
        self._pending.append(message)
        del self._pending[:-_MAX_PENDING]
        self.flush()

    def flush(self) -> None:
        """Send the state messages still waiting, oldest first, as far as the socket takes them."""
        while self._pending and self._send(self._pending[0]):
            self._pending.pop(0)

    def ready(self, status: str | None = None) -> None:
        self._post("READY=1" + (f"\nSTATUS={_clean(status)}" if status else ""))
        if status:
            self.last_status = _clean(status)

    def status(self, text: str) -> None:
        text = _clean(text)
        if text != self.last_status:
            self.last_status = text
            self._post(f"STATUS={text}")

    def watchdog(self) -> None:
        """WATCHDOG=1, after any state message still waiting; a ping that cannot go is dropped."""
        self.flush()
        if not self._pending:
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._post("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp systemd (253+) asks for."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._post(f"RELOADING=1\nMONOTONIC_USEC={usec}")


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
