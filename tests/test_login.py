"""`tokend login`'s flows against the loopback authorization server: device, loopback and paste,
discovery from an issuer or an MCP URL, registration, PKCE, `state`, `resource` and the failures
a human can cause (denied consent, an expired device code, a wrong redirect)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.sites import Site
from tokend.authserver import AuthServer
from tokend.clock import SystemClock
from tokend.config import ConnectorConfig
from tokend.errors import DiscoveryError, LoginError
from tokend.login.flows import Prompt
from tokend.login.session import LoginResult, login
from tokend.model import Secret
from tokend.oauth.device import DEVICE_CODE_GRANT

pytestmark = pytest.mark.anyio


@pytest.fixture
def server() -> Iterator[AuthServer]:
    """The loopback server with fast device polling (the RFC's 5 s slow-down step kept)."""
    with AuthServer(lifetime_s=30.0) as auth:
        auth.device_interval_s = 0.2
        yield auth


@dataclass
class Human:
    """Plays the user: reads what login shows and answers like a browser would."""

    lines: list[str] = field(default_factory=list)
    paste: str | None = None  # what to paste back; None: follow the URL and paste the redirect
    tamper_state: bool = False
    interactive: bool = False

    def prompt(self) -> Prompt:
        return Prompt(say=self.say, ask=self.ask, interactive=self.interactive)

    def say(self, text: str) -> None:
        self.lines.append(text)
        if text.startswith("Waiting for the redirect"):
            # The loopback flow: a browser follows the URL to the listener, off the event loop.
            threading.Thread(target=self.browse, args=(self.shown_url(), True), daemon=True).start()

    def ask(self) -> str | None:
        if self.paste is not None:
            return self.paste
        return self.browse(self.shown_url(), follow=False)

    def shown_url(self) -> str:
        return next(u for u in map(self.authorization_url, self.lines) if u is not None)

    @staticmethod
    def authorization_url(text: str) -> str | None:
        for word in text.split():
            if "/authorize?" in word:
                return word
        return None

    def browse(self, url: str, follow: bool) -> str:
        """GET the authorization URL, then (loopback) the redirect it answers with."""
        answer = httpx.get(url, follow_redirects=False, timeout=10)
        location = answer.headers["location"]
        if self.tamper_state:
            location = location.replace("state=", "state=x")
        if follow and location.startswith("http://127.0.0.1"):
            httpx.get(location, timeout=10)
        return location


def connector(server: AuthServer, **changes: Any) -> ConnectorConfig:
    base = ConnectorConfig(name="svc", token_url=None, client_id=None, mcp_url=server.mcp_url)
    return replace(base, **changes)


async def run(conn: ConnectorConfig, human: Human, **options: Any) -> LoginResult:
    def no_secret() -> Secret | None:
        raise AssertionError("no configured confidential client here")

    async with httpx.AsyncClient() as http:
        return await login(
            conn, http=http, prompt=human.prompt(), clock=SystemClock(), read_secret=no_secret,
            timeout_s=10.0, **options,
        )  # fmt: skip


def requests_to(server: AuthServer, path: str) -> list[dict[str, str]]:
    return [r.form for r in server.requests if urlsplit(r.path).path == path]


async def test_device_flow_from_an_mcp_url_registers_and_authorizes(server: AuthServer) -> None:
    """From the MCP URL alone: discovery, registration with the device grant, the device flow
    (preferred when offered), and a token the server accepts; the user sees URL and code."""
    server.device_auto = "approve"
    human = Human()
    result = await run(connector(server), human)
    assert result.flow == "device"
    assert server.is_valid_access_token(result.token.access_token.reveal())
    assert result.token.refresh_token is not None
    record = result.record
    assert (record.source, record.source_url, record.issuer) == (
        "mcp_url", server.mcp_url, server.issuer,
    )  # fmt: skip
    assert (record.token_endpoint, record.revocation_endpoint) == (
        server.token_url, server.url + "/revoke",
    )  # fmt: skip
    assert record.client_kind == "registered"
    assert (record.client_auth, result.client_secret is not None) == ("client_secret_post", True)
    shown = "\n".join(human.lines)
    assert "/device" in shown and "code" in shown
    registered = requests_to(server, "/register")
    assert len(registered) == 1
    assert DEVICE_CODE_GRANT in registered[0]["grant_types"]


async def test_loopback_flow_with_pkce_state_and_resource(server: AuthServer) -> None:
    """Without a device endpoint the loopback flow runs: PKCE S256, state, the resource on the
    authorization and token requests, offline_access with prompt=consent."""
    server.device_flow = False
    result = await run(connector(server), Human())
    assert result.flow == "loopback"
    assert server.is_valid_access_token(result.token.access_token.reveal())
    (query,) = requests_to(server, "/authorize")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["resource"] == server.mcp_url
    assert query["redirect_uri"].startswith("http://127.0.0.1:")
    assert "offline_access" in query["scope"].split() and query["prompt"] == "consent"
    exchange = [
        f for f in requests_to(server, "/token") if f.get("grant_type") == "authorization_code"
    ]
    assert len(exchange) == 1 and exchange[0]["resource"] == server.mcp_url
    assert len(exchange[0]["code_verifier"]) >= 43


async def test_resource_opt_out_sends_none(server: AuthServer) -> None:
    """resource = "" keeps the resource parameter off the authorization and token requests."""
    server.device_flow = False
    result = await run(connector(server, resource_opt_out=True), Human())
    assert result.record.resource is None
    (query,) = requests_to(server, "/authorize")
    assert "resource" not in query
    assert all("resource" not in form for form in requests_to(server, "/token"))


async def test_paste_flow_exchanges_the_pasted_redirect(server: AuthServer) -> None:
    """--flow paste prints the URL and exchanges the code in the redirect URL pasted back."""
    result = await run(connector(server), Human(), flow="paste")
    assert result.flow == "paste"
    assert server.is_valid_access_token(result.token.access_token.reveal())


async def test_wrong_state_is_refused_and_nothing_exchanged(server: AuthServer) -> None:
    """A pasted redirect whose state differs is refused; no code exchange is attempted."""
    with pytest.raises(LoginError, match="state in the redirect does not match"):
        await run(connector(server), Human(tamper_state=True), flow="paste")
    assert not [
        f for f in requests_to(server, "/token") if f.get("grant_type") == "authorization_code"
    ]


async def test_denied_consent_fails_with_the_reason(server: AuthServer) -> None:
    """access_denied at the authorization endpoint ends the login: exit 10, one clear reason."""
    server.consent = "deny"
    with pytest.raises(LoginError, match="authorization was denied") as info:
        await run(connector(server), Human(), flow="paste")
    assert info.value.exit_code == 10


async def test_device_flow_denied_and_expired(server: AuthServer) -> None:
    """A denied device authorization and a device code that expires both end the login."""
    server.device_auto = "deny"
    with pytest.raises(LoginError, match="authorization was denied"):
        await run(connector(server), Human())
    server.device_auto = None
    server.device_expires_s = 1
    with pytest.raises(LoginError, match="expired"):
        await run(connector(server), Human())


async def test_device_flow_obeys_slow_down(server: AuthServer) -> None:
    """After slow_down the next poll comes at least 5 s later (RFC 8628 §3.5), then succeeds."""
    server.device_auto = "approve"
    server.device_pending_polls = 2
    server.device_slow_down = 1
    server.device_slow_down_step_s = 0
    result = await run(connector(server), Human())
    assert server.is_valid_access_token(result.token.access_token.reveal())
    polls = [r.at for r in server.requests if r.form.get("grant_type") == DEVICE_CODE_GRANT]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(polls)]
    assert gaps and gaps[0] >= 5.0  # the first poll got slow_down


async def test_missing_s256_refuses_to_proceed(server: AuthServer) -> None:
    """Metadata without S256 in code_challenge_methods_supported stops before registering."""
    server.pkce_methods = ()
    with pytest.raises(DiscoveryError, match="S256"):
        await run(connector(server), Human())
    assert requests_to(server, "/register") == []


async def test_issuer_connector_discovers_through_openid_only(server: AuthServer) -> None:
    """An issuer serving only OpenID discovery still works; no resource is sent by default."""
    server.metadata_docs = {"openid"}
    server.device_auto = "approve"
    conn = ConnectorConfig(name="svc", token_url=None, client_id=None, issuer=server.issuer)
    result = await run(conn, Human())
    assert (result.record.source, result.record.issuer) == ("issuer", server.issuer)
    assert result.record.resource is None


async def test_configured_public_client_is_used_as_is(server: AuthServer) -> None:
    """A configured client_id (client_auth none) is used without registering anything."""
    server.device_auto = "approve"
    result = await run(connector(server, client_id="tokend-demo", client_auth="none"), Human())
    assert (result.record.client_id, result.record.client_kind) == ("tokend-demo", "configured")
    assert requests_to(server, "/register") == []


async def test_explicit_endpoints_without_discovery(server: AuthServer) -> None:
    """A token_url connector with authorization_url logs in by loopback without discovery."""
    conn = ConnectorConfig(
        name="svc", token_url=server.token_url, client_id="tokend-demo", client_auth="none",
        authorization_url=server.url + "/authorize",
    )  # fmt: skip
    result = await run(conn, Human())
    assert result.flow == "loopback"
    assert result.record.source == "token_url"
    assert not [r for r in server.requests if "well-known" in r.path]


async def test_no_refresh_token_is_warned_about(server: AuthServer) -> None:
    """A login that yields no refresh token warns that the connector cannot be kept alive."""
    server.device_auto = "approve"
    server.fail_next("omit_refresh_token", count=3)  # a pending poll may take the first
    human = Human()
    result = await run(connector(server), human)
    assert result.token.refresh_token is None
    assert any("cannot keep svc alive unattended" in line for line in human.lines)


async def test_loopback_times_out_when_nobody_comes(server: AuthServer) -> None:
    """Without a redirect the loopback flow gives up after its timeout with a clear reason."""
    server.device_flow = False

    class Absent(Human):
        def say(self, text: str) -> None:
            self.lines.append(text)

    with pytest.raises(LoginError, match="no redirect arrived"):
        async with httpx.AsyncClient() as http:
            await login(
                connector(server), http=http, prompt=Absent().prompt(), clock=SystemClock(),
                read_secret=lambda: None, timeout_s=0.5,
            )  # fmt: skip


def test_token_lifetime_survives_the_hand_over() -> None:
    """The grant body gives the remaining lifetime, rounded down (never longer than true)."""
    from datetime import UTC, datetime

    from tokend.login.session import as_token_response
    from tokend.model import TokenSet

    now = datetime(2026, 1, 1, tzinfo=UTC)
    token = TokenSet(
        access_token=Secret("a"), refresh_token=Secret("r"), token_type="Bearer",
        expires_at=now + timedelta(seconds=59.9), obtained_at=now, scope="x",
    )  # fmt: skip
    body = as_token_response(token, now=now)
    assert body == {
        "access_token": "a", "token_type": "Bearer", "expires_in": 59, "refresh_token": "r",
        "scope": "x",
    }  # fmt: skip


def test_browser_opens_only_for_a_human_with_a_display() -> None:
    """No browser without a terminal, or without $DISPLAY/$WAYLAND_DISPLAY/$BROWSER."""
    from tokend.login.flows import may_open_browser

    human, script = Human(interactive=True).prompt(), Human(interactive=False).prompt()
    assert may_open_browser(human, {"DISPLAY": ":0"})
    assert may_open_browser(human, {"BROWSER": "lynx"})
    assert not may_open_browser(human, {})
    assert not may_open_browser(script, {"DISPLAY": ":0"})


async def test_client_id_metadata_document_is_used_when_the_server_accepts_it(
    server: AuthServer, site: Site
) -> None:
    """With client_metadata_url and a server advertising support, the document URL is the
    client id and nothing is registered; without support, login falls back to registration."""
    url = f"{site.base}/tokend-client.json"
    site.json(
        "/tokend-client.json",
        {
            "client_id": url,
            "client_name": "tokend",
            "redirect_uris": ["http://127.0.0.1:8765/callback"],
            "grant_types": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
            "token_endpoint_auth_method": "none",
        },
    )
    server.cimd = True
    server.device_auto = "approve"
    result = await run(connector(server, client_metadata_url=url), Human())
    assert (result.record.client_id, result.record.client_kind) == (url, "metadata_document")
    assert result.record.client_auth == "none" and result.client_secret is None
    assert requests_to(server, "/register") == []
    server.cimd = False
    human = Human()
    fallback = await run(connector(server, client_metadata_url=url), human)
    assert fallback.record.client_kind == "registered"
    assert any("does not accept client ID metadata documents" in line for line in human.lines)
