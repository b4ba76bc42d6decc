"""OAuth 2.0 Dynamic Client Registration (RFC 7591) for `tokend login`.

`build_registration` and `parse_registration` are pure; `register_client` sends through an
injected `httpx.AsyncClient`. A registered client secret is a `Secret` from the moment it is
parsed; nothing here logs, and no message carries the secret or the response body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from tokend.config import ClientAuth
from tokend.errors import DiscoveryError, OAuthError, TransientError
from tokend.model import Secret
from tokend.oauth.device import DEVICE_CODE_GRANT
from tokend.oauth.discovery import ServerMetadata
from tokend.oauth.protocol import DESCRIPTION_LIMIT, USER_AGENT, sanitise
from tokend.oauth.transport import check_endpoint, send

# Our preference among the methods we can do: a secret kept in the keyring beats none.
# Post first: it is what MCP clients register with, and some servers (the MCP Python SDK's) want
# `client_id` in the form even with HTTP Basic, which RFC 6749 §2.3.1 does not put there.
_PREFERENCE: tuple[ClientAuth, ...] = ("client_secret_post", "client_secret_basic", "none")
_METHODS: dict[str, ClientAuth] = {method: method for method in _PREFERENCE}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRegistration:
    """The client a server registered for us (RFC 7591 §3.2.1)."""

    client_id: str
    client_secret: Secret | None
    client_auth: ClientAuth
    client_secret_expires_at: datetime | None  # None: never (RFC 7591's 0), or no secret


def choose_auth_method(meta: ServerMetadata) -> ClientAuth:
    """The client authentication method to register: post, else basic, else none.

    Among what the server lists; when it lists none of them (only `private_key_jwt`, say),
    `client_secret_basic`, the RFC 8414 default, and the server will say no.
    """
    for method in _PREFERENCE:
        if method in meta.token_endpoint_auth_methods_supported:
            return method
    return "client_secret_basic"


def build_registration(
    endpoint: str,
    *,
    connector: str,
    redirect_uris: Sequence[str],
    client_name: str,
    scope: str | None,
    grant_types: Sequence[str],
    auth_method: ClientAuth,
) -> httpx.Request:
    """The RFC 7591 §3.1 registration request (JSON client metadata).

    Raises OAuthError(insecure_url) for an endpoint that is neither https nor loopback http.
    """
    check_endpoint(endpoint, connector=connector, what="registration endpoint")
    metadata: dict[str, object] = {
        "client_name": client_name,
        "redirect_uris": list(redirect_uris),
        "grant_types": list(grant_types),
        "response_types": ["code"] if "authorization_code" in grant_types else [],
        "token_endpoint_auth_method": auth_method,
    }
    if scope is not None:
        metadata["scope"] = scope
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    return httpx.Request("POST", endpoint, json=metadata, headers=headers)


def _expiry(value: object, url: str, connector: str) -> datetime | None:
    if value is None or value == 0:
        return None  # RFC 7591 §3.2.1: 0 means the secret does not expire
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 40:
        raise DiscoveryError(
            connector, f"registration at {url}: malformed client_secret_expires_at"
        )
    return datetime.fromtimestamp(value, tz=UTC)


def parse_registration(response: httpx.Response, *, connector: str) -> ClientRegistration:
    """The registered client in an RFC 7591 §3.2.1 answer (201, or 200 from lenient servers).

    Without a `token_endpoint_auth_method` in the answer, the method is read off the secret:
    one given means `client_secret_basic` (the RFC default), none means `none`. Raises
    DiscoveryError: transient for 429 and 5xx; otherwise naming the RFC 7591 §3.2.2 error and its
    description, or what is missing (client_id, a secret the method needs, a method we lack).
    """
    try:
        url = str(response.request.url)
    except RuntimeError:  # a Response built without its request (tests, or a caller's own)
        url = "the server"
    status = response.status_code
    try:
        data = response.json()
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        data = None
    raw_secret = None if data is None else data.get("client_secret")
    redact = (raw_secret,) if isinstance(raw_secret, str) and raw_secret else ()
    if status == 429 or status >= 500:
        reason = f"registration at {url} answered HTTP {status}; try again later"
        raise DiscoveryError(connector, reason, transient=True)
    if data is not None and isinstance(data.get("error"), str) and status not in (200, 201):
        code = sanitise(data["error"], 64, redact)
        raw = data.get("error_description")
        detail = f" ({sanitise(raw, DESCRIPTION_LIMIT, redact)})" if raw else ""
        raise DiscoveryError(connector, f"registration at {url} refused: {code}{detail}")
    if data is None or status not in (200, 201):
        reason = f"registration at {url} gave an unusable answer (HTTP {status})"
        raise DiscoveryError(connector, reason)
    client_id = data.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise DiscoveryError(connector, f"registration at {url} returned no client_id")
    if raw_secret is not None and (not isinstance(raw_secret, str) or not raw_secret):
        raw_secret = None
    secret = None if raw_secret is None else Secret(raw_secret)
    method = data.get("token_endpoint_auth_method")
    if method is None:
        method = "none" if secret is None else "client_secret_basic"
    auth = _METHODS.get(method) if isinstance(method, str) else None
    if auth is None:
        shown = sanitise(method, 64, redact)
        reason = f"registration at {url} chose client authentication {shown!r}, which tokend lacks"
        raise DiscoveryError(connector, reason)
    if auth != "none" and secret is None:
        reason = f"registration at {url} returned no client_secret for {auth}"
        raise DiscoveryError(connector, reason)
    return ClientRegistration(
        client_id=client_id,
        client_secret=secret,
        client_auth=auth,
        client_secret_expires_at=(
            None
            if secret is None
            else _expiry(data.get("client_secret_expires_at"), url, connector)
        ),
    )


async def register_client(
    meta: ServerMetadata,
    http: httpx.AsyncClient,
    *,
    connector: str,
    redirect_uris: Sequence[str],
    client_name: str = "tokend",
    scope: str | None,
    want_device: bool,
) -> ClientRegistration:
    """Register tokend at `meta`'s registration endpoint (RFC 7591).

    Asks for the authorization code and refresh token grants, plus the device grant when
    `want_device`, and the auth method `choose_auth_method` picks. Raises DiscoveryError (no
    registration endpoint, refused, unusable answer; transient for network errors, 429, 5xx).
    """
    if meta.registration_endpoint is None:
        reason = (
            f"{meta.issuer} offers no dynamic client registration; "
            "set client_id (and run: tokend secret) in the connector's configuration"
        )
        raise DiscoveryError(connector, reason)
    grant_types = ["authorization_code", "refresh_token"]
    if want_device:
        grant_types.append(DEVICE_CODE_GRANT)
    try:
        request = build_registration(
            meta.registration_endpoint,
            connector=connector,
            redirect_uris=redirect_uris,
            client_name=client_name,
            scope=scope,
            grant_types=grant_types,
            auth_method=choose_auth_method(meta),
        )
    except OAuthError as exc:
        raise DiscoveryError(connector, exc.description or exc.error) from None
    try:
        response = await send(http, request, connector=connector)
    except TransientError as exc:
        raise DiscoveryError(connector, exc.reason, transient=True) from exc
    return parse_registration(response, connector=connector)
