"""Login-time OAuth requests: PKCE, the authorization URL and redirect, code exchange, revocation.

Pure builders over `httpx.Request` and parsers over `httpx.Response` (RFC 6749 §4.1, RFC 7636,
RFC 7009, RFC 8707, RFC 9207). The device grant (RFC 8628) is `tokend.oauth.device`; sending and
the shared request pieces are `tokend.oauth.transport`. No clock and no logging here; nothing
puts a code, a verifier, a token or a client secret into a message: from a provider only `error`
and `error_description` are quoted, sanitised and truncated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Literal
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import httpx

from tokend.errors import LoginError, OAuthError, TransientError
from tokend.model import Secret
from tokend.oauth.protocol import DESCRIPTION_LIMIT, json_object, sanitise
from tokend.oauth.transport import (
    CODE_LIMIT,
    ClientCredentials,
    check_endpoint,
    post_form,
)

# -- PKCE and state --------------------------------------------------------------------------


def pkce_challenge(verifier: str) -> str:
    """The RFC 7636 §4.2 S256 challenge: base64url(SHA-256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> tuple[Secret, str]:
    """A fresh RFC 7636 code verifier (86 characters, 512 random bits) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)
    return Secret(verifier), pkce_challenge(verifier)


def new_state() -> str:
    """A fresh, unguessable `state` value (256 bits) binding the redirect to this login."""
    return secrets.token_urlsafe(32)


# -- authorization code flow -----------------------------------------------------------------


def authorization_url(
    endpoint: str,
    *,
    connector: str,
    client_id: str,
    redirect_uri: str,
    state: str,
    code_challenge: str,
    scope: str | None,
    resource: str | None,
    prompt: str | None,
) -> str:
    """The RFC 6749 §4.1.1 authorization request URL, with PKCE S256 (RFC 7636 §4.3).

    The endpoint's own query parameters are kept (§3.1) unless this request sets the same name;
    `scope`, `resource` (RFC 8707) and `prompt` (OpenID Connect) are added only when given.
    Raises OAuthError(insecure_url) for an endpoint that is neither https nor loopback http.
    """
    check_endpoint(endpoint, connector=connector, what="authorization endpoint")
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    if scope is not None:
        params["scope"] = scope
    if resource is not None:
        params["resource"] = resource
    if prompt is not None:
        params["prompt"] = prompt
    parts = urlsplit(endpoint)
    kept = [
        (key, value)
        for key, values in parse_qs(parts.query, keep_blank_values=True).items()
        if key not in params
        for value in values
    ]
    query = urlencode([*kept, *params.items()], quote_via=quote)
    # §3.1: the endpoint has no fragment; one there would swallow our parameters.
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _redirect_params(text: str, connector: str) -> dict[str, str]:
    text = text.strip()
    if "://" in text or text.startswith("/"):
        query = urlsplit(text).query
    else:
        query = text.removeprefix("?")
    parsed = parse_qs(query, keep_blank_values=True)
    repeated = sorted(key for key, values in parsed.items() if len(values) > 1)
    if repeated:
        # RFC 6749 §3.1: parameters must not repeat; a repeat is tampering or a bad paste.
        names = ", ".join(sanitise(key, 32, ()) for key in repeated)
        raise LoginError(connector, f"the redirect repeats the parameter(s) {names}")
    return {key: values[0] for key, values in parsed.items()}


def code_from_redirect(
    url: str,
    *,
    expected_state: str,
    issuer: str | None,
    connector: str,
    iss_required: bool = False,
) -> Secret:
    """The authorization code in the redirect the user's browser reached (RFC 6749 §4.1.2).

    `url` is the whole redirect URL or just its query string (the paste-back flow). Checks, in
    this order: `state` (§10.12), the RFC 9207 `iss` against `issuer` (required when
    `iss_required`, i.e. the server advertises `authorization_response_iss_parameter_supported`),
    an `error` answer (§4.1.2.1), then the code itself. Raises LoginError.
    """
    params = _redirect_params(url, connector)
    code = params.get("code", "")
    redact = (code,) if code else ()
    state = params.get("state")
    if state is not None and not hmac.compare_digest(state.encode(), expected_state.encode()):
        raise LoginError(
            connector, "state in the redirect does not match; the redirect is not from this login"
        )
    iss = params.get("iss")
    if issuer is not None and (iss is not None or iss_required) and iss != issuer:
        shown = "none" if iss is None else repr(sanitise(iss, DESCRIPTION_LIMIT, redact))
        raise LoginError(
            connector,
            f"the redirect's issuer ({shown}) is not {issuer!r}; "
            "the answer may come from another authorization server",
        )
    error = params.get("error")
    if error is not None:
        code_text = sanitise(error, CODE_LIMIT, redact)
        if code_text == "access_denied":
            raise LoginError(connector, "authorization was denied")
        raw = params.get("error_description")
        detail = f" ({sanitise(raw, DESCRIPTION_LIMIT, redact)})" if raw else ""
        raise LoginError(connector, f"authorization failed: {code_text}{detail}")
    if state is None:
        raise LoginError(
            connector, "state is missing from the redirect; the redirect is not from this login"
        )
    if not code:
        raise LoginError(connector, "the redirect carries no authorization code")
    return Secret(code)


def build_code_exchange(
    token_endpoint: str,
    creds: ClientCredentials,
    *,
    connector: str,
    code: Secret,
    redirect_uri: str,
    code_verifier: Secret,
    resource: str | None,
) -> httpx.Request:
    """The RFC 6749 §4.1.3 token request, with the PKCE verifier (RFC 7636 §4.5).

    Raises OAuthError(insecure_url), SecretMissingError (confidential client without secret).
    """
    form = {
        "grant_type": "authorization_code",
        "code": code.reveal(),
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier.reveal(),
    }
    if resource is not None:
        form["resource"] = resource
    return post_form(token_endpoint, creds, form, connector=connector, what="token endpoint")


# -- revocation (RFC 7009) -------------------------------------------------------------------


def build_revocation(
    endpoint: str,
    creds: ClientCredentials,
    *,
    connector: str,
    token: Secret,
    hint: Literal["refresh_token", "access_token"],
) -> httpx.Request:
    """The RFC 7009 §2.1 revocation request. Raises OAuthError(insecure_url), SecretMissingError."""
    form = {"token": token.reveal(), "token_type_hint": hint}
    return post_form(endpoint, creds, form, connector=connector, what="revocation endpoint")


def parse_revocation(response: httpx.Response, *, connector: str, token: Secret) -> None:
    """Accept an RFC 7009 §2.2 answer: HTTP 200 means revoked (or already invalid).

    Raises TransientError (429, 5xx incl. §2.2.1's 503, redirects, other non-error answers) and
    OAuthError for an RFC 6749 §5.2 error object (`unsupported_token_type`, `invalid_client`).
    """
    status = response.status_code
    if status == 200:
        return
    redact = (token.reveal(),) if token.reveal() else ()
    data = json_object(response)
    if status < 500 and status != 429 and data is not None and isinstance(data.get("error"), str):
        code = sanitise(data["error"], CODE_LIMIT, redact)
        raw = data.get("error_description")
        description = "revocation refused" + (
            f": {sanitise(raw, DESCRIPTION_LIMIT, redact)}" if raw else ""
        )
        raise OAuthError(connector, code, description, status)
    raise TransientError(connector, f"revocation endpoint answered HTTP {status}")
