"""Frozen value types shared by every layer: `Secret`, `TokenSet`, `State`, `ConnectorState`.

No I/O here. A secret is a `Secret` from the moment it is parsed until a boundary (header building,
keyring write, socket reply) calls `.reveal()`; its repr and str never show the value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,63}"


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string whose repr, str and format never show the value."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The value itself; call only where it leaves the process on purpose."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


class State(StrEnum):
    """A connector's state (DESIGN §1)."""

    UNAUTHORIZED = "unauthorized"
    OK = "ok"
    REFRESHING = "refreshing"
    RETRYING = "retrying"
    EXPIRED = "expired"
    NEEDS_REAUTH = "needs_reauth"
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        """A human must act before the daemon tries this connector again."""
        return self in (State.NEEDS_REAUTH, State.REJECTED, State.UNAUTHORIZED)


def _dt(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("timestamp must be a string")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.astimezone(UTC)


def _opt_dt(value: Any) -> datetime | None:
    return None if value is None else _dt(value)


def _opt_iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSet:
    """One grant's tokens with an absolute expiry.

    `obtained_at` is when the request that produced it *started*, so latency shortens the believed
    lifetime. `generation` counts the stored versions: 0 means never stored; the store bumps it.
    """

    access_token: Secret
    refresh_token: Secret | None
    token_type: str = "Bearer"  # noqa: S105  # a scheme name, not a secret
    scope: str | None = None
    obtained_at: datetime
    expires_at: datetime
    lifetime_assumed: bool = False
    generation: int = 0

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.obtained_at

    def remaining(self, now: datetime) -> timedelta:
        return self.expires_at - now

    def with_generation(self, generation: int) -> TokenSet:
        return replace(self, generation=generation)

    def to_json(self) -> str:
        """The keyring item's value: the whole token set, secrets revealed (keyring boundary)."""
        return json.dumps(
            {
                "version": 1,
                "access_token": self.access_token.reveal(),
                "refresh_token": (
                    None if self.refresh_token is None else self.refresh_token.reveal()
                ),
                "token_type": self.token_type,
                "scope": self.scope,
                "obtained_at": _opt_iso(self.obtained_at),
                "expires_at": _opt_iso(self.expires_at),
                "lifetime_assumed": self.lifetime_assumed,
                "generation": self.generation,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> TokenSet:
        """Parse a keyring item; raises ValueError (never quoting the text) when it is unusable."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("stored token set is not JSON") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("stored token set has an unknown format")
        try:
            access = data["access_token"]
            refresh = data.get("refresh_token")
            if not isinstance(access, str) or not (refresh is None or isinstance(refresh, str)):
                raise ValueError("stored tokens must be strings")
            return cls(
                access_token=Secret(access),
                refresh_token=None if refresh is None else Secret(refresh),
                token_type=str(data.get("token_type") or "Bearer"),
                scope=data.get("scope"),
                obtained_at=_dt(data["obtained_at"]),
                expires_at=_dt(data["expires_at"]),
                lifetime_assumed=bool(data.get("lifetime_assumed", False)),
                generation=int(data.get("generation", 0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"stored token set lacks a field: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorState:
    """A connector's non-secret state: what `status` shows and `state.json` keeps across restarts.

    `generation` is the stored token set's generation this state speaks of, so a grant installed
    while the daemon was down is not mistaken for the dead one.
    """

    state: State = State.UNAUTHORIZED
    since: datetime | None = None
    generation: int | None = None
    obtained_at: datetime | None = None
    expires_at: datetime | None = None
    next_refresh_at: datetime | None = None
    last_refresh_at: datetime | None = None
    retry_at: datetime | None = None
    consecutive_failures: int = 0
    last_error: str | None = None
    lifetime_assumed: bool = False
    clock_offset_s: float | None = None
    refreshes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": _opt_iso(self.since),
            "generation": self.generation,
            "obtained_at": _opt_iso(self.obtained_at),
            "expires_at": _opt_iso(self.expires_at),
            "next_refresh_at": _opt_iso(self.next_refresh_at),
            "last_refresh_at": _opt_iso(self.last_refresh_at),
            "retry_at": _opt_iso(self.retry_at),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "lifetime_assumed": self.lifetime_assumed,
            "clock_offset_s": self.clock_offset_s,
            "refreshes": self.refreshes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectorState:
        """Parse one entry of `state.json`; raises ValueError/KeyError/TypeError when malformed."""
        offset = data.get("clock_offset_s")
        generation = data.get("generation")
        return cls(
            state=State(data["state"]),
            since=_opt_dt(data.get("since")),
            generation=None if generation is None else int(generation),
            obtained_at=_opt_dt(data.get("obtained_at")),
            expires_at=_opt_dt(data.get("expires_at")),
            next_refresh_at=_opt_dt(data.get("next_refresh_at")),
            last_refresh_at=_opt_dt(data.get("last_refresh_at")),
            retry_at=_opt_dt(data.get("retry_at")),
            consecutive_failures=int(data.get("consecutive_failures", 0)),
            last_error=data.get("last_error"),
            lifetime_assumed=bool(data.get("lifetime_assumed", False)),
            clock_offset_s=None if offset is None else float(offset),
            refreshes=int(data.get("refreshes", 0)),
        )
