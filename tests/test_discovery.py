"""Tests for tokend.oauth.discovery against a real loopback HTTP server with per-test documents."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.sites import Site
from tokend.errors import DiscoveryError
from tokend.oauth.discovery import canonical_resource, discover


def challenge(**params: str) -> dict[str, str]:
    inner = ", ".join(f'{key}="{value}"' for key, value in params.items())
    return {"WWW-Authenticate": f"Bearer {inner}".strip()}


# -- mcp_url: protected resource metadata ----------------------------------------------------


@pytest.mark.anyio
async def test_mcp_header_driven_prm(site: Site, http: httpx.AsyncClient) -> None:
    """The 401's resource_metadata URL is used first; its scope is kept as challenge_scope."""
    mcp = f"{site.base}/mcp"
    prm_url = f"{site.base}/custom/prm"
    site.routes["POST /mcp"] = (
        401,
        challenge(realm="x", resource_metadata=prm_url, scope="files:read mcp"),
        b"",
    )
    site.json("/custom/prm", {"resource": mcp, "authorization_servers": [site.base]})
    site.as_metadata(site.base, "/.well-known/oauth-authorization-server")
    found = await discover(connector="c", http=http, mcp_url=mcp)
    assert found.resource is not None
    assert found.resource.metadata_url == prm_url
    assert found.resource.challenge_scope == "files:read mcp"
    assert found.resource.authorization_servers == (site.base,)
    assert found.metadata.token_endpoint == f"{site.base}/token"
    assert site.paths() == [
        "POST /mcp",
        "GET /custom/prm",
        "GET /.well-known/oauth-authorization-server",
    ]
    assert found.tried[0] == f"POST {mcp} -> 401"
    assert found.tried[1] == f"GET {prm_url} -> 200"


@pytest.mark.anyio
async def test_mcp_probe_is_an_initialize_post(site: Site, http: httpx.AsyncClient) -> None:
    """The probe is a JSON-RPC initialize POST accepting JSON and SSE, as MCP servers expect."""
    mcp = f"{site.base}/mcp"
    site.json(
        "/.well-known/oauth-protected-resource",
        {"resource": site.base, "authorization_servers": [site.base]},
    )
    site.as_metadata(site.base, "/.well-known/oauth-authorization-server")
    await discover(connector="c", http=http, mcp_url=mcp)
    method, path, headers, body = site.requests[0]
    assert (method, path) == ("POST", "/mcp")
    assert headers["Accept"] == "application/json, text/event-stream"
    assert json.loads(body)["method"] == "initialize"


@pytest.mark.anyio
async def test_mcp_prm_falls_back_path_aware_then_root(site: Site, http: httpx.AsyncClient) -> None:
    """Without a challenge, the path-aware PRM URL is tried before the root one (RFC 9728 §3.1)."""
    mcp = f"{site.base}/api/mcp"
    site.status("POST /api/mcp", 401, {"WWW-Authenticate": 'Bearer realm="x"'})
    site.json(
        "/.well-known/oauth-protected-resource",
        {
            "resource": f"{site.base}/",
            "authorization_servers": [site.base],
            "scopes_supported": ["a"],
        },
    )
    site.as_metadata(site.base, "/.well-known/oauth-authorization-server")
    found = await discover(connector="c", http=http, mcp_url=mcp)
    assert site.paths()[:3] == [
        "POST /api/mcp",
        "GET /.well-known/oauth-protected-resource/api/mcp",
        "GET /.well-known/oauth-protected-resource",
    ]
    assert found.resource is not None
    assert found.resource.scopes_supported == ("a",)
    assert found.resource.challenge_scope is None
    assert f"GET {site.base}/.well-known/oauth-protected-resource/api/mcp -> 404" in found.tried


@pytest.mark.anyio
async def test_mcp_path_aware_prm_wins(site: Site, http: httpx.AsyncClient) -> None:
    """A path-aware PRM document is used without asking for the root one."""
    mcp = f"{site.base}/mcp"
    site.json(
        "/.well-known/oauth-protected-resource/mcp",
        {"resource": mcp, "authorization_servers": [f"{site.base}/tenant"]},
    )
    site.as_metadata(f"{site.base}/tenant", "/.well-known/oauth-authorization-server/tenant")
    found = await discover(connector="c", http=http, mcp_url=mcp)
    assert found.metadata.issuer == f"{site.base}/tenant"
    assert "GET /.well-known/oauth-protected-resource" not in site.paths()


@pytest.mark.anyio
async def test_prm_resource_mismatch_refused(site: Site, http: httpx.AsyncClient) -> None:
    """A PRM whose resource is another server, or an unrelated path, is refused (RFC 9728 §3.3)."""
    mcp = f"{site.base}/mcp"
    site.json(
        "/.well-known/oauth-protected-resource/mcp",
        {"resource": "https://evil.example/mcp", "authorization_servers": [site.base]},
    )
    with pytest.raises(DiscoveryError, match=r"resource .*does not match") as info:
        await discover(connector="c", http=http, mcp_url=mcp)
    assert not info.value.transient
    site.json(
        "/.well-known/oauth-protected-resource/mcp",
        {"resource": f"{site.base}/other", "authorization_servers": [site.base]},
    )
    with pytest.raises(DiscoveryError, match="does not match"):
        await discover(connector="c", http=http, mcp_url=mcp)


@pytest.mark.anyio
async def test_prm_without_authorization_servers_refused(
    site: Site, http: httpx.AsyncClient
) -> None:
    """A PRM naming no authorization server is unusable, and says so."""
    mcp = f"{site.base}/mcp"
    site.json("/.well-known/oauth-protected-resource/mcp", {"resource": mcp})
    with pytest.raises(DiscoveryError, match="no authorization_servers"):
        await discover(connector="c", http=http, mcp_url=mcp)


@pytest.mark.anyio
async def test_no_prm_anywhere_names_the_urls(site: Site, http: httpx.AsyncClient) -> None:
    """Without any PRM document the error names every URL tried and is not transient."""
    mcp = f"{site.base}/mcp"
    site.routes["/.well-known/oauth-protected-resource"] = (200, {}, b"<html>spa</html>")
    tried: list[str] = []
    with pytest.raises(DiscoveryError, match="no protected resource metadata") as info:
        await discover(connector="c", http=http, mcp_url=mcp, tried=tried)
    assert not info.value.transient
    assert "/.well-known/oauth-protected-resource/mcp" in str(info.value)
    assert tried[-1].endswith("-> 200 (not a JSON object)")


# -- issuer: authorization server metadata ---------------------------------------------------


@pytest.mark.anyio
async def test_rfc8414_path_aware_first(site: Site, http: httpx.AsyncClient) -> None:
    """An issuer with a path is looked up at the path-aware RFC 8414 URL first, with defaults."""
    issuer = f"{site.base}/tenant"
    site.as_metadata(issuer, "/.well-known/oauth-authorization-server/tenant")
    found = await discover(connector="c", http=http, issuer=issuer)
    meta = found.metadata
    assert site.paths() == ["GET /.well-known/oauth-authorization-server/tenant"]
    assert meta.metadata_url == f"{site.base}/.well-known/oauth-authorization-server/tenant"
    assert meta.token_endpoint_auth_methods_supported == ("client_secret_basic",)
    assert meta.grant_types_supported == ("authorization_code", "implicit")
    assert meta.code_challenge_methods_supported == ()
    assert not meta.supports_s256
    assert meta.scopes_supported is None
    assert found.resource is None


@pytest.mark.anyio
async def test_oidc_insert_then_append(site: Site, http: httpx.AsyncClient) -> None:
    """After RFC 8414 fails, OpenID discovery is tried with the path inserted, then appended."""
    issuer = f"{site.base}/realms/x"
    site.as_metadata(
        issuer,
        "/realms/x/.well-known/openid-configuration",
        code_challenge_methods_supported=["plain", "S256"],
        device_authorization_endpoint=f"{site.base}/device",
        client_id_metadata_document_supported=True,
    )
    found = await discover(connector="c", http=http, issuer=issuer)
    assert site.paths() == [
        "GET /.well-known/oauth-authorization-server/realms/x",
        "GET /.well-known/openid-configuration/realms/x",
        "GET /realms/x/.well-known/openid-configuration",
    ]
    assert found.metadata.supports_s256
    assert found.metadata.device_authorization_endpoint == f"{site.base}/device"
    assert found.metadata.client_id_metadata_document_supported
    assert len(found.tried) == 3


@pytest.mark.anyio
async def test_root_issuer_tries_root_forms_only(site: Site, http: httpx.AsyncClient) -> None:
    """An issuer without a path tries the RFC 8414 then the OpenID root URL, and nothing else."""
    site.as_metadata(site.base, "/.well-known/openid-configuration")
    found = await discover(connector="c", http=http, issuer=site.base)
    assert site.paths() == [
        "GET /.well-known/oauth-authorization-server",
        "GET /.well-known/openid-configuration",
    ]
    assert found.metadata.issuer == site.base


@pytest.mark.anyio
async def test_issuer_mismatch_refused(site: Site, http: httpx.AsyncClient) -> None:
    """Metadata whose issuer is not the one asked for is refused, not skipped (RFC 8414 §3.3)."""
    site.as_metadata("https://other.example", "/.well-known/oauth-authorization-server")
    site.as_metadata(site.base, "/.well-known/openid-configuration")
    with pytest.raises(DiscoveryError, match=r"issuer .*other\.example.* is not") as info:
        await discover(connector="c", http=http, issuer=site.base)
    assert not info.value.transient
    assert info.value.exit_code == 78


@pytest.mark.anyio
async def test_non_loopback_http_endpoint_refused(site: Site, http: httpx.AsyncClient) -> None:
    """An endpoint on plain http to a remote host makes the metadata unusable."""
    site.as_metadata(
        site.base,
        "/.well-known/oauth-authorization-server",
        authorization_endpoint="http://auth.example.com/authorize",
    )
    with pytest.raises(DiscoveryError, match=r"authorization_endpoint .*must be https"):
        await discover(connector="c", http=http, issuer=site.base)


@pytest.mark.anyio
async def test_non_loopback_http_issuer_refused(http: httpx.AsyncClient) -> None:
    """A plain-http remote issuer is refused before any request is made."""
    with pytest.raises(DiscoveryError, match="must be https"):
        await discover(connector="c", http=http, issuer="http://auth.example.com")


@pytest.mark.anyio
async def test_missing_token_endpoint_refused(site: Site, http: httpx.AsyncClient) -> None:
    """Metadata without a token endpoint names the field and the URL."""
    site.json("/.well-known/oauth-authorization-server", {"issuer": site.base})
    with pytest.raises(DiscoveryError, match="token_endpoint is missing"):
        await discover(connector="c", http=http, issuer=site.base)


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_errors_are_transient(
    site: Site, http: httpx.AsyncClient, status: int
) -> None:
    """5xx and 429 on a metadata URL stop discovery with a transient error (exit 75)."""
    site.status("/.well-known/oauth-authorization-server", status)
    with pytest.raises(DiscoveryError, match=f"HTTP {status}") as info:
        await discover(connector="c", http=http, issuer=site.base)
    assert info.value.transient
    assert info.value.exit_code == 75


@pytest.mark.anyio
async def test_network_error_is_transient(http: httpx.AsyncClient) -> None:
    """A refused connection is a transient discovery error recorded in `tried`."""
    closed = Site()
    base = closed.base
    closed.close()
    tried: list[str] = []
    with pytest.raises(DiscoveryError) as info:
        await discover(connector="c", http=http, issuer=base, tried=tried)
    assert info.value.transient
    assert "-> error:" in tried[0]


@pytest.mark.anyio
async def test_redirect_not_followed(site: Site, http: httpx.AsyncClient) -> None:
    """A redirecting metadata URL is recorded and skipped, never followed."""
    site.status(
        "/.well-known/oauth-authorization-server", 302, {"Location": f"{site.base}/elsewhere"}
    )
    site.as_metadata(site.base, "/elsewhere")
    site.as_metadata(site.base, "/.well-known/openid-configuration")
    found = await discover(connector="c", http=http, issuer=site.base)
    assert "GET /elsewhere" not in site.paths()
    assert found.tried[0].endswith("-> 302")


@pytest.mark.anyio
async def test_exactly_one_source(http: httpx.AsyncClient) -> None:
    """Passing both or neither of issuer and mcp_url is a programming error."""
    with pytest.raises(ValueError, match="exactly one"):
        await discover(connector="c", http=http)
    with pytest.raises(ValueError, match="exactly one"):
        await discover(connector="c", http=http, issuer="https://a", mcp_url="https://b")


# -- canonical_resource ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("HTTPS://MCP.Example.COM/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com:443/mcp", "https://mcp.example.com/mcp"),
        ("http://127.0.0.1:80/", "http://127.0.0.1"),
        ("https://mcp.example.com:8443/mcp", "https://mcp.example.com:8443/mcp"),
        ("https://mcp.example.com/mcp#frag", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/", "https://mcp.example.com"),
        ("https://mcp.example.com", "https://mcp.example.com"),
        ("https://mcp.example.com/Server/MCP", "https://mcp.example.com/Server/MCP"),
        ("http://[::1]:8080/mcp", "http://[::1]:8080/mcp"),
    ],
)
def test_canonical_resource(url: str, canonical: str) -> None:
    """Scheme and host lowercase, default port and fragment dropped, path kept (RFC 8707 §2)."""
    assert canonical_resource(url) == canonical


def test_canonical_resource_rejects_relative() -> None:
    """A URL without scheme or host has no canonical form."""
    with pytest.raises(ValueError, match="absolute"):
        canonical_resource("/mcp")


@pytest.mark.anyio
async def test_root_mcp_url_tries_root_prm_once(site: Site, http: httpx.AsyncClient) -> None:
    """An MCP URL at the root has one well-known PRM URL; a non-Bearer challenge is ignored."""
    site.status("POST /", 401, {"WWW-Authenticate": 'Basic realm="x"'})
    site.json(
        "/.well-known/oauth-protected-resource",
        {"resource": site.base, "authorization_servers": [site.base]},
    )
    site.as_metadata(site.base, "/.well-known/oauth-authorization-server")
    found = await discover(connector="c", http=http, mcp_url=f"{site.base}/")
    assert site.paths()[1:] == [
        "GET /.well-known/oauth-protected-resource",
        "GET /.well-known/oauth-authorization-server",
    ]
    assert found.resource is not None
    assert found.resource.challenge_scope is None


@pytest.mark.anyio
async def test_unusable_documents(site: Site, http: httpx.AsyncClient) -> None:
    """Garbled fields, a query in the issuer, a junk resource or no metadata at all are refused."""
    site.as_metadata(site.base, "/.well-known/oauth-authorization-server", scopes_supported="a b")
    with pytest.raises(DiscoveryError, match="scopes_supported must be a list of strings"):
        await discover(connector="c", http=http, issuer=site.base)
    with pytest.raises(DiscoveryError, match="no query or fragment"):
        await discover(connector="c", http=http, issuer=f"{site.base}/?x=1")
    with pytest.raises(DiscoveryError, match="no authorization server metadata") as info:
        await discover(connector="c", http=http, issuer=f"{site.base}/nothing")
    assert not info.value.transient
    site.json(
        "/.well-known/oauth-protected-resource/mcp",
        {"resource": "not a url", "authorization_servers": [site.base]},
    )
    with pytest.raises(DiscoveryError, match="does not match"):
        await discover(connector="c", http=http, mcp_url=f"{site.base}/mcp")


@pytest.mark.anyio
async def test_oversized_document_is_transient(site: Site, http: httpx.AsyncClient) -> None:
    """A metadata body over the cap is not held in memory: the fetch fails as transient."""
    site.routes["/.well-known/oauth-authorization-server"] = (200, {}, b" " * (2 << 20))
    with pytest.raises(DiscoveryError, match="too large") as info:
        await discover(connector="c", http=http, issuer=site.base)
    assert info.value.transient
