"""Property-based fuzzing (hypothesis, derandomized for CI): the config loader, durations, token
endpoint responses and raw bytes on the daemon's socket only ever fail in the documented ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.harness import config_dict, get, make_config, running_daemon, short_tmp, to_toml
from tokend.authserver import AuthServer
from tokend.config import Config, config_from_mapping, load_config, parse_duration
from tokend.daemon import Daemon
from tokend.errors import ConfigError, OAuthError, TokendError, TransientError
from tokend.model import Secret, TokenSet
from tokend.oauth.protocol import parse_token_response, token_set_from_fields

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SOURCE = "fuzz.toml"

# --- config files -------------------------------------------------------------------------------

_scalars = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["30s", "1h30m", "", " ", "none", "https://a.example/t", "http://[::1]:8/t"]),
    st.sampled_from(["user:root", "uid:0", "gid:x", "group:nogroup", "/tmp", "/", "rel/path"]),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),
    st.booleans(),
    st.dates(),
    st.times(),
    st.datetimes(),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_known_keys = st.sampled_from(
    [
        "daemon", "refresh", "alerts", "connectors", "demo", "socket", "socket_group", "state_dir",
        "keyring_service", "keyring_backend", "skew", "min_interval", "max_interval",
        "default_lifetime", "exec", "webhook", "apprise", "repeat", "token_url", "client_id",
        "client_auth", "scope", "resource", "allow", "ca_file", "client_secret", "issuer",
    ]
)  # fmt: skip
_keys = _known_keys | st.text(max_size=12)


def _set_path(data: dict[str, Any], path: list[str], value: object) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with random keys set to random values at random depths, or pure noise."""
    if draw(st.booleans()):
        return draw(st.dictionaries(_keys, _values, max_size=5))
    data = config_dict(Path("/tmp/fuzz"), "https://auth.example/token")
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.lists(_keys, min_size=1, max_size=4))
        _set_path(data, path, draw(_values))
    return data


def _check_config_error(exc: ConfigError, source: str) -> None:
    message = str(exc)
    assert message.startswith(f"{source}: "), message
    assert "\n" not in message and "\r" not in message, message


@settings(FUZZ, max_examples=300)
@given(config_mappings())
def test_config_mapping_fails_only_with_one_line_config_error(data: dict[str, Any]) -> None:
    """config_from_mapping on any TOML-like mapping gives a Config or a one-line ConfigError that
    starts with the file name; nothing else escapes."""
    try:
        config = config_from_mapping(data, source=SOURCE)
    except ConfigError as exc:
        _check_config_error(exc, SOURCE)
    else:
        assert isinstance(config, Config)


def _toml_or_noise(data: dict[str, Any]) -> bytes:
    try:
        return to_toml(data).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError, AttributeError):
        return b"[x"


@settings(FUZZ, max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        config_mappings().map(_toml_or_noise),
        st.tuples(config_mappings().map(_toml_or_noise), st.binary(max_size=20)).map(
            lambda p: p[0] + p[1]
        ),
    )
)
@example(b"x = 1" + b"0" * 5000)  # over Python's 4300-digit int limit: tomllib raises ValueError
@example(b"x = " + b"[" * 100_000)  # tomllib recurses
@example(b"x = " + b"{a = " * 5000)
@example(b"\xff\xfe[daemon]")
@example(b'[daemon]\nsocket = "/a\\u0000b"\n')
def test_config_file_fails_only_with_one_line_config_error(raw: bytes) -> None:
    """load_config on arbitrary file bytes gives a Config or a one-line ConfigError that starts with
    the file's name."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(raw)
        try:
            config = load_config(path)
        except ConfigError as exc:
            _check_config_error(exc, str(path))
        else:
            assert config.path == path


# --- durations ----------------------------------------------------------------------------------

_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@settings(FUZZ, max_examples=400)
@given(
    st.one_of(
        st.text(max_size=20),
        st.text(alphabet="0123456789.msdh -+e", max_size=20),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.dates(),
    )
)
@example("9" * 400 + "d")
@example("9" * 30 + "ms")
@example(10**30)
@example(-1)
def test_parse_duration_gives_non_negative_timedelta_or_config_error(value: object) -> None:
    """parse_duration on anything returns a timedelta >= 0 or raises a one-line ConfigError."""
    try:
        result = parse_duration(value, where="fuzz.toml: refresh.skew")
    except ConfigError as exc:
        _check_config_error(exc, "fuzz.toml: refresh.skew")
    else:
        assert isinstance(result, timedelta)
        assert result >= timedelta(0)


@settings(FUZZ, max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(_UNITS))), min_size=1, max_size=5
    )
)
@example([(1, "h"), (30, "m")])
@example([(30, "s")])
def test_generated_duration_strings_round_trip(parts: list[tuple[int, str]]) -> None:
    """A string of number+unit parts parses to the sum of its parts."""
    text = "".join(f"{number}{unit}" for number, unit in parts)
    expected = sum((timedelta(**{_UNITS[unit]: number}) for number, unit in parts), timedelta())
    assert parse_duration(text, where="w") == expected


@settings(FUZZ, max_examples=200)
@given(st.integers(0, 10**9))
def test_integer_durations_are_seconds(seconds: int) -> None:
    """A non-negative integer (and its "Ns" string) is that many seconds."""
    assert parse_duration(seconds, where="w") == timedelta(seconds=seconds)
    assert parse_duration(f"{seconds}s", where="w") == timedelta(seconds=seconds)


# --- token endpoint responses -------------------------------------------------------------------

OBTAINED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_tokens = st.from_regex(r"[A-Za-z0-9]{12,20}", fullmatch=True)
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_expires_in = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.floats(min_value=0, max_value=1e-5),
    st.from_regex(r"\s?[0-9]{1,31}(\.[0-9]{1,31})?\s?", fullmatch=True),
    _json_values,
)
_error_codes = st.sampled_from(
    ["invalid_grant", "bad_refresh_token", "invalid_client", "invalid_request", "server_error", ""]
)


@dataclass(frozen=True)
class TokenBody:
    """A token endpoint's JSON object and the secret values it (or the previous set) holds."""

    fields: dict[str, object]
    secrets: tuple[str, ...]


@st.composite
def token_bodies(draw: st.DrawFn) -> TokenBody:
    """A JSON object with recognizable token values, random RFC 6749 fields and random extras."""
    access = "AT" + draw(_tokens)
    refresh = "RT" + draw(_tokens)
    echo = st.sampled_from([access, refresh, f"bad {access}", f"{refresh} reused"])
    fields: dict[str, object] = draw(
        st.dictionaries(st.text(max_size=10), _json_values, max_size=3)
    )
    optional: dict[str, st.SearchStrategy[object]] = {
        "access_token": st.just(access) | st.sampled_from(["", None, 0]) | _json_values,
        "refresh_token": st.just(refresh) | st.sampled_from(["", None]) | _json_values,
        "expires_in": _expires_in,
        "token_type": st.sampled_from(["Bearer", "bearer", "BEARER", "mac", "DPoP"]) | _json_values,
        "scope": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=3) | _json_values,
        "error": _error_codes | st.text(max_size=20) | echo | _json_values,
        "error_description": st.text(max_size=40) | echo | _json_values,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            fields[key] = draw(strategy)
    # Only values the body holds as tokens are secrets; the same text elsewhere is just text.
    sent = (fields.get("access_token"), fields.get("refresh_token"))
    return TokenBody(fields, tuple(s for s in (access, refresh) if s in sent))


PREVIOUS_SECRETS = ("PAprevious0access", "PRprevious0refresh")


def _previous() -> TokenSet:
    return TokenSet(
        access_token=Secret(PREVIOUS_SECRETS[0]),
        refresh_token=Secret(PREVIOUS_SECRETS[1]),
        token_type="Bearer",
        scope="read",
        obtained_at=OBTAINED - timedelta(hours=1),
        expires_at=OBTAINED,
        lifetime_assumed=False,
        generation=3,
    )


def _check_outcome(outcome: TokenSet | TokendError, secrets: tuple[str, ...]) -> None:
    if isinstance(outcome, TokenSet):
        assert outcome.access_token.reveal()
        assert outcome.expires_at > outcome.obtained_at
        return
    assert isinstance(outcome, OAuthError | TransientError), type(outcome)
    message = str(outcome)
    assert "\n" not in message
    for secret in secrets:
        assert secret not in message, message


@settings(FUZZ, max_examples=300)
@given(token_bodies(), st.booleans())
@example(TokenBody({"access_token": "ATx", "expires_in": 1e-7}, ("ATx",)), False)
@example(TokenBody({"access_token": "ATx", "expires_in": -(10**400)}, ("ATx",)), False)
def test_token_set_from_fields_fails_only_with_tokend_errors(body: TokenBody, prev: bool) -> None:
    """token_set_from_fields gives a usable TokenSet or an OAuthError/TransientError that quotes
    no token value."""
    previous = _previous() if prev else None
    secrets = body.secrets + (PREVIOUS_SECRETS if prev else ())
    outcome: TokenSet | TokendError
    try:
        outcome = token_set_from_fields(
            body.fields,
            connector="demo",
            obtained_at=OBTAINED,
            previous=previous,
            default_lifetime=timedelta(hours=1),
        )
    except TokendError as exc:
        outcome = exc
    _check_outcome(outcome, secrets)


_header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_headers = st.dictionaries(
    st.sampled_from(["Retry-After", "Date", "Content-Type", "X-Junk"]),
    st.one_of(
        _header_text,
        st.integers(-5, 10**30).map(str),
        st.sampled_from(
            [
                "Wed, 21 Oct 2015 07:28:00 GMT",
                "Thu, 01 Jan 9999 00:00:00 -2359",
                "Mon, 01 Jan 0001 00:00:00 +2359",
                "application/json; charset=utf-32",
                "application/json; charset=nonsense",
                "9" * 400,
            ]
        ),
    ),
    max_size=3,
)


@st.composite
def response_bodies(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """A body: a token JSON object (maybe re-encoded or cut), other JSON, or raw bytes."""
    body = draw(token_bodies())
    kind = draw(st.sampled_from(["object", "cut", "utf16", "other", "bytes", "deep"]))
    text = json.dumps(body.fields)
    if kind == "object":
        return text.encode("utf-8", "surrogatepass"), body.secrets
    if kind == "cut":
        raw = text.encode("utf-8", "surrogatepass")
        return raw[: draw(st.integers(0, len(raw)))], body.secrets
    if kind == "utf16":
        return text.encode("utf-16", "surrogatepass"), body.secrets
    if kind == "other":
        return json.dumps(draw(_json_values)).encode("utf-8", "surrogatepass"), ()
    if kind == "deep":
        return b'{"a":' * 3000 + b"1" + b"}" * 3000, ()
    return draw(st.binary(max_size=200)), ()


@settings(FUZZ, max_examples=300)
@given(
    st.integers(100, 599) | st.sampled_from([200, 400, 401, 429, 503]),
    _headers,
    response_bodies(),
    st.booleans(),
)
@example(200, {}, (b'{"access_token": "ATx", "expires_in": "0.0000001"}', ("ATx",)), False)
@example(400, {}, (b'{"error": "ATx", "access_token": "ATx"}', ("ATx",)), True)
@example(503, {}, (b'{"error": "RTx", "refresh_token": "RTx"}', ("RTx",)), False)
def test_parse_token_response_fails_only_with_tokend_errors(
    status: int, headers: dict[str, str], body: tuple[bytes, tuple[str, ...]], prev: bool
) -> None:
    """parse_token_response on any status, headers and body gives a usable TokenSet or an
    OAuthError/InvalidGrantError/TransientError whose message quotes no token value."""
    content, secrets = body
    previous = _previous() if prev else None
    if prev:
        secrets += PREVIOUS_SECRETS
    response = httpx.Response(status, headers=headers, content=content)
    outcome: TokenSet | TokendError
    try:
        outcome = parse_token_response(
            response,
            connector="demo",
            obtained_at=OBTAINED,
            previous=previous,
            default_lifetime=timedelta(hours=1),
        )
    except TokendError as exc:
        outcome = exc
    _check_outcome(outcome, secrets)


def test_error_description_echoing_the_token_is_masked() -> None:
    """An error body that echoes its own access and refresh token values has them masked."""
    body = {
        "error": "invalid_grant",
        "error_description": "grant ATsecret123456 / RTsecret123456 is dead",
        "access_token": "ATsecret123456",
        "refresh_token": "RTsecret123456",
    }
    response = httpx.Response(400, content=json.dumps(body).encode())
    with pytest.raises(OAuthError) as info:
        parse_token_response(
            response,
            connector="demo",
            obtained_at=OBTAINED,
            previous=None,
            default_lifetime=timedelta(hours=1),
        )
    assert "secret123456" not in str(info.value)
    assert "***" in str(info.value)


# --- raw bytes on the daemon's socket -----------------------------------------------------------


@dataclass
class LiveDaemon:
    """An in-process daemon on its own event loop thread, with its socket path."""

    daemon: Daemon
    socket: str
    thread: threading.Thread
    error: list[BaseException]

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.error


@pytest.fixture(scope="module")
def live() -> Iterator[LiveDaemon]:
    """A real daemon (loopback auth server, installed grant) serving on a real socket."""
    root = short_tmp()
    stop = threading.Event()
    started = threading.Event()
    holder: dict[str, Daemon] = {}
    errors: list[BaseException] = []
    with AuthServer(lifetime_s=60.0) as auth:
        config = make_config(root, auth.token_url)

        async def main() -> None:
            # A 2 s request timeout (10 s by default) keeps the slow-client test short.
            async with running_daemon(config, request_timeout_s=2.0) as daemon:
                assert daemon.server is not None
                holder["daemon"] = daemon
                started.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # reported by the tests, not swallowed
                errors.append(exc)
            finally:
                started.set()

        thread = threading.Thread(target=run, name="fuzz-daemon", daemon=True)
        thread.start()
        assert started.wait(30)
        assert not errors, errors
        sock = str(config.daemon.socket)
        status, body = get(sock, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
        assert status == 200, body
        try:
            yield LiveDaemon(holder["daemon"], sock, thread, errors)
        finally:
            stop.set()
            thread.join(40)
    shutil.rmtree(root, ignore_errors=True)
    assert not thread.is_alive()
    assert not errors, errors


def _assert_serving(live: LiveDaemon) -> None:
    started = time.monotonic()
    status, body = get(live.socket, "/v1/connectors/demo/token")
    assert status == 200, body
    assert body["access_token"]
    assert time.monotonic() - started < 5.0  # generous: "quickly" on a loaded 2-core machine
    assert live.alive()


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def _exchange(path: str, data: bytes, *, half_close: bool, timeout: float = 1.0) -> bytes:
    """Send `data` on a fresh connection, maybe half-close, and read what comes back."""
    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        with contextlib.suppress(OSError):  # the daemon may cut an oversized request mid-send
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):  # a timeout or a reset ends the read
            while chunk := sock.recv(65536):
                received += chunk
    return bytes(received)


_methods = st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PATCH", "G\x00T", "", "GET GET"])
_targets = st.one_of(
    st.sampled_from(
        [
            "/v1/connectors/demo/token",
            "/v1/connectors/demo/token?format=raw&min_ttl=nan",
            "/v1/connectors/demo",
            "/v1/connectors",
            "/v1/health",
            "/metrics",
            "/v1/connectors/%2e%2e/token",
            "/v1/connectors/demo/refresh",
            "http://x/v1/health",
            "*",
            "",
        ]
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=40),
)
_versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", ""])
_header_names = st.sampled_from(
    ["Host", "Content-Length", "Transfer-Encoding", "Expect", "Connection", "X-A", "Bad Name", ""]
)
_header_values = st.one_of(
    st.sampled_from(["chunked", "100-continue", "close", "keep-alive", "-1", "99999999999", "5"]),
    st.text(st.characters(min_codepoint=0x00, max_codepoint=0xFF), max_size=30),
)


def _latin1(text: str) -> bytes:
    return text.encode("latin-1", "replace")


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Bytes a confused or hostile client might send: noise or mangled HTTP/1.1."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=500))
    line = f"{draw(_methods)} {draw(_targets)} {draw(_versions)}"
    headers = draw(st.lists(st.tuples(_header_names, _header_values), max_size=5))
    head = _latin1(line) + b"\r\n"
    head += b"".join(_latin1(f"{name}: {value}") + b"\r\n" for name, value in headers)
    body = draw(st.binary(max_size=100))
    shape = draw(st.sampled_from(["plain", "huge_head", "huge_body", "chunked", "pipeline", "cut"]))
    if shape == "huge_head":
        head += b"X-Big: " + b"a" * draw(st.integers(16 * 1024, 40 * 1024)) + b"\r\n"
    elif shape == "huge_body":
        body = b"b" * draw(st.integers(64 * 1024 + 1, 160 * 1024))
        if draw(st.booleans()):
            head += b"Content-Length: %d\r\n" % len(body)
    elif shape == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        size = draw(st.integers(0, 100 * 1024))
        body = b"%x\r\n" % size + b"c" * size + b"\r\n0\r\n\r\n"
    request = head + b"\r\n" + body
    if shape == "pipeline":
        good = b"GET /v1/connectors/demo/token HTTP/1.1\r\nHost: x\r\n\r\n"
        request = good + request + good * draw(st.integers(0, 3))
    elif shape == "cut":
        request = request[: draw(st.integers(0, len(request)))]
    return request


@settings(FUZZ, max_examples=120)
@given(raw_requests(), st.booleans())
@example(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", True)
@example(b"GET /v1/health HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx", True)
@example(b"\r\n" * 10_000, True)
@example(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000 + b"\r\n", True)
def test_raw_bytes_never_break_the_daemon(
    live: LiveDaemon, caplog: pytest.LogCaptureFixture, data: bytes, half_close: bool
) -> None:
    """Any bytes on a fresh connection leave the daemon running, logging no ERROR, and answering
    a normal lookup on another connection."""
    _exchange(live.socket, data, half_close=half_close, timeout=1.0 if half_close else 0.2)
    _assert_serving(live)
    _no_errors_logged(caplog)


@contextlib.contextmanager
def _fd_limit(wanted: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard fd limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_thousand_idle_connections_do_not_block_a_lookup(
    live: LiveDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """With 1,000 idle connections held open, a new client still gets its token."""
    # Both ends of every connection live in this process: 2,000 fds plus the rest.
    with _fd_limit(4096), contextlib.ExitStack() as stack:
        for _ in range(1000):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.settimeout(10)
            sock.connect(live.socket)
        server = live.daemon.server
        assert server is not None
        deadline = time.monotonic() + 20
        while len(server._connections) < 1000:  # accepted and being served, not just queued
            assert time.monotonic() < deadline, len(server._connections)
            time.sleep(0.05)
        _assert_serving(live)
    _no_errors_logged(caplog)


@pytest.mark.timeout(120)  # trickles bytes for up to 20 s on purpose
def test_slow_client_is_cut_while_others_are_served(
    live: LiveDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """A client trickling a request one byte at a time is disconnected (request timeout) while
    other clients keep getting tokens."""
    request = b"GET /v1/connectors/demo/token HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200
    served = 0
    cut = False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(5)
        slow.connect(live.socket)
        deadline = time.monotonic() + 20  # the daemon's request timeout is 2 s here
        for byte in request:
            if time.monotonic() > deadline:
                break
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # EPIPE/ECONNRESET: the daemon closed on us
                cut = True
                break
            _assert_serving(live)
            served += 1
            time.sleep(0.1)
        if not cut:
            slow.settimeout(10)
            with contextlib.suppress(OSError):
                while slow.recv(65536):
                    pass
                cut = True
    assert cut
    assert served >= 3
    assert served < len(request)  # cut before the request could ever complete
    _assert_serving(live)
    _no_errors_logged(caplog)


def test_daemon_survived(live: LiveDaemon) -> None:
    """After all the abuse above the daemon's run loop is still going."""
    assert live.alive()
    _assert_serving(live)
