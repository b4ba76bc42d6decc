"""Composition root and lifecycle: builds config, store, connectors, scheduler, socket server and
notifier; owns signals and the start-up and shutdown order, as `startup()`, `main_loop()` and
`shutdown()`.

Start: state-dir lock → keyring probe (fail fast) → saved state → stored grants → socket →
scheduler (due refreshes run now) → READY. Run: SIGTERM/SIGINT only set `stop_event`, SIGHUP only
asks the reload task for a reload. Stop: STOPPING → stop accepting → stop planning → let a reload
under way finish → `close()` every connector (its refresh in flight persisted, a last write of an
unwritten set; bounded by SHUTDOWN_GRACE_S) → flush state → close alerts and the HTTP client.
The token source the server calls is `tokend.source`; SIGHUP's reload is `tokend.reload`; the
STATUS= summary and /v1/health are `tokend.health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import signal
import time
from collections.abc import Coroutine, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tokend import __version__, health
from tokend.alerts.manager import AlertManager
from tokend.clients import ClientRecord, ClientRecords, resolve_config
from tokend.clock import Clock, SystemClock
from tokend.config import Config, ConnectorConfig
from tokend.errors import ConfigError, StoreError
from tokend.metrics import Metrics
from tokend.model import ConnectorState, State
from tokend.notify import Notifier, Watchdog, watchdog_interval_s
from tokend.oauth.client import OAuthClient, make_http_client
from tokend.refresher.connector import Connector
from tokend.refresher.serving import action_of
from tokend.reload import Reloader
from tokend.scheduler import RefreshScheduler
from tokend.server.http import ApiServer, inherited_socket
from tokend.source import DaemonSource
from tokend.store import GrantStore, KeyringStore, StateDirLock, StateFile

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 20.0  # SIGTERM waits this long for the connectors to close (DESIGN §2)
STATE_FLUSH_DELAY_S = 0.5  # state.json is rewritten at most this often


class Daemon:
    """The running daemon: its lifecycle, and the glue between connectors, scheduler, state
    file, notifier and alerts. The server reads `source`, not the daemon."""

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
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
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
        self.shutdown_grace_s = shutdown_grace_s
        self.connectors: dict[str, Connector] = {}
        self.stop_event = asyncio.Event()
        self.ready_event = asyncio.Event()
        self._lock = StateDirLock(config.daemon.state_dir)
        self._state_file = StateFile(config.daemon.state_dir / "state.json")
        self._clients = ClientRecords(config.daemon.state_dir)
        self.client_records: dict[str, ClientRecord] = {}
        self._state_dirty = asyncio.Event()
        self._started_at = time.monotonic()
        self.server: ApiServer | None = None
        self.scheduler: RefreshScheduler | None = None
        self.watchdog: Watchdog | None = None
        self.metrics = Metrics()
        self.alerts = AlertManager(config.alerts, clock=self.clock)
        self.store_backend = "?"
        self.config_error: str | None = None  # the last reload's error; the old config runs on
        self.source = DaemonSource(self, self._clients)
        self.reloader = Reloader(self)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # flush, watchdog, reload: stopped last
        self._grants: GrantStore | None = None
        self._oauth: OAuthClient | None = None
        self._http_in_use: httpx.AsyncClient | None = None

    # ----------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Start, serve until `stop_event` is set (SIGTERM/SIGINT), stop in order; raises
        TokendError if start-up fails (after undoing what had started)."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.stop_event.set,
            signal.SIGINT: self.stop_event.set,
            signal.SIGHUP: self.request_reload,
        }
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        await asyncio.to_thread(self._lock.acquire)
        try:
            try:
                await self.startup()
                await self.main_loop()
            finally:
                await self.shutdown()
        finally:
            await asyncio.to_thread(self._lock.release)
            for sig in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    async def startup(self) -> None:
        """Everything up to READY=1: store, saved state, connectors, socket, scheduler."""
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
        self._http_in_use = http = self._http or make_http_client()
        self._oauth = OAuthClient(http, self.clock)
        self.scheduler = RefreshScheduler(
            self._run_refresh, self._due, self.clock, recheck_s=self.recheck_s
        )
        self._grants = store
        for name, conn_config in self.config.connectors.items():
            self.connectors[name] = self.make_connector(conn_config)
        await self.alerts.start()
        await asyncio.gather(*(c.start(saved.get(n)) for n, c in self.connectors.items()))
        self.server = ApiServer(self.source, request_timeout_s=self.request_timeout_s)
        inherited = inherited_socket()
        if inherited is not None:
            await self.server.start_from_socket(inherited)
            logger.info("listening on the socket systemd passed")
        else:
            gid = await asyncio.to_thread(self._socket_gid)  # a group lookup may ask the network
            await self.server.start(self.config.daemon.socket, group=gid)
        self.scheduler.start()
        self._spawn("state flush", self._flush_loop())
        self._spawn("reload", self.reloader.run())
        interval = watchdog_interval_s()
        if interval is not None:
            self.watchdog = Watchdog(self.notifier, interval, self.health_problem)
            self._spawn("watchdog", self.watchdog.run())
        self.ready_event.set()
        self.notifier.ready(self.summary())
        logger.info(
            "tokend %s ready: %d connectors, socket %s",
            __version__,
            len(self.connectors),
            self.config.daemon.socket,
        )

    async def main_loop(self) -> None:
        """Serve until SIGTERM/SIGINT (or a caller) sets `stop_event`."""
        await self.stop_event.wait()

    async def shutdown(self) -> None:
        """Stop in order; safe after a start-up that failed half-way."""
        if self.ready_event.is_set():
            self.notifier.stopping()
            logger.info("stopping")
        if self.server is not None:
            await self.server.close()  # stop accepting; unlinks the socket
        if self.scheduler is not None and self.scheduler.running:
            await self.scheduler.shutdown()  # stop planning
        try:
            async with asyncio.timeout(self.shutdown_grace_s):
                reload_task = self._tasks.pop("reload", None)
                if reload_task is not None:
                    await self.reloader.stop(reload_task)
                await self._close_connectors()
        except TimeoutError:
            busy = sorted(n for n, c in self.connectors.items() if c.refresh_in_flight)
            logger.error(
                "connectors not closed after %ds (%s); exiting",
                self.shutdown_grace_s,
                ", ".join(busy) or "a reload under way",
            )
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self.ready_event.is_set():
            await self._flush_state()
        await self.alerts.close()
        if self._oauth is not None:
            await self._oauth.aclose()
        if self._http is None and self._http_in_use is not None:
            await self._http_in_use.aclose()
        self.notifier.close()

    async def _close_connectors(self) -> None:
        """`close()` every connector at once: the refresh in flight is persisted, and a set
        still unwritten gets a last write (a failure is an ERROR naming the connector)."""
        connectors = list(self.connectors.values())
        inflight = sum(1 for c in connectors if c.refresh_in_flight)
        if inflight:
            logger.info("waiting for %d refreshes in flight", inflight)
        results = await asyncio.gather(*(c.close() for c in connectors), return_exceptions=True)
        for connector, result in zip(connectors, results, strict=True):
            if isinstance(result, Exception):
                logger.error("%s: not closed cleanly: %s", connector.name, result)

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[name] = asyncio.create_task(work, name=name)

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

    def health(self) -> dict[str, object]:
        """The /v1/health body (`tokend.health.report`)."""
        return health.report(
            self.connectors.values(),
            scheduler=self.scheduler,
            config_error=self.config_error,
            store_backend=self.store_backend,
            uptime_s=int(time.monotonic() - self._started_at),
            summary=self.summary(),
            notify_dropped=self.notifier.dropped,
        )

    def metrics_text(self) -> str:
        """The /metrics body (`tokend.metrics`)."""
        return self.metrics.render(
            self.source.statuses(),
            version=__version__,
            started_at_monotonic=self._started_at,
            notify_dropped=self.notifier.dropped,
        )

    def summary(self) -> str:
        """One line for systemd's STATUS=: counts by state and the next refresh."""
        return health.summary(
            self.connectors.values(), now=self.clock.now(), config_error=self.config_error
        )

    # ----------------------------------------------------------------- reload (SIGHUP)

    def request_reload(self) -> None:
        """SIGHUP: ask the reload task for a reload (`tokend.reload.Reloader`)."""
        self.reloader.request()

    def resolve(self, config: Config) -> Config:
        """A newly read config, resolved against the stored client records."""
        self.file_config = config
        return resolve_config(config, self.client_records)

    async def reload(self) -> bool:
        """Re-read the config file and apply it (`tokend.reload`): add, remove and change
        connectors, keeping every stored token. An invalid file changes nothing: the error is
        logged and shown in STATUS and health. Returns whether it was applied."""
        return await self.reloader.reload()

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
