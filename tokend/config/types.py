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


RedirectHost = Literal["127.0.0.1", "localhost"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorConfig:
    """One `[connectors.NAME]` table, or (after `tokend.clients.resolve`) the settings in effect.

    The endpoints come from exactly one source: `token_url` (with the optional explicit
    `authorization_url`, `device_authorization_url` and `revocation_url`), `issuer` (RFC 8414 /
    OpenID discovery) or `mcp_url` (MCP authorization: RFC 9728, then RFC 8414). With `issuer` or
    `mcp_url`, `token_url` and `client_id` stay None until `tokend login` has discovered and
    registered them; `tokend.clients.resolve` fills them in from what login stored, or sets
    `needs_login` to the reason the stored registration cannot be used.
    """

    name: str
    token_url: str | None
    client_id: str | None
    client_auth: ClientAuth = "client_secret_basic"
    scope: str | None = None
    resource: str | None = None  # sent on token requests; None sends none
    resource_opt_out: bool = False  # `resource = ""`: never send one, not even the MCP URL
    issuer: str | None = None
    mcp_url: str | None = None
    authorization_url: str | None = None
    device_authorization_url: str | None = None
    revocation_url: str | None = None
    client_metadata_url: str | None = None  # a Client ID Metadata Document (MCP), https
    redirect_host: RedirectHost = "127.0.0.1"
    redirect_port: int = 0  # 0: any free port; fixed for `ssh -L` or exact-match servers
    allow: tuple[AllowRule, ...] = ()
    ca_file: Path | None = None
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    needs_login: str | None = None  # set by resolution: why the stored client cannot be used

    @property
    def source(self) -> Literal["token_url", "issuer", "mcp_url"]:
        """Where the endpoints come from."""
        if self.mcp_url is not None:
            return "mcp_url"
        if self.issuer is not None:
            return "issuer"
        return "token_url"

    @property
    def source_url(self) -> str:
        """The configured URL the endpoints come from."""
        url = self.mcp_url or self.issuer or self.token_url
        if url is None:  # a resolved token_url-less connector always has issuer or mcp_url
            raise ValueError(f"{self.name}: no token_url, issuer or mcp_url")
        return url


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    daemon: DaemonSettings
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    connectors: Mapping[str, ConnectorConfig] = field(default_factory=dict)
