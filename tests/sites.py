"""`Site`: a loopback HTTP server answering canned documents per path (discovery and
registration tests; `tests/conftest.py` has the `site` fixture that starts one)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = tuple[int, dict[str, str], bytes]


class Site:
    """A loopback HTTP server: `routes` maps "METHOD /path" or "/path" to a canned answer."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                site.requests.append((self.command, self.path, dict(self.headers), body))
                route = site.routes.get(f"{self.command} {self.path}") or site.routes.get(
                    self.path, (404, {}, b"not found")
                )
                status, headers, payload = route
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def json(self, path: str, data: object, status: int = 200) -> None:
        self.routes[path] = (
            status,
            {"Content-Type": "application/json"},
            json.dumps(data).encode(),
        )

    def status(self, path: str, status: int, headers: dict[str, str] | None = None) -> None:
        self.routes[path] = (status, headers or {}, b"")

    def as_metadata(self, issuer: str, path: str, **extra: object) -> None:
        """Serve authorization server metadata for `issuer` at `path`."""
        doc = {"issuer": issuer, "token_endpoint": f"{self.base}/token", **extra}
        self.json(path, doc)

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
