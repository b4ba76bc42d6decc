"""The authorization server's grant logic: what `/token`, `/api/whoami` and metadata answer.

`Provider` keeps the grant families (rotation, reuse detection), the issued access tokens, the
registered clients and their authentication (RFC 6749 §2.3.1, §6), and the queue of scripted
faults. It answers parsed requests with `Reply` values and knows nothing of sockets or HTTP
framing (that is `tokend.authserver.http`). Stdlib only; it never logs a token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

FAULT_KINDS = frozenset(
    {
        "500", "503", "429", "invalid_grant", "invalid_client", "unauthorized_client",
        "unsupported_grant_type", "garbage", "html", "missing_access_token", "bad_expires_in",
        "omit_expires_in", "omit_refresh_token", "omit_scope", "slow", "hang", "reset",
    }
)  # fmt: skip
# Faults after which the refresh really happens; every other one leaves the grant untouched.
PASS_THROUGH_FAULTS = frozenset({"slow", "omit_expires_in", "omit_refresh_token", "omit_scope"})
_ERROR_STATUS = {"invalid_grant": 400, "invalid_client": 401, "unauthorized_client": 400,
                 "unsupported_grant_type": 400}  # fmt: skip
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
_SUB = "demo-user"


@dataclass(slots=True)
class Family:
    """One grant: its current refresh token (retired ones still map here) and whether it died."""

    client_id: str
    scope: str | None
    current: str
    revoked: bool = False
    resource: str | None = None  # RFC 8707: the audience its access tokens are for


@dataclass(frozen=True, slots=True)
class Access:
    family: Family
    scope: str | None
    expires_mono: float


@dataclass(slots=True)
class Reply:
    """An answer to send: status, a JSON object or raw bytes, content type, extra headers."""

    status: int
    body: dict[str, Any] | bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""  # what to record as the outcome instead of the default

    @property
    def outcome(self) -> str:
        if self.note:
            return self.note
        if 200 <= self.status < 300:
            return "ok"
        return str(self.body.get("error")) if isinstance(self.body, dict) else str(self.status)


def error_reply(status: int, error: str, description: str) -> Reply:
    """An RFC 6749 §5.2 error object with `status`."""
    return Reply(status, {"error": error, "error_description": description})


class Provider:
    """Grant families, access tokens, clients and the fault script; safe to call from any thread.

    `lifetime_s`, `rotate` and `reuse_detection` may be changed at run time: each is one atomic
    attribute store, read once per request.
    """

    def __init__(
        self,
        *,
        lifetime_s: float,
        rotate: bool,
        reuse_detection: bool,
        clients: Mapping[str, str | None] | None,
    ) -> None:
        self._lock = threading.Lock()
        self.lifetime_s = lifetime_s
        self.rotate = rotate
        self.reuse_detection = reuse_detection
        self._clients: dict[str, str | None] = (
            dict(clients) if clients is not None else {"tokend-demo": None}
        )
        self._refresh: dict[str, Family] = {}
        self._access: dict[str, Access] = {}
        self._issued = 0
        self._scopes = {"demo", "offline_access"}
        self._faults: deque[tuple[str, dict[str, Any]]] = deque()
        self.refreshes_ok = 0
        self.reuse_detected = 0

    # -- scripting ---------------------------------------------------------------------------

    def issue_grant(
        self,
        client_id: str = "tokend-demo",
        scope: str | None = "demo offline_access",
        resource: str | None = None,
    ) -> dict[str, object]:
        """Start a new grant family; returns its RFC 6749 §5.1 token response."""
        if client_id not in self._clients:
            raise ValueError(f"unknown client: {client_id}")
        with self._lock:
            if scope:
                self._scopes.update(scope.split())
            return self._new_family(client_id, scope, resource)

    def fail_next(self, kind: str, count: int = 1, **params: Any) -> None:
        """Answer the next `count` POST /token calls with the scripted fault `kind`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind: {kind}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.extend((kind, dict(params)) for _ in range(count))

    def is_valid_access_token(self, token: str) -> bool:
        """Whether `token` was issued here, has not expired and its family was not revoked."""
        with self._lock:
            return self._lookup_access(token) is not None

    def revoke_family_of(self, refresh_token: str) -> None:
        """Revoke the grant a (current or retired) refresh token belongs to; KeyError if unknown."""
        with self._lock:
            family = self._refresh.get(refresh_token)
            if family is None:
                raise KeyError("unknown refresh token")
            family.revoked = True

    @property
    def url(self) -> str:
        """The server's base URL; the HTTP layer knows it."""
        raise NotImplementedError

    # -- answering (called from handler threads) ---------------------------------------------

    def _new_family(
        self, client_id: str, scope: str | None, resource: str | None
    ) -> dict[str, object]:
        """Start a grant family (lock held); its first token response."""
        family = Family(client_id, scope, new_token("rt_"), resource=resource)
        self._refresh[family.current] = family
        return self._token_response(family, scope)

    def _next_fault(self) -> tuple[str, dict[str, Any]]:
        """The scripted fault for this POST /token, or ("", {}) when none is queued."""
        with self._lock:
            return self._faults.popleft() if self._faults else ("", {})

    def _lookup_access(self, token: str) -> Access | None:
        access = self._access.get(token)
        if access is None or access.family.revoked or time.monotonic() >= access.expires_mono:
            return None
        return access

    def _token_response(self, family: Family, scope: str | None) -> dict[str, object]:
        """Issue an access token in `family` (lock held) and build the response around it."""
        token = new_token("at_")
        self._access[token] = Access(family, scope, time.monotonic() + self.lifetime_s)
        self._issued += 1
        if self._issued % 1024 == 0:  # drop dead access tokens now and then
            now = time.monotonic()
            self._access = {k: v for k, v in self._access.items() if v.expires_mono > now}
        body: dict[str, object] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": max(1, int(self.lifetime_s)),
            "refresh_token": family.current,
        }
        if scope is not None:
            body["scope"] = scope
        return body

    def _whoami(self, authorization: str) -> tuple[Reply, str | None]:
        """The protected resource: whom a bearer token stands for, and its client id."""
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            access = self._lookup_access(token) if scheme.lower() == "bearer" else None
        if access is None:
            challenge = [("WWW-Authenticate", 'Bearer error="invalid_token"')]
            return Reply(401, {"error": "invalid_token"}, headers=challenge), None
        client = access.family.client_id
        return Reply(200, {"sub": _SUB, "client_id": client, "scope": access.scope}), client

    def _token_request(
        self,
        form: dict[str, str],
        *,
        repeated: bool,
        content_type: str,
        authorization: str | None,
        kind: str,
    ) -> tuple[Reply, str | None]:
        """Answer a POST /token that no fault stopped: check the form, the client, the grant."""
        client = form.get("client_id")
        if content_type != "application/x-www-form-urlencoded":
            return error_reply(400, "invalid_request", "the body must be form-urlencoded"), client
        if repeated:  # RFC 6749 §3.2: no parameter more than once
            return error_reply(400, "invalid_request", "a parameter was repeated"), client
        refused, client = self._authenticate(authorization, form)
        return refused or self._grant(form, client or "", kind), client

    def _grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        """Answer an authenticated token request by its grant type (later layers add more)."""
        return self._refresh_grant(form, client, kind)

    def _authenticate(
        self, authorization: str | None, form: dict[str, str]
    ) -> tuple[Reply | None, str | None]:
        """RFC 6749 §2.3.1 client authentication: an error reply or None, and the client id."""
        basic = authorization is not None and authorization[:6].lower() == "basic "
        client, secret = form.get("client_id"), form.get("client_secret")
        if basic:
            assert authorization is not None  # noqa: S101  # narrowing for mypy only
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                raw_id, sep, raw_secret = decoded.partition(":")
                if not sep:
                    raise ValueError("no colon")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return _invalid_client(True, "malformed Basic credentials"), client
            if secret is not None:
                return error_reply(
                    400, "invalid_request", "more than one client authentication"
                ), client
            basic_id = unquote_plus(raw_id)
            if client is not None and client != basic_id:
                return _invalid_client(True, "client_id differs from the Basic credentials"), client
            client, secret = basic_id, unquote_plus(raw_secret)
        if client is None or client not in self._clients:
            return _invalid_client(basic, "unknown client"), client
        expected = self._clients[client]
        if expected is None:
            ok = not secret  # a public client: no secret (an empty Basic password is tolerated)
        else:
            ok = secret is not None and hmac.compare_digest(secret.encode(), expected.encode())
        return (None if ok else _invalid_client(basic, "client authentication failed")), client

    def _refresh_grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        """RFC 6749 §6 with rotation and reuse detection, for an authenticated client."""
        if form.get("grant_type") != "refresh_token":
            return error_reply(400, "unsupported_grant_type", "only refresh_token is supported")
        presented = form.get("refresh_token")
        if not presented:
            return error_reply(400, "invalid_request", "refresh_token is missing")
        with self._lock:
            family = self._refresh.get(presented)
            # A refresh token is bound to the client it was issued to (RFC 6749 §6).
            if family is None or family.revoked or family.client_id != client:
                return error_reply(400, "invalid_grant", "refresh token unknown or revoked")
            if presented != family.current:
                if self.reuse_detection:
                    family.revoked = True  # the whole family dies, as real providers do
                    self.reuse_detected += 1
                    return error_reply(400, "invalid_grant", "refresh token reused; grant revoked")
                return error_reply(400, "invalid_grant", "refresh token was rotated away")
            resource = form.get("resource")
            if resource and family.resource and resource != family.resource:
                return error_reply(400, "invalid_target", "resource differs from the grant's")
            scope = form.get("scope") or family.scope
            if (
                scope is not None
                and family.scope is not None
                and not set(scope.split()) <= set(family.scope.split())
            ):
                return error_reply(400, "invalid_scope", "scope exceeds the grant")
            if self.rotate and kind != "omit_refresh_token":
                family.current = new_token("rt_")
                self._refresh[family.current] = family
            body = self._token_response(family, scope)
            self.refreshes_ok += 1
        return Reply(200, omit_for_fault(body, kind))

    def _fault_reply(self, kind: str, params: dict[str, Any]) -> Reply:
        """The scripted answer for a fault that leaves the grant untouched (not hang or reset)."""
        description = str(params.get("description", f"scripted {kind}"))
        retry = params.get("retry_after")
        extra = [("Retry-After", str(retry))] if retry is not None else []
        if kind in _ERROR_STATUS:
            reply = error_reply(_ERROR_STATUS[kind], kind, description)
            if kind == "invalid_client":
                reply.headers.append(("WWW-Authenticate", 'Basic realm="tokend-authserver"'))
            return reply
        if kind == "500" and params.get("body") == "html":
            page = b"<html><body><h1>Internal Server Error</h1></body></html>"
            return Reply(500, page, "text/html; charset=utf-8")
        if kind in ("500", "503", "429"):
            error = {"500": "server_error", "503": "temporarily_unavailable"}.get(kind, "slow_down")
            body = {"error": error, "error_description": description}
            return Reply(int(kind), body, headers=extra)
        if kind == "garbage":
            return Reply(200, b'{"access_token": "at_', "application/json")
        if kind == "html":
            return Reply(200, b"<html><body>Please sign in</body></html>", "text/html")
        # Tokens below are never registered: a client that accepts them will learn on next use.
        fake = {"token_type": "Bearer", "refresh_token": new_token("rt_"), "expires_in": 30}
        if kind == "missing_access_token":
            return Reply(200, fake)
        # "bad_expires_in", the only kind left (hang and reset are the connection's business)
        fake.update(access_token=new_token("at_"), expires_in=params.get("value", "abc"))
        return Reply(200, fake)


def omit_for_fault(body: dict[str, object], kind: str) -> dict[str, object]:
    """Drop the field a pass-through `omit_*` fault names from a real token response."""
    if kind == "omit_refresh_token":  # RFC 6749 §6: the client keeps using the old one
        body.pop("refresh_token", None)
    elif kind == "omit_scope":
        body.pop("scope", None)
    elif kind == "omit_expires_in":
        body.pop("expires_in", None)
    return body


def _invalid_client(basic_tried: bool, description: str) -> Reply:
    """401 invalid_client; with WWW-Authenticate when the client tried Basic (RFC 6749 §5.2)."""
    reply = error_reply(401, "invalid_client", description)
    if basic_tried:
        reply.headers.append(("WWW-Authenticate", 'Basic realm="tokend-authserver"'))
    return reply


def new_token(prefix: str) -> str:
    """A fresh unguessable token with a readable prefix (at_, rt_, ac_, dc_, ...)."""
    return prefix + secrets.token_urlsafe(24)
