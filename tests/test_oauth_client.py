"""Tests for tokend.oauth.client: OAuthClient refreshing over real loopback HTTP and TLS."""

from __future__ import annotations

import gzip
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import (
    CLIENT_SECRET,
    HOUR,
    NEW_ACCESS,
    NEW_REFRESH,
    OLD_ACCESS,
    OLD_REFRESH,
    PREVIOUS,
)
from tests.pki import Pki, make_pki
from tokend import __version__
from tokend.authserver import AuthServer
from tokend.config import ConnectorConfig
from tokend.errors import (
    InvalidGrantError,
    OAuthError,
    SecretMissingError,
    TransientError,
)
from tokend.model import Secret, TokenSet
from tokend.oauth.client import MAX_BODY_BYTES, OAuthClient, RefreshResult, make_http_client
from tokend.oauth.protocol import token_set_from_fields


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def ok_body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "access_token": NEW_ACCESS,
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": NEW_REFRESH,
        "scope": "repo",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _OMIT}


_OMIT = object()


class WallClock:
    """The real wall clock, recording every reading."""

    def __init__(self) -> None:
        self.readings: list[datetime] = []

    def now(self) -> datetime:
        moment = datetime.now(UTC)
        self.readings.append(moment)
        return moment

    def monotonic(self) -> float:
        return 0.0


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    clients = {"conf": CLIENT_SECRET, "public": None}
    server = AuthServer(lifetime_s=60, clients=clients).start()
    yield server
    server.stop()


def grant_of(server: AuthServer, client_id: str = "conf") -> TokenSet:
    return token_set_from_fields(
        server.issue_grant(client_id),
        connector="demo",
        obtained_at=datetime.now(UTC),
        previous=None,
        default_lifetime=HOUR,
    )


def demo_conn(url: str, **changes: Any) -> ConnectorConfig:
    base = ConnectorConfig(name="demo", token_url=url, client_id="conf")
    return replace(base, **changes)


def assert_no_secrets(exc: BaseException) -> None:
    text = f"{exc} {exc!r} {vars(exc)}"
    for secret in (OLD_ACCESS, OLD_REFRESH, CLIENT_SECRET):
        assert secret not in text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("client_id", "method", "secret"),
    [
        ("conf", "client_secret_basic", Secret(CLIENT_SECRET)),
        ("conf", "client_secret_post", Secret(CLIENT_SECRET)),
        ("public", "none", None),
    ],
)
async def test_refresh_end_to_end(
    auth: AuthServer, client_id: str, method: str, secret: Secret | None
) -> None:
    """A refresh over HTTP rotates the refresh token and yields an access token the server takes."""
    current = grant_of(auth, client_id)
    conn = demo_conn(auth.token_url, client_id=client_id, client_auth=method, scope="demo")
    async with make_http_client() as http:
        result = await OAuthClient(http, WallClock()).refresh(conn, current, secret)
    assert isinstance(result, RefreshResult)
    new = result.token
    assert auth.is_valid_access_token(new.access_token.reveal())
    assert new.refresh_token is not None
    assert current.refresh_token is not None
    assert new.refresh_token.reveal() != current.refresh_token.reveal()
    assert new.lifetime == timedelta(seconds=60)
    assert new.scope == "demo offline_access"
    assert result.clock_offset_s is not None
    assert abs(result.clock_offset_s) < 30
    [recorded] = auth.requests
    assert recorded.outcome == "ok"
    assert "scope" not in recorded.form
    assert recorded.headers["user-agent"] == f"tokend/{__version__}"


@pytest.mark.anyio
async def test_refresh_keeps_refresh_token_the_server_omits(auth: AuthServer) -> None:
    """A refresh answer without refresh_token or scope keeps the current ones."""
    current = grant_of(auth)
    auth.fail_next("omit_refresh_token")
    auth.fail_next("omit_scope")
    conn = demo_conn(auth.token_url)
    async with make_http_client() as http:
        client = OAuthClient(http, WallClock())
        first = (await client.refresh(conn, current, Secret(CLIENT_SECRET))).token
        second = (await client.refresh(conn, first, Secret(CLIENT_SECRET))).token
    assert first.refresh_token == current.refresh_token
    assert second.scope == current.scope
    assert second.refresh_token != first.refresh_token


@pytest.mark.anyio
async def test_refresh_stamps_obtained_at_before_sending(auth: AuthServer) -> None:
    """obtained_at is read before the request leaves, so a slow server shortens the lifetime."""
    current = grant_of(auth)
    auth.fail_next("slow", delay_s=0.5)
    clock = WallClock()
    async with make_http_client() as http:
        result = await OAuthClient(http, clock).refresh(
            demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
        )
    [recorded] = auth.requests
    token = result.token
    # The server saw the request after obtained_at was stamped, and answered 0.5 s later.
    assert token.obtained_at == clock.readings[0]
    assert token.obtained_at <= recorded.at
    assert token.expires_at == token.obtained_at + timedelta(seconds=60)
    assert token.expires_at <= recorded.at + timedelta(seconds=60)
    assert clock.readings[1] - token.obtained_at >= timedelta(seconds=0.5)


@pytest.mark.anyio
async def test_refresh_reports_server_clock_offset() -> None:
    """RefreshResult carries how far the server's Date header is ahead of our clock."""
    with AuthServer(lifetime_s=60, date_offset_s=300) as auth:
        current = grant_of(auth, "tokend-demo")
        conn = demo_conn(auth.token_url, client_id="tokend-demo", client_auth="none")
        async with make_http_client() as http:
            result = await OAuthClient(http, WallClock()).refresh(conn, current, None)
    assert result.clock_offset_s is not None
    assert 270 < result.clock_offset_s < 330


@pytest.mark.anyio
async def test_refresh_invalid_grant(auth: AuthServer) -> None:
    """invalid_grant over HTTP raises InvalidGrantError."""
    current = grant_of(auth)
    auth.fail_next("invalid_grant", description="revoked by admin")
    async with make_http_client() as http:
        with pytest.raises(InvalidGrantError) as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
            )
    assert info.value.description == "revoked by admin"


@pytest.mark.anyio
async def test_refresh_wrong_client_secret_is_rejected(auth: AuthServer) -> None:
    """A wrong client secret gets invalid_client: terminal OAuthError, not transient."""
    current = grant_of(auth)
    async with make_http_client() as http:
        with pytest.raises(OAuthError) as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret("wrong")
            )
    assert info.value.error == "invalid_client"
    assert info.value.status == 401


@pytest.mark.anyio
async def test_refresh_429_carries_retry_after(auth: AuthServer) -> None:
    """429 with Retry-After over HTTP raises TransientError with retry_after."""
    current = grant_of(auth)
    auth.fail_next("429", retry_after=7)
    async with make_http_client() as http:
        with pytest.raises(TransientError) as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
            )
    assert info.value.retry_after == 7.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("reset", {}, "cannot reach the token endpoint 127.0.0.1"),
        ("500", {"body": "html"}, "HTTP 500"),
        ("garbage", {}, "unparseable response"),
        ("bad_expires_in", {"value": -1}, "expires_in"),
    ],
)
async def test_refresh_transient_faults(
    auth: AuthServer, kind: str, params: dict[str, Any], match: str
) -> None:
    """Resets, 5xx pages and garbage bodies are transient, and their messages hold no secret."""
    current = grant_of(auth)
    auth.fail_next(kind, **params)
    async with make_http_client() as http:
        with pytest.raises(TransientError, match=match) as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
            )
    assert_no_secrets(info.value)
    assert current.refresh_token is not None
    assert current.refresh_token.reveal() not in str(info.value)


@pytest.mark.anyio
async def test_refresh_connection_refused(auth: AuthServer) -> None:
    """A refused connection is a transient error naming the host only."""
    current = grant_of(auth)
    auth.go_down()
    async with make_http_client() as http:
        with pytest.raises(TransientError, match="ConnectError") as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url + "?tenant=x"), current, Secret(CLIENT_SECRET)
            )
    assert "tenant" not in str(info.value)
    assert_no_secrets(info.value)


@pytest.mark.anyio
async def test_refresh_total_timeout(auth: AuthServer) -> None:
    """A hanging endpoint hits the total timeout and is transient."""
    current = grant_of(auth)
    auth.fail_next("hang", delay_s=5)
    async with make_http_client() as http:
        client = OAuthClient(http, WallClock(), total_timeout_s=0.3)
        with pytest.raises(TransientError, match=r"timed out after 0\.3s"):
            await client.refresh(demo_conn(auth.token_url), current, Secret(CLIENT_SECRET))


@pytest.mark.anyio
async def test_refresh_read_timeout(auth: AuthServer) -> None:
    """httpx's own read timeout is transient too."""
    current = grant_of(auth)
    auth.fail_next("hang", delay_s=5)
    async with make_http_client(timeout_s=0.3) as http:
        with pytest.raises(TransientError, match="ReadTimeout") as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
            )
    assert_no_secrets(info.value)


@pytest.mark.anyio
async def test_refresh_without_refresh_token_sends_nothing(auth: AuthServer) -> None:
    """A grant without a refresh token raises InvalidGrantError(no_refresh_token), no request."""
    current = replace(grant_of(auth), refresh_token=None)
    async with make_http_client() as http:
        with pytest.raises(InvalidGrantError, match="no_refresh_token") as info:
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), current, Secret(CLIENT_SECRET)
            )
    assert "tokend login demo" in str(info.value)
    assert auth.token_calls == 0


@pytest.mark.anyio
async def test_refresh_without_client_secret_sends_nothing(auth: AuthServer) -> None:
    """A confidential client without its secret raises SecretMissingError before sending."""
    async with make_http_client() as http:
        with pytest.raises(SecretMissingError):
            await OAuthClient(http, WallClock()).refresh(
                demo_conn(auth.token_url), grant_of(auth), None
            )
    assert auth.token_calls == 0


# -- a scripted server for what AuthServer does not do: redirects, huge or gzip bodies, TLS ---


class _ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.routes: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.hits: list[str] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-answer are part of these tests

    @property
    def base(self) -> str:
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        server = self.server
        assert isinstance(server, _ScriptedServer)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server.hits.append(self.path)
        status, headers, body = server.routes.get(self.path, (404, [], b"{}"))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _serve
    do_POST = _serve


def _serve_in_thread(server: _ScriptedServer) -> Iterator[_ScriptedServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def scripted() -> Iterator[_ScriptedServer]:
    yield from _serve_in_thread(_ScriptedServer())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[_ScriptedServer]:
    server = _ScriptedServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_file, pki.key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve_in_thread(server)


def _current() -> TokenSet:
    return PREVIOUS


_JSON = [("Content-Type", "application/json")]
_TOKEN_BODY = json.dumps(ok_body()).encode()


@pytest.mark.anyio
async def test_refresh_does_not_follow_redirects(scripted: _ScriptedServer) -> None:
    """A redirect from the token endpoint is transient, and its target is never contacted."""
    scripted.routes["/token"] = (307, [("Location", scripted.base + "/elsewhere")], b"")
    scripted.routes["/elsewhere"] = (200, _JSON, _TOKEN_BODY)
    conn = demo_conn(scripted.base + "/token")
    async with make_http_client() as http:
        with pytest.raises(TransientError, match="unexpected redirect"):
            await OAuthClient(http, WallClock()).refresh(conn, _current(), Secret(CLIENT_SECRET))
    assert scripted.hits == ["/token"]


@pytest.mark.anyio
async def test_refresh_refuses_oversized_bodies(scripted: _ScriptedServer) -> None:
    """A response body over MAX_BODY_BYTES is refused as transient, not held in memory."""
    scripted.routes["/token"] = (200, _JSON, b" " * (MAX_BODY_BYTES + 100_000))
    conn = demo_conn(scripted.base + "/token")
    async with make_http_client() as http:
        with pytest.raises(TransientError, match="too large"):
            await OAuthClient(http, WallClock()).refresh(conn, _current(), Secret(CLIENT_SECRET))


@pytest.mark.anyio
async def test_refresh_reads_gzip_bodies(scripted: _ScriptedServer) -> None:
    """A gzip-encoded token response is decoded once and parsed."""
    headers = [*_JSON, ("Content-Encoding", "gzip")]
    scripted.routes["/token"] = (200, headers, gzip.compress(_TOKEN_BODY))
    conn = demo_conn(scripted.base + "/token")
    async with make_http_client() as http:
        result = await OAuthClient(http, WallClock()).refresh(
            conn, _current(), Secret(CLIENT_SECRET)
        )
    assert result.token.access_token.reveal() == NEW_ACCESS


@pytest.mark.anyio
async def test_refresh_verifies_tls_against_the_connector_ca(
    tls_server: _ScriptedServer, pki: Pki
) -> None:
    """TLS is verified: an unknown CA fails as transient; the connector's ca_file makes it work."""
    tls_server.routes["/token"] = (200, _JSON, _TOKEN_BODY)
    url = tls_server.base + "/token"
    async with make_http_client() as http:
        client = OAuthClient(http, WallClock())
        with pytest.raises(TransientError, match=r"ConnectError.*CERTIFICATE_VERIFY_FAILED"):
            await client.refresh(demo_conn(url), _current(), Secret(CLIENT_SECRET))
        conn = demo_conn(url, ca_file=pki.ca_file)
        for _ in range(2):  # the second refresh reuses the client made for this ca_file
            result = await client.refresh(conn, _current(), Secret(CLIENT_SECRET))
            assert result.token.access_token.reveal() == NEW_ACCESS
        assert await client.probe(conn) == 200
        await client.aclose()
        await client.aclose()  # idempotent
    assert tls_server.hits == ["/token", "/token", "/token"]


@pytest.mark.anyio
async def test_refresh_unloadable_ca_file_is_rejected(tmp_path: Path) -> None:
    """A ca_file that cannot be loaded is a configuration problem: OAuthError(invalid_ca_file)."""
    conn = demo_conn("https://127.0.0.1:9/token", ca_file=tmp_path / "missing.pem")
    async with make_http_client() as http:
        with pytest.raises(OAuthError, match="invalid_ca_file"):
            await OAuthClient(http, WallClock()).refresh(conn, _current(), Secret(CLIENT_SECRET))


@pytest.mark.anyio
async def test_probe_reports_status_without_a_grant(auth: AuthServer) -> None:
    """probe GETs the token endpoint and returns its status without sending any grant."""
    async with make_http_client() as http:
        client = OAuthClient(http, WallClock())
        assert await client.probe(demo_conn(auth.token_url)) == 404
        [recorded] = auth.requests
        assert recorded.method == "GET"
        assert auth.token_calls == 0
        with pytest.raises(OAuthError, match="insecure_token_url"):
            await client.probe(demo_conn("http://auth.example.com/token"))
    auth.go_down()
    # A fresh client: a pooled keep-alive connection could outlive go_down.
    async with make_http_client() as http:
        with pytest.raises(TransientError, match="ConnectError"):
            await OAuthClient(http, WallClock()).probe(demo_conn(auth.token_url))
