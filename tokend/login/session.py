"""One `tokend login`: endpoints, client identity, scope and resource, then a flow.

Endpoints come from the configuration (`token_url` and friends) or from discovery (`issuer`:
RFC 8414 / OpenID; `mcp_url`: RFC 9728 first). The client is, in the MCP specification's order,
the configured `client_id`, else a Client ID Metadata Document URL the server accepts, else a
client registered now (RFC 7591; registered afresh at every login, so its redirect URI always
matches the listener). PKCE S256 is required of every discovered server. The result is the token
set, the `ClientRecord` that lets the daemon refresh it without discovering again, and a
registered client's secret for the keyring; handing them over is the caller's job.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import httpx

from tokend.clients import ClientKind, ClientRecord
from tokend.clock import Clock, human_span
from tokend.config import ConnectorConfig
from tokend.errors import DiscoveryError, LoginError
from tokend.login import flows
from tokend.login.flows import CodeRequest, Prompt
from tokend.model import Secret, TokenSet
from tokend.oauth.device import DEVICE_CODE_GRANT
from tokend.oauth.discovery import Discovery, canonical_resource, discover
from tokend.oauth.registration import register_client
from tokend.oauth.transport import ClientCredentials

Flow = Literal["device", "loopback", "paste"]
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    issuer: str | None
    token: str
    authorization: str | None
    device: str | None
    revocation: str | None
    iss_required: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResult:
    token: TokenSet
    record: ClientRecord
    client_secret: Secret | None  # a registered client's secret, for the keyring
    flow: Flow


def _endpoints(conn: ConnectorConfig, found: Discovery | None) -> Endpoints:
    if found is None:
        if conn.token_url is None:
            raise LoginError(conn.name, "no token endpoint is configured")
        return Endpoints(
            issuer=None,
            token=conn.token_url,
            authorization=conn.authorization_url,
            device=conn.device_authorization_url,
            revocation=conn.revocation_url,
        )
    meta = found.metadata
    if "S256" not in meta.code_challenge_methods_supported:
        raise DiscoveryError(
            conn.name,
            f"the authorization server's metadata ({meta.metadata_url}) does not list S256 in "
            "code_challenge_methods_supported; tokend requires PKCE S256 (as MCP does) and "
            "stops here",
        )
    return Endpoints(
        issuer=meta.issuer,
        token=meta.token_endpoint,
        authorization=meta.authorization_endpoint,
        device=meta.device_authorization_endpoint,
        revocation=meta.revocation_endpoint,
        iss_required=meta.authorization_response_iss_parameter_supported,
    )


def _resource(conn: ConnectorConfig) -> str | None:
    if conn.resource_opt_out:
        return None
    if conn.resource is not None:
        return conn.resource
    return canonical_resource(conn.mcp_url) if conn.mcp_url is not None else None


def _scope(conn: ConnectorConfig, found: Discovery | None) -> tuple[str | None, str | None]:
    """The scope to ask for and the `prompt` to send with it (DESIGN §6)."""
    scope = conn.scope
    if scope is None and found is not None and found.resource is not None:
        scope = found.resource.challenge_scope
        if scope is None and found.resource.scopes_supported:
            scope = " ".join(found.resource.scopes_supported)
    supported = found.metadata.scopes_supported if found is not None else None
    if supported and "offline_access" in supported:
        words = (scope or "").split()
        if "offline_access" not in words:
            words.append("offline_access")
        # OpenID providers grant offline access only with explicit consent.
        return " ".join(words), "consent"
    return scope, None


def _choose_flow(conn: ConnectorConfig, ends: Endpoints, forced: Flow | None) -> Flow:
    if forced == "device" and ends.device is None:
        raise LoginError(conn.name, "the server offers no device authorization endpoint")
    if forced in ("loopback", "paste") and ends.authorization is None:
        raise LoginError(conn.name, "the server offers no authorization endpoint")
    if forced is not None:
        return forced
    if ends.device is not None:
        return "device"
    if ends.authorization is not None:
        return "loopback"
    raise LoginError(
        conn.name,
        "no authorization or device authorization endpoint is known; set authorization_url "
        "(or device_authorization_url), or install a grant with tokend import",
    )


async def login(
    conn: ConnectorConfig,
    *,
    http: httpx.AsyncClient,
    prompt: Prompt,
    clock: Clock,
    read_secret: Callable[[], Secret | None],
    previous: ClientRecord | None = None,
    flow: Flow | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    open_browser: bool = True,
) -> LoginResult:
    """Authorize `conn` (as configured in the file, not resolved) with a human's help.

    `read_secret` gives a configured confidential client's secret. Raises DiscoveryError,
    LoginError, OAuthError, TransientError or SecretMissingError.
    """
    found: Discovery | None = None
    if conn.issuer is not None or conn.mcp_url is not None:
        found = await discover(
            connector=conn.name, http=http, issuer=conn.issuer, mcp_url=conn.mcp_url
        )
        for line in found.tried:
            prompt.say(f"  {line}")
    ends = _endpoints(conn, found)
    if previous is not None and previous.issuer is not None and previous.issuer != ends.issuer:
        prompt.say(
            f"note: the authorization server changed from {previous.issuer} to {ends.issuer}; "
            "the stored client is not used"
        )
    chosen = _choose_flow(conn, ends, flow)
    scope, consent = _scope(conn, found)
    resource = _resource(conn)
    with contextlib.ExitStack() as stack:
        server = None
        if chosen == "loopback":
            redirect_uri, server = stack.enter_context(
                flows.loopback_listener(conn.redirect_host, conn.redirect_port, connector=conn.name)
            )
        else:
            port = conn.redirect_port or flows.free_port(conn.redirect_host)
            redirect_uri = f"http://{conn.redirect_host}:{port}{flows.CALLBACK_PATH}"
        creds, kind, secret = await _client(
            conn, found, http, redirect_uri=redirect_uri, scope=scope, read_secret=read_secret,
            prompt=prompt,
        )  # fmt: skip
        lifetime = conn.refresh.default_lifetime
        if chosen == "device":
            if ends.device is None:  # _choose_flow checked; this narrows the type
                raise LoginError(conn.name, "the server offers no device authorization endpoint")
            token = await flows.device_flow(
                http, prompt, clock, connector=conn.name, device_endpoint=ends.device,
                token_endpoint=ends.token, creds=creds, scope=scope, resource=resource,
                default_lifetime=lifetime,
            )  # fmt: skip
        else:
            if ends.authorization is None:
                raise LoginError(conn.name, "the server offers no authorization endpoint")
            req = CodeRequest(
                connector=conn.name, authorization_endpoint=ends.authorization,
                token_endpoint=ends.token, creds=creds, scope=scope, resource=resource,
                prompt=consent, issuer=ends.issuer, iss_required=ends.iss_required,
                default_lifetime=lifetime,
            )  # fmt: skip
            if server is not None:
                token = await flows.loopback_flow(
                    http, prompt, clock, req, redirect_uri=redirect_uri, server=server,
                    timeout_s=timeout_s,
                    open_browser=open_browser and flows.may_open_browser(prompt, os.environ),
                )  # fmt: skip
            else:
                token = await flows.paste_flow(http, prompt, clock, req, redirect_uri=redirect_uri)
    if token.refresh_token is None:
        span = human_span(int(token.lifetime.total_seconds()))
        prompt.say(
            f"WARNING: the server issued no refresh token: tokend cannot keep {conn.name} alive "
            f"unattended; the access token expires in {span} and then needs another "
            f"tokend login {conn.name}"
        )
    record = ClientRecord(
        source=conn.source,
        source_url=conn.source_url,
        issuer=ends.issuer,
        token_endpoint=ends.token,
        authorization_endpoint=ends.authorization,
        device_authorization_endpoint=ends.device,
        revocation_endpoint=ends.revocation,
        client_id=creds.client_id,
        client_auth=creds.client_auth,
        client_kind=kind,
        resource=resource,
        scope=scope,
        redirect_uri=redirect_uri if chosen != "device" else None,
        recorded_at=clock.now(),
    )
    return LoginResult(token=token, record=record, client_secret=secret, flow=chosen)


async def _client(
    conn: ConnectorConfig,
    found: Discovery | None,
    http: httpx.AsyncClient,
    *,
    redirect_uri: str,
    scope: str | None,
    read_secret: Callable[[], Secret | None],
    prompt: Prompt,
) -> tuple[ClientCredentials, ClientKind, Secret | None]:
    """The client to authorize as: configured, a metadata document URL, or registered now."""
    if conn.client_id is not None:
        secret = read_secret() if conn.client_auth != "none" else None
        return ClientCredentials(conn.client_id, conn.client_auth, secret), "configured", None
    if found is None:  # config requires client_id with token_url
        raise LoginError(conn.name, "client_id is not configured")
    meta = found.metadata
    if conn.client_metadata_url is not None:
        if meta.client_id_metadata_document_supported:
            creds = ClientCredentials(conn.client_metadata_url, "none", None)
            return creds, "metadata_document", None
        prompt.say(
            "note: the server does not accept client ID metadata documents; registering a client"
        )
    if meta.registration_endpoint is None:
        raise DiscoveryError(
            conn.name,
            f"{meta.issuer} offers no dynamic client registration; register a client there and "
            f"set connectors.{conn.name}.client_id (and tokend secret {conn.name})",
        )
    registered = await register_client(
        meta,
        http,
        connector=conn.name,
        redirect_uris=[redirect_uri],
        scope=scope,
        want_device=meta.device_authorization_endpoint is not None
        and DEVICE_CODE_GRANT in meta.grant_types_supported,
    )
    prompt.say(f"Registered client {registered.client_id} at {meta.issuer}")
    creds = ClientCredentials(
        registered.client_id, registered.client_auth, registered.client_secret
    )
    return creds, "registered", registered.client_secret


def as_token_response(token: TokenSet, *, now: datetime) -> dict[str, object]:
    """`token` as an RFC 6749 §5.1 response for `PUT .../grant`: `expires_in` is what remains
    of its life at `now` (rounded down), so the daemon never believes it lives longer."""
    body: dict[str, object] = {
        # reveal: the grant goes to the daemon over its socket, or straight into the keyring.
        "access_token": token.access_token.reveal(),
        "token_type": token.token_type,
        "expires_in": max(1, math.floor(token.remaining(now).total_seconds())),
    }
    if token.refresh_token is not None:
        body["refresh_token"] = token.refresh_token.reveal()
    if token.scope is not None:
        body["scope"] = token.scope
    return body
