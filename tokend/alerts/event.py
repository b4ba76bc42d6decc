"""Alert events (DESIGN §7): the JSON every sink receives, and the sentences in it.

`{"event","connector","severity","message","since","attempts","action","host","at"}`; reminders add
`"reminder": true` and `recovered` adds `"resolves"` (the event it ends). Pure: no I/O, no secrets
(messages come from reasons the daemon built without them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime

from tokend.clock import isoformat

SEVERITY = {
    "needs_reauth": "critical",
    "rejected": "critical",
    "daemon_failed": "critical",
    "expired": "error",
    "persist_failed": "error",
    "recovered": "info",
    "test": "info",
}
_MESSAGE_LIMIT = 500
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


def one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    text = " ".join(_CONTROL_RE.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def make_event(
    event: str,
    *,
    connector: str | None,
    message: str,
    since: datetime | None,
    attempts: int | None,
    action: str | None,
    host: str,
    at: datetime,
) -> dict[str, object]:
    """An alert event as sinks receive it (DESIGN §7); times are RFC 3339 UTC."""
    return {
        "event": event,
        "connector": connector,
        "severity": SEVERITY.get(event, "error"),
        "message": one_line(message),
        "since": isoformat(since),
        "attempts": attempts,
        "action": action,
        "host": host,
        "at": isoformat(at),
    }


def daemon_failed_event(
    unit: str, *, host: str, at: datetime, result: str | None = None
) -> dict[str, object]:
    """The event `tokend alert --unit NAME` sends from a systemd `OnFailure=` unit."""
    how = f" ({result})" if result else ""
    return make_event(
        "daemon_failed",
        connector=None,
        message=f"The tokend service {unit} failed on {host}{how}; tokens are not being refreshed.",
        since=at,
        attempts=None,
        action=f"journalctl -u {unit} -e; then: systemctl restart {unit}",
        host=host,
        at=at,
    )


def check_event(*, host: str, at: datetime) -> dict[str, object]:
    """The event `tokend check --alerts` sends to prove each sink works."""
    return make_event(
        "test",
        connector=None,
        message=f"Test alert from tokend on {host}: this alert sink works.",
        since=at,
        attempts=None,
        action=None,
        host=host,
        at=at,
    )


def describe(event: str, connector: str, reason: str | None, attempts: int | None) -> str:
    detail = f": {reason.rstrip('. ')}" if reason else ""
    if event == "needs_reauth":
        return f"Connector {connector} needs a new authorization{detail}."
    if event == "rejected":
        return f"Connector {connector} was rejected and will not refresh until fixed{detail}."
    if event == "expired":
        tries = f" after {attempts} failed attempts" if attempts else ""
        return (
            f"Connector {connector}'s access token expired and refreshing keeps failing"
            f"{tries}{detail}."
        )
    return (
        f"Connector {connector} was refreshed but the keyring write failed; the new tokens are "
        f"held in memory only{detail}."
    )


def encode(event: Mapping[str, object]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
