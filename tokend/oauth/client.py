"""Sending OAuth refresh requests: `OAuthClient` over an injected `httpx.AsyncClient`.

Builds and parses nothing itself (that is `tokend.oauth.protocol`); stamps `obtained_at` before
sending, bounds each exchange in time and body size, and turns network failures into
TransientError. This package and `alerts` are the only users of httpx. Nothing here logs; nothing
here puts a token, a client secret or a response body into a message.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from tokend.clock import Clock
from tokend.config import ConnectorConfig
from tokend.errors import InvalidGrantError, OAuthError
from tokend.model import Secret, TokenSet
from tokend.oauth.grants import build_revocation, parse_revocation
from tokend.oauth.protocol import (
    DESCRIPTION_LIMIT,
    USER_AGENT,
    build_refresh_request,
    check_token_url,
    parse_token_response,
    sanitise,
    secrets_of,
    server_clock_offset,
)
from tokend.oauth.transport import (
    CONNECT_TIMEOUT_S,
    MAX_BODY_BYTES,
    TOTAL_TIMEOUT_S,
    ClientCredentials,
    send,
)

__all__ = ["MAX_BODY_BYTES", "OAuthClient", "RefreshResult", "endpoint_of", "make_http_client"]


def endpoint_of(conn: ConnectorConfig) -> str:
    """`conn`'s token endpoint; OAuthError(not_discovered) before `tokend login` found one."""
    if conn.token_url is None:
        reason = conn.needs_login or "no token endpoint is known yet"
        raise OAuthError(conn.name, "not_discovered", f"{reason}; run: tokend login {conn.name}")
    return conn.token_url


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """A refreshed token set and how far the server's clock is ahead of ours (None if unknown)."""

    token: TokenSet
    clock_offset_s: float | None


def make_http_client(
    *, ca_file: Path | None = None, timeout_s: float = TOTAL_TIMEOUT_S
) -> httpx.AsyncClient:
    """An AsyncClient for token endpoints: TLS verified (by `ca_file` when given), no redirects.

    Connect timeout 10 s (or `timeout_s` if shorter), `timeout_s` for each read and write.
    Raises OSError or ssl.SSLError when `ca_file` cannot be loaded.
    """
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    return httpx.AsyncClient(
        verify=verify,
        timeout=timeout,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


class OAuthClient:
    """Sends refresh requests; one instance serves every connector.

    `http` serves connectors without a `ca_file`. A connector with one gets a client of its own,
    made on first use and kept per CA file (a TLS context is fixed per client, and building one per
    request would reload the CA bundle every time); `aclose` closes those, the caller closes `http`.
    """

    def __init__(
        self, http: httpx.AsyncClient, clock: Clock, *, total_timeout_s: float = TOTAL_TIMEOUT_S
    ) -> None:
        self._http = http
        self._clock = clock
        self._total_timeout_s = total_timeout_s
        self._by_ca_file: dict[Path, httpx.AsyncClient] = {}

    def _client_for(self, conn: ConnectorConfig) -> httpx.AsyncClient:
        if conn.ca_file is None:
            return self._http
        client = self._by_ca_file.get(conn.ca_file)
        if client is None:
            try:
                client = make_http_client(ca_file=conn.ca_file, timeout_s=self._total_timeout_s)
            except (OSError, ssl.SSLError) as exc:
                reason = sanitise(exc, DESCRIPTION_LIMIT, ())
                raise OAuthError(
                    conn.name, "invalid_ca_file", f"cannot load ca_file: {reason}"
                ) from exc
            self._by_ca_file[conn.ca_file] = client
        return client

    async def _send(
        self, conn: ConnectorConfig, request: httpx.Request, redact: tuple[str, ...]
    ) -> httpx.Response:
        """`transport.send` through `conn`'s client, within this client's timeout."""
        return await send(
            self._client_for(conn), request, connector=conn.name, redact=redact,
            timeout_s=self._total_timeout_s, what="token endpoint",
        )  # fmt: skip

    async def refresh(
        self, conn: ConnectorConfig, current: TokenSet, client_secret: Secret | None
    ) -> RefreshResult:
        """Refresh `current` at `conn`'s token endpoint (RFC 6749 §6).

        `obtained_at` is stamped before sending, so latency shortens the believed lifetime.
        A grant without a refresh token raises InvalidGrantError (`no_refresh_token`): like a dead
        refresh token, only a human re-authorizing can fix it. Otherwise raises what
        `build_refresh_request` and `parse_token_response` raise, and TransientError for network
        errors, timeouts and redirects.
        """
        if current.refresh_token is None:
            raise InvalidGrantError(
                conn.name,
                "no_refresh_token",
                f"the grant has no refresh token; run: tokend login {conn.name}",
            )
        request = build_refresh_request(conn, current.refresh_token, client_secret)
        obtained_at = self._clock.now()
        response = await self._send(conn, request, secrets_of(current))
        received_at = self._clock.now()
        token = parse_token_response(
            response,
            connector=conn.name,
            obtained_at=obtained_at,
            previous=current,
            default_lifetime=conn.refresh.default_lifetime,
            received_at=received_at,
        )
        return RefreshResult(token, server_clock_offset(response, received_at=received_at))

    async def probe(self, conn: ConnectorConfig) -> int:
        """GET the token endpoint and return the HTTP status: proves DNS, TCP and TLS work.

        Sends no grant, so nothing is consumed (for `tokend check`). Raises TransientError for
        network errors and timeouts, OAuthError(insecure_token_url) for a plain-http remote URL.
        """
        token_url = endpoint_of(conn)
        check_token_url(token_url, connector=conn.name)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        request = httpx.Request("GET", token_url, headers=headers)
        response = await self._send(conn, request, ())
        return response.status_code

    async def revoke(
        self,
        conn: ConnectorConfig,
        token: Secret,
        *,
        hint: Literal["refresh_token", "access_token"],
        client_secret: Secret | None,
    ) -> None:
        """Revoke `token` at `conn`'s revocation endpoint (RFC 7009).

        Raises TransientError (network, 5xx, 429) or OAuthError (refused, or no endpoint).
        """
        if conn.revocation_url is None or conn.client_id is None:
            raise OAuthError(conn.name, "no_revocation_endpoint", "the server offers none")
        creds = ClientCredentials(conn.client_id, conn.client_auth, client_secret)
        request = build_revocation(
            conn.revocation_url, creds, connector=conn.name, token=token, hint=hint
        )
        response = await self._send(conn, request, (token.reveal(),))
        parse_revocation(response, connector=conn.name, token=token)

    async def aclose(self) -> None:
        """Close the per-CA-file clients this object made (not the injected one)."""
        clients = list(self._by_ca_file.values())
        self._by_ca_file.clear()
        for client in clients:
            await client.aclose()
