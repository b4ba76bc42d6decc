"""Tests for tokend.server: the socket API over a real unix socket, backed by a FakeTokenSource.

The server runs on the test's event loop; blocking clients (http.client, raw sockets, curl) run
in worker threads so the loop keeps serving.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import h11
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeTokenSource, make_tokens
from tests.harness import require
from tokend.errors import ApiError, ConfigError, ExitCode
from tokend.model import Secret, TokenSet
from tokend.server.http import ApiServer, SocketInUseError

T = TypeVar("T")
UID = os.getuid()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tkd"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(source: FakeTokenSource, sock_dir: Path, **kwargs: Any) -> AsyncIterator[str]:
    """A started ApiServer on `sock_dir/run/t.sock`; yields the socket path; closes on exit."""
    server = ApiServer(source, **kwargs)
    path = sock_dir / "run" / "t.sock"
    await server.start(path)
    try:
        yield str(path)
    finally:
        await server.close()


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=30, check=False, **kwargs)


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


# --- blocking clients -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX, as the CLI will do it."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("tokend", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = connect(self.unix_path, self.timeout or 10.0)


def request(
    path: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn = UnixHTTPConnection(path)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        headers_ = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, resp.reason, headers_, resp.read())
    finally:
        conn.close()


async def call(path: str, method: str, target: str, body: Any = None) -> Reply:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    return await in_thread(request, path, method, target, data)


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A connected client socket; blocking connect, since AF_UNIX has no asynchronous connect
    and a socket with a timeout gets EAGAIN instead of waiting when the backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def read_replies(
    sock: socket.socket, count: int, *, head: bool = False
) -> tuple[bytes, list[Reply]]:
    """Read `count` responses with an h11 client; also return the raw bytes received."""
    client = h11.Connection(h11.CLIENT)
    raw = bytearray()
    replies: list[Reply] = []
    method = "HEAD" if head else "GET"
    for _ in range(count):
        # h11 parses a response only after "sending" its request; these bytes are discarded.
        client.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
        client.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                raw += data
                client.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        headers = {n.decode(): v.decode() for n, v in response.headers}
        replies.append(Reply(response.status_code, response.reason.decode(), headers, bytes(body)))
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
    return bytes(raw), replies


def raw_request(path: str, data: bytes, count: int = 1) -> tuple[bytes, list[Reply]]:
    with connect(path) as sock:
        sock.sendall(data)
        return read_replies(sock, count)


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed the connection (blocks up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def get(target: str, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: t", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return 0.0


# --- the token route ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_token_json_body(sock_dir: Path) -> None:
    """GET token answers the documented JSON fields; expires_in is floored and never negative."""
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    def tokens(access: str, seconds: float) -> TokenSet:
        return TokenSet(
            access_token=Secret(access),
            refresh_token=None,
            token_type="Bearer",
            scope="read write",
            obtained_at=now - timedelta(hours=1),
            expires_at=now + timedelta(seconds=seconds),
        )

    source = FakeTokenSource({"a": tokens("at-a", 100.9), "old": tokens("at-old", -5)})
    async with serving(source, sock_dir, clock=FixedClock(now)) as path:
        reply = await call(path, "GET", "/v1/connectors/a/token")
        expired = await call(path, "GET", "/v1/connectors/old/token")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "connector": "a",
        "access_token": "at-a",
        "token_type": "Bearer",
        "expires_at": "2030-01-02T03:05:45Z",
        "expires_in": 100,
        "scope": "read write",
    }
    assert expired.json()["expires_in"] == 0
    assert source.min_ttls == [0.0, 0.0]


@pytest.mark.anyio
async def test_token_raw_format(sock_dir: Path) -> None:
    """?format=raw answers text/plain with the bare token and no trailing newline."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply = await call(path, "GET", "/v1/connectors/a/token?format=raw")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; charset=utf-8"
    assert reply.body == b"at-a"


@pytest.mark.anyio
async def test_min_ttl_is_passed_to_the_source(sock_dir: Path) -> None:
    """?min_ttl=SECONDS reaches TokenSource.token as a float."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        assert (await call(path, "GET", "/v1/connectors/a/token?min_ttl=120")).status == 200
        assert (
            await call(path, "GET", "/v1/connectors/a/token?min_ttl=0.5&format=raw")
        ).status == 200
    assert source.min_ttls == [120.0, 0.5]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    ["min_ttl=-1", "min_ttl=abc", "min_ttl=nan", "min_ttl=inf", "min_ttl=", "format=xml",
     "colour=red", "min_ttl=1&min_ttl=2", "min_ttl"],
)  # fmt: skip
async def test_bad_token_query_is_400(sock_dir: Path, query: str) -> None:
    """A bad min_ttl or format, an unknown or repeated parameter: 400 bad_request, no lookup."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        reply = await call(path, "GET", f"/v1/connectors/a/token?{query}")
    assert reply.status == 400
    assert reply.json()["error"] == "bad_request"
    assert source.calls == []


@pytest.mark.anyio
async def test_unknown_connector_is_404(sock_dir: Path) -> None:
    """An unconfigured or invalid connector name answers 404 unknown_connector."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        missing = await call(path, "GET", "/v1/connectors/nope/token")
        invalid = await call(path, "GET", "/v1/connectors/Bad%21/token")
        status = await call(path, "GET", "/v1/connectors/nope")
    assert missing.status == status.status == invalid.status == 404
    assert missing.json() == {
        "error": "unknown_connector",
        "error_description": "no such connector",
        "connector": "nope",
    }
    assert invalid.json()["error"] == "unknown_connector"
    assert "connector" not in invalid.json()


@pytest.mark.anyio
async def test_percent_encoded_name_is_decoded(sock_dir: Path) -> None:
    """The path is percent-decoded before the connector name is matched."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply = await call(path, "GET", "/v1/connectors/%61/token?format=raw")
    assert reply.body == b"at-a"


@pytest.mark.anyio
async def test_peer_not_allowed_is_403(sock_dir: Path) -> None:
    """A peer outside the allow list gets 403 naming connector and uid (as SO_PEERCRED says)."""
    source = FakeTokenSource(allowed_uids={"a": set()})
    async with serving(source, sock_dir) as path:
        reply = await call(path, "GET", "/v1/connectors/a/token")
    assert reply.status == 403
    body = reply.json()
    assert body["error"] == "forbidden"
    assert body["connector"] == "a"
    assert f"uid {UID}" in body["error_description"]
    assert re.fullmatch(r"add (user:\S+|uid:\d+) to connectors\.a\.allow", body["action"])
    assert source.calls == []
    peer = source.peers[-1]
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), UID, os.getgid())
    assert peer.groups == frozenset(os.getgroups()) | {os.getgid()}


@pytest.mark.anyio
async def test_source_errors_keep_their_status_and_retry_after(sock_dir: Path) -> None:
    """An ApiError from the source answers its status and body, with Retry-After when set."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        reauth = await call(path, "GET", "/v1/connectors/b/token")
        source.fail["token"] = ApiError(
            "temporarily_unavailable", "refresh failing", connector="a", retry_after=30
        )
        later = await call(path, "GET", "/v1/connectors/a/token")
    assert reauth.status == 503
    assert reauth.json()["error"] == "needs_reauth"
    assert reauth.json()["action"] == "tokend login b"
    assert "retry-after" not in reauth.headers
    assert later.status == 503
    assert later.headers["retry-after"] == "30"
    assert later.json()["error"] == "temporarily_unavailable"


# --- status, health and admin routes --------------------------------------------------------


@pytest.mark.anyio
async def test_status_routes_answer_anyone(sock_dir: Path) -> None:
    """Connector list, one connector's status and health answer peers outside every allow list."""
    source = FakeTokenSource(allowed_uids={"a": set(), "b": set()}, admin_uids=set())
    source.degraded = True
    async with serving(source, sock_dir) as path:
        listing = await call(path, "GET", "/v1/connectors")
        one = await call(path, "GET", "/v1/connectors/a")
        health = await call(path, "GET", "/v1/health")
    assert listing.status == one.status == health.status == 200
    assert [c["connector"] for c in listing.json()["connectors"]] == ["a", "b"]
    assert one.json()["state"] == "ok"
    assert health.json()["status"] == "degraded"


@pytest.mark.anyio
async def test_metrics_route_answers_anyone_in_text_format(sock_dir: Path) -> None:
    """GET /metrics answers a peer outside every allow list with the source's Prometheus text,
    as text/plain version 0.0.4, not cached; other methods are 405."""
    source = FakeTokenSource(allowed_uids={"a": set(), "b": set()}, admin_uids=set())
    async with serving(source, sock_dir) as path:
        reply = await call(path, "GET", "/metrics")
        post = await call(path, "POST", "/metrics")
        query = await call(path, "GET", "/metrics?x=1")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.headers["cache-control"] == "no-store"
    families = {f.name for f in text_string_to_metric_families(reply.body.decode())}
    assert {"tokend_connector_state", "tokend_lookups"} <= families
    assert 'tokend_connector_state{connector="a",state="ok"} 1' in reply.body.decode()
    assert post.status == 405
    assert query.status == 400


@pytest.mark.anyio
async def test_every_lookup_outcome_is_reported(sock_dir: Path) -> None:
    """Each token request is reported once with its outcome, including those decided by the
    server itself; a name that is no configured connector is reported as ""."""
    tokens = {"a": make_tokens("at-a"), "b": None, "c": make_tokens("at-c")}
    source = FakeTokenSource(tokens, allowed_uids={"c": set()})
    async with serving(source, sock_dir) as path:
        targets = [
            "/v1/connectors/a/token",  # ok
            "/v1/connectors/a/token?format=raw",  # ok
            "/v1/connectors/b/token",  # needs_reauth (from the source)
            "/v1/connectors/c/token",  # forbidden (allow list)
            "/v1/connectors/a/token?format=xml",  # bad_request (query)
            "/v1/connectors/nope/token",  # unknown_connector
            "/v1/connectors/Bad%21/token",  # unknown_connector, invalid name
            "/v1/connectors/nope/token?colour=red",  # bad_request on an unknown name
        ]
        for target in targets:
            await call(path, "GET", target)
        source.fail["token"] = ApiError("temporarily_unavailable", "down", retry_after=5)
        await call(path, "GET", "/v1/connectors/a/token")
        await call(path, "GET", "/v1/connectors/a")  # not lookups: status and a wrong method
        await call(path, "POST", "/v1/connectors/a/token")
        text = (await call(path, "GET", "/metrics")).body.decode()
    assert source.lookups == [
        ("a", "ok"),
        ("a", "ok"),
        ("b", "needs_reauth"),
        ("c", "forbidden"),
        ("a", "bad_request"),
        ("", "unknown_connector"),
        ("", "unknown_connector"),
        ("", "bad_request"),
        ("a", "temporarily_unavailable"),
    ]
    assert 'tokend_lookups_total{connector="a",outcome="ok"} 2' in text
    assert 'tokend_lookups_total{connector="",outcome="unknown_connector"} 2' in text
    assert "nope" not in text


@pytest.mark.anyio
async def test_admin_routes(sock_dir: Path) -> None:
    """refresh, grant install/forget and secret reach the source for the daemon's own user."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        refreshed = await call(path, "POST", "/v1/connectors/a/refresh")
        installed = await call(
            path, "PUT", "/v1/connectors/b/grant", {"access_token": "new", "expires_in": 60}
        )
        secret = await call(path, "PUT", "/v1/connectors/a/secret", {"client_secret": "s3cr3t"})
        forgotten = await call(path, "DELETE", "/v1/connectors/a/grant")
    assert refreshed.status == installed.status == secret.status == forgotten.status == 200
    assert installed.json()["state"] == "ok"
    assert forgotten.json()["state"] == "unauthorized"
    assert source.grants["b"] == {"access_token": "new", "expires_in": 60}
    assert source.secrets["a"].reveal() == "s3cr3t"
    assert source.calls == [
        ("refresh", "a"),
        ("install_grant", "b"),
        ("store_secret", "a"),
        ("forget_grant", "a"),
    ]


@pytest.mark.anyio
async def test_admin_routes_refuse_others(sock_dir: Path) -> None:
    """Admin-only routes answer 403 forbidden to a peer that is not an admin, calling nothing."""
    source = FakeTokenSource(admin_uids=set())
    async with serving(source, sock_dir) as path:
        replies = [
            await call(path, "POST", "/v1/connectors/a/refresh"),
            await call(path, "PUT", "/v1/connectors/a/grant", {"access_token": "x"}),
            await call(path, "DELETE", "/v1/connectors/a/grant"),
            await call(path, "PUT", "/v1/connectors/a/secret", {"client_secret": "x"}),
        ]
    assert [r.status for r in replies] == [403] * 4
    assert all(r.json()["error"] == "forbidden" for r in replies)
    assert source.calls == []
    assert source.peers[-1].uid == UID


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("/v1/connectors/a/grant", b""),
        ("/v1/connectors/a/grant", b"{not json"),
        ("/v1/connectors/a/grant", b"[1, 2]"),
        ("/v1/connectors/a/grant", b'{"access_token": NaN}'),
        ("/v1/connectors/a/grant", b"[" * 30_000 + b"]" * 30_000),
        ("/v1/connectors/a/grant", b'{"token_type": "Bearer"}'),  # the source refuses it
        ("/v1/connectors/a/secret", b'{"client_secret": ""}'),
        ("/v1/connectors/a/secret", b'{"client_secret": 5}'),
        ("/v1/connectors/a/secret", b'{"client_secret": "x", "other": 1}'),
        ("/v1/connectors/a/secret", b"\xff\xfe"),
    ],
)
async def test_bad_admin_bodies_are_400(sock_dir: Path, target: str, body: bytes) -> None:
    """Absent, malformed or wrong-shaped JSON bodies answer 400 bad_request."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        reply = await call(path, "PUT", target, body)
    assert reply.status == 400
    assert reply.json()["error"] == "bad_request"
    assert source.secrets == {}
    assert "a" not in source.grants


# --- paths and methods ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_method_is_405_with_allow(sock_dir: Path) -> None:
    """A known path with the wrong method answers 405 and lists the allowed ones."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        post = await call(path, "POST", "/v1/connectors/a/token")
        get_grant = await call(path, "GET", "/v1/connectors/a/grant")
        head = await in_thread(raw_request_head, path, "/v1/health")
    assert post.status == get_grant.status == head.status == 405
    assert post.headers["allow"] == "GET"
    assert get_grant.headers["allow"] == "DELETE, PUT"
    assert post.json()["error"] == "method_not_allowed"
    assert head.body == b""
    assert int(head.headers["content-length"]) > 0


def raw_request_head(path: str, target: str) -> Reply:
    with connect(path) as sock:
        sock.sendall(f"HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return read_replies(sock, 1, head=True)[1][0]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("target", "status", "error"),
    [
        ("/nope", 404, "not_found"),
        ("/v1/connectors/a/token/more", 404, "not_found"),
        ("//v1/health", 404, "not_found"),
        ("/v1/connectors/", 404, "not_found"),
        ("/v1/connectors/../health", 400, "bad_request"),
        ("/v1/connectors/%2e%2e/token", 400, "bad_request"),
        ("/v1/connectors/a%2Fb/token", 400, "bad_request"),
        ("/v1/connectors/%ff/token", 400, "bad_request"),
        ("/v1/health?x=1", 400, "bad_request"),
        ("http://tokend/v1/health", 200, None),
    ],
)
async def test_paths(sock_dir: Path, target: str, status: int, error: str | None) -> None:
    """Unknown paths are 404 not_found; '..' and encoded slashes are 400; absolute form works."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply = await in_thread(raw_request, path, get(target))
    assert reply[1][0].status == status
    if error is not None:
        assert reply[1][0].json()["error"] == error


@pytest.mark.anyio
async def test_every_response_has_no_store_and_a_reason_phrase(sock_dir: Path) -> None:
    """Every status sent carries Cache-Control: no-store and a standard, non-empty reason phrase."""
    source = FakeTokenSource(allowed_uids={"a": set()}, admin_uids=set())
    cases = [
        (get("/v1/health"), 200),
        (get("/v1/connectors/b/token?min_ttl=x"), 400),
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (get("/v1/connectors/a/token"), 403),
        (get("/v1/connectors/x"), 404),
        (b"DELETE /v1/health HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        (b"PUT /v1/connectors/a/grant HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n", 413),
        (get("/v1/health", "X-Big: " + "x" * 20_000), 431),
        (get("/v1/connectors/c"), 500),
        (get("/v1/connectors/b/token"), 503),
    ]
    source.tokens["c"] = None
    async with serving(source, sock_dir) as path:
        source.fail["status"] = RuntimeError("boom")
        for data, status in cases:
            raw, (reply,) = await in_thread(raw_request, path, data)
            line = raw.split(b"\r\n", 1)[0].decode()
            assert line == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", data[:40]
            assert reply.headers["cache-control"] == "no-store"
            assert int(reply.headers["content-length"]) == len(reply.body)
            assert "error" in reply.json() or status == 200


@pytest.mark.anyio
async def test_curl(sock_dir: Path) -> None:
    """curl --unix-socket reads the raw token and the JSON answer with a proper status line."""
    require(shutil.which("curl") is not None, "curl is not installed")
    async with serving(FakeTokenSource(), sock_dir) as path:
        raw = await in_thread(
            run, ["curl", "-sS", "--unix-socket", path, "http://t/v1/connectors/a/token?format=raw"]
        )
        full = await in_thread(
            run, ["curl", "-sS", "-i", "--unix-socket", path, "http://t/v1/connectors/a/token"]
        )
    assert raw.returncode == full.returncode == 0
    assert raw.stdout == b"at-a"
    head, _, body = full.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"cache-control: no-store" in head.lower()
    assert json.loads(body)["access_token"] == "at-a"


# --- connection handling --------------------------------------------------------------------


def sequential(path: str) -> list[Reply]:
    with connect(path) as sock:
        replies = []
        for target in ("/v1/health", "/v1/connectors", "/v1/connectors/a/token?format=raw"):
            sock.sendall(get(target))
            replies += read_replies(sock, 1)[1]
        return replies


@pytest.mark.anyio
async def test_keep_alive_serves_three_requests_on_one_connection(sock_dir: Path) -> None:
    """One connection carries several requests, one after the other."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        replies = await in_thread(sequential, path)
    assert [r.status for r in replies] == [200, 200, 200]
    assert replies[2].body == b"at-a"


@pytest.mark.anyio
async def test_pipelined_requests_are_answered_in_order(sock_dir: Path) -> None:
    """Requests sent back to back before any answer are answered in order."""
    data = get("/v1/connectors/a") + get("/v1/health") + get("/v1/connectors/a/token?format=raw")
    async with serving(FakeTokenSource(), sock_dir) as path:
        _, replies = await in_thread(raw_request, path, data, 3)
    assert replies[0].json()["connector"] == "a"
    assert replies[1].json()["status"] == "ok"
    assert replies[2].body == b"at-a"


def exchange_then_check_closed(path: str, data: bytes) -> tuple[Reply, bool]:
    with connect(path) as sock:
        sock.sendall(data)
        reply = read_replies(sock, 1)[1][0]
        return reply, is_closed(sock)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /v1/health\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (get("/v1/health", "Bad Header: x"), 400),
        (get("/v1/health", "X-Big: " + "x" * 20_000), 431),
        (b"GET /v1/health HTTP/1.1\r\nX-Endless: " + b"x" * 100_000, 431),
        (b"PUT /v1/connectors/a/grant HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
         + b"x" * 100_000, 413),
        (b"PUT /v1/connectors/a/grant HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"8000\r\n" + b"x" * 0x8000 + b"\r\n" + b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
         + b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", 413),
    ],
)  # fmt: skip
async def test_bad_requests_are_answered_then_closed(
    sock_dir: Path, data: bytes, status: int
) -> None:
    """Malformed requests get 400, oversized heads 431, oversized bodies 413, then a close."""
    source = FakeTokenSource()
    async with serving(source, sock_dir) as path:
        reply, closed = await in_thread(exchange_then_check_closed, path, data)
        after = await call(path, "GET", "/v1/health")
    assert reply.status == status
    assert closed
    assert after.status == 200
    assert source.grants == {}


def expect_continue(path: str) -> tuple[bytes, Reply]:
    body = json.dumps({"access_token": "x" * 2000}).encode()
    with connect(path) as sock:
        sock.sendall(
            b"PUT /v1/connectors/a/grant HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        sock.sendall(body)
        return interim, read_replies(sock, 1)[1][0]


@pytest.mark.anyio
async def test_expect_100_continue(sock_dir: Path) -> None:
    """A client that waits for 100 Continue before sending its body gets it."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        interim, reply = await in_thread(expect_continue, path)
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert reply.status == 200


def slow_client_scenario(path: str) -> tuple[bool, Reply, bool, float]:
    with connect(path) as slow:
        slow.sendall(b"GET /v1/health HTTP/1.1\r\nHo")
        started = time.monotonic()
        other = request(path, "GET", "/v1/health")
        slow.setblocking(False)
        try:
            open_meanwhile = slow.recv(1) != b""
        except BlockingIOError:
            open_meanwhile = True
        slow.settimeout(10)
        closed = is_closed(slow)
        return open_meanwhile, other, closed, time.monotonic() - started


@pytest.mark.anyio
async def test_slow_client_is_cut_while_others_are_served(sock_dir: Path) -> None:
    """A client that stalls mid-request is cut after the request timeout; others are served."""
    async with serving(FakeTokenSource(), sock_dir, request_timeout_s=1.5) as path:
        open_meanwhile, other, closed, elapsed = await in_thread(slow_client_scenario, path)
    assert open_meanwhile
    assert other.status == 200
    assert closed
    assert elapsed >= 1.0


def idle_scenario(path: str) -> tuple[Reply, bool, bool, float]:
    with connect(path) as silent, connect(path) as used:
        started = time.monotonic()
        used.sendall(get("/v1/health"))
        reply = read_replies(used, 1)[1][0]
        return reply, is_closed(used), is_closed(silent), time.monotonic() - started


@pytest.mark.anyio
async def test_idle_connections_are_closed(sock_dir: Path) -> None:
    """Connections idle before or between requests are closed after the idle timeout."""
    async with serving(FakeTokenSource(), sock_dir, idle_timeout_s=0.3) as path:
        reply, used_closed, silent_closed, elapsed = await in_thread(idle_scenario, path)
    assert reply.status == 200
    assert used_closed
    assert silent_closed
    assert elapsed >= 0.2


def flood_without_reading(path: str, count: int) -> tuple[int, Reply]:
    with connect(path) as greedy:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # More than the buffers hold: this blocks until the server gives up on us.
            greedy.sendall(get("/v1/connectors/a/token?format=raw") * count)
        other = request(path, "GET", "/v1/health")
        raw = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := greedy.recv(65536):
                raw += chunk
        return raw.count(b"HTTP/1.1 200 OK\r\n"), other


@pytest.mark.anyio
async def test_client_that_never_reads_is_cut(sock_dir: Path) -> None:
    """A client that pipelines requests but never reads answers is cut once writes stall."""
    count = 20_000  # 1 MB of requests, 2.6 MB of answers: far beyond the socket buffers
    async with serving(FakeTokenSource(), sock_dir, request_timeout_s=0.5) as path:
        answered, other = await in_thread(flood_without_reading, path, count)
    assert other.status == 200
    assert answered < count


def many_idle_then_request(path: str, count: int) -> Reply:
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            stack.enter_context(connect(path))
        return request(path, "GET", "/v1/connectors/a/token?format=raw")


@pytest.mark.anyio
async def test_idle_connections_do_not_block_a_new_client(sock_dir: Path) -> None:
    """200 silent connections do not keep a new client from being served."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply = await in_thread(many_idle_then_request, path, 200)
    assert reply.body == b"at-a"


def cap_scenario(path: str) -> tuple[bool, Reply]:
    first, second = connect(path), connect(path)
    try:
        for sock in (first, second):  # a request each, so the server surely holds both
            sock.sendall(get("/v1/health"))
            read_replies(sock, 1)
        with connect(path) as third:
            refused = is_closed(third)
    finally:
        first.close()
        second.close()
    deadline = time.monotonic() + 10
    while True:  # the server notices the closes asynchronously
        try:
            return refused, request(path, "GET", "/v1/health")
        except (ConnectionError, http.client.RemoteDisconnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.anyio
async def test_connection_cap(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_connections a new connection is closed at once; freed slots are reused."""
    async with serving(FakeTokenSource(), sock_dir, max_connections=2) as path:
        refused, later = await in_thread(cap_scenario, path)
    assert refused
    assert later.status == 200
    assert any("refusing new ones" in r.getMessage() for r in caplog.records)


@pytest.mark.anyio
async def test_handler_exception_is_500_and_serving_continues(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a handler answers 500 internal_error, is logged once, and serving continues."""
    source = FakeTokenSource()
    source.fail["status"] = RuntimeError("boom")
    async with serving(source, sock_dir) as path:
        broken = await call(path, "GET", "/v1/connectors/a")
        fine = await call(path, "GET", "/v1/connectors/a/token?format=raw")
    assert broken.status == 500
    assert broken.json()["error"] == "internal_error"
    assert fine.body == b"at-a"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


@pytest.mark.anyio
async def test_one_debug_line_per_request_without_the_token(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request logs one DEBUG line with method, path, status and uid; never the token."""
    caplog.set_level(logging.DEBUG, logger="tokend.server")
    source = FakeTokenSource({"a": make_tokens("canary-token-4711")})
    async with serving(source, sock_dir) as path:
        await call(path, "GET", "/v1/connectors/a/token?min_ttl=5")
        await call(path, "PUT", "/v1/connectors/a/secret", {"client_secret": "canary-secret-4711"})
    lines = [r.getMessage() for r in caplog.records]
    assert f"GET /v1/connectors/a/token -> 200 (uid {UID})" in lines
    assert f"PUT /v1/connectors/a/secret -> 200 (uid {UID})" in lines
    assert not any("canary" in line or "min_ttl" in line for line in lines)


# --- binding and lifecycle ------------------------------------------------------------------


@pytest.mark.anyio
async def test_socket_and_directory_modes(sock_dir: Path) -> None:
    """start() creates the directory 0750 and the socket 0660, and reports the path."""
    server = ApiServer(FakeTokenSource())
    path = sock_dir / "run" / "t.sock"
    await server.start(path)
    try:
        assert server.path == path
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    finally:
        await server.close()


@pytest.mark.anyio
async def test_stale_socket_is_replaced(sock_dir: Path) -> None:
    """A socket file nobody listens on (left by a crash) is removed and rebound."""
    path = sock_dir / "t.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    server = ApiServer(FakeTokenSource())
    await server.start(path)
    try:
        assert (await call(str(path), "GET", "/v1/health")).status == 200
    finally:
        await server.close()


@pytest.mark.anyio
async def test_live_socket_is_refused(sock_dir: Path) -> None:
    """start() on a socket another server accepts on raises SocketInUseError (exit 75)."""
    path = sock_dir / "t.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(SocketInUseError, match=str(path)) as info:
            await ApiServer(FakeTokenSource()).start(path)
        assert info.value.exit_code == ExitCode.TEMPORARY
        assert path.exists()


@pytest.mark.anyio
async def test_non_socket_file_is_kept(sock_dir: Path) -> None:
    """A regular file at the socket path is refused and left alone."""
    path = sock_dir / "t.sock"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        await ApiServer(FakeTokenSource()).start(path)
    assert path.read_text() == "keep me"


@pytest.mark.anyio
async def test_too_long_path_is_refused(sock_dir: Path) -> None:
    """A socket path over 107 bytes raises ConfigError naming the path."""
    path = sock_dir / ("x" * 120)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        await ApiServer(FakeTokenSource()).start(path)


@pytest.mark.anyio
async def test_close_unlinks_only_our_socket(sock_dir: Path) -> None:
    """close() unlinks the socket it bound, but not a file that has replaced it since."""
    first, second = ApiServer(FakeTokenSource()), ApiServer(FakeTokenSource())
    path = sock_dir / "t.sock"
    await first.start(path)
    await first.close()
    assert not path.exists()
    await second.start(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        await second.close()
        assert path.exists()


@pytest.mark.anyio
async def test_start_from_socket_never_unlinks(sock_dir: Path) -> None:
    """A server on an inherited socket serves it and leaves the file in place on close()."""
    path = sock_dir / "t.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    server = ApiServer(FakeTokenSource())
    await server.start_from_socket(sock)
    try:
        assert server.path == path
        assert (await call(str(path), "GET", "/v1/health")).status == 200
    finally:
        await server.close()
    assert path.exists()


@pytest.mark.anyio
async def test_close_lets_an_in_flight_request_finish(sock_dir: Path) -> None:
    """close() waits for a request already being handled and answers it before closing."""
    source = FakeTokenSource()
    source.token_delay_s = 0.3
    server = ApiServer(source)
    path = sock_dir / "t.sock"
    await server.start(path)
    replies: list[Reply] = []

    async def client() -> None:
        replies.append(await call(str(path), "GET", "/v1/connectors/a/token?format=raw"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        assert await in_thread(source.token_entered.wait, 10)
        await server.close()
    assert replies[0].body == b"at-a"
    assert replies[0].headers["connection"] == "close"
    assert not path.exists()


@pytest.mark.anyio
async def test_close_cuts_a_stuck_request(sock_dir: Path) -> None:
    """close() gives a stuck request a short grace, then closes its connection anyway."""
    source = FakeTokenSource()
    source.token_delay_s = 600
    server = ApiServer(source)
    path = sock_dir / "t.sock"
    await server.start(path)
    errors: list[BaseException] = []

    async def client() -> None:
        try:
            await call(str(path), "GET", "/v1/connectors/a/token")
        except (http.client.RemoteDisconnected, ConnectionError) as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        assert await in_thread(source.token_entered.wait, 10)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 10
    assert len(errors) == 1


# --- other users (root only) ----------------------------------------------------------------


@pytest.mark.root
@pytest.mark.anyio
async def test_peer_credentials_of_another_user(sock_dir: Path) -> None:
    """A client running as another uid is seen with that uid, gid and supplementary groups."""
    require(os.geteuid() == 0, "needs root to switch uid")
    require(shutil.which("curl") is not None, "curl is not installed")
    sock_dir.chmod(0o755)  # let the other users reach the 0750 directory below
    source = FakeTokenSource(allowed_uids={"a": {65534}})
    server = ApiServer(source)
    path = sock_dir / "run" / "t.sock"
    await server.start(path, group=65534)
    curl = ["curl", "-sS", "--unix-socket", str(path), "http://t/v1/connectors/a/token?format=raw"]
    try:
        assert path.stat().st_gid == path.parent.stat().st_gid == 65534
        member = await in_thread(run, curl, cwd="/", user=65534, group=65534, extra_groups=[100])
        stranger = await in_thread(run, curl, cwd="/", user=65533, group=65533, extra_groups=[])
    finally:
        await server.close()
    assert member.stdout == b"at-a"
    peer = source.peers[-1]
    assert (peer.uid, peer.gid, peer.groups) == (65534, 65534, frozenset({65534, 100}))
    assert stranger.returncode != 0  # 0750 directory and 0660 socket keep others out
    assert len(source.peers) == 1


# --- the httptools connection: parsing edges, long pipelines, the token answer cache --------


@pytest.mark.anyio
async def test_token_answer_follows_a_new_token_set(sock_dir: Path) -> None:
    """The cached token answer is rebuilt when the source serves a new TokenSet, byte for byte
    what json.dumps gives."""
    source = FakeTokenSource({"a": make_tokens("at-one", scope="read")})
    async with serving(source, sock_dir) as path:
        first = await call(path, "GET", "/v1/connectors/a/token")
        again = await call(path, "GET", "/v1/connectors/a/token")
        source.tokens["a"] = make_tokens("at-two", scope=None)
        second = await call(path, "GET", "/v1/connectors/a/token")
    assert first.json()["access_token"] == again.json()["access_token"] == "at-one"
    assert second.json()["access_token"] == "at-two"
    assert second.json()["scope"] is None
    for reply in (first, second):
        expected = json.dumps(reply.json(), separators=(",", ":")).encode() + b"\n"
        assert reply.body == expected


def endless_head_in_pieces(path: str) -> tuple[Reply, bool]:
    with connect(path) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: t\r\nX-Endless: ")
            for _ in range(40):  # 40 KiB of one header line that never ends
                sock.sendall(b"x" * 1024)
                time.sleep(0.002)
        reply = read_replies(sock, 1)[1][0]
        return reply, is_closed(sock)


@pytest.mark.anyio
async def test_unfinished_head_arriving_in_pieces_is_431(sock_dir: Path) -> None:
    """A head that keeps growing across many reads without ending is cut with 431."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply, closed = await in_thread(endless_head_in_pieces, path)
        after = await call(path, "GET", "/v1/health")
    assert reply.status == 431
    assert closed
    assert after.status == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "status", "close_header"),
    [
        (b"GET /v1/health HTTP/1.1\r\n\r\n", 400, "close"),  # HTTP/1.1 requires Host
        (b"GET /v1/health HTTP/2.0\r\nHost: t\r\n\r\n", 400, "close"),
        (b"GET /v1/health HTTP/1.0\r\n\r\n", 200, "close"),  # no keep-alive for HTTP/1.0
        (b"GET /v1/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 200, "close"),
        (b"GET /v1/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 200, "close"),
        (b"GET /v1/health HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\n"
         b"Upgrade: websocket\r\n\r\n", 200, "close"),  # answered, never upgraded
    ],
)  # fmt: skip
async def test_versions_host_and_upgrades(
    sock_dir: Path, data: bytes, status: int, close_header: str
) -> None:
    """HTTP/1.0 and Connection: close are answered then closed; HTTP/1.1 without Host and other
    versions are 400; an Upgrade request is answered as plain HTTP/1.1, then closed."""
    async with serving(FakeTokenSource(), sock_dir) as path:
        reply, closed = await in_thread(exchange_then_check_closed, path, data)
    assert reply.status == status
    assert reply.headers.get("connection") == close_header
    assert closed


@pytest.mark.anyio
async def test_long_pipeline_is_answered_in_order(sock_dir: Path) -> None:
    """Hundreds of pipelined requests in one write (more than the server parses ahead) are all
    answered, in order, on the same connection."""
    count = 300
    data = get("/v1/connectors/a/token?format=raw") * count + get("/v1/health")
    async with serving(FakeTokenSource(), sock_dir) as path:
        _, replies = await in_thread(raw_request, path, data, count + 1)
    assert [r.body for r in replies[:count]] == [b"at-a"] * count
    assert replies[count].json()["status"] == "ok"


@pytest.mark.anyio
async def test_timeout_sweeper_runs_only_while_connections_are_open(sock_dir: Path) -> None:
    """With no connection open the server keeps no periodic task (an idle daemon sleeps)."""
    server = ApiServer(FakeTokenSource(), idle_timeout_s=0.4)
    path = sock_dir / "t.sock"
    await server.start(path)
    try:
        assert server._sweeper is None
        reply = await call(str(path), "GET", "/v1/health")
        assert reply.status == 200
        deadline = time.monotonic() + 10
        while server._sweeper is not None or server.connections:
            assert time.monotonic() < deadline
            await anyio.sleep(0.05)
    finally:
        await server.close()


def half_close_after(path: str, data: bytes, count: int) -> tuple[list[Reply], bool]:
    with connect(path) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        replies = read_replies(sock, count)[1]
        return replies, is_closed(sock)


@pytest.mark.anyio
async def test_half_close_answers_what_was_sent(sock_dir: Path) -> None:
    """After the client shuts down its sending side, complete requests are answered in order,
    a request cut short gets 400, and the connection is closed."""
    data = get("/v1/connectors/a/token?format=raw") + b"GET /v1/health HTTP/1.1\r\nHost: t\r\n"
    async with serving(FakeTokenSource(), sock_dir) as path:
        replies, closed = await in_thread(half_close_after, path, data, 2)
    assert replies[0].body == b"at-a"
    assert replies[1].status == 400
    assert closed
