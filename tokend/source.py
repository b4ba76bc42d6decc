"""The token source the socket server calls (`tokend.server.api.TokenSource`): lookups, status,
refresh, grant install and removal, client secrets, health and metrics, over the daemon's
connectors.

It owns no connector and no lifecycle: the daemon (`tokend.daemon`) builds it over itself through
the `Host` protocol below, so this module never imports the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

from tokend.clients import ClientRecord, ClientRecords, mismatch, resolve
from tokend.config import Config, ConnectorConfig
from tokend.errors import ApiError, StoreError, unknown_connector
from tokend.metrics import Metrics
from tokend.model import Secret, State, TokenSet
from tokend.refresher.connector import Connector
from tokend.server.api import Peer

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What the token source reads and changes of the running daemon."""

    config: Config  # as in effect: connectors resolved against their client records
    file_config: Config  # as read from the file
    connectors: dict[str, Connector]
    client_records: dict[str, ClientRecord]
    metrics: Metrics

    def health(self) -> dict[str, object]: ...
    def metrics_text(self) -> str: ...


class DaemonSource:
    """The daemon's connectors as the socket server sees them; every async method may raise
    ApiError."""

    def __init__(self, host: Host, clients: ClientRecords) -> None:
        self._host = host
        self._clients = clients
        self._uid = os.getuid()

    def _connector(self, name: str) -> Connector:
        connector = self._host.connectors.get(name)
        if connector is None:
            raise unknown_connector(name, self._host.config.path or "the configuration")
        return connector

    def has_connector(self, name: str) -> bool:
        return name in self._host.connectors

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in (0, self._uid)

    def is_allowed(self, name: str, peer: Peer) -> bool:
        if self.is_admin(peer):
            return True
        conn: ConnectorConfig | None = self._host.config.connectors.get(name)
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
        return [c.status() for _, c in sorted(self._host.connectors.items())]

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
            host = self._host
            host.config = replace(host.config, connectors={**host.config.connectors, name: config})
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
        configured = self._host.file_config.connectors[name]
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
        self._host.client_records[name] = record
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

    def health(self) -> dict[str, object]:
        return self._host.health()

    def metrics_text(self) -> str:
        return self._host.metrics_text()

    def lookup_done(self, name: str, outcome: str) -> None:
        self._host.metrics.lookup_done(name, outcome)
