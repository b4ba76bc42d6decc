"""Tests for tokend.oauth.registration: RFC 7591 requests, answers, errors, auth method choice."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.sites import Site
from tokend.errors import DiscoveryError
from tokend.oauth.device import DEVICE_CODE_GRANT
from tokend.oauth.discovery import ServerMetadata
from tokend.oauth.registration import (
    build_registration,
    choose_auth_method,
    parse_registration,
    register_client,
)

SECRET = "cs-CANARY-dcr-secret-4e7b"
ENDPOINT = "https://auth.example.com/register"


def meta(**changes: Any) -> ServerMetadata:
    fields: dict[str, Any] = {
        "issuer": "https://auth.example.com",
        "token_endpoint": "https://auth.example.com/token",
        "metadata_url": "https://auth.example.com/.well-known/oauth-authorization-server",
        **changes,
    }
    return ServerMetadata(**fields)


def answer(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("POST", ENDPOINT))


# -- build -----------------------------------------------------------------------------------


def test_build_registration_body() -> None:
    """The request is a JSON POST of the client metadata RFC 7591 §2 names."""
    request = build_registration(
        ENDPOINT,
        connector="c",
        redirect_uris=["http://127.0.0.1:5000/callback"],
        client_name="tokend",
        scope="mcp",
        grant_types=["authorization_code", "refresh_token"],
        auth_method="none",
    )
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "client_name": "tokend",
        "redirect_uris": ["http://127.0.0.1:5000/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "scope": "mcp",
    }


def test_build_registration_without_scope_or_code_grant() -> None:
    """No scope key without a scope; no response type without the code grant."""
    request = build_registration(
        ENDPOINT,
        connector="c",
        redirect_uris=[],
        client_name="tokend",
        scope=None,
        grant_types=[DEVICE_CODE_GRANT],
        auth_method="client_secret_basic",
    )
    body = json.loads(request.content)
    assert "scope" not in body
    assert body["response_types"] == []


# -- parse -----------------------------------------------------------------------------------


def test_parse_confidential_client() -> None:
    """A 201 with id, secret, method and expiry is read; the secret is a Secret."""
    found = parse_registration(
        answer(
            201,
            {
                "client_id": "id-1",
                "client_secret": SECRET,
                "token_endpoint_auth_method": "client_secret_post",
                "client_secret_expires_at": 1_900_000_000,
            },
        ),
        connector="c",
    )
    assert found.client_id == "id-1"
    assert found.client_secret is not None
    assert found.client_secret.reveal() == SECRET
    assert SECRET not in repr(found)
    assert found.client_auth == "client_secret_post"
    assert found.client_secret_expires_at == datetime.fromtimestamp(1_900_000_000, tz=UTC)


@pytest.mark.parametrize(
    ("body", "auth"),
    [
        ({"client_id": "id", "client_secret": SECRET}, "client_secret_basic"),
        ({"client_id": "id"}, "none"),
        ({"client_id": "id", "client_secret": SECRET, "client_secret_expires_at": 0}, None),
    ],
)
def test_parse_infers_method_and_expiry(body: dict[str, object], auth: str | None) -> None:
    """Without a method the secret decides (basic or none); expiry 0 means never."""
    found = parse_registration(answer(200, body), connector="c")
    if auth is not None:
        assert found.client_auth == auth
    assert found.client_secret_expires_at is None


@pytest.mark.parametrize(
    ("status", "body", "pattern", "transient"),
    [
        (
            400,
            {"error": "invalid_redirect_uri", "error_description": "no loopback"},
            r"refused: invalid_redirect_uri \(no loopback\)",
            False,
        ),
        (
            400,
            {
                "error": "invalid_client_metadata",
                "error_description": f"x {SECRET}",
                "client_secret": SECRET,
            },
            "invalid_client_metadata",
            False,
        ),
        (201, {"client_secret": SECRET}, "no client_id", False),
        (201, {"client_id": "id", "token_endpoint_auth_method": "private_key_jwt"}, "lacks", False),
        (
            201,
            {"client_id": "id", "token_endpoint_auth_method": "client_secret_post"},
            "no client_secret",
            False,
        ),
        (
            201,
            {"client_id": "id", "client_secret": SECRET, "client_secret_expires_at": "soon"},
            "client_secret_expires_at",
            False,
        ),
        (404, {"detail": "no"}, "unusable", False),
        (503, {}, "HTTP 503", True),
        (429, {}, "HTTP 429", True),
    ],
)
def test_parse_errors(status: int, body: object, pattern: str, transient: bool) -> None:
    """Refusals name error and description; bad answers say what is missing; 5xx is transient."""
    with pytest.raises(DiscoveryError, match=pattern) as info:
        parse_registration(answer(status, body), connector="c")
    assert info.value.transient is transient
    assert SECRET not in str(info.value)
    assert ENDPOINT in str(info.value)


def test_parse_non_json() -> None:
    """An HTML answer is unusable, even with a 201."""
    response = httpx.Response(201, content=b"<html>ok</html>")
    with pytest.raises(DiscoveryError, match="unusable"):
        parse_registration(response, connector="c")


# -- choose_auth_method ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listed", "chosen"),
    [
        (("client_secret_basic",), "client_secret_basic"),
        (("none", "client_secret_post", "client_secret_basic"), "client_secret_post"),
        (("none", "client_secret_basic"), "client_secret_basic"),
        (("none",), "none"),
        (("private_key_jwt",), "client_secret_basic"),
    ],
)
def test_choose_auth_method(listed: tuple[str, ...], chosen: str) -> None:
    """Post beats basic beats none among what the server lists; else the RFC default."""
    assert choose_auth_method(meta(token_endpoint_auth_methods_supported=listed)) == chosen


# -- register_client over a loopback server --------------------------------------------------


@pytest.mark.anyio
async def test_register_client_sends_and_parses(site: Site, http: httpx.AsyncClient) -> None:
    """register_client posts the metadata with the device grant when asked, and reads the client."""
    site.json(
        "POST /register",
        {"client_id": "new-id", "token_endpoint_auth_method": "none"},
        status=201,
    )
    found = await register_client(
        meta(
            registration_endpoint=f"{site.base}/register",
            token_endpoint_auth_methods_supported=("none",),
        ),
        http,
        connector="c",
        redirect_uris=["http://127.0.0.1:5000/callback"],
        scope="mcp",
        want_device=True,
    )
    assert found.client_id == "new-id"
    assert found.client_auth == "none"
    sent = json.loads(site.requests[0][3])
    assert sent["grant_types"] == ["authorization_code", "refresh_token", DEVICE_CODE_GRANT]
    assert sent["token_endpoint_auth_method"] == "none"
    assert sent["client_name"] == "tokend"


@pytest.mark.anyio
async def test_register_client_without_endpoint(http: httpx.AsyncClient) -> None:
    """A server without a registration endpoint is a configuration problem, not transient."""
    with pytest.raises(DiscoveryError, match="no dynamic client registration") as info:
        await register_client(
            meta(), http, connector="c", redirect_uris=[], scope=None, want_device=False
        )
    assert not info.value.transient


@pytest.mark.anyio
async def test_register_client_network_error_is_transient(http: httpx.AsyncClient) -> None:
    """An unreachable registration endpoint gives a transient DiscoveryError."""
    closed = Site()
    base = closed.base
    closed.close()
    with pytest.raises(DiscoveryError) as info:
        await register_client(
            meta(registration_endpoint=f"{base}/register"),
            http,
            connector="c",
            redirect_uris=[],
            scope=None,
            want_device=False,
        )
    assert info.value.transient


@pytest.mark.anyio
async def test_register_client_refuses_insecure_endpoint(http: httpx.AsyncClient) -> None:
    """A plain-http remote registration endpoint is refused before sending."""
    with pytest.raises(DiscoveryError, match="must be https"):
        await register_client(
            meta(registration_endpoint="http://auth.example.com/register"),
            http,
            connector="c",
            redirect_uris=[],
            scope=None,
            want_device=False,
        )
