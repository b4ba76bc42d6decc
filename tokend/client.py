"""The socket client: one HTTP/1.1 request to the daemon over AF_UNIX with the standard library.

Stdlib only (http.client, socket, json), so client commands start fast.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from tokend.errors import API_ERRORS, ApiError, DaemonUnavailableError, SocketPermissionError

CLIENT_TIMEOUT_S = 20.0  # the daemon may wait up to 10 s for a refresh before answering


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("tokend", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Connect in blocking mode: with a timeout set, a full accept queue fails at once
            # (EAGAIN) instead of waiting its turn.
            sock.connect(self._path)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(
    socket_path: str,
    method: str,
    path: str,
    body: object | None = None,
    *,
    timeout: float = CLIENT_TIMEOUT_S,
) -> tuple[int, str, bytes]:
    """One request to the daemon; returns (status, content type, body).

    Raises DaemonUnavailableError when the socket cannot be reached.
    """
    conn = _UnixConnection(socket_path, timeout)
    headers = {"Host": "tokend"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, response.getheader("Content-Type") or "", data
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailableError(
            f"the daemon is not running at {socket_path} ({exc.strerror}); "
            "start it: systemctl start tokend (or: tokend run)"
        ) from None
    except PermissionError:
        raise SocketPermissionError(
            f"permission denied on {socket_path}; ask for membership of the socket's group"
        ) from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise DaemonUnavailableError(
            f"the daemon at {socket_path} did not answer ({type(exc).__name__})"
        ) from None
    finally:
        conn.close()


def _api_error(status: int, data: bytes, connector: str | None) -> ApiError:
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        return ApiError("internal_error", f"daemon answered HTTP {status}", connector=connector)
    retry = body.get("retry_after")
    code = body.get("error")
    description = str(body.get("error_description", f"daemon answered HTTP {status}"))
    if code not in API_ERRORS:  # a newer daemon's code, or none: not understood here
        code, description = (
            "internal_error",
            f"daemon answered HTTP {status} ({code}): {description}",
        )
    return ApiError(
        str(code),
        description,
        connector=body.get("connector", connector),
        since=body.get("since"),
        action=body.get("action"),
        retry_after=retry if isinstance(retry, int) else None,
    )


def request_json(
    socket_path: str,
    method: str,
    path: str,
    body: object | None = None,
    *,
    connector: str | None = None,
) -> Any:
    """Call the daemon and decode a JSON answer; raises ApiError for an error answer."""
    status, _, data = call(socket_path, method, path, body)
    if status >= 300:
        raise _api_error(status, data, connector)
    return json.loads(data) if data else None
