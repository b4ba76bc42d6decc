"""The authorization server's HTTP side: `AuthServer` serves a `Provider` on a loopback port.

Owns the listener (a stdlib `ThreadingHTTPServer` in a daemon thread), the request handler, the
lifecycle (`start`, `stop`, and `go_down`/`come_back` to simulate an outage), tracking open
connections, the faults that act on a connection (`hang`, `reset`), and recording every request
(in memory only, tokens included, so tests can check what a client presented). What a request
is answered is `tokend.authserver.provider`'s business. It never prints and never logs a token.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tokend.authserver.provider import PASS_THROUGH_FAULTS, Reply, error_reply
from tokend.authserver.site import Site

logger = logging.getLogger(__name__)

_MAX_BODY = 64 * 1024
_GO_DOWN_GRACE_S = 1.0  # how long go_down waits for answers being written
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

    def do_other(self) -> None:
        """PUT, PATCH, DELETE, OPTIONS: only the protected resource /mcp answers them."""
        self._answer(self.auth._handle_other(self))

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_other

    def _answer(self, reply: Reply | None) -> None:
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


class AuthServer(Site):
    """The loopback authorization server; `start()` it, or use it as a context manager.

    Its settable attributes and test hooks come from the layers below: `Provider` (refresh,
    faults), `Clients` (registration, CIMD, issuer), `Authorizer` (authorization code + PKCE),
    `DeviceFlow` (RFC 8628) and `Site` (discovery, /mcp, revocation).
    """

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
        super().__init__(
            lifetime_s=lifetime_s, rotate=rotate, reuse_detection=reuse_detection, clients=clients
        )
        self._host = host
        self._port = port
        self.date_offset_s = date_offset_s  # settable at run time, like `lifetime_s`
        self._requests: deque[RecordedRequest] = deque(maxlen=_KEEP_REQUESTS)
        self._conns: dict[socket.socket, bool] = {}  # connection -> busy
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._down = False
        self._stopping = threading.Event()
        self.token_calls = 0

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
        """Refuse connections (listener closed) and close idle keep-alive ones; keep the port.

        A handler marks its connection idle only after writing the answer, so a client may already
        hold an answer whose connection still counts as busy: such connections get a short grace
        to turn idle and are then closed like the others, so the client's next request sees a
        closed connection (and a refused reconnect), not a reset mid-request.
        """
        with self._lock:
            self._down = True
        self._unlisten()
        deadline = time.monotonic() + _GO_DOWN_GRACE_S
        while True:
            with self._lock:
                idle = [conn for conn, busy in self._conns.items() if not busy]
                busy_left = len(self._conns) - len(idle)
            for conn in idle:
                _shutdown(conn)
            if not busy_left or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

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

    # -- request handling (called from handler threads) --------------------------------------

    def _record(self, handler: _Handler, form: dict[str, str], client: str | None, outcome: str,
                at: datetime) -> None:  # fmt: skip
        headers = {name.lower(): value for name, value in handler.headers.items()}
        entry = RecordedRequest(handler.command, handler.path, form, headers, client, at, outcome)
        with self._lock:
            self._requests.append(entry)

    def _handle_get(self, handler: _Handler) -> Reply:
        at = datetime.now(UTC)
        target = urlsplit(handler.path)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        reply, client, form = self._route("GET", target.path, target.query, b"", headers)
        self._record(handler, form, client, reply.outcome, at)
        return reply

    def _handle_other(self, handler: _Handler) -> Reply:
        at = datetime.now(UTC)
        length = handler.headers.get("Content-Length", "0")
        chunked = "Transfer-Encoding" in handler.headers
        if chunked or not length.isdigit() or int(length) > _MAX_BODY:
            handler.close_connection = True  # the body cannot be skipped safely
            self._record(handler, {}, None, "invalid_request", at)
            return error_reply(
                400, "invalid_request", "a Content-Length of at most 64 KiB is needed"
            )
        body = handler.rfile.read(int(length))
        target = urlsplit(handler.path)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        reply, client, form = self._route(handler.command, target.path, target.query, body, headers)
        self._record(handler, form, client, reply.outcome, at)
        return reply

    def _handle_post(self, handler: _Handler) -> Reply | None:
        at = datetime.now(UTC)
        is_token = urlsplit(handler.path).path == "/token"
        with self._lock:
            self.token_calls += is_token
        length = handler.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > _MAX_BODY:
            handler.close_connection = True  # the body cannot be skipped safely
            reply = error_reply(
                400, "invalid_request", "a Content-Length of at most 64 KiB is needed"
            )
            self._record(handler, {}, None, "invalid_request", at)
            return reply
        body = handler.rfile.read(int(length))
        if not is_token:
            target = urlsplit(handler.path)
            headers = {name.lower(): value for name, value in handler.headers.items()}
            reply, client, form = self._route("POST", target.path, target.query, body, headers)
            self._record(handler, form, client, reply.outcome, at)
            return reply
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = dict(pairs)
        kind, params = self._next_fault()
        client = form.get("client_id")
        if kind and kind not in PASS_THROUGH_FAULTS:
            self._record(handler, form, client, f"fault:{kind}", at)
            return self._fault(handler, kind, params)
        if kind == "slow":
            self._stopping.wait(float(params.get("delay_s", 1.0)))
        ctype = handler.headers.get("Content-Type", "").split(";")[0].strip().lower()
        reply, client = self._token_request(
            form,
            repeated=len(form) != len(pairs),
            content_type=ctype,
            authorization=handler.headers.get("Authorization"),
            kind=kind,
        )
        outcome = f"{reply.outcome} ({kind})" if kind else reply.outcome
        self._record(handler, form, client, outcome, at)
        return reply

    def _fault(self, handler: _Handler, kind: str, params: dict[str, Any]) -> Reply | None:
        """The scripted answer for a fault; None for one that answers nothing (hang, reset)."""
        if kind == "hang":
            self._stopping.wait(float(params.get("delay_s", 30.0)))
            return None
        if kind == "reset":
            handler.reset()
            return None
        return self._fault_reply(kind, params)


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
