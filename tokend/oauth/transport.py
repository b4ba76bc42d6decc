"""Sending login-time OAuth requests, and the pieces the login builders and parsers share.

Owns `send`, the one bounded sender that `grants`, `device`, `discovery` and `registration`
share (no redirects followed, bodies capped, each exchange bounded in time), the endpoint check
for login-time URLs, the `ClientCredentials` a form POST authenticates with, and reading a JSON
object body. No clock and no logging here; messages name a host, never a full URL or a secret.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from tokend.config import ClientAuth
from tokend.errors import OAuthError, TransientError
from tokend.model import Secret
from tokend.oauth.protocol import (
    DESCRIPTION_LIMIT,
    USER_AGENT,
    add_client_auth,
    check_token_url,
    sanitise,
)

CODE_LIMIT = 64  # the longest provider `error` code quoted in a message
CONNECT_TIMEOUT_S = 10.0
TOTAL_TIMEOUT_S = 30.0
# A token response or a metadata document is a few KiB; a larger body is refused, not held.
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Who the client is at the token endpoint, and how it proves it (RFC 6749 §2.3)."""

    client_id: str
    client_auth: ClientAuth
    client_secret: Secret | None


async def send(
    http: httpx.AsyncClient,
    request: httpx.Request,
    *,
    connector: str,
    redact: tuple[str, ...] = (),
    read_body: bool = True,
    timeout_s: float = TOTAL_TIMEOUT_S,
    what: str | None = None,
) -> httpx.Response:
    """Send without following redirects, read at most MAX_BODY_BYTES, all within `timeout_s`.

    With `read_body=False` only the status and headers are kept (a probe of an endpoint that
    may answer with an endless stream). Raises TransientError for network errors, timeouts and
    oversized bodies; the reason names the host (and `what` it is, e.g. "token endpoint"),
    never the full URL or a secret.
    """
    host = request.url.host
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            response = await http.send(request, stream=True, follow_redirects=False)
            try:
                if read_body:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY_BYTES:
                            too_large = f"{what} response" if what else f"response from {host}"
                            raise TransientError(connector, f"{too_large} too large")
            finally:
                await response.aclose()
    except TimeoutError:
        reason = f"{what or host} timed out after {timeout_s:g}s"
        raise TransientError(connector, reason) from None
    except httpx.RequestError as exc:
        # The exception's text may name the URL (with its query): show the host only.
        text = str(exc).replace(str(request.url), host)
        detail = sanitise(text, DESCRIPTION_LIMIT, redact)
        target = f"the {what} {host}" if what else host
        reason = f"cannot reach {target}: {type(exc).__name__}"
        raise TransientError(connector, f"{reason} ({detail})" if detail else reason) from exc
    # The body is decoded already: drop the headers that describe its wire encoding.
    headers = [
        (key, value)
        for key, value in response.headers.multi_items()
        if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=bytes(body), request=request
    )


def check_endpoint(url: str, *, connector: str, what: str) -> None:
    """Refuse an endpoint that is not https (or http to loopback), as `check_token_url` does.

    Raises OAuthError(insecure_url) naming `what` ("authorization endpoint", ...).
    """
    try:
        check_token_url(url, connector=connector)
    except OAuthError:
        description = f"the {what} must be https (or http to loopback)"
        raise OAuthError(connector, "insecure_url", description) from None


def post_form(
    url: str,
    creds: ClientCredentials,
    form: dict[str, str],
    *,
    connector: str,
    what: str,
) -> httpx.Request:
    """A form POST to `url`, authenticated as `creds`; raises what `add_client_auth` raises."""
    check_endpoint(url, connector=connector, what=what)
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    add_client_auth(
        form,
        headers,
        client_id=creds.client_id,
        client_auth=creds.client_auth,
        client_secret=creds.client_secret,
        connector=connector,
    )
    return httpx.Request("POST", url, data=form, headers=headers)
