"""Tests for tokend.oauth.grants and .device: PKCE, authorization URL, redirects, device flow,
revocation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from tokend.errors import (
    InvalidGrantError,
    LoginError,
    OAuthError,
    SecretMissingError,
    TransientError,
)
from tokend.model import Secret, TokenSet
from tokend.oauth.device import (
    DEVICE_CODE_GRANT,
    build_device_authorization,
    build_device_token,
    parse_device_authorization,
    parse_device_poll,
)
from tokend.oauth.grants import (
    authorization_url,
    build_code_exchange,
    build_revocation,
    code_from_redirect,
    new_pkce,
    new_state,
    parse_revocation,
    pkce_challenge,
)
from tokend.oauth.transport import ClientCredentials

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
TOKEN_URL = "https://auth.example.com/token"
CODE = "code-CANARY-3e1f0a"
VERIFIER = "ver-CANARY-77ab01"
DEVICE_CODE = "dev-CANARY-5c4d2e"
CLIENT_SECRET = "cs-CANARY-grant-secret-9f"
ACCESS = "at-CANARY-login-access-1a"
CANARIES = (CODE, VERIFIER, DEVICE_CODE, CLIENT_SECRET, ACCESS)
BASIC = ClientCredentials("cli ent", "client_secret_basic", Secret(CLIENT_SECRET))
POST = ClientCredentials("client", "client_secret_post", Secret(CLIENT_SECRET))
PUBLIC = ClientCredentials("client", "none", None)


def form_of(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.content.decode(), keep_blank_values=True))


def assert_no_canary(exc: BaseException) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'description', '')} {getattr(exc, 'reason', '')}"
    for canary in CANARIES:
        assert canary not in text


# -- PKCE and state ---------------------------------------------------------------------------


def test_pkce_matches_rfc7636_appendix_b() -> None:
    """The S256 challenge of RFC 7636 appendix B's verifier is the RFC's value."""
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_is_fresh_and_well_formed() -> None:
    """A verifier is 43-128 unreserved characters, a Secret, and its challenge is S256 of it."""
    verifier, challenge = new_pkce()
    value = verifier.reveal()
    assert 43 <= len(value) <= 128
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    assert challenge == pkce_challenge(value)
    assert "=" not in challenge
    assert value not in repr(verifier)
    assert new_pkce()[0].reveal() != value


def test_new_state_is_unguessable() -> None:
    """State values are long and differ each time."""
    first, second = new_state(), new_state()
    assert first != second
    assert len(first) >= 43


# -- authorization URL -----------------------------------------------------------------------


def test_authorization_url_params() -> None:
    """The URL carries response_type=code, PKCE S256, state, scope, resource and prompt."""
    url = authorization_url(
        "https://auth.example.com/authorize",
        connector="c",
        client_id="cli ent",
        redirect_uri="http://127.0.0.1:5000/callback",
        state="st",
        code_challenge="ch",
        scope="mcp offline_access",
        resource="https://mcp.example.com/mcp",
        prompt="consent",
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.example.com", "/authorize")
    assert " " not in url
    assert dict(parse_qsl(parts.query)) == {
        "response_type": "code",
        "client_id": "cli ent",
        "redirect_uri": "http://127.0.0.1:5000/callback",
        "state": "st",
        "code_challenge": "ch",
        "code_challenge_method": "S256",
        "scope": "mcp offline_access",
        "resource": "https://mcp.example.com/mcp",
        "prompt": "consent",
    }


def test_authorization_url_omits_absent_and_keeps_endpoint_query() -> None:
    """Absent scope/resource/prompt are left out; the endpoint's own query is kept."""
    url = authorization_url(
        "https://auth.example.com/authorize?tenant=a&client_id=stale#frag",
        connector="c",
        client_id="id",
        redirect_uri="http://localhost/callback",
        state="st",
        code_challenge="ch",
        scope=None,
        resource=None,
        prompt=None,
    )
    query = parse_qs(urlsplit(url).query)
    assert query["tenant"] == ["a"]
    assert query["client_id"] == ["id"]
    assert not {"scope", "resource", "prompt"} & set(query)
    assert "#" not in url


def test_authorization_url_refuses_plain_http_remote() -> None:
    """An authorization endpoint on plain http to a remote host is refused."""
    with pytest.raises(OAuthError, match="insecure_url"):
        authorization_url(
            "http://auth.example.com/authorize",
            connector="c",
            client_id="id",
            redirect_uri="http://localhost/callback",
            state="st",
            code_challenge="ch",
            scope=None,
            resource=None,
            prompt=None,
        )


# -- code_from_redirect ----------------------------------------------------------------------

ISSUER = "https://auth.example.com"


def redirect(query: str) -> str:
    return f"http://127.0.0.1:5000/callback?{query}"


def test_code_from_whole_url() -> None:
    """The code comes back as a Secret when state and iss match."""
    code = code_from_redirect(
        redirect(f"code={CODE}&state=st&iss=https%3A%2F%2Fauth.example.com"),
        expected_state="st",
        issuer=ISSUER,
        connector="c",
    )
    assert code.reveal() == CODE


@pytest.mark.parametrize("pasted", [f"code={CODE}&state=st", f"?code={CODE}&state=st\n"])
def test_code_from_pasted_query_only(pasted: str) -> None:
    """A pasted query string (with or without '?', with a newline) is accepted."""
    code = code_from_redirect(pasted, expected_state="st", issuer=None, connector="c")
    assert code.reveal() == CODE


@pytest.mark.parametrize("query", [f"code={CODE}&state=other", f"code={CODE}"])
def test_code_state_mismatch_or_missing(query: str) -> None:
    """A wrong or missing state is refused: the redirect is not from this login."""
    with pytest.raises(LoginError, match="not from this login") as info:
        code_from_redirect(redirect(query), expected_state="st", issuer=None, connector="c")
    assert_no_canary(info.value)


def test_code_denied() -> None:
    """error=access_denied reads as 'authorization was denied'."""
    with pytest.raises(LoginError, match="authorization was denied"):
        code_from_redirect(
            redirect("error=access_denied&state=st"),
            expected_state="st",
            issuer=None,
            connector="c",
        )


def test_code_other_error_quotes_error_and_description() -> None:
    """Another error names the code and its sanitised description."""
    with pytest.raises(LoginError, match=r"authorization failed: invalid_scope \(bad scope\)"):
        code_from_redirect(
            redirect("error=invalid_scope&error_description=bad%20scope%0A&state=st"),
            expected_state="st",
            issuer=None,
            connector="c",
        )


def test_code_iss_mismatch() -> None:
    """A different RFC 9207 iss is refused (mix-up attack), even when state matches."""
    with pytest.raises(LoginError, match="issuer") as info:
        code_from_redirect(
            redirect(f"code={CODE}&state=st&iss=https%3A%2F%2Fevil.example"),
            expected_state="st",
            issuer=ISSUER,
            connector="c",
        )
    assert_no_canary(info.value)


def test_code_iss_required_when_advertised() -> None:
    """With iss_required, a redirect without iss is refused; without it, it is accepted."""
    query = redirect(f"code={CODE}&state=st")
    with pytest.raises(LoginError, match="issuer"):
        code_from_redirect(
            query, expected_state="st", issuer=ISSUER, connector="c", iss_required=True
        )
    assert code_from_redirect(query, expected_state="st", issuer=ISSUER, connector="c")


def test_code_missing() -> None:
    """A redirect with state but no code is refused."""
    with pytest.raises(LoginError, match="no authorization code"):
        code_from_redirect(redirect("state=st"), expected_state="st", issuer=None, connector="c")


def test_code_repeated_parameter() -> None:
    """A repeated parameter (RFC 6749 §3.1) is refused without quoting values."""
    with pytest.raises(LoginError, match="repeats the parameter") as info:
        code_from_redirect(
            redirect(f"code={CODE}&code=x&state=st"),
            expected_state="st",
            issuer=None,
            connector="c",
        )
    assert_no_canary(info.value)


# -- token-endpoint builders and client authentication ---------------------------------------


def test_code_exchange_form_basic_auth() -> None:
    """The code exchange carries code, redirect_uri, verifier, resource; basic auth in a header."""
    request = build_code_exchange(
        TOKEN_URL,
        BASIC,
        connector="c",
        code=Secret(CODE),
        redirect_uri="http://127.0.0.1:5000/callback",
        code_verifier=Secret(VERIFIER),
        resource="https://mcp.example.com/mcp",
    )
    assert request.method == "POST"
    assert str(request.url) == TOKEN_URL
    assert form_of(request) == {
        "grant_type": "authorization_code",
        "code": CODE,
        "redirect_uri": "http://127.0.0.1:5000/callback",
        "code_verifier": VERIFIER,
        "resource": "https://mcp.example.com/mcp",
    }
    scheme, _, encoded = request.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"cli+ent:{CLIENT_SECRET}"


def test_code_exchange_post_and_public_clients() -> None:
    """client_secret_post puts id and secret in the form; a public client sends its id only."""
    kwargs = {
        "connector": "c",
        "code": Secret(CODE),
        "redirect_uri": "http://localhost/callback",
        "code_verifier": Secret(VERIFIER),
        "resource": None,
    }
    posted = build_code_exchange(TOKEN_URL, POST, **kwargs)  # type: ignore[arg-type]
    assert form_of(posted)["client_secret"] == CLIENT_SECRET
    assert form_of(posted)["client_id"] == "client"
    assert "Authorization" not in posted.headers
    assert "resource" not in form_of(posted)
    public = build_code_exchange(TOKEN_URL, PUBLIC, **kwargs)  # type: ignore[arg-type]
    assert form_of(public)["client_id"] == "client"
    assert "client_secret" not in form_of(public)
    assert "Authorization" not in public.headers


def test_confidential_client_without_secret() -> None:
    """A confidential client with no secret raises SecretMissingError naming the fix."""
    creds = ClientCredentials("client", "client_secret_basic", None)
    with pytest.raises(SecretMissingError, match="tokend secret c"):
        build_device_token(
            TOKEN_URL, creds, connector="c", device_code=Secret(DEVICE_CODE), resource=None
        )


def test_builders_refuse_plain_http_remote() -> None:
    """Every builder refuses a plain-http remote endpoint and accepts loopback http."""
    remote = "http://auth.example.com/x"
    with pytest.raises(OAuthError):
        build_device_authorization(remote, PUBLIC, connector="c", scope=None, resource=None)
    with pytest.raises(OAuthError):
        build_revocation(remote, PUBLIC, connector="c", token=Secret("t"), hint="access_token")
    with pytest.raises(OAuthError, match="insecure"):
        build_device_token(remote, PUBLIC, connector="c", device_code=Secret("d"), resource=None)
    request = build_device_authorization(
        "http://127.0.0.1:9/device", PUBLIC, connector="c", scope="a b", resource="https://r"
    )
    assert form_of(request) == {"client_id": "client", "scope": "a b", "resource": "https://r"}


def test_device_token_form() -> None:
    """A device poll sends the device_code grant, the code and the resource."""
    request = build_device_token(
        TOKEN_URL, POST, connector="c", device_code=Secret(DEVICE_CODE), resource="https://r"
    )
    assert form_of(request) == {
        "grant_type": DEVICE_CODE_GRANT,
        "device_code": DEVICE_CODE,
        "resource": "https://r",
        "client_id": "client",
        "client_secret": CLIENT_SECRET,
    }


def test_revocation_form() -> None:
    """Revocation sends the token with its type hint (RFC 7009 §2.1)."""
    request = build_revocation(
        "https://auth.example.com/revoke",
        PUBLIC,
        connector="c",
        token=Secret(ACCESS),
        hint="refresh_token",
    )
    assert form_of(request) == {
        "token": ACCESS,
        "token_type_hint": "refresh_token",
        "client_id": "client",
    }


# -- device authorization response -----------------------------------------------------------


def test_parse_device_authorization() -> None:
    """A full RFC 8628 §3.2 answer is read, the device code kept as a Secret."""
    response = httpx.Response(
        200,
        json={
            "device_code": DEVICE_CODE,
            "user_code": "ABCD-EFGH",
            "verification_uri": "https://auth.example.com/device",
            "verification_uri_complete": "https://auth.example.com/device?u=ABCD-EFGH",
            "expires_in": 900,
            "interval": "7",
        },
    )
    found = parse_device_authorization(response, connector="c")
    assert found.device_code.reveal() == DEVICE_CODE
    assert DEVICE_CODE not in repr(found)
    assert found.user_code == "ABCD-EFGH"
    assert found.verification_uri_complete == "https://auth.example.com/device?u=ABCD-EFGH"
    assert (found.expires_in, found.interval) == (900.0, 7.0)


def test_parse_device_authorization_defaults_interval() -> None:
    """Without an interval the RFC's 5 s applies; no complete URI reads as None."""
    response = httpx.Response(
        200,
        json={
            "device_code": DEVICE_CODE,
            "user_code": "X",
            "verification_uri": "https://a/device",
            "expires_in": 600,
        },
    )
    found = parse_device_authorization(response, connector="c")
    assert found.interval == 5.0
    assert found.verification_uri_complete is None


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(503), TransientError),
        (httpx.Response(429), TransientError),
        (httpx.Response(400, json={"error": "unauthorized_client"}), LoginError),
        (httpx.Response(200, content=b"<html>"), TransientError),
        (
            httpx.Response(
                200,
                content=b'{"device_code": "d", "user_code": "X", "verification_uri": "https://a",'
                b' "expires_in": 1' + b"0" * 400 + b"}",
            ),
            TransientError,
        ),
        (httpx.Response(200, json={"device_code": DEVICE_CODE, "user_code": "X"}), TransientError),
        (
            httpx.Response(
                200,
                json={
                    "device_code": DEVICE_CODE,
                    "user_code": "X",
                    "verification_uri": "https://a",
                    "expires_in": 0,
                },
            ),
            TransientError,
        ),
    ],
)
def test_parse_device_authorization_failures(
    response: httpx.Response, error: type[Exception]
) -> None:
    """Server trouble is transient, a refusal a LoginError, a broken answer transient."""
    with pytest.raises(error) as info:
        parse_device_authorization(response, connector="c")
    assert_no_canary(info.value)


def test_parse_device_authorization_refusal_masks_device_code() -> None:
    """A refusal echoing the device code in its description does not leak it."""
    response = httpx.Response(
        400,
        json={
            "error": "invalid_scope",
            "error_description": f"bad {DEVICE_CODE}",
            "device_code": DEVICE_CODE,
        },
    )
    with pytest.raises(LoginError, match="invalid_scope") as info:
        parse_device_authorization(response, connector="c")
    assert_no_canary(info.value)


# -- device poll -----------------------------------------------------------------------------


def poll(response: httpx.Response) -> TokenSet | str:
    return parse_device_poll(response, connector="c", obtained_at=T0, default_lifetime=HOUR)


@pytest.mark.parametrize("status", [400, 200])
def test_poll_pending_and_slow_down(status: int) -> None:
    """authorization_pending and slow_down are outcomes, whatever the status (GitHub sends 200)."""
    assert poll(httpx.Response(status, json={"error": "authorization_pending"})) == "pending"
    assert poll(httpx.Response(status, json={"error": "slow_down"})) == "slow_down"


def test_poll_denied_and_expired() -> None:
    """access_denied and expired_token end the login with a LoginError."""
    with pytest.raises(LoginError, match="denied"):
        poll(httpx.Response(400, json={"error": "access_denied"}))
    with pytest.raises(LoginError, match="expired"):
        poll(httpx.Response(400, json={"error": "expired_token"}))


def test_poll_success() -> None:
    """A token response becomes a TokenSet stamped at obtained_at."""
    result = poll(
        httpx.Response(200, json={"access_token": ACCESS, "token_type": "bearer", "expires_in": 60})
    )
    assert isinstance(result, TokenSet)
    assert result.access_token.reveal() == ACCESS
    assert result.expires_at == T0 + timedelta(seconds=60)
    assert result.refresh_token is None


def test_poll_other_errors_as_token_endpoint() -> None:
    """Other outcomes follow parse_token_response: invalid_grant, invalid_client, 5xx."""
    with pytest.raises(InvalidGrantError):
        poll(httpx.Response(400, json={"error": "invalid_grant"}))
    with pytest.raises(OAuthError, match="invalid_client"):
        poll(httpx.Response(401, json={"error": "invalid_client"}))
    with pytest.raises(TransientError):
        poll(httpx.Response(502))


# -- revocation response ---------------------------------------------------------------------


def test_parse_revocation() -> None:
    """200 is success; an error object is refused; 503 and garbage are transient."""
    token = Secret(ACCESS)
    parse_revocation(httpx.Response(200), connector="c", token=token)
    body = {"error": "unsupported_token_type", "error_description": f"no {ACCESS}"}
    with pytest.raises(OAuthError, match="unsupported_token_type") as info:
        parse_revocation(httpx.Response(400, json=body), connector="c", token=token)
    assert_no_canary(info.value)
    with pytest.raises(TransientError):
        parse_revocation(httpx.Response(503, json=body), connector="c", token=token)
    with pytest.raises(TransientError):
        parse_revocation(httpx.Response(404), connector="c", token=token)
