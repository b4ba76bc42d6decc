"""Composition root: builds config, store, connectors, scheduler, socket server and notifier; owns
signals and the start-up and shutdown order.

Start: state-dir lock → keyring probe (fail fast) → saved state → stored grants → socket →
scheduler (due refreshes run now) → READY. Stop: STOPPING → stop accepting → stop planning →
await refreshes in flight (bounded, so rotated tokens are persisted) → flush state → unlink socket.
SIGHUP's reload is `tokend.reload`; the STATUS= summary and /v1/health are `tokend.health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from tokend import __version__, health, reload
from tokend.alerts.manager import AlertManager
from tokend.clients import ClientRecord, ClientRecords, mismatch, resolve, resolve_config
from tokend.clock import Clock, SystemClock
from tokend.config import Config, ConnectorConfig
from tokend.errors import ApiError, ConfigError, StoreError, unknown_connector
from tokend.metrics import Metrics
from tokend.model import ConnectorState, Secret, State, TokenSet
from tokend.notify import Notifier, Watchdog, watchdog_interval_s
from tokend.oauth.client import OAuthClient, make_http_client
from tokend.refresher.connector import Connector
from tokend.refresher.serving import action_of
from tokend.scheduler import RefreshScheduler
from tokend.server.api import Peer
from tokend.server.http import ApiServer, inherited_socket
from tokend.store import GrantStore, KeyringStore, StateDirLock, StateFile

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0  # SIGTERM waits this long for refreshes in flight to be persisted
STATE_FLUSH_DELAY_S = 0.5  # state.json is rewritten at most this often


class Daemon:
    """The running daemon; also the `TokenSource` the socket server reads from."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        store: GrantStore | None = None,
        http: httpx.AsyncClient | None = None,
        notifier: Notifier | None = None,
        recheck_s: float = 30.0,
        backoff_scale: float = 1.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.config = config  # as in effect: connectors resolved against their client records
        self.file_config = config  # as read from the file
        self.clock = clock or SystemClock()
        self._store = store
        self._http = http
        self.notifier = notifier or Notifier()
        self.recheck_s = recheck_s
        self.backoff_scale = backoff_scale
        self.request_timeout_s = request_timeout_s  # a client must send its request within this
        self.connectors: dict[str, Connector] = {}
        self.stop_event = asyncio.Event()
        self.ready_event = asyncio.Event()
        self._lock = StateDirLock(config.daemon.state_dir)
        self._state_file = StateFile(config.daemon.state_dir / "state.json")
        self._clients = ClientRecords(config.daemon.state_dir)
        self.client_records: dict[str, ClientRecord] = {}
        self._state_dirty = asyncio.Event()
        self._started_at = time.monotonic()
        self._uid = os.getuid()
        self.server: ApiServer | None = None
        self.scheduler: RefreshScheduler | None = None
        self.watchdog: Watchdog | None = None
        self.metrics = Metrics()
        self.alerts = AlertManager(config.alerts, clock=self.clock)
        self.store_backend = "?"
        self.config_error: str | None = None  # the last reload's error; the old config runs on
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._grants: GrantStore | None = None
        self._oauth: OAuthClient | None = None

    # ----------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Run until `stop_event` is set (SIGTERM/SIGINT); raises TokendError if start-up fails."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.stop_event.set,
            signal.SIGINT: self.stop_event.set,
            signal.SIGHUP: self.request_reload,
        }
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        self._lock.acquire()
        try:
            await self._run_locked()
        finally:
            self._lock.release()
            for sig in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def _run_locked(self) -> None:
        store = self._store
        if store is None:
            keyring_store = KeyringStore.from_settings(self.config.daemon)
            await asyncio.to_thread(keyring_store.probe)
            store = keyring_store
            self.store_backend = keyring_store.backend_name
        else:
            self.store_backend = type(store).__name__
        logger.info("keyring backend %s", self.store_backend)
        saved = await asyncio.to_thread(self._state_file.load)
        try:
            self.client_records = await asyncio.to_thread(self._clients.load)
        except StoreError as exc:
            logger.error("client records unusable: %s", exc)
        self.config = resolve_config(self.file_config, self.client_records)
        http = self._http or make_http_client()
        oauth = OAuthClient(http, self.clock)
        self.scheduler = RefreshScheduler(
            self._run_refresh, self._due, self.clock, recheck_s=self.recheck_s
        )
        self._grants, self._oauth = store, oauth
        for name, conn_config in self.config.connectors.items():
            self.connectors[name] = self.make_connector(conn_config)
        flusher: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        try:
            await self.alerts.start()
            await asyncio.gather(*(c.start(saved.get(n)) for n, c in self.connectors.items()))
            self.server = ApiServer(self, request_timeout_s=self.request_timeout_s)
            inherited = inherited_socket()
            if inherited is not None:
                await self.server.start_from_socket(inherited)
                logger.info("listening on the socket systemd passed")
            else:
                await self.server.start(self.config.daemon.socket, group=self._socket_gid())
            self.scheduler.start()
            flusher = asyncio.create_task(self._flush_loop(), name="state flush")
            interval = watchdog_interval_s()
            if interval is not None:
                self.watchdog = Watchdog(self.notifier, interval, self.health_problem)
                watchdog = asyncio.create_task(self.watchdog.run(), name="watchdog")
            self.ready_event.set()
            self.notifier.ready(self.summary())
            logger.info(
                "tokend %s ready: %d connectors, socket %s",
                __version__,
                len(self.connectors),
                self.config.daemon.socket,
            )
            await self.stop_event.wait()
            self.notifier.stopping()
            logger.info("stopping")
            await self._shutdown()
        finally:
            for task in (flusher, watchdog, *self._background):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.server is not None:
                await self.server.close()
            if self.scheduler.running:
                await self.scheduler.shutdown()
            await self.alerts.close()
            self.notifier.close()
            await oauth.aclose()
            if self._http is None:
                await http.aclose()

    async def _shutdown(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.scheduler is not None:
            await self.scheduler.shutdown()
        inflight = [c.wait_idle() for c in self.connectors.values() if c.refresh_in_flight]
        if inflight:
            logger.info("waiting for %d refreshes in flight", len(inflight))
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await asyncio.gather(*inflight, return_exceptions=True)
            except TimeoutError:
                logger.error("refreshes still in flight after %ds; exiting", SHUTDOWN_GRACE_S)
        await self._flush_state()

    def make_connector(self, conn_config: ConnectorConfig) -> Connector:
        """A connector of this daemon: its store, client, scheduler, listener and metrics."""
        if self._grants is None or self._oauth is None:
            raise RuntimeError("connectors are made once the store and the client exist")
        return Connector(
            conn_config,
            store=self._grants,
            oauth=self._oauth,
            clock=self.clock,
            schedule=self._schedule,
            listener=self._on_change,
            backoff_scale=self.backoff_scale,
            report=self.metrics.refresh_done,
        )

    def _socket_gid(self) -> int | None:
        group = self.config.daemon.socket_group
        if group is None:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"daemon.socket_group: no such group {group!r}") from None

    # ----------------------------------------------------------------- health

    def health_problem(self) -> str | None:
        """Why the daemon is not healthy (the watchdog withholds its ping), or None."""
        return health.watchdog_problem(self.scheduler, monotonic=self.clock.monotonic())

    def summary(self) -> str:
        """One line for systemd's STATUS=: counts by state and the next refresh."""
        return health.summary(
            self.connectors.values(), now=self.clock.now(), config_error=self.config_error
        )

    # ----------------------------------------------------------------- reload (SIGHUP)

    def request_reload(self) -> None:
        """SIGHUP: reload in the background; reloads never overlap."""
        task = asyncio.create_task(self._reload_quietly(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_quietly(self) -> None:
        await self.reload()

    def resolve(self, config: Config) -> Config:
        """A newly read config, resolved against the stored client records."""
        self.file_config = config
        return resolve_config(config, self.client_records)

    async def reload(self) -> bool:
        """Re-read the config file and apply it (`tokend.reload`): add, remove and change
        connectors, keeping every stored token. An invalid file changes nothing: the error is
        logged and shown in STATUS and health. Returns whether it was applied."""
        async with self._reload_lock:
            return await reload.reload(self)

    # ----------------------------------------------------------------- scheduling glue

    def mark_state_dirty(self) -> None:
        """Connector states changed: flush state.json (and STATUS) soon."""
        self._state_dirty.set()

    def _schedule(self, name: str, when: datetime | None) -> None:
        if self.scheduler is not None:
            self.scheduler.schedule(name, when)
        self._state_dirty.set()  # the next flush also refreshes STATUS's "next refresh"

    async def _run_refresh(self, name: str) -> None:
        connector = self.connectors.get(name)
        if connector is not None:
            await connector.refresh()

    def _due(self, now: datetime) -> Iterable[str]:
        for connector in self.connectors.values():
            connector.note_expiry(now)  # the periodic re-check also notices tokens running out
        return [name for name, c in self.connectors.items() if c.is_due(now)]

    def _on_change(self, connector: Connector, old: State) -> None:
        self._state_dirty.set()
        record = connector.record
        if connector.state != old:
            logger.debug("%s: %s -> %s", connector.name, old.value, connector.state.value)
            self.alerts.observe(
                connector.name,
                connector.state.value,
                reason=record.last_error,
                action=action_of(connector),
                since=record.since,
                attempts=record.consecutive_failures or None,
            )
        if connector.unpersisted:
            reason = record.last_error or "keyring write failed"
            self.alerts.persist_failed(connector.name, reason=reason, since=self.clock.now())
        else:
            self.alerts.persist_recovered(connector.name)

    async def _flush_loop(self) -> None:
        while True:
            await self._state_dirty.wait()
            await asyncio.sleep(STATE_FLUSH_DELAY_S)
            self.notifier.status(self.summary())
            await self._flush_state()

    async def _flush_state(self) -> None:
        self._state_dirty.clear()
        states: Mapping[str, ConnectorState] = {n: c.record for n, c in self.connectors.items()}
        try:
            await asyncio.to_thread(self._state_file.save, states)
        except StoreError as exc:
            logger.warning("state not saved (%s); tokens are unaffected", exc)

    # ----------------------------------------------------------------- TokenSource

    def _connector(self, name: str) -> Connector:
        connector = self.connectors.get(name)
        if connector is None:
            raise unknown_connector(name, self.config.path or "the configuration")
        return connector

    def has_connector(self, name: str) -> bool:
        return name in self.connectors

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in (0, self._uid)

    def is_allowed(self, name: str, peer: Peer) -> bool:
        if self.is_admin(peer):
            return True
        conn: ConnectorConfig | None = self.config.connectors.get(name)
        if conn is None:
            return False
        for rule in conn.allow:
            if rule.kind == "uid" and peer.uid == rule.id:
                return True
            if rule.kind == "gid" and (peer.gid == rule.id or rule.id in peer.groups):
                return True
        return False

    async def token(self, name: str, *, min_ttl_s: float) -> TokenSet:
        return await self._connector(name).lookup(min_ttl_s=min_ttl_s)

    def status(self, name: str) -> dict[str, object]:
        return self._connector(name).status()

    def statuses(self) -> list[dict[str, object]]:
        return [c.status() for _, c in sorted(self.connectors.items())]

    async def refresh(self, name: str) -> dict[str, object]:
        connector = self._connector(name)
        await connector.force_refresh()
        return connector.status()

    async def install_grant(self, name: str, body: Mapping[str, object]) -> dict[str, object]:
        connector = self._connector(name)
        fields = dict(body)
        record_data = fields.pop("client_record", None)
        config = None
        if record_data is not None:
            config = await self._adopt_client_record(name, record_data)
        await connector.install(fields, config=config)
        if config is not None:
            self.config = replace(self.config, connectors={**self.config.connectors, name: config})
        return connector.status()

    async def _adopt_client_record(self, name: str, data: object) -> ConnectorConfig:
        """Store what `tokend login` learnt (before the grant it goes with) and return the
        connector's settings in effect with it; ApiError(bad_request) if it does not fit."""
        try:
            if not isinstance(data, Mapping):
                raise TypeError("client_record must be an object")
            record = ClientRecord.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError("bad_request", f"client_record: {exc}", connector=name) from None
        configured = self.file_config.connectors[name]
        problem = mismatch(configured, record)
        if problem is not None:
            raise ApiError(
                "bad_request",
                f"the login does not match the daemon's configuration: {problem}",
                connector=name,
                action=f"reload the daemon (systemctl reload tokend), then: tokend login {name}",
            )
        try:
            await asyncio.to_thread(self._clients.put, name, record)
        except StoreError as exc:
            raise ApiError("temporarily_unavailable", str(exc), connector=name) from None
        self.client_records[name] = record
        logger.info("%s: client %s recorded (%s)", name, record.client_kind, record.token_endpoint)
        return resolve(configured, record)

    async def forget_grant(self, name: str, *, revoke: bool) -> dict[str, object]:
        connector = self._connector(name)
        revoked = await connector.forget(revoke=revoke)
        return {**connector.status(), "revoked": revoked}

    async def store_secret(self, name: str, secret: Secret) -> None:
        connector = self._connector(name)
        await asyncio.to_thread(connector.store.save_client_secret, name, secret)
        logger.info("%s: client secret stored", name)
        if connector.state is State.REJECTED and connector.token is not None:
            await connector.refresh(forced=True)

    def metrics_text(self) -> str:
        return self.metrics.render(
            self.statuses(),
            version=__version__,
            started_at_monotonic=self._started_at,
            notify_dropped=self.notifier.dropped,
        )

    def lookup_done(self, name: str, outcome: str) -> None:
        self.metrics.lookup_done(name, outcome)

    def health(self) -> dict[str, object]:
        return health.report(
            self.connectors.values(),
            scheduler=self.scheduler,
            config_error=self.config_error,
            store_backend=self.store_backend,
            uptime_s=int(time.monotonic() - self._started_at),
            summary=self.summary(),
            notify_dropped=self.notifier.dropped,
        )
