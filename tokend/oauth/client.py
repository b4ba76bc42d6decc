"""Sending OAuth refresh requests: `OAuthClient` over an injected `httpx.AsyncClient`.

Builds and parses nothing itself (that is `tokend.oauth.protocol`); stamps `obtained_at` before
sending, bounds each exchange in time and body size, and turns network failures into
TransientError. This package and `alerts` are the only users of httpx. Nothing here logs; nothing
here puts a token, a client secret or a response body into a message.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from tokend.clock import Clock
from tokend.config import ConnectorConfig
from tokend.errors import InvalidGrantError, OAuthError, TransientError
from tokend.model import Secret, TokenSet
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

CONNECT_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 30.0
# A token response is a few KiB; a larger body is refused rather than held in memory.
MAX_BODY_BYTES = 1 << 20


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
        """Send without following redirects, read at most MAX_BODY_BYTES, all within the timeout.

        Raises TransientError for network errors, timeouts and oversized bodies.
        """
        client = self._client_for(conn)
        try:
            async with asyncio.timeout(self._total_timeout_s):
                response = await client.send(request, stream=True, follow_redirects=False)
                try:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY_BYTES:
                            raise TransientError(conn.name, "token endpoint response too large")
                finally:
                    await response.aclose()
        except TimeoutError:
            reason = f"token endpoint timed out after {self._total_timeout_s:g}s"
            raise TransientError(conn.name, reason) from None
        except httpx.RequestError as exc:
            # The exception's text may name the URL; show the host only, and mask the secrets.
            text = str(exc).replace(str(request.url), request.url.host)
            detail = sanitise(text, DESCRIPTION_LIMIT, redact)
            reason = f"cannot reach the token endpoint {request.url.host}: {type(exc).__name__}"
            raise TransientError(conn.name, f"{reason} ({detail})" if detail else reason) from exc
        # The body is decoded already: drop the headers that describe its wire encoding.
        headers = [
            (key, value)
            for key, value in response.headers.multi_items()
            if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

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
        check_token_url(conn.token_url, connector=conn.name)
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        request = httpx.Request("GET", conn.token_url, headers=headers)
        response = await self._send(conn, request, ())
        return response.status_code

    async def aclose(self) -> None:
        """Close the per-CA-file clients this object made (not the injected one)."""
        clients = list(self._by_ca_file.values())
        self._by_ca_file.clear()
        for client in clients:
            await client.aclose()
