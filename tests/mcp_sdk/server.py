"""An MCP server on the official SDK, with the SDK's own OAuth authorization server in front.

Run: `python -m tests.mcp_sdk.server --port 0 --lifetime 4`. One uvicorn server on 127.0.0.1
serves both halves from one origin (the SDK mounts its auth routes next to the MCP endpoint):

- the SDK's authorization-server routes (RFC 8414 metadata, /authorize, /token, /register,
  /revoke), backed by `MemoryProvider` (auto-approved consent, rotation, reuse detection);
- the SDK's streamable-HTTP MCP endpoint at /mcp behind its bearer middleware, with RFC 9728
  protected-resource metadata; tokens must have been issued for this resource (RFC 8707);
- `GET /test/stats` (no auth): counters for the test.

When ready it prints one JSON line on stdout, {"mcp_url", "issuer", "pid"}, and runs until
SIGTERM. It logs each token request's grant_type and resource to stderr, never a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.mcp_sdk.provider import MemoryProvider, Stats

log = logging.getLogger("tests.mcp_sdk.server")

MCP_PATH = "/mcp"
REQUIRED_SCOPES = ["mcp"]
AS_SCOPES = ["mcp", "offline_access"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenRequestLog:
    """ASGI middleware: logs and records each POST /token's grant_type and resource, then
    replays the body to the SDK's token handler."""

    def __init__(self, app: ASGIApp, stats: Stats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/token":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        form = parse_qs(body.decode("latin-1"))
        grant_type = form.get("grant_type", [None])[0]
        resource = form.get("resource", [None])[0]
        self.stats.token_requests.append({"grant_type": grant_type, "resource": resource})
        log.info("token request grant_type=%s resource=%s", grant_type, resource)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def build(port: int, lifetime_s: float) -> tuple[ASGIApp, MemoryProvider, dict[str, str]]:
    """The ASGI app on 127.0.0.1:port, its provider, and the URLs to announce."""
    origin = f"http://127.0.0.1:{port}"
    mcp_url = origin + MCP_PATH
    provider = MemoryProvider(lifetime_s=lifetime_s, resource=mcp_url, scopes=REQUIRED_SCOPES)
    server = MCPServer(
        name="tokend-test",
        auth_server_provider=provider,
        auth=AuthSettings(
            issuer_url=origin,  # type: ignore[arg-type]  # pydantic validates the string
            resource_server_url=mcp_url,  # type: ignore[arg-type]
            validate_token_resource=True,
            required_scopes=REQUIRED_SCOPES,
            client_registration_options=ClientRegistrationOptions(
                enabled=True, valid_scopes=AS_SCOPES, default_scopes=AS_SCOPES
            ),
            revocation_options=RevocationOptions(enabled=True),
        ),
        log_level="WARNING",
    )
    calls = {"n": 0}

    @server.tool()
    def whoami() -> dict[str, Any]:
        """The calling client's id and how many tool calls the server has answered."""
        calls["n"] += 1
        token = get_access_token()
        return {"client_id": token.client_id if token else None, "calls": calls["n"]}

    @server.tool()
    def add(a: int, b: int) -> int:
        """The sum of two integers."""
        return a + b

    async def stats(_request: Request) -> Response:
        return JSONResponse(provider.stats.as_dict(), headers={"Cache-Control": "no-store"})

    server.custom_route("/test/stats", methods=["GET"])(stats)  # untyped decorator in the SDK

    app = server.streamable_http_app(streamable_http_path=MCP_PATH, host="127.0.0.1")
    urls = {"mcp_url": mcp_url, "issuer": origin}
    return TokenRequestLog(app, provider.stats), provider, urls


async def serve(port: int, lifetime_s: float) -> None:
    """Bind first (so port 0 resolves), build the app for that port, announce once serving."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    app, _provider, urls = build(sock.getsockname()[1], lifetime_s)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raises what stopped it
            return
        await asyncio.sleep(0.02)
    sys.stdout.write(json.dumps({**urls, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mcp_sdk.server", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--lifetime", type=float, default=4.0, help="access-token lifetime in seconds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # uvicorn shuts down gracefully on SIGTERM, restores this handler and re-raises the signal:
    # this handler turns that into a clean exit 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    asyncio.run(serve(args.port, args.lifetime))
    return 0


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
