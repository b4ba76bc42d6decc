"""One API connection on the unix socket: parsing, limits, answering in order, deadlines.

Owns the per-connection asyncio.Protocol over httptools' parser (llhttp): reading the peer's
credentials, the head and body size limits and their refusals (400, 413, 431), pipelining with
back-pressure, `100 Continue`, the bytes of each response, and the deadline each state sets.
The server a connection belongs to (`ConnectionHost`: `tokend.server.http.ApiServer`) caps the
connections, sweeps expired deadlines and answers requests; what a request means is
`tokend.server.api`'s business. Never logs a request body or a token.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pwd
import socket
import struct
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from tokend.server.api import Peer, Response, error_response

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux value; absent from older Pythons


def read_peer(sock: socket.socket) -> Peer:
    """The peer's pid, uid, gid and groups; raises OSError when the kernel will not say."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    pid, uid, gid = struct.unpack("iII", creds)
    try:
        # 1024 bytes (256 groups) is the most CPython's getsockopt accepts; more gives ERANGE.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        groups = set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        try:
            groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except (KeyError, OSError):
            groups = set()
    return Peer(pid=pid, uid=uid, gid=gid, groups=frozenset(groups | {gid}))


class _Refused(Exception):  # raised inside parser callbacks to stop parsing
    """A request the server refuses to read further: answered with `status`, then closed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request, as the server's `handle` receives it."""

    method: str
    target: str
    body: bytes
    keep_alive: bool


_REFUSALS = {
    400: ("bad_request", "malformed or oversized request"),
    413: ("payload_too_large", f"body over {MAX_BODY_BYTES} bytes"),
    431: ("headers_too_large", "malformed or oversized request"),
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_QUEUED = 32  # pipelined requests parsed ahead of the answers; reading pauses beyond this


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode()


def encode_response(response: Response, *, close: bool, head_only: bool) -> bytes:
    """The bytes of `response` on the wire: status line, headers (no-store always), body."""
    parts = [
        _status_line(response.status),
        b"content-type: ",
        response.content_type,
        b"\r\ncontent-length: ",
        str(len(response.body)).encode(),
        b"\r\ncache-control: no-store\r\n",
    ]
    for name, value in response.headers:
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(response.body)
    return b"".join(parts)


class ConnectionHost(Protocol):
    """What a connection needs from its server (`ApiServer`)."""

    @property
    def closing(self) -> bool: ...

    @property
    def connections(self) -> set[Connection]: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def request_timeout_s(self) -> float: ...

    @property
    def idle_timeout_s(self) -> float: ...

    def refused_one(self) -> None: ...

    def accepted(self, conn: Connection) -> None: ...

    def gone(self, conn: Connection) -> None: ...

    async def handle(self, peer: Peer, request: Request) -> Response: ...


class Connection(asyncio.Protocol):
    """One client connection: httptools parses, requests are answered in order, one at a time.

    Timeouts are deadlines (event-loop time) that the server's sweeper checks: idle before or
    between requests, a request head and body arriving too slowly, and answers the client does
    not read. No deadline runs while a request is being handled.
    """

    def __init__(self, server: ConnectionHost) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport  # both set by connection_made, which comes first
        self._peer: Peer
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request | Response] = deque()
        self.task: asyncio.Task[None] | None = None
        self.deadline: float | None = None
        self._refused = False  # a refusal is queued: parse nothing more
        self._closed = False  # we closed (or are flushing before closing), or the peer left
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        # the request being parsed
        self._partial = False
        self._in_head = False
        self._head_bytes = 0  # target + headers, counted as the callbacks see them
        self._raw_head_bytes = 0  # whole reads that arrived while the head was incomplete
        self._url: list[bytes] = []
        self._body = bytearray()
        self._has_host = False
        self._expect_continue = False
        self._want_continue = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)
        server = self._server
        if server.closing or len(server.connections) >= server.max_connections:
            server.refused_one()
            self._closed = True
            transport.abort()
            return
        try:
            self._peer = read_peer(transport.get_extra_info("socket"))
        except OSError as exc:
            logger.debug("connection dropped: %s", type(exc).__name__)
            self._closed = True
            transport.abort()
            return
        self.deadline = self._loop.time() + server.idle_timeout_s
        server.accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.deadline = None
        self._server.gone(self)

    def eof_received(self) -> bool:
        self._eof = True
        if self._partial and not self._refused:
            self._refuse(400)  # the client stopped sending in the middle of a request
        if self.task is None and not self._queue:
            self._closed = True
            return False  # the transport closes itself
        self._pump()
        return True  # answer what was asked before the client stopped sending

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.deadline = self._loop.time() + self._server.request_timeout_s

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.deadline = None
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._closed:
            return
        try:
            # Fed in slices, so an unfinished head is noticed once a whole slice of it has
            # come in after the slice it began in: the head of a request is never buffered past
            # twice the limit. Finished heads are measured exactly by the callbacks.
            if len(data) <= MAX_HEAD_BYTES:  # the usual case
                self._feed(data)
            else:
                view = memoryview(data)
                for start in range(0, len(view), MAX_HEAD_BYTES):
                    self._feed(view[start : start + MAX_HEAD_BYTES])
        except _Refused as exc:
            self._refuse(exc.status)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, _Refused) else 400)
        except httptools.HttpParserUpgrade:
            # CONNECT or an Upgrade: the request itself is answered, then the connection closed
            last = self._queue[-1] if self._queue else None
            if isinstance(last, Request):
                self._queue[-1] = Request(last.method, last.target, last.body, keep_alive=False)
                self._refused = True
            else:
                self._refuse(400)
        except httptools.HttpParserError:
            self._refuse(400)
        if self._want_continue and self.task is None and not self._queue:
            self._want_continue = False
            self._write(_CONTINUE)
        if len(self._queue) > _MAX_QUEUED and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._pump()

    def _feed(self, piece: bytes | memoryview) -> None:
        if self._in_head:
            self._raw_head_bytes += len(piece)
        self._parser.feed_data(piece)
        if self._in_head and self._raw_head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._partial = self._in_head = True
        self._head_bytes = self._raw_head_bytes = 0
        self._url = []
        self._body = bytearray()
        self._has_host = self._expect_continue = False
        if self.task is None and not self._queue and not self._writing_paused:
            self.deadline = self._loop.time() + self._server.request_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Refused(431)
        name = name.lower()
        if name == b"content-length":
            if int(value) > MAX_BODY_BYTES:  # the parser has checked it is digits
                raise _Refused(413)
        elif name == b"host":
            self._has_host = True
        elif name == b"expect":
            self._expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        version = self._parser.get_http_version()
        if version not in ("1.1", "1.0") or (version == "1.1" and not self._has_host):
            raise _Refused(400)
        self._want_continue = self._expect_continue and version == "1.1"

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > MAX_BODY_BYTES:
            raise _Refused(413)

    def on_message_complete(self) -> None:
        parser = self._parser
        self._partial = self._want_continue = False
        self._queue.append(
            Request(
                parser.get_method().decode("ascii", "replace"),
                b"".join(self._url).decode("ascii", "replace"),
                bytes(self._body),
                parser.should_keep_alive() and parser.get_http_version() == "1.1",
            )
        )

    # answering

    def _refuse(self, status: int) -> None:
        self._refused = True
        self._partial = self._in_head = self._want_continue = False
        code, description = _REFUSALS[status]
        self._queue.append(error_response(status, code, description))

    def _write(self, data: bytes) -> None:
        if not self._closed:
            self._transport.write(data)

    def _pump(self) -> None:
        """Answer queued requests in order; a handler that has to wait continues in a task."""
        while self._queue and self.task is None and not self._writing_paused:
            if self._closed:
                self._queue.clear()
                return
            item = self._queue.popleft()
            if isinstance(item, Response):  # a refusal: the last answer on this connection
                self._write(encode_response(item, close=True, head_only=False))
                self.close()
                return
            self.deadline = None
            self.task = self._loop.create_task(self._answer(item))
            return
        if self.task is not None or self._closed:
            return
        if self._eof and not self._queue:
            self.close()
            return
        if self._reading_paused and len(self._queue) <= _MAX_QUEUED // 2:
            self._reading_paused = False
            self._transport.resume_reading()
        if not self._writing_paused and not self._queue:
            timeout = self._server.request_timeout_s if self._partial else None
            self.deadline = self._loop.time() + (timeout or self._server.idle_timeout_s)

    async def _answer(self, request: Request) -> None:
        try:
            response = await self._server.handle(self._peer, request)
        finally:
            self.task = None
        close = not request.keep_alive or self._server.closing
        self._write(encode_response(response, close=close, head_only=request.method == "HEAD"))
        if close:
            self.close()
        else:
            self._pump()

    def close(self) -> None:
        """Close after what is written has been sent; the sweeper cuts a client not reading."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        transport = self._transport
        transport.close()
        if transport.get_write_buffer_size():
            self.deadline = self._loop.time() + self._server.request_timeout_s
        else:
            self.deadline = None

    def expire(self) -> None:
        """The deadline passed: drop the connection (unsent answers with it)."""
        logger.debug("connection dropped: %s", "TimeoutError")
        self._closed = True
        self.deadline = None
        self._transport.abort()

    def abort(self) -> None:
        self._closed = True
        self.deadline = None
        self._transport.abort()
