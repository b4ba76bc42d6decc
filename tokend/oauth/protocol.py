"""OAuth 2.0 refresh protocol (RFC 6749 §5-6): pure request builders and response parsers.

No I/O and no clock: the caller passes the times (`obtained_at`, `received_at`), and
`tokend.oauth.client` sends what this module builds. Nothing here logs; nothing here puts a token,
a client secret or a response body into a message: from a provider only `error` and
`error_description` are quoted, sanitised and truncated.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import quote_plus

import httpx

from tokend import __version__
from tokend.config import ClientAuth, ConnectorConfig, is_loopback_host
from tokend.errors import InvalidGrantError, OAuthError, SecretMissingError, TransientError
from tokend.model import Secret, TokenSet

USER_AGENT = f"tokend/{__version__}"
# An `expires_in` beyond ten years is read as ten years: the token is refreshed every max_interval
# anyway, and absurd values (1e300) would overflow datetime arithmetic.
MAX_EXPIRES_IN_S = 10 * 365 * 86400

# RFC 6749 §5.2 codes that mean a human must act. `invalid_grant` (the refresh token is dead) is
# its own class; the rest say the client or its configuration is wrong (state `rejected`).
_REJECTED = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
    }
)
# GitHub answers a dead refresh token with HTTP 200 and this code instead of `invalid_grant`.
_INVALID_GRANT = frozenset({"invalid_grant", "bad_refresh_token"})
_EXPIRES_IN_TEXT = re.compile(r"\s*[0-9]{1,30}(\.[0-9]{1,30})?\s*")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
DESCRIPTION_LIMIT = 200
_ERROR_CODE_LIMIT = 64


def sanitise(text: object, limit: int, redact: tuple[str, ...]) -> str:
    """Provider text fit for a message: one line, printable, truncated, known secrets masked."""
    clean = _UNPRINTABLE.sub(" ", str(text)).strip()
    for secret in redact:
        clean = clean.replace(secret, "***")
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def secrets_of(token: TokenSet | None) -> tuple[str, ...]:
    """The token values to mask in messages (never empty: replacing "" would mangle the text)."""
    if token is None:
        return ()
    # reveal: only to find and mask these values in provider text.
    secrets = (token.access_token, token.refresh_token)
    return tuple(s.reveal() for s in secrets if s is not None and s.reveal())


def check_token_url(url: str, *, connector: str) -> None:
    """Refuse to send a grant anywhere but https, or plain http to a loopback host.

    `config` already checks this at load; this is defence in depth at the point of sending.
    Raises OAuthError(error="insecure_token_url").
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is not None and parsed.host:
        if parsed.scheme == "https":
            return
        if parsed.scheme == "http" and is_loopback_host(parsed.host):
            return
    raise OAuthError(
        connector, "insecure_token_url", "token_url must be https (or http to loopback)"
    )


def add_client_auth(
    form: dict[str, str],
    headers: dict[str, str],
    *,
    client_id: str,
    client_auth: ClientAuth,
    client_secret: Secret | None,
    connector: str,
) -> None:
    """Add RFC 6749 §2.3.1 client authentication to a token-endpoint-style request, in place.

    `none` sends `client_id` in the form; `client_secret_basic` an Authorization header;
    `client_secret_post` id and secret in the form. Raises SecretMissingError when a confidential
    client has no secret.
    """
    if client_auth == "none":
        form["client_id"] = client_id
        return
    if client_secret is None:
        raise SecretMissingError(
            f"{connector}: client_auth {client_auth} needs a client secret and none is "
            f"stored; run: tokend secret {connector}"
        )
    if client_auth == "client_secret_basic":
        # RFC 6749 §2.3.1: form-urlencode id and secret, then join with ':' and base64.
        pair = f"{quote_plus(client_id)}:{quote_plus(client_secret.reveal())}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    else:
        form["client_id"] = client_id
        form["client_secret"] = client_secret.reveal()


def build_refresh_request(
    conn: ConnectorConfig, refresh_token: Secret, client_secret: Secret | None
) -> httpx.Request:
    """The RFC 6749 §6 refresh request for `conn`.

    `scope` is never sent, so the grant keeps its original scope (§6 allows no widening and
    narrowing is not wanted); `resource` is sent when configured (RFC 8707). Client authentication
    follows `conn.client_auth` (§2.3.1). Raises SecretMissingError when a confidential client has
    no stored secret, OAuthError(insecure_token_url) for a non-https, non-loopback endpoint,
    OAuthError(not_discovered) when no token endpoint or client id is known yet.
    """
    token_url, client_id = conn.token_url, conn.client_id
    if token_url is None or client_id is None:
        # An issuer/mcp_url connector before `tokend login` discovered and registered it.
        reason = conn.needs_login or "no token endpoint or client is known yet"
        raise OAuthError(conn.name, "not_discovered", f"{reason}; run: tokend login {conn.name}")
    check_token_url(token_url, connector=conn.name)
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    if conn.resource is not None:
        form["resource"] = conn.resource
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    add_client_auth(
        form,
        headers,
        client_id=client_id,
        client_auth=conn.client_auth,
        client_secret=client_secret,
        connector=conn.name,
    )
    return httpx.Request("POST", token_url, data=form, headers=headers)


def _http_date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # HTTP-dates are GMT; an explicit "-0000" zone parses naive.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def server_clock_offset(response: httpx.Response, *, received_at: datetime) -> float | None:
    """Seconds the server's `Date` header is ahead (+) of or behind (-) `received_at`.

    None when the header is absent or unparseable. The header has one-second resolution.
    """
    server_now = _http_date(response.headers.get("Date"))
    return None if server_now is None else (server_now - received_at).total_seconds()


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    A date is measured against the response's own `Date` when it has one, so a skewed server
    clock does not distort the delay; else against `now`. Past dates give 0; garbage gives None.
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    until = _http_date(value)
    if until is None:
        return None
    reference = _http_date(response.headers.get("Date")) or now
    return max(0.0, (until - reference).total_seconds())


def _error_from_fields(
    data: Mapping[str, object],
    *,
    connector: str,
    status: int,
    retry_after: float | None,
    redact: tuple[str, ...],
) -> Exception:
    """The exception for an RFC 6749 §5.2 error object."""
    code = sanitise(data["error"], _ERROR_CODE_LIMIT, redact)
    raw = data.get("error_description")
    description = None if raw is None else sanitise(raw, DESCRIPTION_LIMIT, redact)
    if code in _INVALID_GRANT:
        return InvalidGrantError(connector, code, description, status)
    if code in _REJECTED:
        return OAuthError(connector, code, description, status)
    # An error code we do not know may be an extension meaning "try later" (`server_error`,
    # `temporarily_unavailable` and `slow_down` exist elsewhere in OAuth). Declaring a grant dead on
    # a guess would need a human for nothing; backing off is polite, and status shows the code.
    detail = f" ({description})" if description else ""
    reason = f"token endpoint answered HTTP {status}: {code}{detail}"
    return TransientError(connector, reason, retry_after=retry_after)


def parse_token_response(
    response: httpx.Response,
    *,
    connector: str,
    obtained_at: datetime,
    previous: TokenSet | None,
    default_lifetime: timedelta,
    received_at: datetime | None = None,
) -> TokenSet:
    """The token set in a token endpoint's response, or the error it stands for (RFC 6749 §5).

    `obtained_at` is when the request started; `received_at` (default `obtained_at`) anchors a
    `Retry-After` date when the response has no `Date`. Raises InvalidGrantError (`invalid_grant`),
    OAuthError (client refused, unsupported token type) or TransientError (429, 5xx, redirects,
    unknown errors, unparseable or incomplete bodies; `retry_after` set from the header).
    """
    status = response.status_code
    redact = secrets_of(previous)
    retry_after = _retry_after(response, obtained_at if received_at is None else received_at)
    if status == 429 or status >= 500:
        data = json_object(response)
        redact = _redact_for(data, redact)
        reason = f"token endpoint answered HTTP {status}"
        if data is not None and isinstance(data.get("error"), str):
            reason += f": {sanitise(data['error'], _ERROR_CODE_LIMIT, redact)}"
        raise TransientError(connector, reason, retry_after=retry_after)
    if 300 <= status < 400:
        reason = f"unexpected redirect (HTTP {status}) from the token endpoint"
        raise TransientError(connector, reason, retry_after=retry_after)
    data = json_object(response)
    if data is None:
        reason = f"unparseable response (HTTP {status}) from the token endpoint"
        raise TransientError(connector, reason, retry_after=retry_after)
    redact = _redact_for(data, redact)
    # Some providers (GitHub) send errors with a 2xx status; an `error` without a token is one.
    if isinstance(data.get("error"), str) and (status >= 400 or "access_token" not in data):
        raise _error_from_fields(
            data, connector=connector, status=status, retry_after=retry_after, redact=redact
        )
    if status >= 400:
        reason = f"token endpoint answered HTTP {status} without an OAuth error"
        raise TransientError(connector, reason, retry_after=retry_after)
    return token_set_from_fields(
        data,
        connector=connector,
        obtained_at=obtained_at,
        previous=previous,
        default_lifetime=default_lifetime,
    )


def _redact_for(data: Mapping[str, object] | None, redact: tuple[str, ...]) -> tuple[str, ...]:
    """`redact` plus the token values in the body itself: an error text may echo them."""
    if data is None:
        return redact
    found = (data.get("access_token"), data.get("refresh_token"))
    return redact + tuple(value for value in found if isinstance(value, str) and value)


def json_object(response: httpx.Response) -> Mapping[str, object] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        data = response.json()
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; [[[[… recurses
        return None
    return data if isinstance(data, dict) else None


def _expires_in(value: object, connector: str) -> float:
    """A positive, finite `expires_in` in seconds from an int, a float or a numeric string."""
    seconds: float | None = None
    if isinstance(value, str):
        if _EXPIRES_IN_TEXT.fullmatch(value):
            seconds = float(value)
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, int) and not isinstance(value, bool):  # JSON true is no duration
        # a 400-digit int (either sign) would overflow float()
        seconds = float(max(-1, min(value, MAX_EXPIRES_IN_S)))
    # Under a microsecond rounds to a zero timedelta: a token that expires as it is obtained.
    if seconds is None or not math.isfinite(seconds) or seconds < 1e-6:
        raise TransientError(connector, "response has a non-numeric or non-positive expires_in")
    return min(seconds, MAX_EXPIRES_IN_S)


def _token_type(value: object, connector: str) -> str:
    if value is None:
        # RFC 6749 §5.1 requires token_type; every server that omits it means Bearer.
        return "Bearer"
    if not isinstance(value, str):
        raise TransientError(connector, "response has a malformed token_type")
    if value.lower() != "bearer":
        # A MAC or DPoP token cannot be used as a bearer token by the jobs: provider mismatch.
        description = f"token_type {sanitise(value, 32, ())!r} is not Bearer"
        raise OAuthError(connector, "unsupported_token_type", description)
    return "Bearer"


def _scope(value: object, previous: TokenSet | None, connector: str) -> str | None:
    if value is None:
        return None if previous is None else previous.scope  # RFC 6749 §5.1: unchanged
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return " ".join(value)  # non-standard array form, seen in the wild
    raise TransientError(connector, "response has a malformed scope")


def token_set_from_fields(
    data: Mapping[str, object],
    *,
    connector: str,
    obtained_at: datetime,
    previous: TokenSet | None,
    default_lifetime: timedelta,
) -> TokenSet:
    """A token set from an RFC 6749 §5.1 JSON object (a refresh response, or `tokend import`).

    `expires_at` = `obtained_at` + `expires_in`; without `expires_in`, `default_lifetime` with
    `lifetime_assumed`. An omitted (or null or empty) `refresh_token` or `scope` keeps `previous`'s
    (§6); without `previous` the refresh token stays None and the grant simply cannot be refreshed.
    `generation` is 0: the store assigns it. Raises TransientError for a missing `access_token` or a
    bad `expires_in` (garbage: the old token is kept), OAuthError(unsupported_token_type) for a
    token type other than Bearer.
    """
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise TransientError(connector, "response has no access_token")
    token_type = _token_type(data.get("token_type"), connector)
    raw_expires_in = data.get("expires_in")
    if raw_expires_in is None:
        lifetime, assumed = default_lifetime, True
    else:
        lifetime, assumed = timedelta(seconds=_expires_in(raw_expires_in, connector)), False
    raw_refresh = data.get("refresh_token")
    refresh: Secret | None
    if raw_refresh is None or raw_refresh == "":
        refresh = None if previous is None else previous.refresh_token
    elif isinstance(raw_refresh, str):
        refresh = Secret(raw_refresh)
    else:
        raise TransientError(connector, "response has a malformed refresh_token")
    return TokenSet(
        access_token=Secret(access),
        refresh_token=refresh,
        token_type=token_type,
        scope=_scope(data.get("scope"), previous, connector),
        obtained_at=obtained_at,
        expires_at=obtained_at + lifetime,
        lifetime_assumed=assumed,
        generation=0,
    )
