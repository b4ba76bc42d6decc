"""HTTP/1.1 over h11 on the API's unix socket: `ApiServer`, the connection side of DESIGN §5.

Owns binding the socket (modes, stale files) and unlinking it, reading peer credentials, the
accept loop and each connection's h11 state machine, and keeping one misbehaving client from
affecting others (size limits, timeouts, a connection cap). What a request means is
`tokend.server.api`'s business; this module never logs a request body or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import h11

from tokend.clock import Clock, SystemClock
from tokend.errors import ConfigError, ExitCode, TokendError
from tokend.server.api import Peer, Response, TokenSource, dispatch, error_response

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_READ_SIZE = 64 * 1024
_CLOSE_GRACE_S = 2.0
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux value; absent from older Pythons


class SocketInUseError(TokendError):
    """Another process accepts connections on the socket path: probably another tokend."""

    exit_code = ExitCode.TEMPORARY


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
                response = error_response(status, code, "malformed or oversized request")
                await self._send(h11conn, writer, response, close=True, head_only=False)
                return
            except _BodyTooLargeError:
                response = error_response(
                    413, "payload_too_large", f"body over {MAX_BODY_BYTES} bytes"
                )
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

    async def _handle(self, peer: Peer, request: h11.Request, body: bytes) -> Response:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0][:200]
        try:
            response = await dispatch(self._source, peer, method, target, body, self._clock)
        except Exception:  # the request handler: one of the three broad catches (STYLE)
            logger.exception("request %s %s failed", method, path)
            response = error_response(500, "internal_error", "internal error; see the daemon's log")
        logger.debug("%s %s -> %d (uid %d)", method, path, response.status, peer.uid)
        return response

    async def _send(
        self,
        h11conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: Response,
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


SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at fd 3


def inherited_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The listening AF_UNIX socket systemd passed (socket activation), else None.

    Honours `LISTEN_PID` (the variables are meant for this process only) and unsets the
    variables so children do not inherit them, like sd_listen_fds(unset_environment=1). Raises
    ConfigError when systemd passed something that is not one listening unix stream socket.
    """
    environ = os.environ if env is None else env
    fds, pid = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    if not fds or pid != str(os.getpid()):
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if fds != "1":
        raise ConfigError(f"socket activation: expected 1 socket, systemd passed {fds}")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError("socket activation: the passed socket is not a unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock
