"""The authorization code grant with PKCE: `/authorize` and `grant_type=authorization_code`.

`Authorizer` adds to `Clients` the authorization endpoint (RFC 6749 §4.1, RFC 7636 PKCE,
RFC 8707 resource, RFC 9207 `iss`), with no UI: the attribute `consent` decides. Codes are
single use, live 60 s and are bound to client, redirect URI, PKCE challenge, scope and resource;
exchanging one starts a grant family, so rotation and reuse detection apply from then on.
Stdlib only; it never logs a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from tokend.authserver.clients import CODE_GRANT, Clients
from tokend.authserver.provider import Family, Reply, error_reply, new_token, omit_for_fault

CODE_LIFETIME_S = 60.0
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


@dataclass(frozen=True, slots=True)
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    method: str
    scope: str | None
    resource: str | None
    expires_mono: float


def pkce_matches(verifier: str, challenge: str, method: str) -> bool:
    """RFC 7636 §4.6: does `verifier` answer `challenge` under `method` (S256 or plain)?"""
    if method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        verifier = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return hmac.compare_digest(verifier.encode(), challenge.encode())


def valid_resource(resource: str) -> bool:
    """RFC 8707 §2: an absolute URI without a fragment."""
    parts = urlsplit(resource)
    return bool(parts.scheme and parts.netloc) and not parts.fragment


def with_query(uri: str, params: dict[str, str]) -> str:
    """`uri` with `params` appended to its query (RFC 6749 §3.1.2 keeps an existing query)."""
    parts = urlsplit(uri)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class Authorizer(Clients):
    """The authorization endpoint and the code exchange.

    Settable at run time: `consent` ("approve" or "deny") and `pkce_methods` (methods accepted
    for `code_challenge_method`; empty means PKCE is not supported and is ignored).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.consent = "approve"
        self.pkce_methods: tuple[str, ...] = ("S256",)
        self._codes: dict[str, _Code] = {}
        self._spent: dict[str, tuple[Family | None, float]] = {}

    def _authorize(self, query: dict[str, str]) -> tuple[Reply, str | None]:
        """GET /authorize: a 302 back to the client, or a 400 when it cannot redirect safely."""
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        if not client_id:
            return error_reply(400, "invalid_request", "client_id is missing"), None
        info, problem = self._resolve_client(client_id)
        if info is None:
            return error_reply(400, "invalid_client", problem), client_id
        if not redirect_uri or not info.allows_redirect(redirect_uri):
            description = "redirect_uri is missing or not registered for this client"
            return error_reply(400, "invalid_request", description), client_id
        state = query.get("state")

        def back(note: str, **params: str) -> tuple[Reply, str | None]:
            if state is not None:
                params["state"] = state
            params["iss"] = self.issuer
            location = with_query(redirect_uri, params)
            return Reply(302, b"", "text/plain", [("Location", location)], note), client_id

        def fail(error: str, description: str) -> tuple[Reply, str | None]:
            return back(error, error=error, error_description=description)

        if query.get("response_type") != "code":
            return fail("unsupported_response_type", "only response_type=code is supported")
        if CODE_GRANT not in info.grant_types:
            return fail("unauthorized_client", "the client did not register authorization_code")
        challenge, method = query.get("code_challenge"), query.get("code_challenge_method")
        methods = tuple(self.pkce_methods)
        if methods:
            method = method or "plain"  # RFC 7636 §4.3
            if not challenge or not _VERIFIER.fullmatch(challenge):
                return fail("invalid_request", "a valid code_challenge is required (PKCE)")
            if method not in methods:
                return fail("invalid_request", f"code_challenge_method must be one of {methods}")
        else:
            challenge = None  # a server without PKCE ignores the parameters
        scope = query.get("scope") or None
        if scope is not None and not set(scope.split()) <= set(self._scopes_supported()):
            return fail("invalid_scope", "unknown scope requested")
        resource = query.get("resource") or None
        if resource is not None and not valid_resource(resource):
            return fail("invalid_target", "resource must be an absolute URI without fragment")
        if self.consent == "deny":
            return fail("access_denied", "the resource owner denied the request")
        code = new_token("ac_")
        now = time.monotonic()
        entry = _Code(client_id, redirect_uri, challenge, method or "", scope, resource,
                      now + CODE_LIFETIME_S)  # fmt: skip
        with self._lock:
            self._codes = {k: v for k, v in self._codes.items() if v.expires_mono > now}
            self._spent = {k: v for k, v in self._spent.items() if v[1] > now}
            self._codes[code] = entry
        return back("redirect", code=code)

    def _grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        if form.get("grant_type") == CODE_GRANT:
            return self._code_grant(form, client, kind)
        return super()._grant(form, client, kind)

    def _code_grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        """RFC 6749 §4.1.3 with RFC 7636 §4.6: exchange a code (once) for a new grant family."""
        code = form.get("code")
        if not code:
            return error_reply(400, "invalid_request", "code is missing")
        info = self._client_info(client)
        if info is not None and CODE_GRANT not in info.grant_types:
            return error_reply(400, "unauthorized_client", "authorization_code not registered")
        now = time.monotonic()
        with self._lock:
            entry = self._codes.pop(code, None)
            if entry is None:
                family = self._spent.get(code, (None, 0.0))[0]
                if family is not None:  # RFC 6749 §4.1.2: a replayed code revokes its grant
                    family.revoked = True
                return error_reply(400, "invalid_grant", "authorization code unknown or used")
            self._spent[code] = (None, entry.expires_mono)
            refusal = _check_exchange(entry, form, client, now)
            if refusal is not None:
                return refusal
            resource = entry.resource or form.get("resource") or None
            body = self._new_family(client, entry.scope, resource)
            self._spent[code] = (self._refresh[str(body["refresh_token"])], entry.expires_mono)
        return Reply(200, omit_for_fault(body, kind))


def _check_exchange(entry: _Code, form: dict[str, str], client: str, now: float) -> Reply | None:
    """Why a code exchange is refused (invalid_grant, invalid_target), or None."""
    if now >= entry.expires_mono:
        return error_reply(400, "invalid_grant", "authorization code expired")
    if entry.client_id != client:
        return error_reply(400, "invalid_grant", "authorization code was issued to another client")
    if form.get("redirect_uri") != entry.redirect_uri:
        return error_reply(400, "invalid_grant", "redirect_uri differs from the authorization")
    if entry.challenge is not None:
        verifier = form.get("code_verifier", "")
        if not _VERIFIER.fullmatch(verifier) or not pkce_matches(
            verifier, entry.challenge, entry.method
        ):
            return error_reply(400, "invalid_grant", "PKCE verification failed")
    resource = form.get("resource")
    if resource and entry.resource and resource != entry.resource:
        return error_reply(400, "invalid_target", "resource differs from the authorization")
    return None
