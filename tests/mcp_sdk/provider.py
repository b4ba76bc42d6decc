"""An in-memory authorization-server provider for the MCP SDK's OAuth routes.

It implements the SDK's `OAuthAuthorizationServerProvider` protocol the way a strict real server
would: consent is auto-approved (authorize() redirects straight back with a code), access tokens
live `lifetime` seconds, every refresh rotates the refresh token, and presenting a retired refresh
token revokes the whole grant ("family": every token descended from one authorization code).
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

log = logging.getLogger("tests.mcp_sdk.provider")

CODE_LIFETIME_S = 300.0


class FamilyAccessToken(AccessToken):
    """An access token with its grant family and an exact expiry (the SDK's is whole seconds)."""

    family: str
    expires_at_exact: float


class FamilyRefreshToken(RefreshToken):
    """A refresh token with its grant family; `retired` once it has been exchanged."""

    family: str
    retired: bool = False


class FamilyCode(AuthorizationCode):
    """An authorization code; each code starts a new grant family when exchanged."""


@dataclass
class Stats:
    """Counters the test reads over `GET /test/stats`."""

    refreshes: int = 0
    reuse_detected: int = 0
    registrations: int = 0
    revocations: int = 0
    token_requests: list[dict[str, str | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "refreshes": self.refreshes,
            "reuse_detected": self.reuse_detected,
            "registrations": self.registrations,
            "revocations": self.revocations,
            "token_requests": list(self.token_requests),
        }


class MemoryProvider(
    OAuthAuthorizationServerProvider[FamilyCode, FamilyRefreshToken, FamilyAccessToken]
):
    """The SDK's provider protocol in memory, with rotation and reuse detection.

    The identity-assertion (jwt-bearer) grant keeps the protocol's default: unsupported."""

    def __init__(self, *, lifetime_s: float, resource: str, scopes: list[str]) -> None:
        self.lifetime_s = lifetime_s
        self.resource = resource
        self.default_scopes = scopes
        self.stats = Stats()
        self._clients: dict[str, OAuthClientInformationFull] = {}
        self._codes: dict[str, FamilyCode] = {}
        self._access: dict[str, FamilyAccessToken] = {}
        self._refresh: dict[str, FamilyRefreshToken] = {}
        self._revoked_families: set[str] = set()

    # -- clients -----------------------------------------------------------------------------

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self._clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        self._clients[client_info.client_id] = client_info
        self.stats.registrations += 1
        log.info(
            "registered client %s auth=%s grants=%s scope=%s",
            client_info.client_id,
            client_info.token_endpoint_auth_method,
            ",".join(client_info.grant_types),
            client_info.scope,
        )

    # -- authorization code ------------------------------------------------------------------

    async def authorize(
        self, client: OAuthClientInformationFull, params: AuthorizationParams
    ) -> str:
        """Consent is auto-approved: redirect straight back with a fresh code."""
        if params.resource is not None and params.resource.rstrip("/") != self.resource:
            raise AuthorizeError("invalid_target", "unknown resource")
        code = secrets.token_urlsafe(32)
        scopes = params.scopes or (client.scope.split() if client.scope else self.default_scopes)
        self._codes[code] = FamilyCode(
            code=code,
            scopes=scopes,
            expires_at=time.time() + CODE_LIFETIME_S,
            client_id=client.client_id,
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject="test-user",
        )
        log.info("authorize client=%s resource=%s", client.client_id, params.resource)
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state)

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> FamilyCode | None:
        return self._codes.get(authorization_code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: FamilyCode
    ) -> OAuthToken:
        if self._codes.pop(authorization_code.code, None) is None:
            raise TokenError("invalid_grant", "authorization code already used")
        family = uuid.uuid4().hex
        return self._issue(
            client.client_id,
            authorization_code.scopes,
            family,
            authorization_code.resource,
            authorization_code.subject,
        )

    # -- refresh -----------------------------------------------------------------------------

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> FamilyRefreshToken | None:
        record = self._refresh.get(refresh_token)
        if record is None or record.family in self._revoked_families:
            return None
        return record  # retired ones too: exchange_refresh_token detects the reuse

    async def exchange_refresh_token(
        self,
        client: OAuthClientInformationFull,
        refresh_token: FamilyRefreshToken,
        scopes: list[str],
    ) -> OAuthToken:
        if refresh_token.retired:
            self.stats.reuse_detected += 1
            self._revoke_family(refresh_token.family)
            log.warning("refresh token reuse detected: grant of %s revoked", client.client_id)
            raise TokenError("invalid_grant", "refresh token reuse detected; grant revoked")
        refresh_token.retired = True
        self.stats.refreshes += 1
        return self._issue(
            client.client_id,
            scopes,
            refresh_token.family,
            refresh_token.resource,
            refresh_token.subject,
        )

    # -- access tokens and revocation --------------------------------------------------------

    async def load_access_token(self, token: str) -> FamilyAccessToken | None:
        record = self._access.get(token)
        if record is None or record.family in self._revoked_families:
            return None
        if record.expires_at_exact <= time.time():
            return None
        return record

    async def revoke_token(self, token: FamilyAccessToken | FamilyRefreshToken) -> None:
        self.stats.revocations += 1
        self._revoke_family(token.family)
        log.info("revoked the grant of %s", token.client_id)

    # -- internals ---------------------------------------------------------------------------

    def _issue(
        self,
        client_id: str,
        scopes: list[str],
        family: str,
        resource: str | None,
        subject: str | None,
    ) -> OAuthToken:
        now = time.time()
        access = secrets.token_urlsafe(32)
        refresh = secrets.token_urlsafe(32)
        self._access[access] = FamilyAccessToken(
            token=access,
            client_id=client_id,
            scopes=scopes,
            expires_at=int(now + self.lifetime_s) + 1,
            expires_at_exact=now + self.lifetime_s,
            resource=resource,
            subject=subject,
            family=family,
        )
        self._refresh[refresh] = FamilyRefreshToken(
            token=refresh,
            client_id=client_id,
            scopes=scopes,
            resource=resource,
            subject=subject,
            family=family,
        )
        return OAuthToken(
            access_token=access,
            expires_in=max(1, round(self.lifetime_s)),
            scope=" ".join(scopes),
            refresh_token=refresh,
        )

    def _revoke_family(self, family: str) -> None:
        self._revoked_families.add(family)
        for table in (self._access, self._refresh):
            for key in [k for k, v in table.items() if v.family == family]:
                del table[key]
