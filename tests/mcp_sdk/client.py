"""Call an MCP tool with the official SDK's streamable-HTTP client and a bearer token.

The token comes from outside (tokend), so no SDK OAuth runs here: the SDK's transport gets an
httpx2 client whose every request carries `Authorization: Bearer TOKEN`.

Runnable form, for transcripts (`tokend exec NAME -- python -m tests.mcp_sdk.client URL TOOL`):
`python -m tests.mcp_sdk.client URL TOOL [JSON_ARGS]`, token in env TOKEND_ACCESS_TOKEN; prints
the tool's result as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import httpx2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

TOKEN_ENV = "TOKEND_ACCESS_TOKEN"


class ToolError(Exception):
    """The server answered the call with an error result (`is_error`)."""


class Unauthorized(Exception):
    """The MCP server refused the bearer token (HTTP 401); `www_authenticate` is its challenge."""

    def __init__(self, www_authenticate: str) -> None:
        super().__init__(f"401 from the MCP server: {www_authenticate}")
        self.www_authenticate = www_authenticate


def _result_value(result: Any) -> object:
    """The structured result if the tool gave one (unwrapping MCPServer's {"result": x}),
    else the text content."""
    if result.is_error:
        raise ToolError(" ".join(getattr(block, "text", "") for block in result.content))
    structured = result.structured_content
    if structured is not None:
        if isinstance(structured, dict) and set(structured) == {"result"}:
            return structured["result"]
        return structured
    return "".join(getattr(block, "text", "") for block in result.content)


async def acall_tool(
    mcp_url: str, access_token: str, name: str, arguments: dict[str, Any]
) -> object:
    """Open an SDK client session on `mcp_url` with the bearer token, call one tool, close.

    Raises `Unauthorized` if the server answered 401 (the SDK itself surfaces that only as a
    generic error inside an exception group), `ToolError` for an error result.
    """
    challenges: list[str] = []

    async def note_401(response: httpx2.Response) -> None:
        if response.status_code == 401:
            challenges.append(response.headers.get("www-authenticate", ""))

    headers = {"Authorization": f"Bearer {access_token}"}
    timeout = httpx2.Timeout(30.0, read=60.0)
    try:
        async with httpx2.AsyncClient(
            headers=headers, timeout=timeout, event_hooks={"response": [note_401]}
        ) as http:
            transport = streamable_http_client(mcp_url, http_client=http)
            async with Client(transport) as client:
                result = await client.call_tool(name, arguments)
    except Exception as exc:
        if challenges:
            raise Unauthorized(challenges[0]) from exc
        raise
    return _result_value(result)


def call_tool(mcp_url: str, access_token: str, name: str, arguments: dict[str, Any]) -> object:
    """Synchronous `acall_tool` (runs its own event loop; do not call from a running loop)."""
    return anyio.run(acall_tool, mcp_url, access_token, name, arguments)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m tests.mcp_sdk.client URL TOOL [JSON_ARGS]", file=sys.stderr)
        return 2
    token = os.environ.get(TOKEN_ENV)
    if not token:
        print(f"{TOKEN_ENV} is not set", file=sys.stderr)
        return 2
    arguments = json.loads(args[2]) if len(args) == 3 else {}
    try:
        value = call_tool(args[0], token, args[1], arguments)
    except (ToolError, Unauthorized) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
