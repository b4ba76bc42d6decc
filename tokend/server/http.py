"""The API's unix socket and its server: `ApiServer`, the listening side of DESIGN §5.

Owns binding the socket (modes, stale files), taking one over from systemd (socket activation,
`inherited_socket`) and unlinking it, the accept loop, the cap on open connections, the one
periodic sweeper task that cuts connections past their deadline (it runs only while
connections are open, so a busy connection costs no timer per read), answering each request
through `tokend.server.api`, and shutdown. Each connection's parsing, limits and deadlines are
`tokend.server.connection`'s. Never logs a request body or a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

from tokend.clock import Clock, SystemClock
from tokend.errors import ConfigError, ExitCode, TokendError
from tokend.server.api import Peer, Response, TokenSource, dispatch, error_response
from tokend.server.connection import Connection, Request

logger = logging.getLogger(__name__)

MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_CLOSE_GRACE_S = 2.0
_SWEEP_MIN_S = 0.05
_SWEEP_MAX_S = 1.0


class SocketInUseError(TokendError):
    """Another process accepts connections on the socket path: probably another tokend."""

    exit_code = ExitCode.TEMPORARY


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
        self._connections: set[Connection] = set()
        self._closing = False
        self._at_cap = False
        self._path: Path | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created
        self._sweeper: asyncio.Task[None] | None = None
        self._all_gone: asyncio.Event | None = None
        tick = min(request_timeout_s, idle_timeout_s) / 4
        self._sweep_s = max(_SWEEP_MIN_S, min(_SWEEP_MAX_S, tick))

    # what connections read and report

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def connections(self) -> set[Connection]:
        return self._connections

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def request_timeout_s(self) -> float:
        return self._request_timeout_s

    @property
    def idle_timeout_s(self) -> float:
        return self._idle_timeout_s

    def refused_one(self) -> None:
        """A new connection was closed unanswered (at the cap, or shutting down)."""
        if not self._at_cap and not self._closing:
            logger.warning("%d connections open; refusing new ones", len(self._connections))
        self._at_cap = not self._closing

    def accepted(self, conn: Connection) -> None:
        self._at_cap = False
        self._connections.add(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def gone(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_gone is not None:
            self._all_gone.set()

    async def _sweep(self) -> None:
        """Cut connections past their deadline; ends when none are left (an idle daemon sleeps)."""
        loop = asyncio.get_running_loop()
        try:
            while self._connections:
                await asyncio.sleep(self._sweep_s)
                now = loop.time()
                for conn in [c for c in self._connections if c.deadline and c.deadline <= now]:
                    conn.expire()
        finally:
            self._sweeper = None

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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Connection(self), sock=sock, backlog=backlog
        )
        if self._path is None and isinstance(name := sock.getsockname(), str) and name:
            self._path = Path(name)
        logger.debug("serving on %s", self._path or "an inherited socket")

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (≤ 2 s), close all, unlink our socket."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if conn.task is None:
                conn.close()
        if self._connections:
            self._all_gone = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), _CLOSE_GRACE_S)
        tasks = [c.task for c in self._connections if c.task is not None]
        for conn in list(self._connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._path is not None and self._bound is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._path)
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self._path)
            self._bound = None

    async def handle(self, peer: Peer, request: Request) -> Response:
        """The answer to one request; a handler's bug is logged and answered 500."""
        method, target = request.method, request.target
        try:
            response = await dispatch(self._source, peer, method, target, request.body, self._clock)
        except Exception:  # the request handler: one of the three broad catches (STYLE)
            path = target.split("?", 1)[0][:200]
            logger.exception("request %s %s failed", method, path)
            response = error_response(500, "internal_error", "internal error; see the daemon's log")
        if logger.isEnabledFor(logging.DEBUG):
            path = target.split("?", 1)[0][:200]
            logger.debug("%s %s -> %d (uid %d)", method, path, response.status, peer.uid)
        return response


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
