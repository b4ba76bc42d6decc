"""Tests for the loopback authorization server's login side: discovery, DCR, CIMD, code, device."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tokend.authserver import AuthServer

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REDIRECT = "http://127.0.0.1:8765/callback"
CLIENTS = {"tokend-demo": None, "conf": "s3cret"}


@pytest.fixture
def server() -> Iterator[AuthServer]:
    with AuthServer(clients=CLIENTS) as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize(client: httpx.Client, server: AuthServer, **params: str) -> httpx.Response:
    return client.get(server.url + "/authorize", params=params)


def redirect_params(response: httpx.Response) -> dict[str, str]:
    """The query parameters of a 302's Location, one value each."""
    assert response.status_code == 302
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}


def code_request(challenge: str, *, client_id: str = "tokend-demo", **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-1",
        "scope": "demo offline_access",
    }
    params.update(extra)
    return params


def exchange(
    client: httpx.Client, server: AuthServer, code: str, verifier: str, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": "tokend-demo",
        **extra,
    }
    return client.post(server.token_url, data=form)


def login(client: httpx.Client, server: AuthServer, **extra: str) -> dict[str, Any]:
    """Run the code flow for tokend-demo; the token response."""
    verifier, challenge = pkce()
    code = redirect_params(authorize(client, server, **code_request(challenge, **extra)))["code"]
    response = exchange(client, server, code, verifier, **extra)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def poll(client: httpx.Client, server: AuthServer, device_code: str) -> httpx.Response:
    form = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": "tokend-demo"}
    return client.post(server.token_url, data=form)


def start_device(client: httpx.Client, server: AuthServer) -> dict[str, Any]:
    response = client.post(
        server.url + "/device_authorization", data={"client_id": "tokend-demo", "scope": "demo"}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def mcp(client: httpx.Client, server: AuthServer, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post(server.mcp_url, json={"jsonrpc": "2.0"}, headers=headers)


def test_both_discovery_documents_are_served_at_the_root(
    server: AuthServer, client: httpx.Client
) -> None:
    """RFC 8414 and OpenID discovery documents list every endpoint, grant, PKCE and scopes."""
    oauth = client.get(server.url + "/.well-known/oauth-authorization-server").json()
    openid = client.get(server.url + "/.well-known/openid-configuration").json()
    assert oauth == openid
    assert oauth["issuer"] == server.url
    for key, path in [
        ("authorization_endpoint", "/authorize"),
        ("token_endpoint", "/token"),
        ("device_authorization_endpoint", "/device_authorization"),
        ("revocation_endpoint", "/revoke"),
        ("registration_endpoint", "/register"),
    ]:
        assert oauth[key] == server.url + path
    assert oauth["code_challenge_methods_supported"] == ["S256"]
    assert oauth["grant_types_supported"] == ["authorization_code", "refresh_token", DEVICE_GRANT]
    assert oauth["response_types_supported"] == ["code"]
    assert "offline_access" in oauth["scopes_supported"]
    assert oauth["client_id_metadata_document_supported"] is False


def test_openid_only_server_and_omitted_features(server: AuthServer, client: httpx.Client) -> None:
    """metadata_docs={"openid"} drops RFC 8414; disabled features and PKCE vanish from the doc."""
    server.metadata_docs = {"openid"}
    server.pkce_methods = ()
    server.device_flow = server.revocation = server.registration = False
    assert client.get(server.url + "/.well-known/oauth-authorization-server").status_code == 404
    doc = client.get(server.url + "/.well-known/openid-configuration").json()
    for key in (
        "code_challenge_methods_supported",
        "device_authorization_endpoint",
        "revocation_endpoint",
        "registration_endpoint",
    ):
        assert key not in doc
    assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert client.post(server.url + "/register", json={}).status_code == 404


def test_issuer_with_a_path_is_discovered_path_aware(
    server: AuthServer, client: httpx.Client
) -> None:
    """With issuer_path the documents live at the RFC 8414 §3.1 and OIDC paths, not the root."""
    server.issuer_path = "/tenant"
    for path in (
        "/.well-known/oauth-authorization-server/tenant",
        "/.well-known/openid-configuration/tenant",
        "/tenant/.well-known/openid-configuration",
    ):
        response = client.get(server.url + path)
        assert response.status_code == 200, path
        assert response.json()["issuer"] == server.url + "/tenant"
    assert client.get(server.url + "/.well-known/oauth-authorization-server").status_code == 404
    assert client.get(server.url + "/.well-known/openid-configuration").status_code == 404


def test_protected_resource_challenge_and_metadata(
    server: AuthServer, client: httpx.Client
) -> None:
    """/mcp without a token is 401 naming its RFC 9728 metadata, which names the issuer."""
    response = mcp(client, server, None)
    assert response.status_code == 401
    prm = server.url + "/.well-known/oauth-protected-resource/mcp"
    assert response.headers["www-authenticate"] == f'Bearer resource_metadata="{prm}", scope="demo"'
    doc = client.get(prm).json()
    assert doc == {
        "resource": server.url + "/mcp",
        "authorization_servers": [server.url],
        "scopes_supported": ["demo"],
        "bearer_methods_supported": ["header"],
    }
    root = server.url + "/.well-known/oauth-protected-resource"
    assert client.get(root).status_code == 404
    server.prm_at_root = True
    assert client.get(root).json() == doc


def test_plain_bearer_challenge_when_challenge_header_is_off(
    server: AuthServer, client: httpx.Client
) -> None:
    """challenge_header=False answers a bare `Bearer` challenge, on any method."""
    server.challenge_header = False
    for method in ("GET", "POST", "DELETE"):
        response = client.request(method, server.mcp_url)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


def test_code_flow_with_pkce_issues_tokens_that_rotate(
    server: AuthServer, client: httpx.Client
) -> None:
    """Authorize → code (with state and iss) → tokens → /mcp works → refresh rotates."""
    verifier, challenge = pkce()
    resource = server.mcp_url
    redirect = authorize(client, server, **code_request(challenge, resource=resource))
    params = redirect_params(redirect)
    assert redirect.headers["location"].startswith(REDIRECT + "?")
    assert (params["state"], params["iss"]) == ("st-1", server.url)
    tokens = exchange(client, server, params["code"], verifier, resource=resource).json()
    assert tokens["scope"] == "demo offline_access"
    seen = mcp(client, server, tokens["access_token"])
    assert seen.status_code == 200
    assert seen.json() == {
        "sub": "demo-user",
        "client_id": "tokend-demo",
        "scope": "demo offline_access",
        "resource": resource,
    }
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": "tokend-demo",
        "resource": resource,
    }
    refreshed = client.post(server.token_url, data=form).json()
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    assert server.refreshes_ok == 1
    authz, code, refresh = [r for r in server.requests if r.path != "/mcp"]
    assert authz.path.startswith("/authorize?")
    assert authz.form["resource"] == code.form["resource"] == refresh.form["resource"] == resource
    assert authz.form["code_challenge"] == challenge
    assert (authz.outcome, code.outcome, refresh.outcome) == ("redirect", "ok", "ok")


def test_a_token_for_another_resource_is_refused_at_mcp(
    server: AuthServer, client: httpx.Client
) -> None:
    """A token bound to another resource (RFC 8707) gets 401 invalid_token at /mcp."""
    tokens = login(client, server, resource="https://elsewhere.example/mcp")
    response = mcp(client, server, tokens["access_token"])
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


def test_wrong_verifier_and_code_reuse_are_invalid_grant(
    server: AuthServer, client: httpx.Client
) -> None:
    """A wrong PKCE verifier fails; a code works once and its replay revokes the grant."""
    verifier, challenge = pkce()
    code = redirect_params(authorize(client, server, **code_request(challenge)))["code"]
    wrong = exchange(client, server, code, pkce()[0])
    assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
    verifier, challenge = pkce()
    code = redirect_params(authorize(client, server, **code_request(challenge)))["code"]
    tokens = exchange(client, server, code, verifier).json()
    replay = exchange(client, server, code, verifier)
    assert (replay.status_code, replay.json()["error"]) == (400, "invalid_grant")
    assert not server.is_valid_access_token(tokens["access_token"])


def test_deny_redirects_access_denied_with_state(server: AuthServer, client: httpx.Client) -> None:
    """consent="deny" redirects with error=access_denied, the state and iss, and no code."""
    server.consent = "deny"
    params = redirect_params(authorize(client, server, **code_request(pkce()[1])))
    assert params["error"] == "access_denied"
    assert (params["state"], params["iss"]) == ("st-1", server.url)
    assert "code" not in params


def test_authorize_refuses_bad_requests(server: AuthServer, client: httpx.Client) -> None:
    """Bad client or redirect → 400 without redirect; missing or unsupported PKCE → redirect."""
    challenge = pkce()[1]
    unknown = authorize(client, server, **code_request(challenge, client_id="stranger"))
    assert (unknown.status_code, unknown.json()["error"]) == (400, "invalid_client")
    remote = authorize(client, server, **code_request(challenge, redirect_uri="https://evil/cb"))
    assert remote.status_code == 400
    assert "location" not in remote.headers
    no_pkce = code_request(challenge)
    del no_pkce["code_challenge"]
    assert redirect_params(authorize(client, server, **no_pkce))["error"] == "invalid_request"
    plain = code_request(challenge, code_challenge_method="plain")
    assert redirect_params(authorize(client, server, **plain))["error"] == "invalid_request"
    bad_scope = code_request(challenge, scope="admin")
    assert redirect_params(authorize(client, server, **bad_scope))["error"] == "invalid_scope"


def test_dynamic_registration_then_code_flow_with_basic_auth(
    server: AuthServer, client: httpx.Client
) -> None:
    """A client registered at /register (201, secret) logs in and refreshes with Basic auth."""
    response = client.post(
        server.url + "/register",
        json={
            "client_name": "tokend",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
        },
    )
    assert response.status_code == 201
    reg = response.json()
    assert reg["token_endpoint_auth_method"] == "client_secret_basic"
    assert reg["client_name"] == "tokend"
    assert isinstance(reg["client_id_issued_at"], int)
    auth = httpx.BasicAuth(reg["client_id"], reg["client_secret"])
    verifier, challenge = pkce()
    request = code_request(challenge, client_id=reg["client_id"])
    code = redirect_params(authorize(client, server, **request))["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    tokens = client.post(server.token_url, data=form, auth=auth).json()
    form = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    assert client.post(server.token_url, data=form, auth=auth).status_code == 200
    bad = client.post(server.token_url, data=form, auth=httpx.BasicAuth(reg["client_id"], "x"))
    assert bad.status_code == 401
    recorded = server.requests[0]
    assert (recorded.path, recorded.outcome, recorded.client_id) == (
        "/register",
        "ok",
        reg["client_id"],
    )
    assert json.loads(recorded.form["redirect_uris"]) == [REDIRECT]


def test_registration_refuses_bad_metadata(server: AuthServer, client: httpx.Client) -> None:
    """Non-loopback http redirects, unknown auth methods and grants are refused with 400."""
    cases = [
        ({"redirect_uris": ["http://example.com/cb"]}, "invalid_redirect_uri"),
        (
            {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "tls"},
            "invalid_client_metadata",
        ),
        ({"redirect_uris": [REDIRECT], "grant_types": ["password"]}, "invalid_client_metadata"),
    ]
    for meta, error in cases:
        response = client.post(server.url + "/register", json=meta)
        assert (response.status_code, response.json()["error"]) == (400, error)
    public = client.post(
        server.url + "/register",
        json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
    ).json()
    assert "client_secret" not in public
    other = code_request(
        pkce()[1], client_id=public["client_id"], redirect_uri="http://127.0.0.1:9/other"
    )
    assert authorize(client, server, **other).status_code == 400  # exact match for DCR clients


def test_device_flow_pending_then_approved(server: AuthServer, client: httpx.Client) -> None:
    """Device codes poll authorization_pending until approve_device, then get tokens once."""
    server.device_interval_s = 0
    start = start_device(client, server)
    assert start["verification_uri"] == server.url + "/device"
    assert start["verification_uri_complete"].endswith(start["user_code"])
    assert (start["expires_in"], start["interval"]) == (600, 0)
    assert len(start["user_code"]) == 9
    assert start["user_code"][4] == "-"
    assert poll(client, server, start["device_code"]).json()["error"] == "authorization_pending"
    assert server.pending_device_codes() == [start["user_code"]]
    server.approve_device(start["user_code"].lower().replace("-", ""))
    tokens = poll(client, server, start["device_code"]).json()
    assert tokens["scope"] == "demo"
    assert server.is_valid_access_token(tokens["access_token"])
    assert poll(client, server, start["device_code"]).json()["error"] == "invalid_grant"
    assert server.pending_device_codes() == []


def test_device_flow_slow_down(server: AuthServer, client: httpx.Client) -> None:
    """Scripted device_slow_down and polling faster than the interval answer slow_down."""
    server.device_interval_s = 0.5
    server.device_slow_down_step_s = 0.0
    start = start_device(client, server)
    assert start["interval"] == 0.5
    assert poll(client, server, start["device_code"]).json()["error"] == "authorization_pending"
    assert poll(client, server, start["device_code"]).json()["error"] == "slow_down"  # too fast
    server.device_interval_s = 0
    server.device_slow_down = 2
    other = start_device(client, server)
    errors = [poll(client, server, other["device_code"]).json()["error"] for _ in range(3)]
    assert errors == ["slow_down", "slow_down", "authorization_pending"]


def test_device_flow_denied_auto_and_expired(server: AuthServer, client: httpx.Client) -> None:
    """deny_device → access_denied; device_auto decides after pending polls; codes expire."""
    server.device_interval_s = 0
    denied = start_device(client, server)
    server.deny_device(denied["user_code"])
    assert poll(client, server, denied["device_code"]).json()["error"] == "access_denied"
    server.device_auto = "approve"
    auto = start_device(client, server)
    assert poll(client, server, auto["device_code"]).json()["error"] == "authorization_pending"
    assert "access_token" in poll(client, server, auto["device_code"]).json()
    server.device_auto = "deny"
    server.device_pending_polls = 0
    refused = start_device(client, server)
    assert poll(client, server, refused["device_code"]).json()["error"] == "access_denied"
    server.device_auto = None
    server.device_expires_s = 0.3
    expiring = start_device(client, server)
    time.sleep(0.5)
    assert poll(client, server, expiring["device_code"]).json()["error"] == "expired_token"
    with pytest.raises(KeyError):
        server.approve_device("NOPE-NOPE")


def test_revoking_a_refresh_token_kills_the_family(
    server: AuthServer, client: httpx.Client
) -> None:
    """/revoke with a refresh token ends the grant: refresh is invalid_grant, /mcp says 401."""
    tokens = login(client, server)
    response = client.post(
        server.url + "/revoke",
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": "tokend-demo",
        },
    )
    assert response.status_code == 200
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": "tokend-demo",
    }
    assert client.post(server.token_url, data=form).json()["error"] == "invalid_grant"
    assert mcp(client, server, tokens["access_token"]).status_code == 401
    assert server.revocations == [("tokend-demo", "refresh_token", "refresh_token")]
    assert tokens["refresh_token"] not in repr(server.revocations)


def test_revoking_an_access_token_and_unknown_tokens(
    server: AuthServer, client: httpx.Client
) -> None:
    """An access token is revoked alone; unknown tokens get 200; confidential clients need auth."""
    tokens = login(client, server)
    url = server.url + "/revoke"
    form = {"token": tokens["access_token"], "client_id": "tokend-demo"}
    assert client.post(url, data=form).status_code == 200
    assert mcp(client, server, tokens["access_token"]).status_code == 401
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": "tokend-demo",
    }
    assert client.post(server.token_url, data=form).status_code == 200
    assert client.post(url, data={"token": "nope", "client_id": "tokend-demo"}).status_code == 200
    unauthenticated = client.post(url, data={"token": "nope", "client_id": "conf"})
    assert unauthenticated.status_code == 401
    basic = httpx.BasicAuth("conf", "s3cret")
    assert client.post(url, data={"token": "nope"}, auth=basic).status_code == 200
    assert [kind for _, _, kind in server.revocations] == ["access_token", "unknown", "unknown"]


class _DocHandler(BaseHTTPRequestHandler):
    documents: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.documents.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def doc_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A tiny stdlib HTTP server for client metadata documents: (base URL, path -> body)."""
    documents: dict[str, bytes] = {}

    class Handler(_DocHandler):
        pass

    Handler.documents = documents
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", documents
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_client_id_metadata_document_login(
    server: AuthServer, client: httpx.Client, doc_server: tuple[str, dict[str, bytes]]
) -> None:
    """With cimd on, a URL client id is fetched, checked, and then logs in as a public client."""
    base, documents = doc_server
    client_id = base + "/client.json"
    documents["/client.json"] = json.dumps(
        {"client_id": client_id, "client_name": "tokend", "redirect_uris": [REDIRECT]}
    ).encode()
    documents["/liar.json"] = json.dumps(
        {"client_id": base + "/other.json", "redirect_uris": [REDIRECT]}
    ).encode()
    verifier, challenge = pkce()
    request = code_request(challenge, client_id=client_id)
    assert authorize(client, server, **request).status_code == 400  # cimd is off
    server.cimd = True
    doc = client.get(server.url + "/.well-known/oauth-authorization-server").json()
    assert doc["client_id_metadata_document_supported"] is True
    code = redirect_params(authorize(client, server, **request))["code"]
    tokens = exchange(client, server, code, verifier, client_id=client_id).json()
    assert mcp(client, server, tokens["access_token"]).json()["client_id"] == client_id
    liar = code_request(challenge, client_id=base + "/liar.json")
    assert authorize(client, server, **liar).status_code == 400
    missing = code_request(challenge, client_id=base + "/missing.json")
    assert authorize(client, server, **missing).status_code == 400
