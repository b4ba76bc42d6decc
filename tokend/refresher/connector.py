"""`Connector`: one configured connector's token in memory, its state, and one refresh at a time.

A `Connector` is the only code that presents a refresh token. It starts from the store, adopts
grants installed or removed by a human, and runs the refresh cycle (`tokend.refresher.cycle`)
single-flight; lookups and status are answered by `tokend.refresher.serving`. A failure never
deletes or overwrites what is stored: transient ones back off and retry forever, terminal ones
wait for a human.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from tokend import policy
from tokend.clock import Clock
from tokend.config import ConnectorConfig
from tokend.errors import ApiError, OAuthError, StoreError, TransientError
from tokend.model import ConnectorState, Secret, State, TokenSet
from tokend.oauth.client import OAuthClient
from tokend.oauth.protocol import token_set_from_fields
from tokend.refresher import cycle, serving
from tokend.store import GrantStore

logger = logging.getLogger(__name__)

Schedule = Callable[[str, datetime | None], None]
Listener = Callable[["Connector", State], None]
# (connector, outcome, seconds) per refresh attempt; outcome is one of "ok", "transient",
# "invalid_grant", "rejected", "persist_failed".
Report = Callable[[str, str, float], None]


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
        self.report: Report = report or (lambda _name, _outcome, _seconds: None)
        self.token: TokenSet | None = None
        self.record = ConnectorState()
        self.unsaved: TokenSet | None = None  # refreshed, not yet in the store
        self.persist_failures = 0  # consecutive failed writes of `unsaved`
        self._schedule = schedule
        self._listener = listener
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._backoff_scale = backoff_scale  # tests shrink the backoff; production keeps 1
        self._mutex = asyncio.Lock()  # one refresh, install or removal at a time
        self._inflight: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- state bookkeeping

    @property
    def state(self) -> State:
        return self.record.state

    @property
    def can_login(self) -> bool:
        """Whether `tokend login` can authorize this connector (see `serving.action_for`)."""
        conn = self.config
        return conn.token_url is None or any(
            url is not None
            for url in (
                conn.issuer,
                conn.mcp_url,
                conn.authorization_url,
                conn.device_authorization_url,
            )
        )

    @property
    def unpersisted(self) -> bool:
        """A refreshed token set is held in memory because the keyring write failed."""
        return self.unsaved is not None

    # `cycle` changes the connector through `update`, `schedule_at` and `adopt`, and sets `token`,
    # `unsaved` and `persist_failures` directly; nothing else outside this class writes them.

    def update(self, **changes: Any) -> None:
        """Change the state record (stamping `since` on a state change) and tell the listener."""
        old = self.record.state
        new_state = changes.get("state", old)
        if new_state != old:
            changes.setdefault("since", self.clock.now())
        self.record = replace(self.record, **changes)
        self._listener(self, old)

    def schedule_at(self, when: datetime | None) -> None:
        """Plan the next refresh attempt; None plans none (a human is awaited)."""
        self.record = replace(self.record, next_refresh_at=when)
        self._schedule(self.name, when)

    def planned_refresh(self, token: TokenSet) -> datetime:
        return policy.next_refresh_at(token, self.config.refresh, jitter=self._rng.random())

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait after `failures` consecutive failures, jittered."""
        return self._backoff_scale * policy.backoff_delay(failures, draw=self._rng.random())

    def adopt(self, token: TokenSet, *, refreshed: bool = False) -> None:
        """Serve `token` (as stored) from now on and plan its refresh; failures are forgotten."""
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
        self.update(**changes)
        self.schedule_at(self.planned_refresh(token))
        if refreshed:
            logger.info(
                "refreshed %s; expires in %ds%s",
                self.name,
                int(token.remaining(now).total_seconds()),
                " (lifetime assumed: no expires_in)" if token.lifetime_assumed else "",
            )

    # ----------------------------------------------------------------- start-up and reconfiguration

    async def start(self, saved: ConnectorState | None) -> None:
        """Load the stored grant and schedule from it; `saved` is last run's state, if any."""
        try:
            token = await asyncio.to_thread(self.store.load, self.name)
        except StoreError as exc:
            # WARNING: the `rejected` alert that follows is the ERROR line a human acts on.
            self.update(state=State.REJECTED, last_error=str(exc))
            logger.warning(
                "%s: stored grant unreadable: %s; run: %s", self.name, exc, serving.action_of(self)
            )
            return
        now = self.clock.now()
        if token is None:
            self.update(state=State.UNAUTHORIZED, generation=None, last_error=None)
            self.schedule_at(None)
            return
        if self.config.needs_login is not None:
            self._await_login(token)
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
            self.update(state=saved.state)
            self.schedule_at(None)
            return
        serving_now = policy.may_serve(token, now=now)
        retry_at = base.retry_at if base.consecutive_failures else None
        if retry_at is not None and retry_at > now:
            self.update(state=State.RETRYING if serving_now else State.EXPIRED)
            self.schedule_at(retry_at)
        else:
            self.update(state=State.OK if serving_now else State.EXPIRED, retry_at=None)
            self.schedule_at(self.planned_refresh(token))

    def reconfigure(self, config: ConnectorConfig) -> None:
        """Adopt a changed config (same name; a reload), keeping tokens, and re-plan the refresh
        unless a retry or a human is awaited."""
        awaiting_login = self.config.needs_login is not None  # a stored grant was held unused
        self.config = config
        token = self.token
        if token is None:
            return
        if config.needs_login is not None:
            self._await_login(token)
        elif awaiting_login:
            self.adopt(token)  # the configuration matches the stored client again
        elif not self.state.is_terminal and self.record.retry_at is None:
            self.schedule_at(self.planned_refresh(token))

    def _await_login(self, token: TokenSet) -> None:
        """The stored client cannot be used as configured now: keep the grant, present nothing,
        and wait for `tokend login`."""
        self.token = token
        reason = self.config.needs_login or "a new login is needed"
        self.update(state=State.NEEDS_REAUTH, generation=token.generation, last_error=reason)
        self.schedule_at(None)
        logger.warning("%s: %s; run: tokend login %s", self.name, reason, self.name)

    # ----------------------------------------------------------------- refresh (single flight)

    def note_expiry(self, now: datetime) -> None:
        """`retrying` promises a valid access token (DESIGN §1): once the token runs out while the
        retry waits in backoff, the connector is `expired` now, not at the next failed attempt."""
        token = self.token
        retrying = self.state is State.RETRYING
        if retrying and token is not None and not policy.may_serve(token, now=now):
            self.update(state=State.EXPIRED)

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

    async def close(self) -> None:
        """At shutdown: wait for the refresh in flight (the core branch adds the last write)."""
        await self.wait_idle()

    async def _cycle(self, *, forced: bool) -> None:
        async with self._mutex:
            await cycle.run(self, forced=forced)

    # ----------------------------------------------------------------- lookups and status

    async def lookup(self, *, min_ttl_s: float = 0.0) -> TokenSet:
        """The current access token, valid for more than `min_ttl_s`, or an ApiError (see
        `tokend.refresher.serving.lookup`)."""
        return await serving.lookup(self, min_ttl_s=min_ttl_s)

    async def force_refresh(self) -> None:
        """Refresh now, ignoring the backoff (a human asked). A dead or missing grant is not
        presented again: unless a newer grant is stored, raises ApiError(needs_reauth)."""
        dead = self.state in (State.NEEDS_REAUTH, State.UNAUTHORIZED)
        if dead and not await self.reload_from_store():
            raise serving.needs_reauth(self)
        await self.refresh(forced=True)
        if self.state.is_terminal:
            raise serving.needs_reauth(self)
        record = self.record
        if record.consecutive_failures:
            # The refresh asked for failed transiently: say so (exit 75), not "ok".
            retry_at = record.retry_at
            raise serving.unavailable(
                self,
                f"refresh failed: {record.last_error or 'transient failure'}",
                retry_after=policy.retry_after_seconds(retry_at, self.clock.now())
                if retry_at
                else None,
            )

    def status(self) -> dict[str, object]:
        """What `status` and the socket show: no secrets."""
        return serving.status(self)

    # ----------------------------------------------------------------- grants

    async def install(
        self, fields: Mapping[str, object], *, config: ConnectorConfig | None = None
    ) -> None:
        """Install a grant from an RFC 6749 token response; raises ApiError(bad_request).

        `config` (from `tokend login`: the endpoints and client the grant belongs to) replaces
        the connector's settings together with the grant, so no refresh runs in between.
        """
        target = config or self.config
        if target.token_url is None:
            raise ApiError(
                "bad_request",
                f"{target.needs_login or 'no token endpoint is known yet'}; "
                f"run: tokend login {self.name}",
                connector=self.name,
                action=f"tokend login {self.name}",
            )
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
            self.config = target
            self.unsaved = None
            self.adopt(saved)
        if saved.refresh_token is None:
            logger.warning(
                "%s: the installed grant has no refresh token; it cannot be kept alive", self.name
            )
        logger.info("%s: grant installed", self.name)

    async def forget(self, *, revoke: bool = False) -> list[str]:
        """Delete the stored grant; the connector becomes `unauthorized`.

        With `revoke`, the refresh token and the access token are first revoked at the
        revocation endpoint (RFC 7009), when the server offers one; if that fails, nothing is
        deleted and the error is raised (ApiError: 503 for a transient failure, 400 otherwise).
        Returns the kinds of token revoked.
        """
        async with self._mutex:
            revoked = await self._revoke() if revoke else []
            await asyncio.to_thread(self.store.delete, self.name)
            self.token = None
            self.unsaved = None
            self.update(
                state=State.UNAUTHORIZED,
                generation=None,
                expires_at=None,
                obtained_at=None,
                retry_at=None,
                consecutive_failures=0,
                last_error=None,
            )
            self.schedule_at(None)
        logger.info(
            "%s: grant removed%s", self.name, f" ({', '.join(revoked)} revoked)" * bool(revoked)
        )
        return revoked

    async def _revoke(self) -> list[str]:
        """Revoke the grant's tokens (mutex held); the kinds revoked, [] when there is no
        endpoint or no grant."""
        token = self.unsaved or self.token or await asyncio.to_thread(self.store.load, self.name)
        if token is None or self.config.revocation_url is None:
            return []
        secret = None
        if self.config.client_auth != "none":
            secret = await asyncio.to_thread(self.store.load_client_secret, self.name)
        kinds: list[tuple[Literal["refresh_token", "access_token"], Secret | None]] = [
            ("refresh_token", token.refresh_token),
            ("access_token", token.access_token),
        ]
        revoked: list[str] = []
        for hint, value in kinds:
            if value is None:
                continue
            try:
                await self.oauth.revoke(self.config, value, hint=hint, client_secret=secret)
            except TransientError as exc:
                raise ApiError(
                    "temporarily_unavailable",
                    f"revocation failed, nothing was deleted: {exc.reason}",
                    connector=self.name,
                    action=f"retry, or delete without revoking: tokend logout {self.name} "
                    "--no-revoke",
                    retry_after=5,
                ) from None
            except (OAuthError, StoreError) as exc:
                raise ApiError(
                    "bad_request",
                    f"revocation refused, nothing was deleted: {cycle.reason_of(self, exc)}",
                    connector=self.name,
                    action=f"delete without revoking: tokend logout {self.name} --no-revoke",
                ) from None
            revoked.append(hint)
        return revoked

    async def reload_from_store(self) -> bool:
        """Adopt a grant stored behind our back (a newer generation); True if one was adopted."""
        stored = await asyncio.to_thread(self.store.load, self.name)
        if stored is None or (
            self.token is not None and stored.generation == self.token.generation
        ):
            return False
        async with self._mutex:
            self.unsaved = None
            self.adopt(stored)
        return True
