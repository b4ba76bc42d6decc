"""The OAuth 2.0 device authorization grant (RFC 8628) for `tokend login`.

Pure builders over `httpx.Request` and parsers over `httpx.Response`: the device authorization
request and its answer, and one token poll and its outcome. Sending is
`tokend.oauth.transport.send`'s; waiting between polls is the caller's. No clock and no logging
here; the device code is a `Secret`, and from a provider only `error` and `error_description`
are quoted, sanitised and truncated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import httpx

from tokend.errors import LoginError, TransientError
from tokend.model import Secret, TokenSet
from tokend.oauth.protocol import DESCRIPTION_LIMIT, json_object, parse_token_response, sanitise
from tokend.oauth.transport import CODE_LIMIT, ClientCredentials, post_form

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_DEVICE_INTERVAL_S = 5.0  # RFC 8628 §3.2: the default when the server names none


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAuthorization:
    """An RFC 8628 §3.2 device authorization response; `device_code` is a secret."""

    device_code: Secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float = DEFAULT_DEVICE_INTERVAL_S


def build_device_authorization(
    endpoint: str,
    creds: ClientCredentials,
    *,
    connector: str,
    scope: str | None,
    resource: str | None,
) -> httpx.Request:
    """The RFC 8628 §3.1 device authorization request (client authenticated as at the token
    endpoint). Raises OAuthError(insecure_url), SecretMissingError."""
    form: dict[str, str] = {}
    if scope is not None:
        form["scope"] = scope
    if resource is not None:
        form["resource"] = resource
    return post_form(
        endpoint, creds, form, connector=connector, what="device authorization endpoint"
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _refusal(data: Mapping[str, object], redact: tuple[str, ...]) -> str:
    code = sanitise(data["error"], CODE_LIMIT, redact)
    raw = data.get("error_description")
    return f"{code} ({sanitise(raw, DESCRIPTION_LIMIT, redact)})" if raw else code


def parse_device_authorization(response: httpx.Response, *, connector: str) -> DeviceAuthorization:
    """The RFC 8628 §3.2 answer: device code, user code, where to go, how long, how often.

    Raises TransientError (429, 5xx, unparseable or incomplete body), LoginError (the server
    refused: an RFC 6749 §5.2 error object).
    """
    status = response.status_code
    data = json_object(response)
    device_code = None if data is None else data.get("device_code")
    redact = (device_code,) if isinstance(device_code, str) and device_code else ()
    if status == 429 or status >= 500:
        raise TransientError(connector, f"device authorization endpoint answered HTTP {status}")
    if data is not None and isinstance(data.get("error"), str):
        reason = f"device authorization refused: {_refusal(data, redact)}"
        raise LoginError(connector, reason)
    if data is None or status != 200:
        reason = f"unusable response (HTTP {status}) from the device authorization endpoint"
        raise TransientError(connector, reason)
    user_code = data.get("user_code")
    # Google names it verification_url (pre-RFC draft); accept both.
    uri = data.get("verification_uri", data.get("verification_url"))
    complete = data.get("verification_uri_complete")
    expires_in = _number(data.get("expires_in"))
    raw_interval = data.get("interval")
    interval = DEFAULT_DEVICE_INTERVAL_S if raw_interval is None else _number(raw_interval)
    if (
        not isinstance(device_code, str)
        or not device_code
        or not isinstance(user_code, str)
        or not user_code
        or not isinstance(uri, str)
        or not uri
        or not (complete is None or isinstance(complete, str))
        or expires_in is None
        or interval is None
    ):
        reason = "device authorization response lacks or garbles a required field"
        raise TransientError(connector, reason)
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete or None,
        expires_in=expires_in,
        interval=interval,
    )


def build_device_token(
    token_endpoint: str,
    creds: ClientCredentials,
    *,
    connector: str,
    device_code: Secret,
    resource: str | None,
) -> httpx.Request:
    """The RFC 8628 §3.4 device access token request (one poll).

    Raises OAuthError(insecure_url), SecretMissingError.
    """
    form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code.reveal()}
    if resource is not None:
        form["resource"] = resource
    return post_form(token_endpoint, creds, form, connector=connector, what="token endpoint")


def parse_device_poll(
    response: httpx.Response,
    *,
    connector: str,
    obtained_at: datetime,
    default_lifetime: timedelta,
) -> TokenSet | Literal["pending", "slow_down"]:
    """One poll's outcome (RFC 8628 §3.5): the token set, or "pending" / "slow_down".

    The caller adds 5 s to its interval on "slow_down". Raises LoginError for `access_denied`
    and `expired_token`; otherwise what `parse_token_response` raises.
    """
    data = json_object(response)
    # GitHub answers pending polls with HTTP 200, so the error is read whatever the status.
    if data is not None and "access_token" not in data and isinstance(data.get("error"), str):
        code = data["error"]
        if code == "authorization_pending":
            return "pending"
        if code == "slow_down":
            return "slow_down"
        if code == "access_denied":
            raise LoginError(connector, "authorization was denied")
        if code == "expired_token":
            raise LoginError(
                connector, "the device code expired before authorization; start the login again"
            )
    return parse_token_response(
        response,
        connector=connector,
        obtained_at=obtained_at,
        previous=None,
        default_lifetime=default_lifetime,
    )
