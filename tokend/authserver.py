"""A loopback OAuth 2.0 authorization server: `tokend demo`'s provider and every test's fixture.

Serves the refresh grant (RFC 6749 §6) at `/token` with rotation and reuse detection, RFC 8414
metadata, and a protected resource `/api/whoami` that proves a served token really works. Faults
are scripted with `fail_next`; every request is recorded in `requests` (in memory only, tokens
included, so tests can check what a client presented). Stdlib only, so it ships in the package;
it never prints and never logs a token.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import email.utils
import hmac
import json
import logging
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

logger = logging.getLogger(__name__)

FAULT_KINDS = frozenset(
    {
        "500", "503", "429", "invalid_grant", "invalid_client", "unauthorized_client",
        "unsupported_grant_type", "garbage", "html", "missing_access_token", "bad_expires_in",
        "omit_expires_in", "omit_refresh_token", "omit_scope", "slow", "hang", "reset",
    }
)  # fmt: skip
# Faults after which the refresh really happens; every other one leaves the grant untouched.
_PASS_THROUGH = frozenset({"slow", "omit_expires_in", "omit_refresh_token", "omit_scope"})
_ERROR_STATUS = {"invalid_grant": 400, "invalid_client": 401, "unauthorized_client": 400,
                 "unsupported_grant_type": 400}  # fmt: skip
_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
_MAX_BODY = 64 * 1024
_SUB = "demo-user"
_KEEP_REQUESTS = 10_000  # a long-running demo must not grow without bound


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the server answered (or deliberately did not); `outcome` says how it went."""

    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]
    client_id: str | None
    at: datetime
    outcome: str


@dataclass(slots=True)
class _Family:
    """One grant: its current refresh token (retired ones still map here) and whether it died."""

    client_id: str
    scope: str | None
    current: str
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class _Access:
    family: _Family
    scope: str | None
    expires_mono: float


@dataclass(slots=True)
class _Reply:
    status: int
    body: dict[str, Any] | bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if self.status == 200:
            return "ok"
        return str(self.body.get("error")) if isinstance(self.body, dict) else str(self.status)


def _error(status: int, error: str, description: str) -> _Reply:
    return _Reply(status, {"error": error, "error_description": description})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, auth: AuthServer, address: tuple[str, int]) -> None:
        self.auth = auth
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; clients hanging up mid-answer is routine here.
        logger.debug("authserver: error while serving a request", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real providers do
    server_version = "tokend-authserver/1"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are cut after a minute
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    @property
    def auth(self) -> AuthServer:
        server = self.server
        assert isinstance(server, _HTTPServer)  # noqa: S101  # narrowing for mypy only
        return server.auth

    def setup(self) -> None:
        super().setup()
        self.auth._track(self.connection, busy=False)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.auth._untrack(self.connection)

    def parse_request(self) -> bool:
        self.auth._track(self.connection, busy=True)
        if self.auth._down:
            # A request on a keep-alive connection that outlived go_down(): a down server
            # answers nothing, so abort it (this also closes the go_down/keep-alive race).
            self.close_connection = True
            self.reset()
            return False
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        pass  # a quiet fixture: the stdlib would write every request line to stderr

    def date_time_string(self, timestamp: float | None = None) -> str:
        if timestamp is None:
            timestamp = time.time() + self.auth.date_offset_s
        return email.utils.formatdate(timestamp, usegmt=True)

    def do_GET(self) -> None:
        self._answer(self.auth._handle_get(self))

    def do_POST(self) -> None:
        self._answer(self.auth._handle_post(self))

    def _answer(self, reply: _Reply | None) -> None:
        if reply is None:  # a fault that answers nothing has already dealt with the connection
            self.close_connection = True
            return
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # RFC 6749 §5.1
        self.send_header("Pragma", "no-cache")
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.auth._down:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        self.auth._track(self.connection, busy=False)

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0) and no answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket's fd closes only once its file objects are closed too.
        self.rfile.close()
        self.wfile.close()
        self.connection.close()


class AuthServer:
    """The loopback authorization server; `start()` it, or use it as a context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifetime_s: float = 30.0,
        rotate: bool = True,
        reuse_detection: bool = True,
        clients: Mapping[str, str | None] | None = None,
        date_offset_s: float = 0.0,
    ) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        # Settable at run time: each is one atomic attribute store, read once per request.
        self.lifetime_s = lifetime_s
        self.rotate = rotate
        self.reuse_detection = reuse_detection
        self.date_offset_s = date_offset_s
        self._clients = dict(clients) if clients is not None else {"tokend-demo": None}
        self._refresh: dict[str, _Family] = {}
        self._access: dict[str, _Access] = {}
        self._issued = 0
        self._scopes = {"demo", "offline_access"}
        self._faults: deque[tuple[str, dict[str, Any]]] = deque()
        self._requests: deque[RecordedRequest] = deque(maxlen=_KEEP_REQUESTS)
        self._conns: dict[socket.socket, bool] = {}  # connection -> busy
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._down = False
        self._stopping = threading.Event()
        self.token_calls = 0
        self.refreshes_ok = 0
        self.reuse_detected = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> AuthServer:
        """Bind (port 0 picks a free one) and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("authorization server already started")
        self._stopping.clear()
        self._down = False
        self._listen()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join the serving thread."""
        self._stopping.set()
        self._unlisten()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)

    def go_down(self) -> None:
        """Refuse connections (listener closed) and close idle keep-alive ones; keep the port."""
        with self._lock:
            self._down = True
            idle = [conn for conn, busy in self._conns.items() if not busy]
        self._unlisten()
        for conn in idle:
            _shutdown(conn)

    def come_back(self) -> None:
        """Listen again on the same port after `go_down`."""
        with self._lock:
            if not self._down:
                return
            self._down = False
        self._listen()

    def __enter__(self) -> AuthServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self) -> None:
        httpd = _HTTPServer(self, (self._host, self._port))
        self._port = httpd.server_address[1]
        wake = socket.socketpair()
        thread = threading.Thread(
            target=_serve, args=(httpd, wake[0]), name="tokend-authserver", daemon=True
        )
        self._httpd, self._wake, self._thread = httpd, wake, thread
        thread.start()

    def _unlisten(self) -> None:
        httpd, wake, thread = self._httpd, self._wake, self._thread
        self._httpd = self._wake = self._thread = None
        if httpd is None or wake is None or thread is None:
            return
        wake[1].send(b"x")
        thread.join()
        httpd.server_close()
        for end in wake:
            end.close()

    def _track(self, conn: socket.socket, *, busy: bool) -> None:
        with self._lock:
            self._conns[conn] = busy

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)

    # -- addresses, settings, observations ---------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the recorded requests (the latest 10,000), oldest first."""
        with self._lock:
            return list(self._requests)

    # -- scripting ---------------------------------------------------------------------------

    def issue_grant(
        self, client_id: str = "tokend-demo", scope: str | None = "demo offline_access"
    ) -> dict[str, object]:
        """Start a new grant family; returns its RFC 6749 §5.1 token response."""
        if client_id not in self._clients:
            raise ValueError(f"unknown client: {client_id}")
        with self._lock:
            family = _Family(client_id, scope, _token("rt_"))
            self._refresh[family.current] = family
            if scope:
                self._scopes.update(scope.split())
            return self._token_response(family, scope)

    def fail_next(self, kind: str, count: int = 1, **params: Any) -> None:
        """Answer the next `count` POST /token calls with the scripted fault `kind`."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind: {kind}")
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._faults.extend((kind, dict(params)) for _ in range(count))

    def is_valid_access_token(self, token: str) -> bool:
        """Whether `token` was issued here, has not expired and its family was not revoked."""
        with self._lock:
            return self._lookup_access(token) is not None

    def revoke_family_of(self, refresh_token: str) -> None:
        """Revoke the grant a (current or retired) refresh token belongs to; KeyError if unknown."""
        with self._lock:
            family = self._refresh.get(refresh_token)
            if family is None:
                raise KeyError("unknown refresh token")
            family.revoked = True

    # -- request handling (called from handler threads) --------------------------------------

    def _lookup_access(self, token: str) -> _Access | None:
        access = self._access.get(token)
        if access is None or access.family.revoked or time.monotonic() >= access.expires_mono:
            return None
        return access

    def _token_response(self, family: _Family, scope: str | None) -> dict[str, object]:
        """Issue an access token in `family` (lock held) and build the response around it."""
        token = _token("at_")
        self._access[token] = _Access(family, scope, time.monotonic() + self.lifetime_s)
        self._issued += 1
        if self._issued % 1024 == 0:  # drop dead access tokens now and then
            now = time.monotonic()
            self._access = {k: v for k, v in self._access.items() if v.expires_mono > now}
        body: dict[str, object] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": max(1, int(self.lifetime_s)),
            "refresh_token": family.current,
        }
        if scope is not None:
            body["scope"] = scope
        return body

    def _record(self, handler: _Handler, form: dict[str, str], client: str | None, outcome: str,
                at: datetime) -> None:  # fmt: skip
        headers = {name.lower(): value for name, value in handler.headers.items()}
        entry = RecordedRequest(handler.command, handler.path, form, headers, client, at, outcome)
        with self._lock:
            self._requests.append(entry)

    def _handle_get(self, handler: _Handler) -> _Reply:
        at = datetime.now(UTC)
        path = urlsplit(handler.path).path
        client = None
        if path == "/.well-known/oauth-authorization-server":
            reply = _Reply(200, self._metadata())
        elif path == "/api/whoami":
            scheme, _, token = handler.headers.get("Authorization", "").partition(" ")
            with self._lock:
                access = self._lookup_access(token) if scheme.lower() == "bearer" else None
            if access is None:
                challenge = [("WWW-Authenticate", 'Bearer error="invalid_token"')]
                reply = _Reply(401, {"error": "invalid_token"}, headers=challenge)
            else:
                client = access.family.client_id
                reply = _Reply(200, {"sub": _SUB, "client_id": client, "scope": access.scope})
        else:
            reply = _Reply(404, {"error": "not_found"})
        self._record(handler, {}, client, reply.outcome, at)
        return reply

    def _metadata(self) -> dict[str, object]:
        with self._lock:
            scopes = sorted(self._scopes)
        return {
            "issuer": self.url,
            "token_endpoint": self.token_url,
            "grant_types_supported": ["refresh_token"],
            "token_endpoint_auth_methods_supported": _AUTH_METHODS,
            "scopes_supported": scopes,
            "response_types_supported": [],  # no authorization endpoint here
        }

    def _handle_post(self, handler: _Handler) -> _Reply | None:
        at = datetime.now(UTC)
        is_token = urlsplit(handler.path).path == "/token"
        with self._lock:
            self.token_calls += is_token
        length = handler.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > _MAX_BODY:
            handler.close_connection = True  # the body cannot be skipped safely
            reply = _error(400, "invalid_request", "a Content-Length of at most 64 KiB is needed")
            self._record(handler, {}, None, "invalid_request", at)
            return reply
        raw = handler.rfile.read(int(length)).decode("utf-8", "replace")
        pairs = parse_qsl(raw, keep_blank_values=True)
        form = dict(pairs)
        if not is_token:
            self._record(handler, form, None, "not_found", at)
            return _Reply(404, {"error": "not_found"})
        with self._lock:
            kind, params = self._faults.popleft() if self._faults else ("", {})
        client = form.get("client_id")
        if kind and kind not in _PASS_THROUGH:
            self._record(handler, form, client, f"fault:{kind}", at)
            return self._fault(handler, kind, params)
        if kind == "slow":
            self._stopping.wait(float(params.get("delay_s", 1.0)))
        ctype = handler.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            reply = _error(400, "invalid_request", "the body must be form-urlencoded")
        elif len(form) != len(pairs):  # RFC 6749 §3.2: no parameter more than once
            reply = _error(400, "invalid_request", "a parameter was repeated")
        else:
            refused, client = self._authenticate(handler.headers.get("Authorization"), form)
            reply = refused or self._refresh_grant(form, client or "", kind)
        outcome = f"{reply.outcome} ({kind})" if kind else reply.outcome
        self._record(handler, form, client, outcome, at)
        return reply

    def _authenticate(
        self, authorization: str | None, form: dict[str, str]
    ) -> tuple[_Reply | None, str | None]:
        """RFC 6749 §2.3.1 client authentication: an error reply or None, and the client id."""
        basic = authorization is not None and authorization[:6].lower() == "basic "
        client, secret = form.get("client_id"), form.get("client_secret")
        if basic:
            assert authorization is not None  # noqa: S101  # narrowing for mypy only
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
                raw_id, sep, raw_secret = decoded.partition(":")
                if not sep:
                    raise ValueError("no colon")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return _invalid_client(True, "malformed Basic credentials"), client
            if secret is not None:
                return _error(400, "invalid_request", "more than one client authentication"), client
            basic_id = unquote_plus(raw_id)
            if client is not None and client != basic_id:
                return _invalid_client(True, "client_id differs from the Basic credentials"), client
            client, secret = basic_id, unquote_plus(raw_secret)
        if client is None or client not in self._clients:
            return _invalid_client(basic, "unknown client"), client
        expected = self._clients[client]
        if expected is None:
            ok = not secret  # a public client: no secret (an empty Basic password is tolerated)
        else:
            ok = secret is not None and hmac.compare_digest(secret.encode(), expected.encode())
        return (None if ok else _invalid_client(basic, "client authentication failed")), client

    def _refresh_grant(self, form: dict[str, str], client: str, kind: str) -> _Reply:
        """RFC 6749 §6 with rotation and reuse detection, for an authenticated client."""
        if form.get("grant_type") != "refresh_token":
            return _error(400, "unsupported_grant_type", "only refresh_token is supported")
        presented = form.get("refresh_token")
        if not presented:
            return _error(400, "invalid_request", "refresh_token is missing")
        with self._lock:
            family = self._refresh.get(presented)
            # A refresh token is bound to the client it was issued to (RFC 6749 §6).
            if family is None or family.revoked or family.client_id != client:
                return _error(400, "invalid_grant", "refresh token unknown or revoked")
            if presented != family.current:
                if self.reuse_detection:
                    family.revoked = True  # the whole family dies, as real providers do
                    self.reuse_detected += 1
                    return _error(400, "invalid_grant", "refresh token reused; grant revoked")
                return _error(400, "invalid_grant", "refresh token was rotated away")
            scope = form.get("scope") or family.scope
            if (
                scope is not None
                and family.scope is not None
                and not set(scope.split()) <= set(family.scope.split())
            ):
                return _error(400, "invalid_scope", "scope exceeds the grant")
            if self.rotate and kind != "omit_refresh_token":
                family.current = _token("rt_")
                self._refresh[family.current] = family
            body = self._token_response(family, scope)
            self.refreshes_ok += 1
        if kind == "omit_refresh_token":  # RFC 6749 §6: the client keeps using the old one
            del body["refresh_token"]
        elif kind == "omit_scope":
            body.pop("scope", None)
        elif kind == "omit_expires_in":
            del body["expires_in"]
        return _Reply(200, body)

    def _fault(self, handler: _Handler, kind: str, params: dict[str, Any]) -> _Reply | None:
        """The scripted answer for a fault that leaves the grant untouched."""
        description = str(params.get("description", f"scripted {kind}"))
        retry = params.get("retry_after")
        extra = [("Retry-After", str(retry))] if retry is not None else []
        if kind in _ERROR_STATUS:
            reply = _error(_ERROR_STATUS[kind], kind, description)
            if kind == "invalid_client":
                reply.headers.append(("WWW-Authenticate", 'Basic realm="tokend-authserver"'))
            return reply
        if kind == "500" and params.get("body") == "html":
            page = b"<html><body><h1>Internal Server Error</h1></body></html>"
            return _Reply(500, page, "text/html; charset=utf-8")
        if kind in ("500", "503", "429"):
            error = {"500": "server_error", "503": "temporarily_unavailable"}.get(kind, "slow_down")
            body = {"error": error, "error_description": description}
            return _Reply(int(kind), body, headers=extra)
        if kind == "garbage":
            return _Reply(200, b'{"access_token": "at_', "application/json")
        if kind == "html":
            return _Reply(200, b"<html><body>Please sign in</body></html>", "text/html")
        # Tokens below are never registered: a client that accepts them will learn on next use.
        fake = {"token_type": "Bearer", "refresh_token": _token("rt_"), "expires_in": 30}
        if kind == "missing_access_token":
            return _Reply(200, fake)
        if kind == "bad_expires_in":
            fake.update(access_token=_token("at_"), expires_in=params.get("value", "abc"))
            return _Reply(200, fake)
        if kind == "hang":
            self._stopping.wait(float(params.get("delay_s", 30.0)))
            return None
        handler.reset()  # "reset"
        return None


def _invalid_client(basic_tried: bool, description: str) -> _Reply:
    """401 invalid_client; with WWW-Authenticate when the client tried Basic (RFC 6749 §5.2)."""
    reply = _error(401, "invalid_client", description)
    if basic_tried:
        reply.headers.append(("WWW-Authenticate", 'Basic realm="tokend-authserver"'))
    return reply


def _token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its handler
        conn.shutdown(socket.SHUT_RDWR)


def _serve(httpd: _HTTPServer, wake: socket.socket) -> None:
    """Accept until `wake` becomes readable: unlike serve_forever, stopping needs no poll tick."""
    with selectors.DefaultSelector() as selector:
        selector.register(httpd.socket, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is wake:
                    return
                httpd.handle_request()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server in the foreground until interrupted; prints only its URL."""
    parser = argparse.ArgumentParser(prog="python -m tokend.authserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=30.0, help="access token lifetime (s)")
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens")
    args = parser.parse_args(argv)
    server = AuthServer(
        host=args.host, port=args.port, lifetime_s=args.lifetime, rotate=not args.no_rotate
    )
    with server:
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
