"""What a connector tells its readers: the access token for a lookup, the ApiError when there is
none (with what a human should do about it), and the status that `tokend status` shows.

A lookup never waits on the network while the token is good; otherwise it joins or starts the
connector's refresh (never faster than the backoff) and waits a bounded time for it. Nothing here
changes a connector's state except through `Connector.refresh` and `Connector.note_expiry`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING

from tokend import policy
from tokend.clock import isoformat
from tokend.errors import ApiError
from tokend.model import State, TokenSet

if TYPE_CHECKING:
    from tokend.refresher.connector import Connector

LOOKUP_WAIT_S = 10.0  # how long a lookup waits for a refresh it needs (DESIGN §5)


def action_for(
    name: str, state: State, last_error: str | None = None, *, can_login: bool = True
) -> str | None:
    """What a human should do about a connector in `state`, as a command line where possible.

    `can_login` says whether `tokend login` can authorize this connector (it has an
    authorization endpoint or discovers one); without it, a new grant comes from `tokend import`.
    """
    authorize = f"tokend login {name}" if can_login else f"tokend import {name}"
    if state in (State.UNAUTHORIZED, State.NEEDS_REAUTH):
        return authorize
    if state is State.REJECTED:
        if last_error and "client secret" in last_error:
            return f"tokend secret {name}"
        if last_error and last_error.startswith("keyring item ") and "is unusable" in last_error:
            return authorize  # a corrupt stored grant: a new one replaces it
        return f"fix connectors.{name} in the config or the client registration, then: " + (
            f"tokend refresh {name}"
        )
    if state is State.EXPIRED:
        return "tokend check"  # it probes the token endpoint; retries go on meanwhile
    return None


def action_of(connector: Connector) -> str | None:
    """`action_for` a connector as it is now."""
    record = connector.record
    return action_for(
        connector.name, record.state, record.last_error, can_login=connector.can_login
    )


def unavailable(
    connector: Connector, description: str, *, retry_after: int | None = None
) -> ApiError:
    """No valid token right now, but the connector is working on one (HTTP 503)."""
    return ApiError(
        "temporarily_unavailable",
        description,
        connector=connector.name,
        since=isoformat(connector.record.since),
        action=action_of(connector),
        retry_after=retry_after,
    )


def needs_reauth(connector: Connector) -> ApiError:
    """No token until a human acts: no grant, a dead grant, or a rejected client."""
    state = connector.state
    record = connector.record
    if state is State.UNAUTHORIZED:
        description = "no grant is stored for this connector"
    else:
        description = record.last_error or f"connector is {state.value}"
    return ApiError(
        "needs_reauth",
        f"{state.value}: {description}",
        connector=connector.name,
        since=isoformat(record.since),
        action=action_of(connector),
    )


async def lookup(connector: Connector, *, min_ttl_s: float = 0.0) -> TokenSet:
    """The current access token, valid for more than `min_ttl_s`, or an ApiError.

    Never waits on the network while the token is good; otherwise joins or starts a refresh
    (never faster than the backoff) and waits up to LOOKUP_WAIT_S for it.
    """
    min_ttl = timedelta(seconds=min_ttl_s)
    now = connector.clock.now()
    connector.note_expiry(now)
    token = connector.token
    if connector.state.is_terminal or token is None:
        raise needs_reauth(connector)
    if policy.may_serve(token, now=now, min_ttl=min_ttl):
        return token
    if min_ttl_s > 0 and token.lifetime <= min_ttl:
        raise ApiError(
            "bad_request",
            f"min_ttl {min_ttl_s:g}s is not below the token lifetime "
            f"{int(token.lifetime.total_seconds())}s",
            connector=connector.name,
        )
    retry_at = connector.record.retry_at
    if not connector.refresh_in_flight and retry_at is not None and retry_at > now:
        raise unavailable(
            connector,
            f"{connector.state.value}: {connector.record.last_error or 'refresh failing'}",
            retry_after=policy.retry_after_seconds(retry_at, now),
        )
    try:
        await asyncio.wait_for(connector.refresh(), LOOKUP_WAIT_S)
    except TimeoutError:
        raise unavailable(connector, "refresh still in flight", retry_after=5) from None
    token = connector.token
    now = connector.clock.now()
    if connector.state.is_terminal or token is None:
        raise needs_reauth(connector)
    if policy.may_serve(token, now=now, min_ttl=min_ttl):
        return token
    retry_at = connector.record.retry_at
    retry_after = policy.retry_after_seconds(retry_at, now) if retry_at else 5
    raise unavailable(
        connector,
        f"{connector.state.value}: {connector.record.last_error or 'no valid token'}",
        retry_after=retry_after,
    )


def status(connector: Connector) -> dict[str, object]:
    """What `status` and the socket show: no secrets."""
    now = connector.clock.now()
    connector.note_expiry(now)
    record = connector.record
    token = connector.token
    expires_in = None
    if token is not None:
        expires_in = max(0, int(token.remaining(now).total_seconds()))
    return {
        "connector": connector.name,
        "state": record.state.value,
        "since": isoformat(record.since),
        "expires_at": isoformat(record.expires_at),
        "expires_in": expires_in,
        # Milliseconds: refresh punctuality is measured against these (RFC 3339 allows them).
        "next_refresh_at": isoformat(record.next_refresh_at, timespec="milliseconds"),
        "last_refresh_at": isoformat(record.last_refresh_at, timespec="milliseconds"),
        "retry_at": isoformat(record.retry_at),
        "consecutive_failures": record.consecutive_failures,
        "last_error": record.last_error,
        "action": action_of(connector),
        "lifetime_assumed": record.lifetime_assumed,
        "clock_offset_s": record.clock_offset_s,
        "refreshes": record.refreshes,
        "has_refresh_token": token is not None and token.refresh_token is not None,
        "unpersisted": connector.unpersisted,
        "token_url": connector.config.token_url,
    }
