"""Client records: what `tokend login` keeps so the daemon never re-discovers, and when a
changed configuration refuses to use them."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tokend.clients import ClientRecord, ClientRecords, resolve, resolve_config
from tokend.config import ConnectorConfig, config_from_mapping
from tokend.errors import StoreError

MCP = "https://mcp.example.com/mcp"
AT = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def mcp_connector(**changes: object) -> ConnectorConfig:
    base = ConnectorConfig(name="mcp", token_url=None, client_id=None, mcp_url=MCP)
    return replace(base, **changes)  # type: ignore[arg-type]


def record(**changes: object) -> ClientRecord:
    base = ClientRecord(
        source="mcp_url",
        source_url=MCP,
        issuer="https://auth.example.com",
        token_endpoint="https://auth.example.com/token",
        authorization_endpoint="https://auth.example.com/authorize",
        revocation_endpoint="https://auth.example.com/revoke",
        client_id="registered-1",
        client_auth="client_secret_post",
        client_kind="registered",
        resource=MCP,
        scope="mcp offline_access",
        redirect_uri="http://127.0.0.1:8765/callback",
        recorded_at=AT,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_unresolved_discovery_connector_needs_login() -> None:
    """An mcp_url connector without a record has no token endpoint and says login is needed."""
    conn = resolve(mcp_connector(), None)
    assert conn.token_url is None
    assert conn.needs_login == "not authorized yet"


def test_record_completes_the_connector() -> None:
    """A matching record supplies endpoints, client, client auth and the resource indicator."""
    conn = resolve(mcp_connector(), record())
    assert conn.needs_login is None
    assert (conn.token_url, conn.client_id, conn.client_auth) == (
        "https://auth.example.com/token",
        "registered-1",
        "client_secret_post",
    )
    assert (conn.resource, conn.revocation_url) == (MCP, "https://auth.example.com/revoke")


def test_resource_opt_out_wins_over_the_record() -> None:
    """resource = "" keeps the resource off refresh requests even when login recorded one."""
    conn = resolve(mcp_connector(resource_opt_out=True), record())
    assert conn.resource is None


def test_changed_mcp_url_refuses_the_stored_client() -> None:
    """A record made for another MCP URL is not used: the reason names both URLs."""
    conn = resolve(mcp_connector(mcp_url="https://other.example.com/mcp"), record())
    assert conn.token_url is None
    assert conn.needs_login is not None
    assert "https://other.example.com/mcp" in conn.needs_login
    assert MCP in conn.needs_login
    assert "stored credentials are not used" in conn.needs_login


def test_changed_issuer_refuses_the_stored_client() -> None:
    """A record obtained through mcp_url does not serve a connector now configured by issuer."""
    conn = ConnectorConfig(
        name="mcp", token_url=None, client_id=None, issuer="https://auth.example.com"
    )
    resolved = resolve(conn, record())
    assert resolved.token_url is None
    assert resolved.needs_login is not None and "issuer" in resolved.needs_login


def test_changed_configured_client_id_refuses_the_stored_client() -> None:
    """A configured client_id that differs from the recorded one needs a new login."""
    conn = resolve(mcp_connector(client_id="another"), record(client_kind="configured"))
    assert conn.needs_login == (
        "client_id changed since the last login; stored credentials are not used"
    )


def test_token_url_connector_keeps_its_configured_endpoints() -> None:
    """A token_url connector without a record is used as configured."""
    conn = ConnectorConfig(name="t", token_url="https://a.example/token", client_id="c")
    assert resolve(conn, None) == conn


def test_records_round_trip_through_a_private_file(tmp_path: Path) -> None:
    """Records are written 0600 as JSON without secrets and read back equal."""
    records = ClientRecords(tmp_path)
    assert records.load() == {}
    records.put("mcp", record())
    records.put("other", record(client_id="registered-2"))
    assert records.load() == {"mcp": record(), "other": record(client_id="registered-2")}
    assert stat.S_IMODE(records.path.stat().st_mode) == 0o600
    assert records.remove("other") is True
    assert records.remove("other") is False
    assert set(records.load()) == {"mcp"}


def test_damaged_entry_is_skipped_and_others_survive(tmp_path: Path) -> None:
    """One unreadable entry costs only that connector; garbage in the file is a StoreError."""
    records = ClientRecords(tmp_path)
    records.put("good", record())
    data = json.loads(records.path.read_text())
    data["bad"] = {"source": "nowhere"}
    records.path.write_text(json.dumps(data))
    assert set(records.load()) == {"good"}
    records.path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        records.load()


def test_resolve_config_resolves_every_connector() -> None:
    """resolve_config applies each connector's own record."""
    config = config_from_mapping(
        {
            "connectors": {
                "mcp": {"mcp_url": MCP},
                "plain": {"token_url": "https://a.example/token", "client_id": "c"},
            }
        },
        source="c",
    )
    resolved = resolve_config(config, {"mcp": record()})
    assert resolved.connectors["mcp"].token_url == "https://auth.example.com/token"
    assert resolved.connectors["plain"] == config.connectors["plain"]
