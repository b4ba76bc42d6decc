"""Tests for tokend.oauth.protocol: refresh request building and token response parsing."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import httpx
import pytest

from tests.fakes import (
    CLIENT_SECRET,
    HOUR,
    NEW_ACCESS,
    NEW_REFRESH,
    OLD_ACCESS,
    OLD_REFRESH,
    PREVIOUS,
    T0,
)
from tokend import __version__
from tokend.config import ConnectorConfig
from tokend.errors import (
    InvalidGrantError,
    OAuthError,
    SecretMissingError,
    TransientError,
)
from tokend.model import Secret, TokenSet
from tokend.oauth.protocol import (
    MAX_EXPIRES_IN_S,
    build_refresh_request,
    check_token_url,
    parse_token_response,
    server_clock_offset,
    token_set_from_fields,
)


def connector(**changes: Any) -> ConnectorConfig:
    base = ConnectorConfig(
        name="github", token_url="https://auth.example.com/oauth/token", client_id="abc123"
    )
    return replace(base, **changes)


def form_of(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode(), keep_blank_values=True)


def parse(response: httpx.Response, previous: TokenSet | None = PREVIOUS, **kw: Any) -> TokenSet:
    return parse_token_response(
        response, connector="github", obtained_at=T0, previous=previous, default_lifetime=HOUR, **kw
    )


def ok_body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "access_token": NEW_ACCESS,
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": NEW_REFRESH,
        "scope": "repo",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _OMIT}


_OMIT = object()


# -- check_token_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example.com/token",
        "http://127.0.0.1:8080/token",
        "http://127.9.9.9/token",
        "http://localhost/token",
        "http://LOCALHOST:1/token",
        "http://[::1]:8080/token",
    ],
)
def test_check_token_url_accepts_https_and_loopback_http(url: str) -> None:
    """https anywhere and plain http to a loopback host are allowed."""
    check_token_url(url, connector="github")


@pytest.mark.parametrize(
    "url",
    [
        "http://auth.example.com/token",
        "http://10.0.0.1/token",
        "ftp://auth.example.com/token",
        "https:///token",
        "not a url",
        "https://auth.example.com:port/token",
    ],
)
def test_check_token_url_refuses_plain_http_and_junk(url: str) -> None:
    """Plain http to a remote host, other schemes and unparseable URLs are refused."""
    with pytest.raises(OAuthError) as info:
        check_token_url(url, connector="github")
    assert info.value.error == "insecure_token_url"
    assert info.value.connector == "github"


# -- build_refresh_request -------------------------------------------------------------------


def test_build_basic_auth_form_urlencodes_id_and_secret() -> None:
    """client_secret_basic form-urlencodes id and secret (':' and non-ASCII) before base64."""
    conn = connector(client_id="my:client id", client_auth="client_secret_basic")
    request = build_refresh_request(conn, Secret(OLD_REFRESH), Secret("sé:cret+/x"))
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    decoded = base64.b64decode(encoded).decode("ascii")
    assert decoded == "my%3Aclient+id:s%C3%A9%3Acret%2B%2Fx"
    raw_id, _, raw_secret = decoded.partition(":")
    assert (unquote_plus(raw_id), unquote_plus(raw_secret)) == ("my:client id", "sé:cret+/x")
    form = form_of(request)
    assert form == {"grant_type": ["refresh_token"], "refresh_token": [OLD_REFRESH]}


def test_build_request_method_url_and_headers() -> None:
    """The refresh is a form POST to token_url accepting JSON, with a tokend User-Agent."""
    request = build_refresh_request(connector(), Secret(OLD_REFRESH), Secret(CLIENT_SECRET))
    assert request.method == "POST"
    assert str(request.url) == "https://auth.example.com/oauth/token"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == f"tokend/{__version__}"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_build_client_secret_post_puts_credentials_in_the_body() -> None:
    """client_secret_post sends client_id and client_secret in the form, no Authorization."""
    conn = connector(client_auth="client_secret_post")
    request = build_refresh_request(conn, Secret(OLD_REFRESH), Secret(CLIENT_SECRET))
    assert "Authorization" not in request.headers
    form = form_of(request)
    assert form["client_id"] == ["abc123"]
    assert form["client_secret"] == [CLIENT_SECRET]
    assert form["grant_type"] == ["refresh_token"]


def test_build_public_client_sends_only_client_id() -> None:
    """client_auth none sends client_id in the form and no secret, even if one is stored."""
    conn = connector(client_auth="none")
    for secret in (None, Secret(CLIENT_SECRET)):
        request = build_refresh_request(conn, Secret(OLD_REFRESH), secret)
        assert "Authorization" not in request.headers
        form = form_of(request)
        assert form["client_id"] == ["abc123"]
        assert "client_secret" not in form


def test_build_sends_resource_only_when_configured() -> None:
    """`resource` (RFC 8707) is in the form when configured, absent otherwise."""
    with_resource = connector(resource="https://mcp.example.com/mcp")
    request = build_refresh_request(with_resource, Secret(OLD_REFRESH), Secret(CLIENT_SECRET))
    assert form_of(request)["resource"] == ["https://mcp.example.com/mcp"]
    request = build_refresh_request(connector(), Secret(OLD_REFRESH), Secret(CLIENT_SECRET))
    assert "resource" not in form_of(request)


def test_build_never_sends_scope() -> None:
    """A configured scope is not sent on refresh: the grant keeps its original scope (§6)."""
    conn = connector(scope="repo offline_access", client_auth="client_secret_post")
    request = build_refresh_request(conn, Secret(OLD_REFRESH), Secret(CLIENT_SECRET))
    assert "scope" not in form_of(request)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_build_confidential_client_without_secret(method: str) -> None:
    """A confidential client without a stored secret raises SecretMissingError naming the fix."""
    with pytest.raises(SecretMissingError, match=r"github.*tokend secret github"):
        build_refresh_request(connector(client_auth=method), Secret(OLD_REFRESH), None)


def test_build_refuses_plain_http_remote_endpoint() -> None:
    """Defence in depth: no grant is built for plain http to a remote host."""
    conn = connector(token_url="http://auth.example.com/token")
    with pytest.raises(OAuthError, match="insecure_token_url"):
        build_refresh_request(conn, Secret(OLD_REFRESH), Secret(CLIENT_SECRET))


# -- parse_token_response: success ----------------------------------------------------------


def test_parse_full_success() -> None:
    """A complete 200 response becomes a TokenSet with expires_at = obtained_at + expires_in."""
    tok = parse(httpx.Response(200, json=ok_body()))
    assert tok.access_token.reveal() == NEW_ACCESS
    assert tok.refresh_token is not None
    assert tok.refresh_token.reveal() == NEW_REFRESH
    assert tok.token_type == "Bearer"
    assert tok.scope == "repo"
    assert tok.obtained_at == T0
    assert tok.expires_at == T0 + HOUR
    assert not tok.lifetime_assumed
    assert tok.generation == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (3600, 3600.0),
        ("3600", 3600.0),
        (" 3600 ", 3600.0),
        (1799.5, 1799.5),
        ("1799.5", 1799.5),
        (1, 1.0),
    ],
)
def test_parse_expires_in_numbers_and_numeric_strings(value: object, seconds: float) -> None:
    """expires_in may be an int, a float or a numeric string."""
    tok = parse(httpx.Response(200, json=ok_body(expires_in=value)))
    assert tok.expires_at == T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", [b"1" + b"0" * 400, b"99999999999999"])
def test_parse_absurd_expires_in_is_capped(raw: bytes) -> None:
    """An absurdly large expires_in is read as ten years instead of overflowing."""
    body = b'{"access_token": "x", "token_type": "bearer", "expires_in": ' + raw + b"}"
    tok = parse(httpx.Response(200, content=body))
    assert tok.expires_at == T0 + timedelta(seconds=MAX_EXPIRES_IN_S)


@pytest.mark.parametrize(
    "value",
    ["abc", "", "1e3", "inf", "NaN", "-5", 0, -5, 0.0, True, False, [3600], {"s": 1}],
)
def test_parse_bad_expires_in_is_transient(value: object) -> None:
    """Non-numeric, non-positive or boolean expires_in is transient garbage."""
    with pytest.raises(TransientError, match="expires_in"):
        parse(httpx.Response(200, json=ok_body(expires_in=value)))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_parse_non_finite_expires_in_is_transient(literal: bytes) -> None:
    """NaN and infinite expires_in (which Python's JSON reader accepts) are transient garbage."""
    body = b'{"access_token": "x", "expires_in": ' + literal + b"}"
    with pytest.raises(TransientError, match="expires_in"):
        parse(httpx.Response(200, content=body))


@pytest.mark.parametrize("value", [_OMIT, None])
def test_parse_missing_expires_in_assumes_default_lifetime(value: object) -> None:
    """Without expires_in the default lifetime is used and flagged as assumed."""
    tok = parse(httpx.Response(200, json=ok_body(expires_in=value)))
    assert tok.expires_at == T0 + HOUR
    assert tok.lifetime_assumed


@pytest.mark.parametrize("value", [_OMIT, None, ""])
def test_parse_missing_refresh_token_keeps_previous(value: object) -> None:
    """An omitted (or null or empty) refresh_token keeps the previous one (RFC 6749 §6)."""
    tok = parse(httpx.Response(200, json=ok_body(refresh_token=value)))
    assert tok.refresh_token is not None
    assert tok.refresh_token.reveal() == OLD_REFRESH


def test_parse_missing_refresh_token_without_previous_is_none() -> None:
    """Without a previous token set an omitted refresh_token stays None."""
    tok = parse(httpx.Response(200, json=ok_body(refresh_token=_OMIT)), previous=None)
    assert tok.refresh_token is None


def test_parse_malformed_refresh_token_is_transient() -> None:
    """A refresh_token that is not a string is transient garbage."""
    with pytest.raises(TransientError, match="refresh_token"):
        parse(httpx.Response(200, json=ok_body(refresh_token=12345)))


@pytest.mark.parametrize("value", [_OMIT, None])
def test_parse_missing_scope_keeps_previous(value: object) -> None:
    """An omitted scope keeps the previous one; without a previous set it is None."""
    tok = parse(httpx.Response(200, json=ok_body(scope=value)))
    assert tok.scope == "repo offline_access"
    tok = parse(httpx.Response(200, json=ok_body(scope=value)), previous=None)
    assert tok.scope is None


def test_parse_scope_array_is_joined() -> None:
    """A non-standard scope array is joined with spaces."""
    tok = parse(httpx.Response(200, json=ok_body(scope=["repo", "user"])))
    assert tok.scope == "repo user"


@pytest.mark.parametrize("value", [5, ["repo", 5], {"a": 1}])
def test_parse_malformed_scope_is_transient(value: object) -> None:
    """A scope that is neither a string nor a list of strings is transient garbage."""
    with pytest.raises(TransientError, match="scope"):
        parse(httpx.Response(200, json=ok_body(scope=value)))


@pytest.mark.parametrize("value", ["bearer", "BEARER", "Bearer", "bEaReR", _OMIT, None])
def test_parse_token_type_bearer_case_insensitive(value: object) -> None:
    """token_type is compared case-insensitively and normalised; a missing one means Bearer."""
    assert parse(httpx.Response(200, json=ok_body(token_type=value))).token_type == "Bearer"


@pytest.mark.parametrize("value", ["mac", "DPoP", "N_A"])
def test_parse_non_bearer_token_type_is_rejected(value: str) -> None:
    """A token_type other than Bearer is a provider mismatch: OAuthError unsupported_token_type."""
    with pytest.raises(OAuthError) as info:
        parse(httpx.Response(200, json=ok_body(token_type=value)))
    assert info.value.error == "unsupported_token_type"
    assert not isinstance(info.value, InvalidGrantError)


def test_parse_malformed_token_type_is_transient() -> None:
    """A token_type that is not a string is transient garbage."""
    with pytest.raises(TransientError, match="token_type"):
        parse(httpx.Response(200, json=ok_body(token_type=1)))


@pytest.mark.parametrize("value", [_OMIT, None, "", 42])
def test_parse_missing_access_token_is_transient(value: object) -> None:
    """A 2xx without a non-empty string access_token is transient garbage."""
    with pytest.raises(TransientError, match="no access_token"):
        parse(httpx.Response(200, json=ok_body(access_token=value)))


def test_parse_token_with_unrelated_error_field_succeeds() -> None:
    """A 2xx carrying both an access_token and a stray `error` field is a success."""
    tok = parse(httpx.Response(200, json=ok_body(error="none")))
    assert tok.access_token.reveal() == NEW_ACCESS


def test_token_set_from_fields_for_import() -> None:
    """token_set_from_fields takes a pasted token response without a previous set (import)."""
    data = {"access_token": NEW_ACCESS, "token_type": "bearer"}
    tok = token_set_from_fields(
        data, connector="github", obtained_at=T0, previous=None, default_lifetime=HOUR
    )
    assert tok.refresh_token is None
    assert tok.scope is None
    assert tok.lifetime_assumed
    assert tok.expires_at == T0 + HOUR


# -- parse_token_response: errors ------------------------------------------------------------


def test_parse_invalid_grant() -> None:
    """400 invalid_grant raises InvalidGrantError with status and description."""
    body = {"error": "invalid_grant", "error_description": "refresh token expired"}
    with pytest.raises(InvalidGrantError) as info:
        parse(httpx.Response(400, json=body))
    assert info.value.error == "invalid_grant"
    assert info.value.description == "refresh token expired"
    assert info.value.status == 400
    assert info.value.connector == "github"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "invalid_client"),
        (400, "invalid_client"),
        (400, "unauthorized_client"),
        (400, "unsupported_grant_type"),
        (400, "invalid_scope"),
        (400, "invalid_request"),
        (403, "unauthorized_client"),
    ],
)
def test_parse_terminal_client_errors(status: int, code: str) -> None:
    """Client and request errors raise OAuthError (terminal: rejected), not InvalidGrantError."""
    with pytest.raises(OAuthError) as info:
        parse(httpx.Response(status, json={"error": code}))
    assert type(info.value) is OAuthError
    assert info.value.error == code
    assert info.value.description is None
    assert info.value.status == status


def test_parse_unknown_4xx_error_code_is_transient() -> None:
    """An unknown error code is retried with backoff rather than declared terminal."""
    body = {"error": "temporarily_unavailable", "error_description": "try later"}
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(400, json=body))
    assert "temporarily_unavailable" in str(info.value)
    assert "try later" in str(info.value)


def test_parse_2xx_error_body_is_classified() -> None:
    """An error sent with status 200 (GitHub style) is classified like a 4xx one."""
    with pytest.raises(InvalidGrantError) as info:
        parse(httpx.Response(200, json={"error": "bad_refresh_token"}))
    assert info.value.status == 200
    with pytest.raises(OAuthError, match="invalid_client"):
        parse(httpx.Response(200, json={"error": "invalid_client"}))


@pytest.mark.parametrize("body", [{"message": "nope"}, {"error": 7}, {"error": None}])
def test_parse_4xx_without_oauth_error_is_transient(body: dict[str, object]) -> None:
    """A 4xx JSON object without a string `error` is transient, naming the status."""
    with pytest.raises(TransientError, match="HTTP 403 without an OAuth error"):
        parse(httpx.Response(403, json=body))


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_parse_429_and_5xx_are_transient(status: int) -> None:
    """429 and 5xx are transient whatever their body, even one naming invalid_grant."""
    with pytest.raises(TransientError, match=f"HTTP {status}") as info:
        parse(httpx.Response(status, json={"error": "invalid_grant"}))
    assert info.value.retry_after is None


def test_parse_5xx_html_is_transient() -> None:
    """A 5xx HTML page is transient and its body is not quoted."""
    page = b"<html><h1>Bad Gateway</h1></html>"
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(502, content=page, headers={"Content-Type": "text/html"}))
    assert str(info.value) == "github: token endpoint answered HTTP 502"


def test_parse_retry_after_delta_seconds() -> None:
    """Retry-After in delta-seconds is carried on the TransientError."""
    response = httpx.Response(429, json={"error": "slow_down"}, headers={"Retry-After": "120"})
    with pytest.raises(TransientError, match="slow_down") as info:
        parse(response)
    assert info.value.retry_after == 120.0


def test_parse_retry_after_http_date_against_date_header() -> None:
    """A Retry-After HTTP-date counts from the response's Date header (immune to clock skew)."""
    server_now = T0 + timedelta(hours=3)  # the server's clock is 3 h off; the delay is not
    headers = {
        "Date": format_datetime(server_now, usegmt=True),
        "Retry-After": format_datetime(server_now + timedelta(seconds=90), usegmt=True),
    }
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(503, headers=headers))
    assert info.value.retry_after == 90.0


def test_parse_retry_after_http_date_against_received_at() -> None:
    """Without a Date header a Retry-After date counts from received_at; past dates give 0."""
    received = T0 + timedelta(seconds=2)
    later = {"Retry-After": format_datetime(received + timedelta(seconds=30), usegmt=True)}
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(503, headers=later), received_at=received)
    assert info.value.retry_after == 30.0
    past = {"Retry-After": format_datetime(T0 - HOUR, usegmt=True)}
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(503, headers=past))
    assert info.value.retry_after == 0.0


@pytest.mark.parametrize("value", [b"soon", b"-5", b"1.5", "٣".encode(), b""])
def test_parse_garbage_retry_after_is_ignored(value: bytes) -> None:
    """An unparseable Retry-After is ignored (None), not an error of its own."""
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(503, headers=[(b"Retry-After", value)]))
    assert info.value.retry_after is None


def test_parse_retry_after_on_unknown_4xx_error() -> None:
    """Retry-After also rides on a transient unknown 4xx error."""
    headers = {"Retry-After": "15"}
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(400, json={"error": "slow_down"}, headers=headers))
    assert info.value.retry_after == 15.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_parse_redirect_is_transient(status: int) -> None:
    """A redirect from the token endpoint is transient and not followed."""
    response = httpx.Response(status, headers={"Location": "https://evil.example/?code=x"})
    with pytest.raises(TransientError, match="unexpected redirect") as info:
        parse(response)
    assert "evil" not in str(info.value)


@pytest.mark.parametrize(
    ("status", "content"),
    [
        (200, b"<html>sign in</html>"),
        (200, b'{"access_token": "at_'),
        (200, b'["access_token"]'),
        (200, b'"a string"'),
        (200, b"\xff\xfe\xfa\xfb"),
        (200, b"[" * 200_000),
        (200, b'{"expires_in": ' + b"9" * 5000 + b"}"),
        (200, b""),
        (404, b"Not Found"),
        (400, b"Bad Request"),
        (401, b""),
    ],
)
def test_parse_unparseable_body_is_transient(status: int, content: bytes) -> None:
    """A non-JSON, truncated or non-object body is transient, naming the status only."""
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(status, content=content))
    assert str(info.value) == (
        f"github: unparseable response (HTTP {status}) from the token endpoint"
    )


def test_parse_description_is_sanitised_and_truncated() -> None:
    """error_description loses control characters and is cut to about 200 characters."""
    description = "line one\nline two\x1b[31m red\x00" + "x" * 1000
    with pytest.raises(InvalidGrantError) as info:
        parse(
            httpx.Response(400, json={"error": "invalid_grant", "error_description": description})
        )
    quoted = info.value.description
    assert quoted is not None
    assert quoted.startswith("line one line two [31m red")
    assert len(quoted) == 200
    assert quoted.endswith("…")
    assert not any(ord(ch) < 32 for ch in str(info.value))


def test_parse_error_code_is_sanitised() -> None:
    """A hostile `error` code is sanitised and truncated like a description."""
    with pytest.raises(TransientError) as info:
        parse(httpx.Response(400, json={"error": "weird\r\nX-Injected: 1" + "y" * 100}))
    assert "\n" not in str(info.value)
    assert "y" * 70 not in str(info.value)


def test_canary_no_token_in_parser_messages() -> None:
    """Parser messages never contain a token, even when the body echoes them everywhere."""
    secrets = (OLD_ACCESS, OLD_REFRESH, NEW_ACCESS, NEW_REFRESH)
    # The provider's own `error`/`error_description` are quoted, so they can echo only what the
    # parser knows to mask (the previous tokens); the new ones ride in fields never quoted.
    known = f"{OLD_ACCESS} and {OLD_REFRESH}"
    every = " ".join(secrets)
    responses = [
        httpx.Response(400, json={"error": "invalid_grant", "error_description": known}),
        httpx.Response(400, json={"error": OLD_REFRESH, "error_description": known}),
        httpx.Response(401, json={"error": "invalid_client", "hint": every}),
        httpx.Response(400, json={"error": "odd_code", "error_description": known, "x": every}),
        httpx.Response(503, json={"error": OLD_ACCESS, "error_description": known, "x": every}),
        httpx.Response(200, json=ok_body(expires_in="never", note=every)),
        httpx.Response(200, json=ok_body(token_type="mac", note=every)),
        httpx.Response(200, json=ok_body(refresh_token=[NEW_REFRESH])),
        httpx.Response(200, json=ok_body(access_token=_OMIT, note=every)),
        httpx.Response(200, content=every.encode()),
        httpx.Response(403, json={"detail": every}),
    ]
    for response in responses:
        with pytest.raises((TransientError, OAuthError)) as info:
            parse(response)
        text = f"{info.value} {info.value!r} {vars(info.value)}"
        for secret in secrets:
            assert secret not in text


def test_parse_masking_tolerates_empty_and_missing_previous_tokens() -> None:
    """A previous set with an empty access token and no refresh token masks nothing by mistake."""
    previous = replace(PREVIOUS, access_token=Secret(""), refresh_token=None)
    body = {"error": "invalid_grant", "error_description": "grant expired"}
    with pytest.raises(InvalidGrantError) as info:
        parse(httpx.Response(400, json=body), previous=previous)
    assert info.value.description == "grant expired"


# -- server_clock_offset ---------------------------------------------------------------------


def test_server_clock_offset() -> None:
    """The Date header gives the server's clock offset; absent or garbage gives None."""
    ahead = httpx.Response(200, headers={"Date": format_datetime(T0 + timedelta(seconds=5), True)})
    assert server_clock_offset(ahead, received_at=T0) == 5.0
    behind = httpx.Response(200, headers={"Date": "Sat, 01 Mar 2025 11:59:00 -0000"})
    assert server_clock_offset(behind, received_at=T0) == -60.0
    assert server_clock_offset(httpx.Response(200), received_at=T0) is None
    garbage = httpx.Response(200, headers={"Date": "yesterday-ish"})
    assert server_clock_offset(garbage, received_at=T0) is None
