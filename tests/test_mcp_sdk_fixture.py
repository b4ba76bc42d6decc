"""The MCP-SDK fixture itself: the official SDK's authorization server and MCP server, driven by a
hand-written OAuth client (httpx), independent of tokend's login code."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.mcp_sdk.client import Unauthorized, call_tool
from tests.mcp_sdk.process import REPO, McpSdkServer

LIFETIME_S = 4.0
REDIRECT = "http://127.0.0.1:8765/callback"


@pytest.fixture(scope="module")
def sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpSdkServer]:
    """One SDK server for the module (start-up costs ~1 s); tests use their own clients."""
    with McpSdkServer(tmp_path_factory.mktemp("mcp-sdk"), lifetime_s=LIFETIME_S) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15.0, follow_redirects=False) as client:
        yield client


def _register(http: httpx.Client, sdk: McpSdkServer, **metadata: Any) -> dict[str, Any]:
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", **metadata}
    response = http.post(sdk.issuer + "/register", json=body)
    assert response.status_code == 201, response.text
    client: dict[str, Any] = response.json()
    return client


def _authorize(http: httpx.Client, sdk: McpSdkServer, client_id: str) -> tuple[str, str]:
    """An auto-approved authorization request with PKCE S256; returns (code, verifier)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(16)
    response = http.get(
        sdk.issuer + "/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
            "state": state,
            "scope": "mcp offline_access",
            "resource": sdk.mcp_url,
        },
    )
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == [state]
    return query["code"][0], verifier


def _token(http: httpx.Client, sdk: McpSdkServer, form: dict[str, str]) -> httpx.Response:
    return http.post(sdk.issuer + "/token", data={**form, "resource": sdk.mcp_url})


def _login(http: httpx.Client, sdk: McpSdkServer) -> tuple[str, dict[str, Any]]:
    """Register a public client and run the code flow; returns (client_id, token response)."""
    client_id = _register(http, sdk)["client_id"]
    code, verifier = _authorize(http, sdk, client_id)
    response = _token(
        http,
        sdk,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200, response.text
    return client_id, response.json()


def _refresh(http: httpx.Client, sdk: McpSdkServer, client_id: str, rt: str) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": rt, "client_id": client_id}
    return _token(http, sdk, form)


def _mcp_status(http: httpx.Client, sdk: McpSdkServer, access_token: str) -> int:
    """The MCP endpoint's status for a bare POST with this token (401 = token refused)."""
    response = http.post(
        sdk.mcp_url,
        headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        json={},
    )
    return response.status_code


def test_tokenless_request_gets_401_pointing_at_protected_resource_metadata(sdk, http):
    """A token-less POST to the MCP endpoint gets 401 with `WWW-Authenticate: Bearer ...,
    resource_metadata="<origin>/.well-known/oauth-protected-resource/mcp"` (RFC 9728 §5.1)."""
    response = http.post(sdk.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    match = re.search(r'resource_metadata="([^"]+)"', challenge)
    assert match is not None
    assert match.group(1) == sdk.issuer + "/.well-known/oauth-protected-resource/mcp"


def test_protected_resource_and_authorization_server_metadata(sdk, http):
    """PRM names the MCP URL and the path-less issuer; RFC 8414 metadata sits at the issuer's
    well-known URL and lists code+PKCE S256, refresh, registration and revocation endpoints."""
    prm = http.get(sdk.issuer + "/.well-known/oauth-protected-resource/mcp").json()
    assert prm["resource"] == sdk.mcp_url
    assert prm["authorization_servers"] == [sdk.issuer]
    assert prm["scopes_supported"] == ["mcp"]
    meta = http.get(sdk.issuer + "/.well-known/oauth-authorization-server").json()
    assert meta["issuer"] == sdk.issuer
    assert meta["authorization_endpoint"] == sdk.issuer + "/authorize"
    assert meta["token_endpoint"] == sdk.issuer + "/token"
    assert meta["registration_endpoint"] == sdk.issuer + "/register"
    assert meta["revocation_endpoint"] == sdk.issuer + "/revoke"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert set(meta["grant_types_supported"]) >= {"authorization_code", "refresh_token"}
    assert "offline_access" in meta["scopes_supported"]


def test_login_expiry_rotation_and_reuse_detection(sdk, http):
    """DCR + code flow gives a token the SDK client can use; it is refused after its lifetime;
    a refresh rotates the refresh token and works again; replaying the retired refresh token
    gets invalid_grant and kills the rotated grant too."""
    before = sdk.stats()
    client_id, first = _login(http, sdk)
    assert first["token_type"] == "Bearer"
    assert first["expires_in"] == round(LIFETIME_S)
    assert call_tool(sdk.mcp_url, first["access_token"], "add", {"a": 2, "b": 3}) == 5
    who = call_tool(sdk.mcp_url, first["access_token"], "whoami", {})
    assert isinstance(who, dict)
    assert who["client_id"] == client_id

    deadline = time.monotonic() + LIFETIME_S + 15
    while _mcp_status(http, sdk, first["access_token"]) != 401:
        assert time.monotonic() < deadline, "token still accepted long after its lifetime"
        time.sleep(0.25)
    with pytest.raises(Unauthorized, match="resource_metadata="):
        call_tool(sdk.mcp_url, first["access_token"], "add", {"a": 1, "b": 1})

    response = _refresh(http, sdk, client_id, first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert call_tool(sdk.mcp_url, second["access_token"], "add", {"a": 20, "b": 22}) == 42

    replay = _refresh(http, sdk, client_id, first["refresh_token"])
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    dead = _refresh(http, sdk, client_id, second["refresh_token"])
    assert dead.status_code == 400
    assert dead.json()["error"] == "invalid_grant"
    assert _mcp_status(http, sdk, second["access_token"]) == 401

    after = sdk.stats()
    assert after["registrations"] - before["registrations"] == 1
    assert after["refreshes"] - before["refreshes"] == 1
    assert after["reuse_detected"] - before["reuse_detected"] == 1
    requests = after["token_requests"][len(before["token_requests"]) :]
    assert [r["grant_type"] for r in requests] == [
        "authorization_code",
        "refresh_token",
        "refresh_token",
        "refresh_token",
    ]
    assert all(r["resource"] == sdk.mcp_url for r in requests)
    assert f"grant_type=refresh_token resource={sdk.mcp_url}" in sdk.log()


def test_revocation_kills_the_grant(sdk, http):
    """RFC 7009 revocation of the refresh token ends the grant (refresh and access token die);
    the SDK's /revoke wants a `client_secret` form field even from a public client (SDK quirk)."""
    before = sdk.stats()
    client_id, tokens = _login(http, sdk)
    form = {"token": tokens["refresh_token"], "client_id": client_id}
    refused = http.post(sdk.issuer + "/revoke", data=form)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_request"
    revoke = http.post(sdk.issuer + "/revoke", data={**form, "client_secret": ""})
    assert revoke.status_code == 200
    assert (
        _refresh(http, sdk, client_id, tokens["refresh_token"]).json()["error"] == "invalid_grant"
    )
    assert _mcp_status(http, sdk, tokens["access_token"]) == 401
    assert sdk.stats()["revocations"] - before["revocations"] == 1


def test_confidential_client_basic_auth_needs_client_id_in_body_too(sdk, http):
    """A DCR client registered for client_secret_basic gets a secret; the SDK's token endpoint
    accepts HTTP Basic only when the form also carries client_id (SDK quirk tokend must meet)."""
    client = _register(http, sdk, token_endpoint_auth_method="client_secret_basic")
    assert client["client_secret"]
    code, verifier = _authorize(http, sdk, client["client_id"])
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    basic = httpx.BasicAuth(client["client_id"], client["client_secret"])
    without_id = http.post(sdk.issuer + "/token", data=form, auth=basic)
    assert without_id.status_code == 401
    assert without_id.json()["error"] == "invalid_client"
    with_id = http.post(
        sdk.issuer + "/token", data={**form, "client_id": client["client_id"]}, auth=basic
    )
    assert with_id.status_code == 200, with_id.text
    assert with_id.json()["refresh_token"]


def test_runnable_client_reads_token_from_env(sdk, http):
    """`python -m tests.mcp_sdk.client URL TOOL ARGS` with TOKEND_ACCESS_TOKEN prints the result
    as JSON (exit 0); with a refused token it exits 1 and shows the 401 challenge on stderr."""

    def run(token: str) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "tests.mcp_sdk.client",
            sdk.mcp_url,
            "add",
            '{"a": 1, "b": 2}',
        ]
        env = {**os.environ, "TOKEND_ACCESS_TOKEN": token}
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    _client_id, tokens = _login(http, sdk)
    done = run(tokens["access_token"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 3
    refused = run("not-a-token")
    assert refused.returncode == 1
    assert "resource_metadata=" in refused.stderr


def test_sigterm_stops_the_server_cleanly(tmp_path: Path):
    """SIGTERM shuts the server down gracefully with exit status 0."""
    server = McpSdkServer(tmp_path, lifetime_s=LIFETIME_S).start()
    assert server.stop() == 0


def test_stats_and_log_never_hold_tokens(sdk, http):
    """The server's stderr and /test/stats hold grant types and resources, never a token."""
    _client_id, tokens = _login(http, sdk)
    text = sdk.log() + str(sdk.stats())
    assert tokens["access_token"] not in text
    assert tokens["refresh_token"] not in text
