"""Finding a connector's authorization server: RFC 9728 (MCP) then RFC 8414 / OpenID discovery.

`discover` fetches documents through an injected `httpx.AsyncClient` (no redirects followed,
bodies capped, each fetch bounded in time) and validates them: issuer and resource identifiers
must match what was asked for, endpoints must be https or http to loopback. Every URL tried is
recorded with its outcome for `tokend check` and `-v`. Nothing here logs; documents and
challenges hold no secrets, and messages quote provider text only sanitised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit
from urllib.request import parse_http_list, parse_keqv_list

import httpx

from tokend import __version__
from tokend.errors import DiscoveryError, OAuthError, TransientError
from tokend.oauth.protocol import DESCRIPTION_LIMIT, USER_AGENT, check_token_url, sanitise
from tokend.oauth.transport import send

PRM_WELL_KNOWN = "/.well-known/oauth-protected-resource"
AS_WELL_KNOWN = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN = "/.well-known/openid-configuration"
# The MCP revision whose `initialize` the probe sends; any server answers it with 401 first.
MCP_PROTOCOL_VERSION = "2025-06-18"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerMetadata:
    """An authorization server's metadata (RFC 8414 §2), with the RFC's defaults filled in."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    registration_endpoint: str | None = None
    scopes_supported: tuple[str, ...] | None = None
    code_challenge_methods_supported: tuple[str, ...] = ()
    token_endpoint_auth_methods_supported: tuple[str, ...] = ("client_secret_basic",)
    grant_types_supported: tuple[str, ...] = ("authorization_code", "implicit")
    client_id_metadata_document_supported: bool = False
    authorization_response_iss_parameter_supported: bool = False  # RFC 9207 §3
    metadata_url: str

    @property
    def supports_s256(self) -> bool:
        """The server lists PKCE S256 (MCP requires clients to refuse servers that do not)."""
        return "S256" in self.code_challenge_methods_supported


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceMetadata:
    """A protected resource's metadata (RFC 9728 §2) and the scope its 401 challenge asked for."""

    resource: str
    metadata_url: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] | None = None
    challenge_scope: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    """What `discover` found, and each request it made with its outcome ("GET URL -> 404")."""

    metadata: ServerMetadata
    resource: ResourceMetadata | None
    tried: tuple[str, ...]


def canonical_resource(url: str) -> str:
    """The canonical URI of a resource server (RFC 8707 §2, MCP authorization spec).

    Lowercase scheme and host, no default port, no fragment, no userinfo, path kept without a
    lone trailing "/"; the query is kept. Raises ValueError for a URL without scheme or host.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname  # lowercased, brackets stripped
    if not scheme or not host:
        raise ValueError("not an absolute URL")
    netloc = f"[{host}]" if ":" in host else host
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    path = parts.path
    if path == "/":
        path = ""
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def _well_known(base: str, suffix: str) -> list[str]:
    """RFC 8414 §3.1 / RFC 9728 §3.1: insert the well-known suffix between host and path.

    A URL with a path gives the path-aware form first, then the root form (for PRM) — the
    caller decides which it wants.
    """
    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    root = urlunsplit((parts.scheme, parts.netloc, suffix, "", ""))
    if not path:
        return [root]
    return [urlunsplit((parts.scheme, parts.netloc, suffix + path, "", "")), root]


def _metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 path-aware, then OpenID discovery with the path inserted, then appended."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(p: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, p, "", ""))

    if not path:
        return [at(AS_WELL_KNOWN), at(OIDC_WELL_KNOWN)]
    return [at(AS_WELL_KNOWN + path), at(OIDC_WELL_KNOWN + path), at(path + OIDC_WELL_KNOWN)]


def _same_identifier(a: str, b: str) -> bool:
    """Identifiers compared as RFC 8414 §3.3 asks (exactly), forgiving only a trailing "/"."""
    return a.rstrip("/") == b.rstrip("/")


def _resource_covers(published: str, requested: str) -> bool:
    """The published resource is the requested URL or an ancestor of it on the same origin.

    RFC 9728 §3.3 wants identity; servers that publish their origin (or a path prefix) for an
    endpoint below it are common, and the MCP SDK accepts them too, so a prefix on a segment
    boundary is accepted. A different origin or an unrelated path is refused.
    """
    try:
        pub, req = urlsplit(canonical_resource(published)), urlsplit(canonical_resource(requested))
    except ValueError:
        return False
    if (pub.scheme, pub.netloc) != (req.scheme, req.netloc):
        return False
    if (pub.path, pub.query) == (req.path, req.query):
        return True
    return not pub.query and req.path.startswith(pub.path.rstrip("/") + "/")


class _Fetcher:
    """Fetches documents for one `discover` call and records what happened to each."""

    def __init__(self, http: httpx.AsyncClient, connector: str, tried: list[str]) -> None:
        self.http = http
        self.connector = connector
        self.tried = tried

    async def _send(self, request: httpx.Request, *, read_body: bool) -> httpx.Response:
        label = f"{request.method} {request.url}"
        try:
            response = await send(self.http, request, connector=self.connector, read_body=read_body)
        except TransientError as exc:
            self.tried.append(f"{label} -> error: {exc.reason}")
            raise DiscoveryError(self.connector, f"{label}: {exc.reason}", transient=True) from exc
        self.tried.append(f"{label} -> {response.status_code}")
        status = response.status_code
        if status == 429 or status >= 500:
            reason = f"{label} answered HTTP {status}; try again later"
            raise DiscoveryError(self.connector, reason, transient=True)
        return response

    async def probe(self, url: str) -> httpx.Response:
        """POST an MCP `initialize` to `url`; only status and headers are read."""
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": MCP_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "tokend", "version": __version__},
            },
        }
        headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        request = httpx.Request("POST", url, content=json.dumps(body).encode(), headers=headers)
        return await self._send(request, read_body=False)

    async def document(self, url: str) -> Mapping[str, object] | None:
        """The JSON object at `url`, or None (recorded) when it is absent or not a JSON object.

        Raises DiscoveryError(transient) for network errors, 429 and 5xx.
        """
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        response = await self._send(httpx.Request("GET", url, headers=headers), read_body=True)
        if response.status_code != 200:
            return None
        try:
            data = response.json()
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            self.tried[-1] += " (not a JSON object)"
            return None
        return data


def _bearer_params(response: httpx.Response) -> dict[str, str]:
    """The auth-params of the Bearer challenge in `WWW-Authenticate` (RFC 6750 §3), keys lowercase.

    Parsed with the stdlib's list and key=value parsers; items that are not key=value (another
    scheme's token68, say) are skipped.
    """
    for value in response.headers.get_list("WWW-Authenticate"):
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            continue
        items = [item for item in parse_http_list(rest) if "=" in item]
        pairs = parse_keqv_list([item.strip() for item in items])
        return {key.strip().lower(): val for key, val in pairs.items()}
    return {}


def _strings(
    data: Mapping[str, object], key: str, url: str, connector: str
) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DiscoveryError(connector, f"{url}: {key} must be a list of strings")
    return tuple(value)


def _endpoint(
    data: Mapping[str, object], key: str, url: str, connector: str, *, required: bool = False
) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise DiscoveryError(connector, f"{url}: {key} is missing or not a string")
    _check_secure(value, f"{url}: {key}", connector)
    return value


def _check_secure(value: str, where: str, connector: str) -> None:
    try:
        check_token_url(value, connector=connector)
    except OAuthError:
        shown = sanitise(value, DESCRIPTION_LIMIT, ())
        reason = f"{where} {shown!r} must be https (or http to loopback)"
        raise DiscoveryError(connector, reason) from None


def _server_metadata(
    data: Mapping[str, object], *, issuer: str, url: str, connector: str
) -> ServerMetadata:
    published = data.get("issuer")
    if not isinstance(published, str) or not _same_identifier(published, issuer):
        shown = sanitise(published, DESCRIPTION_LIMIT, ()) if isinstance(published, str) else None
        reason = f"{url}: issuer {shown!r} is not {issuer!r} (RFC 8414 §3.3); refused"
        raise DiscoveryError(connector, reason)
    token_endpoint = _endpoint(data, "token_endpoint", url, connector, required=True)
    assert token_endpoint is not None  # noqa: S101  # required=True never returns None
    cimd = data.get("client_id_metadata_document_supported", False)
    iss_param = data.get("authorization_response_iss_parameter_supported", False)
    return ServerMetadata(
        issuer=published,  # as published: RFC 9207's `iss` is compared with this exact value
        token_endpoint=token_endpoint,
        authorization_endpoint=_endpoint(data, "authorization_endpoint", url, connector),
        device_authorization_endpoint=_endpoint(
            data, "device_authorization_endpoint", url, connector
        ),
        revocation_endpoint=_endpoint(data, "revocation_endpoint", url, connector),
        registration_endpoint=_endpoint(data, "registration_endpoint", url, connector),
        scopes_supported=_strings(data, "scopes_supported", url, connector),
        code_challenge_methods_supported=(
            _strings(data, "code_challenge_methods_supported", url, connector) or ()
        ),
        token_endpoint_auth_methods_supported=(
            _strings(data, "token_endpoint_auth_methods_supported", url, connector)
            or ("client_secret_basic",)
        ),
        grant_types_supported=(
            _strings(data, "grant_types_supported", url, connector)
            or ("authorization_code", "implicit")
        ),
        client_id_metadata_document_supported=cimd is True,
        authorization_response_iss_parameter_supported=iss_param is True,
        metadata_url=url,
    )


async def _fetch_server_metadata(fetcher: _Fetcher, issuer: str) -> ServerMetadata:
    connector = fetcher.connector
    _check_secure(issuer, "issuer", connector)
    parts = urlsplit(issuer)
    if parts.query or parts.fragment:
        raise DiscoveryError(connector, f"issuer {issuer!r} must have no query or fragment")
    for url in _metadata_urls(issuer):
        data = await fetcher.document(url)
        if data is not None:
            return _server_metadata(data, issuer=issuer, url=url, connector=connector)
    tried = ", ".join(_metadata_urls(issuer))
    reason = f"no authorization server metadata for {issuer} (tried {tried})"
    raise DiscoveryError(connector, reason)


def _resource_metadata(
    data: Mapping[str, object],
    *,
    mcp_url: str,
    url: str,
    challenge_scope: str | None,
    connector: str,
) -> ResourceMetadata:
    resource = data.get("resource")
    if not isinstance(resource, str) or not _resource_covers(resource, mcp_url):
        shown = sanitise(resource, DESCRIPTION_LIMIT, ()) if isinstance(resource, str) else None
        reason = f"{url}: resource {shown!r} does not match {mcp_url!r} (RFC 9728 §3.3); refused"
        raise DiscoveryError(connector, reason)
    servers = _strings(data, "authorization_servers", url, connector)
    if not servers:
        raise DiscoveryError(connector, f"{url}: lists no authorization_servers")
    return ResourceMetadata(
        resource=resource,
        metadata_url=url,
        authorization_servers=servers,
        scopes_supported=_strings(data, "scopes_supported", url, connector),
        challenge_scope=challenge_scope,
    )


async def _fetch_resource_metadata(fetcher: _Fetcher, mcp_url: str) -> ResourceMetadata:
    connector = fetcher.connector
    challenge = _bearer_params(await fetcher.probe(mcp_url))
    scope = challenge.get("scope") or None
    candidates = _well_known(mcp_url, PRM_WELL_KNOWN)
    from_header = challenge.get("resource_metadata")
    if from_header:
        _check_secure(from_header, "resource_metadata in WWW-Authenticate", connector)
        candidates = [from_header, *(url for url in candidates if url != from_header)]
    for url in candidates:
        data = await fetcher.document(url)
        if data is not None:
            return _resource_metadata(
                data, mcp_url=mcp_url, url=url, challenge_scope=scope, connector=connector
            )
    reason = f"no protected resource metadata for {mcp_url} (tried {', '.join(candidates)})"
    raise DiscoveryError(connector, reason)


async def discover(
    *,
    connector: str,
    http: httpx.AsyncClient,
    issuer: str | None = None,
    mcp_url: str | None = None,
    tried: list[str] | None = None,
) -> Discovery:
    """Find and validate the authorization server of `issuer`, or of the MCP server at `mcp_url`.

    For `mcp_url`: POST an MCP `initialize` to it and read the 401's Bearer challenge
    (`resource_metadata`, `scope`); fetch the protected resource metadata from the challenge's
    URL, else the path-aware then root well-known URL (RFC 9728 §3.1); take its first
    authorization server. Then fetch RFC 8414 metadata, falling back to OpenID discovery.
    Raises DiscoveryError: `transient` for network errors, timeouts, 429 and 5xx; otherwise for
    missing or unusable documents, an issuer or resource that does not match, or an endpoint
    that is neither https nor loopback http. When `tried` is given, each request's outcome is
    appended to it as it happens, so a caller can show them after a failure too.
    """
    if (issuer is None) == (mcp_url is None):
        raise ValueError("pass exactly one of issuer and mcp_url")
    fetcher = _Fetcher(http, connector, [] if tried is None else tried)
    resource: ResourceMetadata | None = None
    if mcp_url is not None:
        _check_secure(mcp_url, "mcp_url", connector)
        resource = await _fetch_resource_metadata(fetcher, mcp_url)
        issuer = resource.authorization_servers[0]
    assert issuer is not None  # noqa: S101  # one of the two was given, checked above
    metadata = await _fetch_server_metadata(fetcher, issuer)
    return Discovery(metadata=metadata, resource=resource, tried=tuple(fetcher.tried))
