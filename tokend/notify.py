"""sd_notify messages to systemd (`NOTIFY_SOCKET`): READY, STATUS, WATCHDOG, STOPPING.

sdnotify swallows every error and silently drops a datagram it cannot encode, so messages are
sanitised to printable latin-1 here and the first failure to send is logged once. Outside systemd
(no `NOTIFY_SOCKET`) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os

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
