"""Logging set-up for `tokend run` and `tokend demo`: stderr, and journald priorities under systemd.

When stderr is the journal (`JOURNAL_STREAM` names stderr's device and inode), every line starts
with an sd-daemon priority prefix (`<3>` for ERROR, …) and carries no timestamp (journald adds
one), so `journalctl -p err -u tokend` shows exactly what a human must act on: ERROR is reserved
for that (a dead grant, a refused client, a keyring write that failed, an alert).
"""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3) priorities: the syslog levels.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
NOISY = ("httpx", "httpcore", "apscheduler", "asyncio", "apprise")  # httpx logs every URL at INFO


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """`<N>` before every line of a record (a traceback's lines too), so none loses its priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """Whether stderr is connected to the journal, per systemd.exec(5)'s JOURNAL_STREAM."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def configure(verbose: int) -> None:
    """stderr logging at INFO (DEBUG with -v); journald priority prefixes when stderr is the
    journal, timestamps otherwise."""
    level = logging.DEBUG if verbose > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
