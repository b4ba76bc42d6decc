"""One connector's life: its token in memory, its state, one refresh at a time, and lookups.

A `Connector` is the only code that presents a refresh token. A refresh cycle stamps the request
start, asks the token endpoint, writes the new token set to the store and reads it back, and only
then swaps the in-memory token that lookups serve. A failure never deletes or overwrites what is
stored: transient ones back off and retry forever, terminal ones wait for a human.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from tokend import policy
from tokend.clock import Clock, isoformat
from tokend.config import ConnectorConfig
from tokend.errors import (
    ApiError,
    GenerationConflictError,
    InvalidGrantError,
    OAuthError,
    SecretMissingError,
    StoreError,
    TransientError,
)
from tokend.model import ConnectorState, Secret, State, TokenSet
from tokend.oauth.client import OAuthClient
from tokend.oauth.protocol import token_set_from_fields
from tokend.store import GrantStore

logger = logging.getLogger(__name__)

LOOKUP_WAIT_S = 10.0  # how long a lookup waits for a refresh it needs (DESIGN §5)

Schedule = Callable[[str, datetime | None], None]
Listener = Callable[["Connector", State], None]
# (connector, outcome, seconds) per refresh attempt; outcome is one of "ok", "transient",
# "invalid_grant", "rejected", "persist_failed".
Report = Callable[[str, str, float], None]


def action_for(name: str, state: State, last_error: str | None = None) -> str | None:
    """What a human should do about a connector in `state`, as a command line where possible."""
    if state is State.UNAUTHORIZED:
        return f"tokend import {name}"
    if state is State.NEEDS_REAUTH:
        return f"tokend import {name}"
    if state is State.REJECTED:
        if last_error and "client secret" in last_error:
            return f"tokend secret {name}"
        if last_error and last_error.startswith("keyring item ") and "is unusable" in last_error:
            return f"tokend import {name}"  # a corrupt stored grant: a new one replaces it
        return f"fix connectors.{name} in the config or the client registration, then: " + (
            f"tokend refresh {name}"
        )
    if state is State.EXPIRED:
        return "tokend check"  # it probes the token endpoint; retries go on meanwhile
    return None


class Connector:
    """The runtime of one configured connector (see module docstring)."""

    def __init__(
        self,
        config: ConnectorConfig,
        *,
        store: GrantStore,
        oauth: OAuthClient,
        clock: Clock,
        schedule: Schedule,
        listener: Listener,
        rng: random.Random | None = None,
        backoff_scale: float = 1.0,
        report: Report | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.store = store
        self.oauth = oauth
        self.clock = clock
        self._schedule = schedule
        self._listener = listener
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._backoff_scale = backoff_scale  # tests shrink the backoff; production keeps 1
        self._report: Report = report or (lambda _name, _outcome, _seconds: None)
        self.token: TokenSet | None = None
        self.record = ConnectorState()
        self._unpersisted: TokenSet | None = None  # refreshed, not yet in the store
        self._persist_failures = 0
        self._mutex = asyncio.Lock()  # one refresh, install or removal at a time
        self._inflight: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- state bookkeeping

    @property
    def state(self) -> State:
        return self.record.state

    def _set(self, **changes: Any) -> None:
        old = self.record.state
        new_state = changes.get("state", old)
        if new_state != old:
            changes.setdefault("since", self.clock.now())
        self.record = replace(self.record, **changes)
        self._listener(self, old)

    def _schedule_at(self, when: datetime | None) -> None:
        self.record = replace(self.record, next_refresh_at=when)
        self._schedule(self.name, when)

    def _planned_refresh(self, token: TokenSet) -> datetime:
        return policy.next_refresh_at(token, self.config.refresh, jitter=self._rng.random())

    # ----------------------------------------------------------------- start-up and reconfiguration

    async def start(self, saved: ConnectorState | None) -> None:
        """Load the stored grant and schedule from it; `saved` is last run's state, if any."""
        try:
            token = await asyncio.to_thread(self.store.load, self.name)
        except StoreError as exc:
            # WARNING: the `rejected` alert that follows is the ERROR line a human acts on.
            logger.warning(
                "%s: stored grant unreadable: %s; run: tokend import %s", self.name, exc, self.name
            )
            self._set(state=State.REJECTED, last_error=str(exc))
            return
        now = self.clock.now()
        if token is None:
            self._set(state=State.UNAUTHORIZED, generation=None, last_error=None)
            self._schedule_at(None)
            return
        self.token = token
        same = saved is not None and saved.generation == token.generation
        base = saved if (saved is not None and same) else ConnectorState()
        self.record = replace(
            base,
            generation=token.generation,
            obtained_at=token.obtained_at,
            expires_at=token.expires_at,
            lifetime_assumed=token.lifetime_assumed,
            since=base.since or now,
        )
        if same and saved is not None and saved.state in (State.NEEDS_REAUTH, State.REJECTED):
            # Presenting a dead refresh token at every restart helps nobody; wait for a human.
            self._set(state=saved.state)
            self._schedule_at(None)
            return
        serving = policy.may_serve(token, now=now)
        retry_at = base.retry_at if base.consecutive_failures else None
        if retry_at is not None and retry_at > now:
            self._set(state=State.RETRYING if serving else State.EXPIRED)
            self._schedule_at(retry_at)
        else:
            self._set(state=State.OK if serving else State.EXPIRED, retry_at=None)
            self._schedule_at(self._planned_refresh(token))

    @property
    def unpersisted(self) -> bool:
        """A refreshed token set is held in memory because the keyring write failed."""
        return self._unpersisted is not None

    def reconfigure(self, config: ConnectorConfig) -> None:
        """Adopt a changed config (same name; a reload), keeping tokens, and re-plan the refresh
        unless a retry or a human is awaited."""
        self.config = config
        if self.token is not None and not self.state.is_terminal and self.record.retry_at is None:
            self._schedule_at(self._planned_refresh(self.token))

    # ----------------------------------------------------------------- refresh

    def note_expiry(self, now: datetime) -> None:
        """`retrying` promises a valid access token (DESIGN §1): once the token runs out while the
        retry waits in backoff, the connector is `expired` now, not at the next failed attempt."""
        token = self.token
        retrying = self.state is State.RETRYING
        if retrying and token is not None and not policy.may_serve(token, now=now):
            self._set(state=State.EXPIRED)

    def is_due(self, now: datetime) -> bool:
        at = self.record.next_refresh_at
        return at is not None and at <= now and not self.refresh_in_flight

    @property
    def refresh_in_flight(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def refresh(self, *, forced: bool = False) -> None:
        """Run one refresh cycle, or join the one in flight (single flight)."""
        task = self._inflight
        if task is None or task.done():
            task = asyncio.create_task(self._cycle(forced=forced), name=f"refresh {self.name}")
            self._inflight = task
        await asyncio.shield(task)

    async def wait_idle(self) -> None:
        """Wait for the refresh in flight, if any, to finish (used at shutdown)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def _cycle(self, *, forced: bool) -> None:
        async with self._mutex:
            pending = self._unpersisted
            if pending is not None and await self._persist_pending(pending, forced=forced):
                return
            current = self._unpersisted or self.token
            if current is None:
                return
            if self.state.is_terminal and not forced:
                return
            await self._refresh_from(current)

    async def _refresh_from(self, current: TokenSet) -> None:
        self._set(state=State.REFRESHING)
        started = self.clock.monotonic()
        outcome = "transient"
        try:
            outcome = await self._attempt(current)
        finally:
            self._report(self.name, outcome, self.clock.monotonic() - started)

    async def _attempt(self, current: TokenSet) -> str:
        """One refresh attempt; returns its outcome for metrics (see `Report`)."""
        try:
            secret = await self._client_secret()
            result = await self.oauth.refresh(self.config, current, secret)
        except InvalidGrantError as exc:
            await self._on_invalid_grant(current, exc)
            return "invalid_grant"
        except (SecretMissingError, OAuthError) as exc:
            self._terminal(State.REJECTED, self._reason(exc))
            return "rejected"
        except (TransientError, StoreError) as exc:
            retry_after = exc.retry_after if isinstance(exc, TransientError) else None
            self._transient(current, self._reason(exc), retry_after=retry_after)
            return "transient"
        except Exception:
            # A bug must not stop this connector for good: treat it as transient, loudly.
            logger.exception("%s: refresh failed unexpectedly", self.name)
            self._transient(current, "internal error during refresh", retry_after=None)
            return "transient"
        self._set(clock_offset_s=result.clock_offset_s)
        return "ok" if await self._persist(result.token, current) else "persist_failed"

    async def _client_secret(self) -> Secret | None:
        if self.config.client_auth == "none":
            return None
        secret = await asyncio.to_thread(self.store.load_client_secret, self.name)
        if secret is None:
            raise SecretMissingError(
                f"{self.name}: no client secret stored for {self.config.client_auth}; "
                f"run: tokend secret {self.name}"
            )
        return secret

    async def _on_invalid_grant(self, current: TokenSet, exc: InvalidGrantError) -> None:
        # Before declaring the grant dead, look once more: a new grant may have been installed.
        try:
            stored = await asyncio.to_thread(self.store.load, self.name)
        except StoreError:
            stored = None
        if stored is not None and stored.generation != current.generation:
            logger.info(
                "%s: refresh token refused, but a newer grant is stored; using it", self.name
            )
            self._adopt(stored)
            return
        self._terminal(State.NEEDS_REAUTH, self._reason(exc))

    def _reason(self, exc: BaseException) -> str:
        text = str(exc)
        prefix = f"{self.name}: "
        return text[len(prefix) :] if text.startswith(prefix) else text

    def _terminal(self, state: State, reason: str) -> None:
        self._set(state=state, last_error=reason, retry_at=None)
        self._schedule_at(None)
        # WARNING: the alert for this state is the ERROR line (one per incident, DESIGN §7).
        logger.warning("%s: %s; run: %s", self.name, reason, action_for(self.name, state, reason))

    def _transient(self, current: TokenSet, reason: str, *, retry_after: float | None) -> None:
        now = self.clock.now()
        failures = self.record.consecutive_failures + 1
        delay = self._backoff_scale * policy.backoff_delay(failures, draw=self._rng.random())
        if retry_after is not None and retry_after > 0:
            # The server's Retry-After lengthens the wait, never shortens it (RFC 9110 §10.2.3).
            delay = max(delay, min(retry_after, policy.MAX_RETRY_AFTER_S))
        retry_at = now + timedelta(seconds=delay)
        state = policy.state_after_failure(current, now=now)
        serving = state is State.RETRYING
        self._set(state=state, consecutive_failures=failures, last_error=reason, retry_at=retry_at)
        self._schedule_at(retry_at)
        logger.warning(
            "%s: refresh failed (%s); attempt %d, retrying in %.0fs%s",
            self.name,
            reason,
            failures,
            delay,
            "" if serving else "; the access token has expired",
        )

    async def _persist(self, new: TokenSet, current: TokenSet) -> bool:
        """Store the refreshed token set, read it back, then serve it; False if the write failed
        (the set is then served from memory and the write retried)."""
        try:
            saved = await asyncio.to_thread(
                self.store.save, self.name, new, expected_generation=current.generation
            )
        except GenerationConflictError as exc:
            # Someone installed a grant while we refreshed: theirs is what the human wants.
            logger.warning("%s: %s; using the newly installed grant", self.name, exc)
            stored = await asyncio.to_thread(self.store.load, self.name)
            if stored is not None:
                self._adopt(stored)
            return True
        except StoreError as exc:
            # Remember which stored generation the unpersisted set descends from.
            self._persist_failed(new.with_generation(current.generation), self._reason(exc))
            return False
        self._unpersisted = None
        self._persist_failures = 0
        self._adopt(saved, refreshed=True)
        return True

    def _persist_failed(self, new: TokenSet, reason: str) -> None:
        # Never drop a rotated refresh token: keep it in memory and serve from it.
        self._unpersisted = new
        self.token = new
        self._persist_failures += 1
        delay = self._backoff_scale * policy.backoff_delay(
            self._persist_failures, draw=self._rng.random()
        )
        now = self.clock.now()
        when = min(now + timedelta(seconds=delay), self._planned_refresh(new))
        self._set(
            state=State.OK,
            last_error=f"persist_failed: {reason}",
            expires_at=new.expires_at,
            obtained_at=new.obtained_at,
            last_refresh_at=now,
            consecutive_failures=0,
            retry_at=None,
        )
        self._schedule_at(when)
        logger.warning(  # the persist_failed alert is the ERROR line
            "%s: refreshed, but the keyring write failed (%s); serving from memory, "
            "retrying the write; run: tokend check",
            self.name,
            reason,
        )

    async def _persist_pending(self, pending: TokenSet, *, forced: bool) -> bool:
        """Retry writing an unpersisted token set; True when nothing more is to be done now."""
        stored_generation = pending.generation
        try:
            saved = await asyncio.to_thread(
                self.store.save, self.name, pending, expected_generation=stored_generation
            )
        except StoreError as exc:
            due = self.clock.now() >= self._planned_refresh(pending)
            if due or forced:
                return False  # refresh from memory; the write is retried with the next set
            self._persist_failed(pending, self._reason(exc))
            return True
        logger.info(
            "%s: keyring write succeeded after %d failures", self.name, self._persist_failures
        )
        self._unpersisted = None
        self._persist_failures = 0
        self._adopt(saved, refreshed=False)
        return not forced

    def _adopt(self, token: TokenSet, *, refreshed: bool = False) -> None:
        now = self.clock.now()
        self.token = token
        changes: dict[str, Any] = {
            "state": State.OK if policy.may_serve(token, now=now) else State.EXPIRED,
            "generation": token.generation,
            "obtained_at": token.obtained_at,
            "expires_at": token.expires_at,
            "lifetime_assumed": token.lifetime_assumed,
            "consecutive_failures": 0,
            "retry_at": None,
            "last_error": None,
        }
        if refreshed:
            changes["last_refresh_at"] = now
            changes["refreshes"] = self.record.refreshes + 1
        self._set(**changes)
        self._schedule_at(self._planned_refresh(token))
        if refreshed:
            logger.info(
                "refreshed %s; expires in %ds%s",
                self.name,
                int(token.remaining(now).total_seconds()),
                " (lifetime assumed: no expires_in)" if token.lifetime_assumed else "",
            )

    # ----------------------------------------------------------------- lookups

    def _unavailable(self, description: str, *, retry_after: int | None = None) -> ApiError:
        return ApiError(
            "temporarily_unavailable",
            description,
            connector=self.name,
            since=isoformat(self.record.since),
            action=action_for(self.name, self.state, self.record.last_error),
            retry_after=retry_after,
        )

    def _needs_reauth(self) -> ApiError:
        state = self.state
        if state is State.UNAUTHORIZED:
            description = "no grant is stored for this connector"
        else:
            description = self.record.last_error or f"connector is {state.value}"
        return ApiError(
            "needs_reauth",
            f"{state.value}: {description}",
            connector=self.name,
            since=isoformat(self.record.since),
            action=action_for(self.name, state, self.record.last_error),
        )

    async def lookup(self, *, min_ttl_s: float = 0.0) -> TokenSet:
        """The current access token, valid for more than `min_ttl_s`, or an ApiError.

        Never waits on the network while the token is good; otherwise joins or starts a refresh
        (never faster than the backoff) and waits up to LOOKUP_WAIT_S for it.
        """
        min_ttl = timedelta(seconds=min_ttl_s)
        now = self.clock.now()
        self.note_expiry(now)
        token = self.token
        if self.state.is_terminal or token is None:
            raise self._needs_reauth()
        if policy.may_serve(token, now=now, min_ttl=min_ttl):
            return token
        if min_ttl_s > 0 and token.lifetime <= min_ttl:
            raise ApiError(
                "bad_request",
                f"min_ttl {min_ttl_s:g}s is not below the token lifetime "
                f"{int(token.lifetime.total_seconds())}s",
                connector=self.name,
            )
        retry_at = self.record.retry_at
        if not self.refresh_in_flight and retry_at is not None and retry_at > now:
            raise self._unavailable(
                f"{self.state.value}: {self.record.last_error or 'refresh failing'}",
                retry_after=policy.retry_after_seconds(retry_at, now),
            )
        try:
            await asyncio.wait_for(self.refresh(), LOOKUP_WAIT_S)
        except TimeoutError:
            raise self._unavailable("refresh still in flight", retry_after=5) from None
        token = self.token
        now = self.clock.now()
        if self.state.is_terminal or token is None:
            raise self._needs_reauth()
        if policy.may_serve(token, now=now, min_ttl=min_ttl):
            return token
        retry_at = self.record.retry_at
        retry_after = policy.retry_after_seconds(retry_at, now) if retry_at else 5
        raise self._unavailable(
            f"{self.state.value}: {self.record.last_error or 'no valid token'}",
            retry_after=retry_after,
        )

    async def force_refresh(self) -> None:
        """Refresh now, ignoring the backoff (a human asked). A dead or missing grant is not
        presented again: unless a newer grant is stored, raises ApiError(needs_reauth)."""
        dead = self.state in (State.NEEDS_REAUTH, State.UNAUTHORIZED)
        if dead and not await self.reload_from_store():
            raise self._needs_reauth()
        await self.refresh(forced=True)
        if self.state.is_terminal:
            raise self._needs_reauth()

    # ----------------------------------------------------------------- grants

    async def install(self, fields: Mapping[str, object]) -> None:
        """Install a grant from an RFC 6749 token response; raises ApiError(bad_request)."""
        try:
            token = token_set_from_fields(
                fields,
                connector=self.name,
                obtained_at=self.clock.now(),
                previous=None,
                default_lifetime=self.config.refresh.default_lifetime,
            )
        except (OAuthError, TransientError) as exc:
            raise ApiError("bad_request", str(exc), connector=self.name) from None
        async with self._mutex:
            saved = await asyncio.to_thread(
                self.store.save, self.name, token, expected_generation=None
            )
            self._unpersisted = None
            self._adopt(saved)
        if saved.refresh_token is None:
            logger.warning(
                "%s: the installed grant has no refresh token; it cannot be kept alive", self.name
            )
        logger.info("%s: grant installed", self.name)

    async def forget(self) -> bool:
        """Delete the stored grant; the connector becomes `unauthorized`."""
        async with self._mutex:
            existed = await asyncio.to_thread(self.store.delete, self.name)
            self.token = None
            self._unpersisted = None
            self._set(
                state=State.UNAUTHORIZED,
                generation=None,
                expires_at=None,
                obtained_at=None,
                retry_at=None,
                consecutive_failures=0,
                last_error=None,
            )
            self._schedule_at(None)
        logger.info("%s: grant removed", self.name)
        return existed

    async def reload_from_store(self) -> bool:
        """Adopt a grant stored behind our back (a newer generation); True if one was adopted."""
        stored = await asyncio.to_thread(self.store.load, self.name)
        if stored is None or (
            self.token is not None and stored.generation == self.token.generation
        ):
            return False
        async with self._mutex:
            self._unpersisted = None
            self._adopt(stored)
        return True

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, object]:
        """What `status` and the socket show: no secrets."""
        now = self.clock.now()
        self.note_expiry(now)
        record = self.record
        token = self.token
        expires_in = None
        if token is not None:
            expires_in = max(0, int(token.remaining(now).total_seconds()))
        return {
            "connector": self.name,
            "state": record.state.value,
            "since": isoformat(record.since),
            "expires_at": isoformat(record.expires_at),
            "expires_in": expires_in,
            "next_refresh_at": isoformat(record.next_refresh_at),
            "last_refresh_at": isoformat(record.last_refresh_at),
            "retry_at": isoformat(record.retry_at),
            "consecutive_failures": record.consecutive_failures,
            "last_error": record.last_error,
            "action": action_for(self.name, record.state, record.last_error),
            "lifetime_assumed": record.lifetime_assumed,
            "clock_offset_s": record.clock_offset_s,
            "refreshes": record.refreshes,
            "has_refresh_token": token is not None and token.refresh_token is not None,
            "unpersisted": self.unpersisted,
            "token_url": self.config.token_url,
        }
