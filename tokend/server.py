"""The unix-socket HTTP/1.1 API (DESIGN §5): asyncio streams, h11 for the protocol, JSON bodies.

Owns binding the socket (modes, stale files), reading peer credentials, routing, and keeping one
misbehaving client from affecting others (size limits, timeouts, a connection cap). Route handlers
are plain functions over the `TokenSource` protocol; this module never refreshes, stores or
decides anything about tokens, and never logs a request body or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import pwd
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from tokend.clock import Clock, SystemClock, isoformat
from tokend.errors import ApiError, ConfigError, ExitCode, TokendError
from tokend.model import NAME_PATTERN, Secret, TokenSet

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_READ_SIZE = 64 * 1024
_CLOSE_GRACE_S = 2.0
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux value; absent from older Pythons
_NAME_RE = re.compile(NAME_PATTERN)


class SocketInUseError(TokendError):
    """Another process accepts connections on the socket path: probably another tokend."""

    exit_code = ExitCode.TEMPORARY


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process's credentials, from SO_PEERCRED and SO_PEERGROUPS."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # primary + supplementary


class TokenSource(Protocol):
    """What the server needs from the daemon; every async method may raise `ApiError`."""

    def has_connector(self, name: str) -> bool: ...
    def is_allowed(self, name: str, peer: Peer) -> bool: ...
    def is_admin(self, peer: Peer) -> bool: ...
    async def token(self, name: str, *, min_ttl_s: float) -> TokenSet: ...
    def status(self, name: str) -> dict[str, object]: ...
    def statuses(self) -> list[dict[str, object]]: ...
    async def refresh(self, name: str) -> dict[str, object]: ...
    async def install_grant(self, name: str, body: Mapping[str, object]) -> dict[str, object]: ...
    async def forget_grant(self, name: str) -> dict[str, object]: ...
    async def store_secret(self, name: str, secret: Secret) -> None: ...
    def health(self) -> dict[str, object]: ...


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


# --- routes: plain functions over a TokenSource ---------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class _Call:
    source: TokenSource
    peer: Peer
    name: str  # "" on routes without a connector
    query: Mapping[str, str]
    body: bytes
    clock: Clock


def _json(status: int, obj: object, headers: tuple[tuple[bytes, bytes], ...] = ()) -> _Response:
    return _Response(
        status, json.dumps(obj, separators=(",", ":")).encode() + b"\n", headers=headers
    )


def _error(status: int, code: str, description: str, **extra: object) -> _Response:
    return _json(status, {"error": code, "error_description": description, **extra})


def _api_error(exc: ApiError) -> _Response:
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if exc.retry_after is not None:
        headers = ((b"retry-after", str(max(0, math.ceil(exc.retry_after))).encode()),)
    return _json(exc.http_status, exc.to_json(), headers)


def _bad_request(description: str, name: str = "") -> ApiError:
    return ApiError("bad_request", description, connector=name or None)


def _user_text(uid: int) -> str:
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid:{uid}"


def _json_object(call: _Call) -> dict[str, object]:
    def no_constants(text: str) -> object:
        raise ValueError(text)

    try:
        data = json.loads(call.body, parse_constant=no_constants) if call.body else None
    except (ValueError, RecursionError):
        raise _bad_request("request body is not valid JSON", call.name) from None
    if not isinstance(data, dict):
        raise _bad_request("request body must be a JSON object", call.name)
    return data


async def _list_connectors(call: _Call) -> _Response:
    return _json(200, {"connectors": call.source.statuses()})


async def _connector_status(call: _Call) -> _Response:
    return _json(200, call.source.status(call.name))


async def _health(call: _Call) -> _Response:
    return _json(200, call.source.health())


async def _token(call: _Call) -> _Response:
    fmt = call.query.get("format", "json")
    if fmt not in ("json", "raw"):
        raise _bad_request("format must be json or raw", call.name)
    min_ttl = 0.0
    if "min_ttl" in call.query:
        try:
            min_ttl = float(call.query["min_ttl"])
        except ValueError:
            min_ttl = -1.0
        if not (math.isfinite(min_ttl) and min_ttl >= 0):
            raise _bad_request("min_ttl must be a non-negative number of seconds", call.name)
    if not call.source.is_allowed(call.name, call.peer):
        raise ApiError(
            "forbidden",
            f"uid {call.peer.uid} may not read the token of connector {call.name}",
            connector=call.name,
            action=f"add {_user_text(call.peer.uid)} to connectors.{call.name}.allow",
        )
    tokens = await call.source.token(call.name, min_ttl_s=min_ttl)
    if fmt == "raw":  # the socket reply is a boundary where the token leaves on purpose
        return _Response(200, tokens.access_token.reveal().encode(), b"text/plain; charset=utf-8")
    remaining = (tokens.expires_at - call.clock.now()).total_seconds()
    return _json(
        200,
        {
            "connector": call.name,
            "access_token": tokens.access_token.reveal(),
            "token_type": tokens.token_type,
            "expires_at": isoformat(tokens.expires_at),
            "expires_in": max(0, math.floor(remaining)),
            "scope": tokens.scope,
        },
    )


async def _refresh(call: _Call) -> _Response:
    return _json(200, await call.source.refresh(call.name))


async def _install_grant(call: _Call) -> _Response:
    return _json(200, await call.source.install_grant(call.name, _json_object(call)))


async def _forget_grant(call: _Call) -> _Response:
    return _json(200, await call.source.forget_grant(call.name))


async def _store_secret(call: _Call) -> _Response:
    data = _json_object(call)
    value = data.get("client_secret")
    if set(data) != {"client_secret"} or not isinstance(value, str) or not value:
        raise _bad_request(
            'body must be {"client_secret": "..."} with a non-empty string', call.name
        )
    await call.source.store_secret(call.name, Secret(value))
    return _json(200, call.source.status(call.name))


_Handler = Callable[[_Call], Awaitable[_Response]]


@dataclass(frozen=True, slots=True)
class _Route:
    parts: tuple[str | None, ...]  # None is the connector NAME
    methods: Mapping[str, _Handler]
    params: frozenset[str] = frozenset()
    admin: bool = False


_ROUTES = (
    _Route(("v1", "connectors"), {"GET": _list_connectors}),
    _Route(("v1", "connectors", None), {"GET": _connector_status}),
    _Route(("v1", "connectors", None, "token"), {"GET": _token}, frozenset({"format", "min_ttl"})),
    _Route(("v1", "connectors", None, "refresh"), {"POST": _refresh}, admin=True),
    _Route(
        ("v1", "connectors", None, "grant"),
        {"PUT": _install_grant, "DELETE": _forget_grant},
        admin=True,
    ),
    _Route(("v1", "connectors", None, "secret"), {"PUT": _store_secret}, admin=True),
    _Route(("v1", "health"), {"GET": _health}),
)


def _split_target(target: str) -> tuple[list[str], dict[str, str]]:
    """Decoded path segments and query parameters; raises ApiError(bad_request)."""
    if target.startswith("/"):  # origin form; urlsplit would read "//x/..." as a host
        path, _, raw_query = target.partition("?")
    else:  # absolute form (RFC 9112 §3.2.2): the host part is ignored
        parts = urlsplit(target)
        path, raw_query = parts.path, parts.query
    if re.search("%2f", path, re.IGNORECASE):
        raise _bad_request("percent-encoded slashes are not allowed in the path")
    try:
        segments = [unquote(s, errors="strict") for s in path.split("/")]
        pairs = parse_qsl(raw_query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except ValueError:  # also UnicodeDecodeError
        raise _bad_request("malformed path or query string") from None
    if any(s in (".", "..") for s in segments):
        raise _bad_request("'.' and '..' are not allowed in the path")
    query = dict(pairs)
    if len(query) != len(pairs):
        raise _bad_request("repeated query parameter")
    return segments, query


async def _dispatch(
    source: TokenSource, peer: Peer, method: str, target: str, body: bytes, clock: Clock
) -> _Response:
    """Route one request; every ApiError becomes its error response."""
    try:
        segments, query = _split_target(target)
        if not segments or segments[0] != "":
            return _error(404, "not_found", "no such path")
        for route in _ROUTES:
            if len(route.parts) != len(segments) - 1:
                continue
            pairs = zip(route.parts, segments[1:], strict=True)
            if all(want == got or (want is None and got) for want, got in pairs):
                break
        else:
            return _error(404, "not_found", "no such path")
        handler = route.methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(route.methods)).encode()
            return _json(
                405,
                {"error": "method_not_allowed", "error_description": f"{method} not allowed"},
                ((b"allow", allow),),
            )
        if unknown := set(query) - route.params:
            raise _bad_request(f"unknown query parameter {sorted(unknown)[0]!r}")
        name = segments[1 + route.parts.index(None)] if None in route.parts else ""
        if None in route.parts and not (_NAME_RE.fullmatch(name) and source.has_connector(name)):
            shown = name if _NAME_RE.fullmatch(name) else None
            raise ApiError("unknown_connector", "no such connector", connector=shown)
        if route.admin and not source.is_admin(peer):
            raise ApiError(
                "forbidden",
                f"only the daemon's user or root may change connectors (peer uid {peer.uid})",
                connector=name or None,
                action="run this as the daemon's user or root",
            )
        return await handler(_Call(source, peer, name, query, body, clock))
    except ApiError as exc:
        return _api_error(exc)


# --- connections ----------------------------------------------------------------------------


class _BodyTooLargeError(Exception):
    pass


@dataclass(slots=True, eq=False)
class _Connection:
    task: asyncio.Task[None] | None
    busy: bool = False


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class ApiServer:
    """Serves the socket API for one `TokenSource`.

    Beyond `max_connections` open connections, new ones are closed at once without an answer:
    it protects file descriptors, and a client sees the same thing as a daemon that is not there.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        request_timeout_s: float = 10.0,
        idle_timeout_s: float = 10.0,
        max_connections: int = 1024,
        clock: Clock | None = None,
    ) -> None:
        self._source = source
        self._request_timeout_s = request_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._clock: Clock = clock or SystemClock()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self._at_cap = False
        self._path: Path | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created

    @property
    def path(self) -> Path | None:
        return self._path

    async def start(self, path: Path, *, group: int | None = None) -> None:
        """Bind `path` (0660, in a 0750 directory created if missing) and start serving.

        Raises ConfigError for a path too long or not a socket, SocketInUseError when a live
        process accepts on it, OSError when binding fails.
        """
        path = Path(path)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{path}: socket path is over {MAX_SOCKET_PATH_BYTES} bytes; choose a shorter one"
            )
        if not path.parent.exists():
            path.parent.parent.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o750, exist_ok=True)
            # mkdir's mode is filtered by the umask; 0750 lets the socket's group in (DESIGN §5)
            os.chmod(path.parent, 0o750)  # noqa: S103  # group traversal is the point
            if group is not None:
                os.chown(path.parent, -1, group)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            # Never wider than 0660, not even between bind and chmod. The umask is per process,
            # so this relies on nothing else creating files during these few instructions.
            old_umask = os.umask(0o117)
            try:
                sock.bind(os.fsencode(path))
                bound = True
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o660)
            if group is not None:
                os.chown(path, -1, group)
            st = os.stat(path)
            await self.start_from_socket(sock)
        except BaseException:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        self._path = path
        self._bound = (st.st_dev, st.st_ino)

    async def start_from_socket(self, sock: socket.socket) -> None:
        """Serve on an already-bound socket (systemd socket activation); never unlinks it."""
        # A deep backlog: a client connecting with a timeout gets EAGAIN, not a wait, when full.
        backlog = max(128, min(self._max_connections, socket.SOMAXCONN))
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, backlog=backlog)
        if self._path is None and isinstance(name := sock.getsockname(), str) and name:
            self._path = Path(name)
        logger.debug("serving on %s", self._path or "an inherited socket")

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (≤ 2 s), close all, unlink our socket."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self._connections if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._path is not None and self._bound is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._path)
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self._path)
            self._bound = None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._connections) >= self._max_connections:
            if not self._at_cap and not self._closing:
                logger.warning("%d connections open; refusing new ones", len(self._connections))
            self._at_cap = not self._closing
            writer.transport.abort()
            return
        self._at_cap = False
        conn = _Connection(asyncio.current_task())
        self._connections.add(conn)
        try:
            peer = read_peer(writer.get_extra_info("socket"))
            await self._serve(conn, peer, reader, writer)
        except (OSError, TimeoutError) as exc:
            logger.debug("connection dropped: %s", type(exc).__name__)
        except asyncio.CancelledError:
            # close() cancels connections. This task is the top of its stack and nobody awaits
            # its cancellation; ending quietly keeps asyncio 3.11's stream callback (which calls
            # task.exception()) from logging every closed connection as an error.
            logger.debug("connection closed by shutdown")
        finally:
            self._connections.discard(conn)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    async def _serve(
        self,
        conn: _Connection,
        peer: Peer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        h11conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while not self._closing:
            try:
                received = await self._receive(h11conn, reader, writer)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = "headers_too_large" if status == 431 else "bad_request"
                response = _error(status, code, "malformed or oversized request")
                await self._send(h11conn, writer, response, close=True, head_only=False)
                return
            except _BodyTooLargeError:
                response = _error(413, "payload_too_large", f"body over {MAX_BODY_BYTES} bytes")
                await self._send(h11conn, writer, response, close=True, head_only=False)
                return
            if received is None:
                return
            request, body = received
            conn.busy = True
            response = await self._handle(peer, request, body)
            head_only = request.method == b"HEAD"
            await self._send(h11conn, writer, response, close=self._closing, head_only=head_only)
            conn.busy = False
            if h11conn.our_state is not h11.DONE or h11conn.their_state is not h11.DONE:
                return
            h11conn.start_next_cycle()

    async def _receive(
        self, h11conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed between requests.

        Raises TimeoutError (idle between requests, or head+body slower than the request
        timeout), h11.RemoteProtocolError (malformed, head too large), _BodyTooLargeError.
        """
        loop = asyncio.get_running_loop()
        started = bool(h11conn.trailing_data[0])
        request: h11.Request | None = None
        body = bytearray()
        first = self._request_timeout_s if started else self._idle_timeout_s
        async with asyncio.timeout(first) as deadline:
            while True:
                event = h11conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(_READ_SIZE)
                    if data and not started:
                        started = True
                        deadline.reschedule(loop.time() + self._request_timeout_s)
                    h11conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                    head = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                    if head > MAX_HEAD_BYTES:
                        raise h11.RemoteProtocolError("head too large", error_status_hint=431)
                    length = next((v for n, v in event.headers if n == b"content-length"), b"0")
                    if int(length) > MAX_BODY_BYTES:  # h11 has checked it is digits
                        raise _BodyTooLargeError
                    if h11conn.they_are_waiting_for_100_continue:
                        writer.write(
                            h11conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                            or b""
                        )
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY_BYTES:
                        raise _BodyTooLargeError
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    return request, bytes(body)
                else:  # ConnectionClosed between requests
                    return None

    async def _handle(self, peer: Peer, request: h11.Request, body: bytes) -> _Response:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0][:200]
        try:
            response = await _dispatch(self._source, peer, method, target, body, self._clock)
        except Exception:  # the request handler: one of the three broad catches (STYLE)
            logger.exception("request %s %s failed", method, path)
            response = _error(500, "internal_error", "internal error; see the daemon's log")
        logger.debug("%s %s -> %d (uid %d)", method, path, response.status, peer.uid)
        return response

    async def _send(
        self,
        h11conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: _Response,
        *,
        close: bool,
        head_only: bool,
    ) -> None:
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
            *response.headers,
        ]
        if close:
            headers.append((b"connection", b"close"))
        try:
            out = (
                h11conn.send(
                    h11.Response(
                        status_code=response.status,
                        headers=headers,
                        reason=_reason(response.status),
                    )
                )
                or b""
            )
            if response.body and not head_only:
                out += h11conn.send(h11.Data(data=response.body)) or b""
            out += h11conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # the connection is past answering (e.g. after an error)
            return
        writer.write(out)
        async with asyncio.timeout(self._request_timeout_s):
            await writer.drain()


def _remove_stale(path: Path) -> None:
    """Unlink a socket file nobody accepts on; raise if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fsencode(path))
    except ConnectionRefusedError:
        logger.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # EAGAIN: its backlog is full, so it is very much alive
    except OSError as exc:
        raise SocketInUseError(
            f"{path}: cannot probe the existing socket: {exc.strerror}"
        ) from None
    finally:
        probe.close()
    raise SocketInUseError(f"{path}: another process is serving on this socket (another tokend?)")
