"""`tokend login`/`logout` as a user runs them, with and without the daemon: the grant and the
client record reach the daemon, refreshes carry the resource without discovering again, a changed
configuration refuses the stored client, and logout revokes before it deletes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FILE_BACKEND, DaemonProcess, get, wait_for, why
from tokend.authserver import AuthServer


@pytest.fixture
def server() -> Any:
    with AuthServer(lifetime_s=4.0) as auth:
        auth.device_interval_s = 0.2
        auth.device_auto = "approve"
        yield auth


def config(root: Path, server: AuthServer, **conn: Any) -> dict[str, Any]:
    return {
        "daemon": {
            "socket": str(root / "run" / "tokend.sock"),
            "state_dir": str(root / "state"),
            "keyring_backend": FILE_BACKEND,
        },
        "refresh": {"skew": "1s", "min_interval": "1s"},
        "connectors": {"svc": {"mcp_url": server.mcp_url, **conn}},
    }


def status(daemon: DaemonProcess) -> dict[str, Any]:
    code, body = get(daemon.socket, "/v1/connectors/svc")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def test_login_through_the_daemon_then_refresh_restart_and_logout(
    tmp_short: Path, server: AuthServer
) -> None:
    """The whole life of a discovered connector: unauthorized, login (device flow) through the
    running daemon, refreshes that carry the resource, a restart that discovers nothing, and a
    logout that revokes at the server and deletes."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server)).start()
    try:
        before = status(daemon)
        assert (before["state"], before["action"]) == ("unauthorized", "tokend login svc")
        result = daemon.cli("login", "svc")
        assert result.returncode == 0, why(result)
        assert "logged in (device flow, registered client" in result.stderr
        assert "/device" in result.stdout
        token = daemon.cli("token", "svc")
        assert token.returncode == 0, why(token)
        assert server.is_valid_access_token(token.stdout.strip())
        wait_for(lambda: status(daemon)["refreshes"] >= 1)
        refreshes = [r.form for r in server.requests if r.form.get("grant_type") == "refresh_token"]
        assert refreshes and all(f["resource"] == server.mcp_url for f in refreshes)
        assert "client_secret" in refreshes[0]  # the registered client authenticates by post
        assert daemon.stop() == 0
        seen = len(server.requests)
        daemon.start()
        wait_for(lambda: status(daemon)["refreshes"] >= 1)
        later = server.requests[seen:]
        assert not [r for r in later if "well-known" in r.path or r.path == "/mcp"]
        assert not [r for r in later if r.path == "/register"]
        out = daemon.cli("logout", "svc")
        assert out.returncode == 0, why(out)
        assert "refresh token and access token revoked" in out.stderr
        assert [hint for _, hint, _ in server.revocations] == ["refresh_token", "access_token"]
        assert status(daemon)["state"] == "unauthorized"
        gone = daemon.cli("token", "svc")
        assert gone.returncode == 10, why(gone)
        assert not server.is_valid_access_token(token.stdout.strip())
        secret = token.stdout.strip()
        for text in (result.stdout, result.stderr, out.stdout, out.stderr, daemon.log()):
            assert secret not in text  # the canary: no access token in login output or logs
    finally:
        daemon.stop()


def test_login_without_a_daemon_writes_the_keyring_directly(
    tmp_short: Path, server: AuthServer
) -> None:
    """With no daemon running, login stores client, secret and grant itself; a daemon started
    later serves the token and refreshes it with the stored client."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server))
    result = daemon.cli("login", "svc")
    assert result.returncode == 0, why(result)
    records = json.loads((tmp_short / "state" / "clients.json").read_text())
    assert records["svc"]["issuer"] == server.issuer
    assert "secret" not in json.dumps(records).replace("client_secret_post", "")
    daemon.start()
    try:
        token = daemon.cli("token", "svc")
        assert token.returncode == 0, why(token)
        wait_for(lambda: status(daemon)["refreshes"] >= 1)
    finally:
        daemon.stop()


def test_changed_mcp_url_refuses_the_stored_client_until_login(
    tmp_short: Path, server: AuthServer
) -> None:
    """After the config points at another MCP URL and the daemon reloads, the stored client and
    grant are not used: lookups fail with needs_reauth naming the change, and nothing is sent to
    the server; the grant is kept."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server)).start()
    try:
        assert daemon.cli("login", "svc").returncode == 0
        other = config(tmp_short, server)
        other["connectors"]["svc"]["mcp_url"] = server.url + "/other/mcp"
        from tests.harness import to_toml

        daemon.config_path.write_text(to_toml(other))
        daemon.signal(1)  # SIGHUP
        wait_for(lambda: status(daemon)["state"] == "needs_reauth")
        body = status(daemon)
        assert "stored credentials are not used" in body["last_error"]
        assert body["action"] == "tokend login svc"
        calls = server.token_calls
        lookup = daemon.cli("token", "svc")
        assert lookup.returncode == 10, why(lookup)
        time.sleep(5)  # past the token's life: still no refresh with the stale client
        assert server.token_calls == calls
    finally:
        daemon.stop()


def test_logout_without_revocation_endpoint_deletes_locally(
    tmp_short: Path, server: AuthServer
) -> None:
    """A server that offers no revocation endpoint: logout says so and still deletes."""
    server.revocation = False
    daemon = DaemonProcess(tmp_short, config(tmp_short, server)).start()
    try:
        assert daemon.cli("login", "svc").returncode == 0
        out = daemon.cli("logout", "svc")
        assert out.returncode == 0, why(out)
        assert "offers no revocation endpoint" in out.stderr
        assert status(daemon)["state"] == "unauthorized"
    finally:
        daemon.stop()


def test_failed_revocation_deletes_nothing(tmp_short: Path, server: AuthServer) -> None:
    """When revocation fails the grant stays (exit 75, how to retry); --no-revoke deletes."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server)).start()
    try:
        assert daemon.cli("login", "svc").returncode == 0
        server.go_down()
        out = daemon.cli("logout", "svc")
        assert out.returncode == 75, why(out)
        assert "nothing was deleted" in out.stderr and "--no-revoke" in out.stderr
        server.come_back()
        assert daemon.cli("token", "svc").returncode == 0
        forced = daemon.cli("logout", "svc", "--no-revoke")
        assert forced.returncode == 0, why(forced)
        assert "not revoked" in forced.stderr
    finally:
        daemon.stop()


def test_check_reports_discovery_without_consuming_anything(
    tmp_short: Path, server: AuthServer
) -> None:
    """tokend check shows the discovered issuer and what it offers; no token request is made."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server))
    result = daemon.cli("check")
    assert f"issuer {server.issuer} (S256, device flow, registration, revocation)" in result.stdout
    assert server.token_calls == 0
    assert not [r for r in server.requests if r.path == "/register"]


def test_login_for_an_unknown_connector_is_a_config_error(
    tmp_short: Path, server: AuthServer
) -> None:
    """login NAME for a name not in the config exits 78 with one line."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server))
    result = daemon.cli("login", "nope")
    assert result.returncode == 78, why(result)
    assert len(result.stderr.splitlines()) == 1


def test_check_notices_an_issuer_changed_since_login(tmp_short: Path, server: AuthServer) -> None:
    """When discovery now finds another issuer than the last login recorded, check fails for
    that connector, says the stored credentials are not used, and names tokend login."""
    daemon = DaemonProcess(tmp_short, config(tmp_short, server))
    assert daemon.cli("login", "svc").returncode == 0
    server.issuer_path = "/tenant"
    result = daemon.cli("check")
    assert result.returncode == 78, why(result)
    line = next(line for line in result.stdout.splitlines() if " svc " in line)
    assert line.startswith("FAIL")
    assert f"now {server.issuer}" in line and "run: tokend login svc" in line
