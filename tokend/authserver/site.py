"""What the server publishes and protects, and which path answers what.

`Site` adds to `DeviceFlow` the discovery documents (RFC 8414, OpenID Connect discovery, both
path-aware for an issuer with a path), the protected resource `/mcp` with its RFC 9728 metadata
and `WWW-Authenticate` challenge, token revocation (RFC 7009), and `_route`, which maps every
request but POST /token (the HTTP layer's, for its faults) to its handler. Stdlib only; it never
logs a token.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from tokend.authserver.clients import CODE_GRANT, DEVICE_GRANT
from tokend.authserver.device import DeviceFlow
from tokend.authserver.provider import AUTH_METHODS, Reply, error_reply

_AS_METADATA = "/.well-known/oauth-authorization-server"
_OPENID = "/.well-known/openid-configuration"
_PRM = "/.well-known/oauth-protected-resource"
_FORM = "application/x-www-form-urlencoded"

Routed = tuple[Reply, str | None, dict[str, str]]  # the answer, the client id, what to record


def _not_found() -> Reply:
    return Reply(404, {"error": "not_found"})


class Site(DeviceFlow):
    """Discovery, the protected resource, revocation and routing.

    Settable at run time: `metadata_docs` ({"oauth", "openid"}: which discovery documents are
    served), `challenge_header` (a 401 from /mcp names its metadata and scope), `prm_at_root`
    (also serve RFC 9728 metadata at the root well-known URL) and `revocation` (serve /revoke).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.metadata_docs: set[str] = {"oauth", "openid"}
        self.challenge_header = True
        self.prm_at_root = False
        self.revocation = True
        self._revocations: list[tuple[str | None, str | None, str]] = []

    @property
    def revocations(self) -> list[tuple[str | None, str | None, str]]:
        """(client id, token_type_hint, what was found) per revocation request; no tokens."""
        with self._lock:
            return list(self._revocations)

    @property
    def prm_url(self) -> str:
        """Where the protected resource's RFC 9728 metadata is (path-aware)."""
        return self.url + _PRM + "/mcp"

    # -- routing -----------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: str, body: bytes,
               headers: dict[str, str]) -> Routed:  # fmt: skip
        """Answer any request but POST /token."""
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if path == "/mcp":
            reply, client = self._mcp(headers.get("authorization", ""))
            return reply, client, {}
        if method == "GET":
            params = dict(parse_qsl(query, keep_blank_values=True))
            reply, client = self._get(path, params, headers.get("authorization", ""))
            return reply, client, params
        if method != "POST":
            return _not_found(), None, {}
        if path == "/register" and self.registration:
            reply = self._register(body, ctype)
            new = reply.body.get("client_id") if isinstance(reply.body, dict) else None
            return reply, new if isinstance(new, str) else None, _flatten(body)
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = dict(pairs)
        endpoints = {"/device_authorization": self.device_flow, "/revoke": self.revocation}
        if not endpoints.get(path):
            return _not_found(), None, form
        if ctype != _FORM:
            return (
                error_reply(400, "invalid_request", "the body must be form-urlencoded"),
                None,
                form,
            )
        if len(pairs) != len(form):
            return error_reply(400, "invalid_request", "a parameter was repeated"), None, form
        if path == "/device_authorization" and self.cimd:
            self._resolve_client(form.get("client_id", ""))  # fetch a URL client id's document
        refused, client = self._authenticate(headers.get("authorization"), form)
        if refused is not None:
            return refused, client, form
        client = client or ""
        if path == "/revoke":
            return self._revoke(form, client), client, form
        return self._device_authorization(form, client), client, form

    def _get(
        self, path: str, params: dict[str, str], authorization: str
    ) -> tuple[Reply, str | None]:
        if path == "/authorize":
            return self._authorize(params)
        if path == "/api/whoami":
            return self._whoami(authorization)
        if path in self._metadata_paths():
            return Reply(200, self._metadata()), None
        if path == _PRM + "/mcp" or (path == _PRM and self.prm_at_root):
            return Reply(200, self._resource_metadata()), None
        if path == "/device" and self.device_flow:
            page = b"tokend-authserver: device requests are approved by the test harness\n"
            return Reply(200, page, "text/plain; charset=utf-8"), None
        return _not_found(), None

    # -- discovery ---------------------------------------------------------------------------

    def _metadata_paths(self) -> set[str]:
        """Where discovery documents are served: RFC 8414 §3.1 and OIDC Discovery §4."""
        docs, tail = set(self.metadata_docs), self.issuer_path.strip("/")
        suffix = "/" + tail if tail else ""
        paths = set()
        if "oauth" in docs:
            paths.add(_AS_METADATA + suffix)
        if "openid" in docs:
            paths.add(_OPENID + suffix)
            if suffix:
                paths.add(suffix + _OPENID)
        return paths

    def _metadata(self) -> dict[str, object]:
        """The authorization server metadata (RFC 8414 §2), also served as OIDC discovery."""
        base = self.url
        doc: dict[str, object] = {
            "issuer": self.issuer,
            "authorization_endpoint": base + "/authorize",
            "token_endpoint": base + "/token",
        }
        grants = [CODE_GRANT, "refresh_token"]
        if self.device_flow:
            doc["device_authorization_endpoint"] = base + "/device_authorization"
            grants.append(DEVICE_GRANT)
        if self.revocation:
            doc["revocation_endpoint"] = base + "/revoke"
            doc["revocation_endpoint_auth_methods_supported"] = AUTH_METHODS
        if self.registration:
            doc["registration_endpoint"] = base + "/register"
        doc.update(
            grant_types_supported=grants,
            response_types_supported=["code"],
            response_modes_supported=["query"],
            token_endpoint_auth_methods_supported=AUTH_METHODS,
            scopes_supported=self._scopes_supported(),
            authorization_response_iss_parameter_supported=True,
            client_id_metadata_document_supported=bool(self.cimd),
        )
        methods = list(self.pkce_methods)
        if methods:
            doc["code_challenge_methods_supported"] = methods
        return doc

    def _resource_metadata(self) -> dict[str, object]:
        """RFC 9728 §2 protected resource metadata for /mcp."""
        return {
            "resource": self.mcp_url,
            "authorization_servers": [self.issuer],
            "scopes_supported": self.resource_scope.split(),
            "bearer_methods_supported": ["header"],
        }

    # -- the protected resource and revocation -----------------------------------------------

    def _mcp(self, authorization: str) -> tuple[Reply, str | None]:
        """Any method on /mcp: who the bearer token stands for, or a 401 challenge."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        with self._lock:
            access = self._lookup_access(token) if scheme.lower() == "bearer" and token else None
        audience = None if access is None else access.family.resource
        if (
            access is not None and audience is not None and (audience.rstrip("/") != self.mcp_url)
        ):  # RFC 8707: a token for another resource is not good here
            access = None
        if access is None:
            params = ['error="invalid_token"'] if authorization else []
            if self.challenge_header:
                params += [f'resource_metadata="{self.prm_url}"', f'scope="{self.resource_scope}"']
            challenge = "Bearer " + ", ".join(params) if params else "Bearer"
            error = "invalid_token" if authorization else "unauthorized"
            return Reply(401, {"error": error}, headers=[("WWW-Authenticate", challenge)]), None
        client = access.family.client_id
        body = {"sub": "demo-user", "client_id": client, "scope": access.scope,
                "resource": audience}  # fmt: skip
        return Reply(200, body), client

    def _revoke(self, form: dict[str, str], client: str) -> Reply:
        """RFC 7009 §2: a refresh token takes its family along; unknown tokens still get 200."""
        token = form.get("token")
        if not token:
            return error_reply(400, "invalid_request", "token is missing")
        with self._lock:
            family = self._refresh.get(token)
            access = self._access.get(token)
            owner = family.client_id if family else access.family.client_id if access else None
            if owner is None:
                found = "unknown"
            elif owner != client:
                found = "foreign"  # not this client's token: nothing is revoked
            elif family is not None:
                family.revoked, found = True, "refresh_token"
            else:
                del self._access[token]
                found = "access_token"
            self._revocations.append((client, form.get("token_type_hint"), found))
        return Reply(200, b"", "text/plain", note=f"ok ({found})")


def _flatten(body: bytes) -> dict[str, str]:
    """A JSON object's members as strings, for the request record (non-objects record nothing)."""
    try:
        meta = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
