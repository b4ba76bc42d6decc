"""Who a client is: configured, dynamically registered (RFC 7591) or described by a URL (CIMD).

`Clients` adds to `Provider` the metadata the login flows need about a client (redirect URIs,
grant types, authentication method), the registration endpoint, the fetching of Client ID
Metadata Documents, and the server's identity (issuer, protected resource, scopes). Stdlib only;
it never logs a token or a client secret.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tokend.authserver.provider import AUTH_METHODS, Provider, Reply, error_reply, new_token

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CODE_GRANT = "authorization_code"
GRANT_TYPES = frozenset({CODE_GRANT, "refresh_token", DEVICE_GRANT})
_MAX_DOCUMENT = 64 * 1024
_FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the login flows check about a client (its secret stays in `Provider._clients`)."""

    redirect_uris: tuple[str, ...]
    grant_types: frozenset[str]
    auth_method: str
    any_loopback: bool = False  # configured clients: any http loopback redirect URI will do

    def allows_redirect(self, uri: str) -> bool:
        """An exact match with a registered URI, or any loopback one for configured clients."""
        return uri in self.redirect_uris or (self.any_loopback and is_loopback_http(uri))


def is_loopback_http(uri: str) -> bool:
    """Whether `uri` is an http URL on a loopback host (RFC 8252 §7.3), without a fragment."""
    parts = urlsplit(uri)
    return parts.scheme == "http" and not parts.fragment and _is_loopback(parts.hostname or "")


def valid_redirect_uri(uri: object) -> bool:
    """A redirect URI we accept at registration: https anywhere, or http to loopback."""
    if not isinstance(uri, str):
        return False
    parts = urlsplit(uri)
    if parts.fragment or not parts.hostname:
        return False
    return parts.scheme == "https" or is_loopback_http(uri)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Clients(Provider):
    """Client metadata, RFC 7591 registration, CIMD, and the server's issuer and resource.

    Settable at run time: `registration` (serve /register), `cimd` (accept URL client ids),
    `issuer_path` (e.g. "/tenant"), `resource_scope` (the protected resource's scope).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.registration = True
        self.cimd = False
        self.issuer_path = ""
        self.resource_scope = "demo"
        self._info: dict[str, ClientInfo] = {}

    # -- identity ----------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The issuer identifier: the base URL plus `issuer_path`."""
        path = self.issuer_path.strip("/")
        return f"{self.url}/{path}" if path else self.url

    @property
    def mcp_url(self) -> str:
        """The protected resource's identifier (RFC 8707 / RFC 9728)."""
        return self.url + "/mcp"

    def _scopes_supported(self) -> list[str]:
        with self._lock:
            scopes = set(self._scopes)
        return sorted(scopes | set(self.resource_scope.split()))

    # -- client metadata ---------------------------------------------------------------------

    def _client_info(self, client_id: str) -> ClientInfo | None:
        """A known client's metadata (configured clients allow every grant), else None."""
        with self._lock:
            info = self._info.get(client_id)
        if info is not None or client_id not in self._clients:
            return info
        method = "none" if self._clients[client_id] is None else "client_secret_basic"
        return ClientInfo((), GRANT_TYPES, method, any_loopback=True)

    def _resolve_client(self, client_id: str) -> tuple[ClientInfo | None, str]:
        """The client's metadata, fetching its metadata document first when it is a URL."""
        if self.cimd and client_id.startswith(("https://", "http://")):
            return self._fetch_cimd(client_id)
        info = self._client_info(client_id)
        return info, "" if info is not None else "unknown client"

    def _fetch_cimd(self, url: str) -> tuple[ClientInfo | None, str]:
        """GET a Client ID Metadata Document and register the public client it describes."""
        parts = urlsplit(url)
        if parts.fragment or not (parts.scheme == "https" or is_loopback_http(url)):
            return None, "a client id URL must be https (or http on loopback)"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        try:
            with opener.open(request, timeout=_FETCH_TIMEOUT_S) as response:
                raw = response.read(_MAX_DOCUMENT + 1)
            doc = json.loads(raw) if len(raw) <= _MAX_DOCUMENT else None
        except (OSError, ValueError):
            return None, "the client metadata document could not be fetched or parsed"
        if not isinstance(doc, dict) or doc.get("client_id") != url:
            return None, "the client metadata document does not name this client_id"
        uris = doc.get("redirect_uris", [])
        if not isinstance(uris, list) or not all(valid_redirect_uri(u) for u in uris):
            return None, "the client metadata document has invalid redirect_uris"
        method = doc.get("token_endpoint_auth_method", "none")
        if method != "none":
            return None, "only public clients (token_endpoint_auth_method none) are supported"
        grants = doc.get("grant_types", [CODE_GRANT, "refresh_token"])
        if not isinstance(grants, list) or not set(grants) <= GRANT_TYPES:
            return None, "the client metadata document has unsupported grant_types"
        info = ClientInfo(tuple(uris), frozenset(grants), "none")
        with self._lock:
            self._clients[url] = None
            self._info[url] = info
        return info, ""

    # -- RFC 7591 dynamic registration -------------------------------------------------------

    def _register(self, body: bytes, content_type: str) -> Reply:
        """POST /register: validate the client metadata, answer 201 with the new client."""
        if content_type != "application/json":
            return _bad_metadata("the body must be application/json")
        try:
            meta = json.loads(body)
        except ValueError:
            return _bad_metadata("the body is not JSON")
        if not isinstance(meta, dict):
            return _bad_metadata("the body must be a JSON object")
        grants = meta.get("grant_types", [CODE_GRANT])
        if not isinstance(grants, list) or not grants or not set(grants) <= GRANT_TYPES:
            return _bad_metadata(f"grant_types must be a subset of {sorted(GRANT_TYPES)}")
        if meta.get("response_types", ["code"]) not in (["code"], []):
            return _bad_metadata('only response_types ["code"] is supported')
        method = meta.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in AUTH_METHODS:
            return _bad_metadata(f"token_endpoint_auth_method must be one of {AUTH_METHODS}")
        uris = meta.get("redirect_uris", [])
        if not isinstance(uris, list) or not all(valid_redirect_uri(u) for u in uris):
            return error_reply(
                400, "invalid_redirect_uri", "redirect_uris must be https or http on loopback"
            )
        if CODE_GRANT in grants and not uris:
            return error_reply(
                400, "invalid_redirect_uri", "authorization_code needs redirect_uris"
            )
        scope = meta.get("scope")
        if scope is not None and not isinstance(scope, str):
            return _bad_metadata("scope must be a space-separated string")
        client_id = "dcr_" + secrets.token_urlsafe(12)
        secret = None if method == "none" else new_token("cs_")
        answer = dict(meta)
        answer.update(
            client_id=client_id,
            client_id_issued_at=int(time.time()),
            redirect_uris=uris,
            grant_types=grants,
            response_types=["code"],
            token_endpoint_auth_method=method,
        )
        if secret is not None:
            answer.update(client_secret=secret, client_secret_expires_at=0)
        with self._lock:
            self._clients[client_id] = secret
            self._info[client_id] = ClientInfo(tuple(uris), frozenset(grants), method)
        return Reply(201, answer)


def _bad_metadata(description: str) -> Reply:
    return error_reply(400, "invalid_client_metadata", description)
