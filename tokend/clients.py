"""What `tokend login` learnt about a connector's server and client, kept so restarts never guess.

A `ClientRecord` holds the non-secret outcome of discovery and client identification: the issuer,
the endpoints, the client id and how it authenticates, the resource indicator, the redirect URI a
registered client was given. `ClientRecords` keeps them in `state_dir/clients.json` (atomic
write, mode 0600); a client secret from dynamic registration lives in the keyring like any other.

`resolve` gives the settings in effect for a connector: the configured ones, completed from its
record. A record made for another source (the config's `issuer` or `mcp_url` changed since the
login, or a configured `client_id` differs from the one recorded) is not used: the connector then
carries `needs_login` with the reason, and its stored grant is left alone, unused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tokend.config import ClientAuth, Config, ConnectorConfig
from tokend.errors import StoreError
from tokend.store import write_atomic

logger = logging.getLogger(__name__)

ClientKind = Literal["configured", "metadata_document", "registered"]
_CLIENT_AUTHS = ("client_secret_basic", "client_secret_post", "none")
_KINDS = ("configured", "metadata_document", "registered")
_SOURCES = ("token_url", "issuer", "mcp_url")
FILE_NAME = "clients.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    """The outcome of one successful `tokend login` (no secrets)."""

    source: Literal["token_url", "issuer", "mcp_url"]
    source_url: str  # the configured token_url, issuer or mcp_url at login time
    issuer: str | None
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    client_id: str
    client_auth: ClientAuth
    client_kind: ClientKind
    resource: str | None = None
    scope: str | None = None
    redirect_uri: str | None = None
    recorded_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recorded_at"] = self.recorded_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClientRecord:
        """Raises ValueError (or KeyError/TypeError) for a record this version cannot read."""
        source, auth, kind = data["source"], data["client_auth"], data["client_kind"]
        if source not in _SOURCES or auth not in _CLIENT_AUTHS or kind not in _KINDS:
            raise ValueError("unknown source, client_auth or client_kind")
        texts = ("source_url", "token_endpoint", "client_id")
        if not all(isinstance(data[key], str) and data[key] for key in texts):
            raise ValueError("source_url, token_endpoint and client_id must be strings")
        optional = (
            "issuer", "authorization_endpoint", "device_authorization_endpoint",
            "revocation_endpoint", "resource", "scope", "redirect_uri",
        )  # fmt: skip
        for key in optional:
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string")
        recorded_at = datetime.fromisoformat(data["recorded_at"])
        if recorded_at.tzinfo is None:
            raise ValueError("recorded_at must carry a time zone")
        return cls(
            source=source,
            source_url=data["source_url"],
            issuer=data.get("issuer"),
            token_endpoint=data["token_endpoint"],
            authorization_endpoint=data.get("authorization_endpoint"),
            device_authorization_endpoint=data.get("device_authorization_endpoint"),
            revocation_endpoint=data.get("revocation_endpoint"),
            client_id=data["client_id"],
            client_auth=auth,
            client_kind=kind,
            resource=data.get("resource"),
            scope=data.get("scope"),
            redirect_uri=data.get("redirect_uri"),
            recorded_at=recorded_at,
        )


class ClientRecords:
    """`state_dir/clients.json`: one `ClientRecord` per connector name.

    Callers serialise writers (the daemon holds the state-directory lock; without a daemon the
    CLI takes that lock). A damaged entry is logged and skipped, never fatal: that connector
    then needs `tokend login` again, and every other one keeps working.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME

    def load(self) -> dict[str, ClientRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{self.path}: not valid JSON; run tokend login again") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{self.path}: expected a JSON object")
        records: dict[str, ClientRecord] = {}
        for name, entry in data.items():
            try:
                records[name] = ClientRecord.from_dict(entry)
            except (KeyError, TypeError, ValueError) as exc:
                logger.error("%s: %s: unreadable client record skipped (%s)", self.path, name, exc)
        return records

    def _write(self, records: Mapping[str, ClientRecord]) -> None:
        body = {name: record.to_dict() for name, record in sorted(records.items())}
        text = json.dumps(body, indent=2, sort_keys=True) + "\n"
        write_atomic(self.path, text.encode())

    def put(self, name: str, record: ClientRecord) -> None:
        records = self.load()
        records[name] = record
        self._write(records)

    def remove(self, name: str) -> bool:
        records = self.load()
        if records.pop(name, None) is None:
            return False
        self._write(records)
        return True


def mismatch(conn: ConnectorConfig, record: ClientRecord) -> str | None:
    """Why `record` cannot serve `conn` as configured now, or None when it can."""
    if record.source != conn.source or record.source_url != conn.source_url:
        return (
            f"{conn.source} is now {conn.source_url} but the stored client was obtained from "
            f"{record.source} {record.source_url}; stored credentials are not used"
        )
    if conn.client_id is not None and conn.client_id != record.client_id:
        return "client_id changed since the last login; stored credentials are not used"
    return None


def resolve(conn: ConnectorConfig, record: ClientRecord | None) -> ConnectorConfig:
    """The settings in effect for `conn`: the configuration completed from its record."""
    if record is None:
        if conn.token_url is None:
            return replace(conn, needs_login="not authorized yet")
        return conn
    problem = mismatch(conn, record)
    if problem is not None:
        if conn.token_url is None:
            return replace(conn, needs_login=problem)
        return conn  # a token_url connector keeps its configured endpoints
    if conn.resource_opt_out:
        resource = None
    else:
        resource = conn.resource if conn.resource is not None else record.resource
    return replace(
        conn,
        token_url=record.token_endpoint,
        client_id=record.client_id,
        client_auth=record.client_auth if conn.client_id is None else conn.client_auth,
        resource=resource,
        authorization_url=conn.authorization_url or record.authorization_endpoint,
        device_authorization_url=(
            conn.device_authorization_url or record.device_authorization_endpoint
        ),
        revocation_url=conn.revocation_url or record.revocation_endpoint,
        needs_login=None,
    )


def resolve_config(config: Config, records: Mapping[str, ClientRecord]) -> Config:
    """`config` with every connector resolved against `records`."""
    connectors = {name: resolve(c, records.get(name)) for name, c in config.connectors.items()}
    return replace(config, connectors=connectors)
