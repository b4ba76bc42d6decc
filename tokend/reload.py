"""SIGHUP: re-read the config file and apply it to the running daemon.

Connectors are added, removed and changed in place: every stored token is kept (removing a
connector never deletes its grant), refreshes in flight finish, and a changed connector keeps
serving throughout. An invalid file changes nothing: the error is logged and shown in STATUS and
health, and the running configuration stays. Settings that only a restart can apply (the socket,
the state directory, the keyring) are reported and left as they are.

`Reloader` is the daemon's reload glue: SIGHUP only sets its event, one task runs the reloads so
that they never overlap, and shutdown waits for a reload under way before it stops that task.
This module never imports the daemon, only the `Reloadable` protocol below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Protocol

from tokend.alerts.manager import AlertManager
from tokend.config import Config, ConnectorConfig, load_config
from tokend.errors import ConfigError
from tokend.metrics import Metrics
from tokend.notify import Notifier
from tokend.refresher.connector import Connector
from tokend.scheduler import RefreshScheduler

logger = logging.getLogger(__name__)

# daemon.* settings a running daemon cannot change: they take effect at the next start.
RESTART_ONLY = ("socket", "socket_group", "state_dir", "keyring_service", "keyring_backend")


class Reloadable(Protocol):
    """What a reload reads and changes of the running daemon."""

    config: Config
    config_error: str | None  # the last reload's error; the old config runs on
    connectors: dict[str, Connector]
    scheduler: RefreshScheduler | None
    alerts: AlertManager
    metrics: Metrics
    notifier: Notifier

    def summary(self) -> str: ...
    def resolve(self, config: Config) -> Config: ...
    def make_connector(self, config: ConnectorConfig) -> Connector: ...
    def mark_state_dirty(self) -> None: ...


class Reloader:
    """Runs the reloads SIGHUP asks for, one at a time, in its own task (`run`)."""

    def __init__(self, daemon: Reloadable) -> None:
        self._daemon = daemon
        self._requested = asyncio.Event()
        self._lock = asyncio.Lock()

    def request(self) -> None:
        """SIGHUP: ask for a reload; requests made while one runs are served by one more."""
        self._requested.set()

    async def run(self) -> None:
        while True:
            await self._requested.wait()
            self._requested.clear()
            await self.reload()

    async def reload(self) -> bool:
        """Reload now (after any reload under way); returns whether the new file was applied."""
        async with self._lock:
            return await reload(self._daemon)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Let a reload under way finish (it may be moving connectors), then end `task`."""
        async with self._lock:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def reload(daemon: Reloadable) -> bool:
    """Re-read the config file and apply it (see module docstring); returns whether it was
    applied. The caller makes sure reloads never overlap."""
    daemon.notifier.reloading()
    path = daemon.config.path
    try:
        if path is None:
            raise ConfigError("no configuration file to reload (started without one)")
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        return _keep_running(daemon, exc)
    try:
        await daemon.alerts.reconfigure(new.alerts)
    except ConfigError as exc:
        return _keep_running(daemon, exc)
    daemon.config_error = None
    await apply(daemon, daemon.resolve(new))
    logger.info("reloaded %s: %d connectors", path, len(daemon.connectors))
    daemon.notifier.ready(daemon.summary())
    return True


def _keep_running(daemon: Reloadable, exc: ConfigError) -> bool:
    daemon.config_error = str(exc)
    logger.error("reload failed; the running configuration stays: %s", exc)
    daemon.notifier.ready(daemon.summary())
    return False


async def apply(daemon: Reloadable, new: Config) -> None:
    """Make the running daemon match `new`, keeping its `daemon` settings (they need a restart)."""
    old = daemon.config
    if new.daemon != old.daemon:
        changed = [
            f"daemon.{key}"
            for key in RESTART_ONLY
            if getattr(new.daemon, key) != getattr(old.daemon, key)
        ]
        logger.warning("%s changed: restart tokend to apply", ", ".join(changed))
    daemon.config = replace(new, daemon=old.daemon)
    for name in sorted(set(old.connectors) - set(new.connectors)):
        connector = daemon.connectors.pop(name)
        if daemon.scheduler is not None:
            daemon.scheduler.cancel(name)
        await connector.wait_idle()  # a refresh in flight is persisted, not dropped
        daemon.metrics.forget(name)
        daemon.alerts.forget(name)
        logger.info("%s: removed from the configuration", name)
    added: list[Connector] = []
    for name, conn_config in new.connectors.items():
        existing = daemon.connectors.get(name)
        if existing is None:
            created = daemon.make_connector(conn_config)
            daemon.connectors[name] = created
            added.append(created)
        elif conn_config != existing.config:
            existing.reconfigure(conn_config)
            logger.info("%s: configuration changed", name)
    await asyncio.gather(*(connector.start(None) for connector in added))
    for connector in added:
        logger.info("%s: added (%s)", connector.name, connector.state.value)
    daemon.mark_state_dirty()
