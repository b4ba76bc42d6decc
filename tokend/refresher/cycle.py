"""One refresh cycle of a connector: persist what is pending, ask the token endpoint, persist and
read back, and only then serve the new token; or record why not.

The cycle stamps the request start, asks the token endpoint, writes the new token set to the store
and reads it back, and only then swaps the in-memory token that lookups serve. A failure never
deletes or overwrites what is stored: transient ones back off and retry forever, terminal ones wait
for a human. A failed keyring write keeps the rotated set in memory, serves from it, and retries
the write. `Connector.refresh` runs `run` single-flight, under the connector's lock.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from tokend import policy
from tokend.errors import (
    GenerationConflictError,
    InvalidGrantError,
    OAuthError,
    SecretMissingError,
    StoreError,
    TransientError,
)
from tokend.model import Secret, State, TokenSet
from tokend.refresher.serving import action_of

if TYPE_CHECKING:
    from tokend.refresher.connector import Connector

logger = logging.getLogger(__name__)


async def run(connector: Connector, *, forced: bool) -> None:
    """One cycle; `forced` (a human asked) also refreshes a connector that awaits a human."""
    pending = connector.unsaved
    if pending is not None and await _persist_pending(connector, pending, forced=forced):
        return
    current = connector.unsaved or connector.token
    if current is None:
        return
    if connector.state.is_terminal and not forced:
        return
    await _refresh_from(connector, current)


async def _refresh_from(connector: Connector, current: TokenSet) -> None:
    connector.update(state=State.REFRESHING)
    started = connector.clock.monotonic()
    outcome = "transient"
    try:
        outcome = await _attempt(connector, current)
    finally:
        connector.report(connector.name, outcome, connector.clock.monotonic() - started)


async def _attempt(connector: Connector, current: TokenSet) -> str:
    """One refresh attempt; returns its outcome for metrics (see `connector.Report`)."""
    try:
        secret = await _client_secret(connector)
        result = await connector.oauth.refresh(connector.config, current, secret)
    except InvalidGrantError as exc:
        await _on_invalid_grant(connector, current, exc)
        return "invalid_grant"
    except (SecretMissingError, OAuthError) as exc:
        _terminal(connector, State.REJECTED, reason_of(connector, exc))
        return "rejected"
    except (TransientError, StoreError) as exc:
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        _transient(connector, current, reason_of(connector, exc), retry_after=retry_after)
        return "transient"
    except Exception:
        # A bug must not stop this connector for good: treat it as transient, loudly.
        logger.exception("%s: refresh failed unexpectedly", connector.name)
        _transient(connector, current, "internal error during refresh", retry_after=None)
        return "transient"
    connector.update(clock_offset_s=result.clock_offset_s)
    return "ok" if await _persist(connector, result.token, current) else "persist_failed"


async def _client_secret(connector: Connector) -> Secret | None:
    if connector.config.client_auth == "none":
        return None
    secret = await asyncio.to_thread(connector.store.load_client_secret, connector.name)
    if secret is None:
        raise SecretMissingError(
            f"{connector.name}: no client secret stored for {connector.config.client_auth}; "
            f"run: tokend secret {connector.name}"
        )
    return secret


async def _on_invalid_grant(
    connector: Connector, current: TokenSet, exc: InvalidGrantError
) -> None:
    # Before declaring the grant dead, look once more: a new grant may have been installed.
    try:
        stored = await asyncio.to_thread(connector.store.load, connector.name)
    except StoreError:
        stored = None
    if stored is not None and stored.generation != current.generation:
        logger.info(
            "%s: refresh token refused, but a newer grant is stored; using it", connector.name
        )
        connector.adopt(stored)
        return
    _terminal(connector, State.NEEDS_REAUTH, reason_of(connector, exc))


def reason_of(connector: Connector, exc: BaseException) -> str:
    """An error's text without the "NAME: " prefix its message starts with."""
    text = str(exc)
    prefix = f"{connector.name}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _terminal(connector: Connector, state: State, reason: str) -> None:
    connector.update(state=state, last_error=reason, retry_at=None)
    connector.schedule_at(None)
    # WARNING: the alert for this state is the ERROR line (one per incident, DESIGN §7).
    logger.warning("%s: %s; run: %s", connector.name, reason, action_of(connector))


def _transient(
    connector: Connector, current: TokenSet, reason: str, *, retry_after: float | None
) -> None:
    now = connector.clock.now()
    failures = connector.record.consecutive_failures + 1
    delay = connector.backoff_delay(failures)
    if retry_after is not None and retry_after > 0:
        # The server's Retry-After lengthens the wait, never shortens it (RFC 9110 §10.2.3).
        delay = max(delay, min(retry_after, policy.MAX_RETRY_AFTER_S))
    retry_at = now + timedelta(seconds=delay)
    state = policy.state_after_failure(current, now=now)
    serving = state is State.RETRYING
    connector.update(
        state=state, consecutive_failures=failures, last_error=reason, retry_at=retry_at
    )
    connector.schedule_at(retry_at)
    logger.warning(
        "%s: refresh failed (%s); attempt %d, retrying in %.0fs%s",
        connector.name,
        reason,
        failures,
        delay,
        "" if serving else "; the access token has expired",
    )


async def _persist(connector: Connector, new: TokenSet, current: TokenSet) -> bool:
    """Store the refreshed token set, read it back, then serve it; False if the write failed
    (the set is then served from memory and the write retried)."""
    try:
        saved = await asyncio.to_thread(
            connector.store.save, connector.name, new, expected_generation=current.generation
        )
    except GenerationConflictError as exc:
        # Someone installed a grant while we refreshed: theirs is what the human wants.
        logger.warning("%s: %s; using the newly installed grant", connector.name, exc)
        stored = await asyncio.to_thread(connector.store.load, connector.name)
        if stored is not None:
            connector.adopt(stored)
        return True
    except StoreError as exc:
        # Remember which stored generation the unpersisted set descends from.
        _persist_failed(
            connector, new.with_generation(current.generation), reason_of(connector, exc)
        )
        return False
    connector.unsaved = None
    connector.persist_failures = 0
    connector.adopt(saved, refreshed=True)
    return True


def _persist_failed(connector: Connector, new: TokenSet, reason: str) -> None:
    # Never drop a rotated refresh token: keep it in memory and serve from it.
    connector.unsaved = new
    connector.token = new
    connector.persist_failures += 1
    delay = connector.backoff_delay(connector.persist_failures)
    now = connector.clock.now()
    when = min(now + timedelta(seconds=delay), connector.planned_refresh(new))
    connector.update(
        state=State.OK,
        last_error=f"persist_failed: {reason}",
        expires_at=new.expires_at,
        obtained_at=new.obtained_at,
        last_refresh_at=now,
        consecutive_failures=0,
        retry_at=None,
    )
    connector.schedule_at(when)
    logger.warning(  # the persist_failed alert is the ERROR line
        "%s: refreshed, but the keyring write failed (%s); serving from memory, "
        "retrying the write; run: tokend check",
        connector.name,
        reason,
    )


async def _persist_pending(connector: Connector, pending: TokenSet, *, forced: bool) -> bool:
    """Retry writing an unpersisted token set; True when nothing more is to be done now."""
    stored_generation = pending.generation
    try:
        saved = await asyncio.to_thread(
            connector.store.save, connector.name, pending, expected_generation=stored_generation
        )
    except StoreError as exc:
        due = connector.clock.now() >= connector.planned_refresh(pending)
        if due or forced:
            return False  # refresh from memory; the write is retried with the next set
        _persist_failed(connector, pending, reason_of(connector, exc))
        return True
    logger.info(
        "%s: keyring write succeeded after %d failures",
        connector.name,
        connector.persist_failures,
    )
    connector.unsaved = None
    connector.persist_failures = 0
    connector.adopt(saved, refreshed=False)
    return not forced
