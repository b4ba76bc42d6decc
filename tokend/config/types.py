"""The configuration's frozen dataclasses: what `load_config` returns, with the defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

ClientAuth = Literal["client_secret_basic", "client_secret_post", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshSettings:
    """When to refresh (DESIGN §2); `[refresh]` gives defaults, each connector may override."""

    skew: timedelta = timedelta(minutes=5)
    min_interval: timedelta = timedelta(seconds=10)
    max_interval: timedelta = timedelta(days=7)
    default_lifetime: timedelta = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowRule:
    """One `allow` entry resolved to a number: kind "uid" or "gid" (names resolved at load)."""

    kind: Literal["uid", "gid"]
    id: int
    text: str  # as written, for messages


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    socket: Path
    socket_group: str | None = None
    state_dir: Path
    keyring_service: str = "tokend"
    keyring_backend: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertSettings:
    """Where alerts go (DESIGN §7): an argv, a webhook URL and Apprise URLs, any combination."""

    exec: tuple[str, ...] | None = None
    webhook: str | None = None
    apprise: tuple[str, ...] = ()  # Apprise URLs; they may hold a service token, so never logged
    repeat: timedelta = timedelta(hours=6)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorConfig:
    name: str
    token_url: str
    client_id: str
    client_auth: ClientAuth = "client_secret_basic"
    scope: str | None = None
    resource: str | None = None
    allow: tuple[AllowRule, ...] = ()
    ca_file: Path | None = None
    refresh: RefreshSettings = field(default_factory=RefreshSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    daemon: DaemonSettings
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    connectors: Mapping[str, ConnectorConfig] = field(default_factory=dict)
