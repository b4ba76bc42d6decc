"""tokend's access tokens for Python jobs: an `httpx.Auth` and two standard-library helpers.

Copy this file beside your job: it is not part of the tokend package and imports nothing from it.
`tokend_token` and `urlopen_with_token` need only the standard library; `TokendAuth` needs httpx
and exists only where httpx can be imported.

    import httpx
    from tokend_auth import TokendAuth

    with httpx.Client(auth=TokendAuth("github")) as client:
        client.get("https://api.github.com/user")

    from tokend_auth import urlopen_with_token

    with urlopen_with_token("https://api.github.com/user", "github") as response:
        body = response.read()

Tokens come from tokend's unix socket: `socket_path`, else $TOKEND_SOCKET, else
/run/tokend/tokend.sock. `TokendAuth` and `urlopen_with_token` keep the token in memory for a short
while (at most `max_age_s`, and never past half of its remaining life, so a kept token is always
well inside its lifetime); it is never written anywhere and never logged. On a 401 they read the
token again from tokend, bypassing that memory, and if tokend now serves a different one (it
refreshed, or a new grant was installed) they send the request once more. A 401 for the very token
tokend still serves is returned as it is: sending it again would only be refused again.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass
from urllib.parse import quote

try:
    import anyio
    import httpx

    _HAS_HTTPX = True
except ImportError:  # the standard-library helpers work without httpx
    _HAS_HTTPX = False

__all__ = ["DEFAULT_SOCKET", "TokenUnavailableError", "tokend_token", "urlopen_with_token"]
if _HAS_HTTPX:
    __all__ += ["TokendAuth"]

DEFAULT_SOCKET = "/run/tokend/tokend.sock"
_LOOKUP_TIMEOUT_S = 20.0  # tokend may wait up to 10 s for an on-demand refresh before answering
_MAX_AGE_S = 60.0

# The exit code `tokend exec` uses for each error, so a job can `sys.exit(exc.exit_code)`.
_EXIT_CODES = {
    "needs_reauth": 10,
    "bad_request": 64,
    "daemon_unavailable": 69,
    "temporarily_unavailable": 75,
    "forbidden": 77,
    "unknown_connector": 78,
}


class TokenUnavailableError(Exception):
    """tokend could not serve a token; `error` is its error code (`needs_reauth`, ...)."""

    def __init__(
        self, connector: str, error: str, description: str, *, retry_after: int | None = None
    ) -> None:
        self.connector = connector
        self.error = error
        self.description = description
        self.retry_after = retry_after
        super().__init__(f"tokend: {connector}: {description}")

    @property
    def exit_code(self) -> int:
        """The exit code `tokend exec` would use: 10 re-authorize, 69 daemon down, 75 later..."""
        return _EXIT_CODES.get(self.error, 1)


# ----------------------------------------------------------------------------- the socket


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over tokend's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("tokend", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True, slots=True)
class _Served:
    """One answer of tokend's token endpoint."""

    access_token: str
    scheme: str
    expires_in: float


def _socket_path(socket_path: str | None) -> str:
    return socket_path or os.environ.get("TOKEND_SOCKET") or DEFAULT_SOCKET


def _lookup(connector: str, socket_path: str | None, min_ttl: float | None) -> _Served:
    """Ask tokend for the connector's token; raises TokenUnavailableError."""
    path = _socket_path(socket_path)
    query = f"?min_ttl={min_ttl:g}" if min_ttl else ""
    conn = _UnixHTTPConnection(path, _LOOKUP_TIMEOUT_S)
    try:
        conn.request(
            "GET",
            f"/v1/connectors/{quote(connector, safe='')}/token{query}",
            headers={"Host": "tokend", "Accept": "application/json"},
        )
        response = conn.getresponse()
        status, data = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise TokenUnavailableError(
            connector,
            "daemon_unavailable",
            f"no answer from tokend at {path} ({type(exc).__name__}); is it running?",
        ) from None
    finally:
        conn.close()
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise TokenUnavailableError(
            connector, "internal_error", f"tokend answered HTTP {status} without a JSON object"
        )
    if status != 200:
        retry_after = body.get("retry_after")
        raise TokenUnavailableError(
            connector,
            str(body.get("error", "internal_error")),
            str(body.get("error_description", f"tokend answered HTTP {status}")),
            retry_after=retry_after if isinstance(retry_after, int) else None,
        )
    token = body.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenUnavailableError(connector, "internal_error", "tokend answered without a token")
    scheme = body.get("token_type")
    # RFC 6750 §2.1 spells the scheme "Bearer"; some providers answer token_type "bearer", and
    # some resource servers compare the scheme case-sensitively.
    if not isinstance(scheme, str) or not scheme or scheme.lower() == "bearer":
        scheme = "Bearer"
    expires_in = body.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, int | float) else 0.0
    return _Served(token, scheme, lifetime)


def tokend_token(
    connector: str, socket_path: str | None = None, min_ttl: float | None = None
) -> str:
    """The connector's current access token, straight from tokend (nothing kept in memory).

    `min_ttl` (seconds): have tokend refresh first if the token would expire sooner.
    Raises TokenUnavailableError when tokend cannot serve one.
    """
    return _lookup(connector, socket_path, min_ttl).access_token


# ----------------------------------------------------------------------------- kept tokens


class _Authorization:
    """One connector's `Authorization` value, kept for a short while; safe across threads."""

    def __init__(
        self, connector: str, socket_path: str | None, min_ttl: float | None, max_age_s: float
    ) -> None:
        self.connector = connector
        self.socket_path = socket_path
        self.min_ttl = min_ttl
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._value: str | None = None
        self._fresh_until = 0.0

    def value(self) -> str:
        """The kept value while it is fresh, else a new one from tokend."""
        with self._lock:
            if self._value is not None and time.monotonic() < self._fresh_until:
                return self._value
        return self._fetch()

    def reread(self, rejected: str) -> str | None:
        """A value fresh from tokend after `rejected` got a 401; None if tokend serves the same."""
        value = self._fetch()
        return None if value == rejected else value

    def _fetch(self) -> str:
        asked_at = time.monotonic()
        served = _lookup(self.connector, self.socket_path, self.min_ttl)
        keep = min(self.max_age_s, served.expires_in / 2)
        if self.min_ttl:
            keep = min(keep, served.expires_in - self.min_ttl)
        value = f"{served.scheme} {served.access_token}"
        with self._lock:
            self._value, self._fresh_until = value, asked_at + keep
        return value


_SHARED: dict[tuple[str, str, float | None], _Authorization] = {}
_SHARED_LOCK = threading.Lock()


def _shared(connector: str, socket_path: str | None, min_ttl: float | None) -> _Authorization:
    key = (_socket_path(socket_path), connector, min_ttl)
    with _SHARED_LOCK:
        kept = _SHARED.get(key)
        if kept is None:
            kept = _SHARED[key] = _Authorization(connector, key[0], min_ttl, _MAX_AGE_S)
        return kept


# ----------------------------------------------------------------------------- urllib


def urlopen_with_token(
    url: str | urllib.request.Request,
    connector: str,
    *,
    socket_path: str | None = None,
    min_ttl: float | None = None,
    timeout: float = 60.0,
) -> http.client.HTTPResponse:
    """`urllib.request.urlopen` with the connector's token; on a 401, re-read once, retry once.

    `url` is an http(s) URL or a `Request`; a request body must be bytes, so it can be sent
    twice. The header is not carried over to redirects (it could leak to another host).
    Raises TokenUnavailableError when tokend cannot serve a token, and what urlopen raises
    (`HTTPError` for a final status of 400 or more, `URLError`).
    """
    if not isinstance(url, urllib.request.Request):
        url = urllib.request.Request(url)  # noqa: S310  # the scheme is checked just below
    request = url
    if request.type not in ("http", "https"):
        raise ValueError(f"urlopen_with_token: not an http(s) URL: {request.type}:")
    authorization = _shared(connector, socket_path, min_ttl)
    value = authorization.value()
    try:
        return _open(request, value, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise
        fresh = authorization.reread(value)
        if fresh is None:
            raise
        exc.close()
    return _open(request, fresh, timeout)


def _open(request: urllib.request.Request, value: str, timeout: float) -> http.client.HTTPResponse:
    request.remove_header("Authorization")
    # "Unredirected": urllib copies ordinary headers to the target of a redirect, whatever host
    # that is; this one stays with the request it was meant for.
    request.add_unredirected_header("Authorization", value)
    # S310 is about file: and custom schemes; the caller let through http(s) only.
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    return response


# ----------------------------------------------------------------------------- httpx

if _HAS_HTTPX:

    class TokendAuth(httpx.Auth):
        """httpx authentication with the connector's token; on a 401, re-read once, retry once.

        `min_ttl` (seconds): have tokend refresh first if the token would expire sooner.
        `max_age_s`: how long a token is reused before tokend is asked again (0: every request).
        Requests raise TokenUnavailableError when tokend cannot serve a token. With
        `httpx.AsyncClient`, the lookups run in a worker thread, off the event loop.
        """

        requires_request_body = True  # a retried request must be able to send its body again

        def __init__(
            self,
            connector: str,
            socket_path: str | None = None,
            *,
            min_ttl: float | None = None,
            max_age_s: float = _MAX_AGE_S,
        ) -> None:
            self._authorization = _Authorization(connector, socket_path, min_ttl, max_age_s)

        def auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            value = self._authorization.value()
            request.headers["Authorization"] = value
            response = yield request
            if response.status_code != 401:
                return
            fresh = self._authorization.reread(value)
            if fresh is not None:
                request.headers["Authorization"] = fresh
                yield request

        async def async_auth_flow(
            self, request: httpx.Request
        ) -> AsyncGenerator[httpx.Request, httpx.Response]:
            await request.aread()
            value = await anyio.to_thread.run_sync(self._authorization.value)
            request.headers["Authorization"] = value
            response = yield request
            if response.status_code != 401:
                return
            fresh = await anyio.to_thread.run_sync(self._authorization.reread, value)
            if fresh is not None:
                request.headers["Authorization"] = fresh
                yield request
