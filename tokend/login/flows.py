"""The three ways a human authorizes tokend: device code, loopback redirect, paste-back.

Each flow talks to the user through a `Prompt` (lines to show, a line to read) and returns the
token set it obtained. Token requests go through `tokend.oauth.grants` and `tokend.oauth.device`
(sent by `tokend.oauth.transport`); this module only waits: for the device grant's polls
(RFC 8628 §3.4-3.5), for the browser's redirect to a loopback listener (RFC 8252 §7.3), or for
the user to paste the redirect URL back.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import os
import socket
import sys
import threading
import webbrowser
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx

from tokend.clock import Clock
from tokend.errors import LoginError
from tokend.model import Secret, TokenSet
from tokend.oauth import device, grants, transport
from tokend.oauth.protocol import parse_token_response
from tokend.oauth.transport import ClientCredentials

logger = logging.getLogger(__name__)

SLOW_DOWN_STEP_S = 5.0  # RFC 8628 §3.5: each slow_down adds 5 seconds to the interval
CALLBACK_PATH = "/callback"


@dataclass(frozen=True, slots=True)
class Prompt:
    """How a flow talks to the user: `say` shows a line, `ask` reads one (None at end of input)."""

    say: Callable[[str], None]
    ask: Callable[[], str | None]
    interactive: bool  # a human at a terminal: a browser may be opened for them


def console_prompt() -> Prompt:
    """Lines on stdout, answers from stdin; interactive when stdin is a terminal."""

    def say(text: str) -> None:
        print(text, flush=True)

    def ask() -> str | None:
        line = sys.stdin.readline()
        return line if line else None

    return Prompt(say=say, ask=ask, interactive=sys.stdin.isatty())


def may_open_browser(prompt: Prompt, env: dict[str, str] | os._Environ[str]) -> bool:
    """Only for a human at a terminal with a display or a configured browser."""
    has_display = any(env.get(key) for key in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))
    return prompt.interactive and has_display


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeRequest:
    """What an authorization code flow needs besides the redirect URI."""

    connector: str
    authorization_endpoint: str
    token_endpoint: str
    creds: ClientCredentials
    scope: str | None
    resource: str | None
    prompt: str | None  # "consent" when offline_access is asked of an OpenID provider
    issuer: str | None
    iss_required: bool
    default_lifetime: timedelta


# -- device authorization grant (RFC 8628) --------------------------------------------------


async def device_flow(
    http: httpx.AsyncClient,
    prompt: Prompt,
    clock: Clock,
    *,
    connector: str,
    device_endpoint: str,
    token_endpoint: str,
    creds: ClientCredentials,
    scope: str | None,
    resource: str | None,
    default_lifetime: timedelta,
) -> TokenSet:
    """Show the code and the URL, then poll at the server's interval until an answer."""
    request = device.build_device_authorization(
        device_endpoint, creds, connector=connector, scope=scope, resource=resource
    )
    response = await transport.send(http, request, connector=connector)
    auth = device.parse_device_authorization(response, connector=connector)
    if auth.verification_uri_complete:
        prompt.say(f"Open {auth.verification_uri_complete}")
        prompt.say(f"and check that it shows the code {auth.user_code}")
    else:
        prompt.say(f"Open {auth.verification_uri} and enter the code {auth.user_code}")
    minutes = max(1, round(auth.expires_in / 60))
    prompt.say(f"Waiting for the authorization (the code expires in {minutes} min) ...")
    deadline = clock.monotonic() + auth.expires_in
    interval = auth.interval
    while True:
        await asyncio.sleep(interval)
        if clock.monotonic() >= deadline:
            raise LoginError(
                connector, "the device code expired before authorization; start the login again"
            )
        poll = device.build_device_token(
            token_endpoint, creds, connector=connector, device_code=auth.device_code,
            resource=resource,
        )  # fmt: skip
        obtained_at = clock.now()
        answer = await transport.send(
            http, poll, connector=connector, redact=(auth.device_code.reveal(),)
        )
        outcome = device.parse_device_poll(
            answer, connector=connector, obtained_at=obtained_at,
            default_lifetime=default_lifetime,
        )  # fmt: skip
        if outcome == "slow_down":
            interval += SLOW_DOWN_STEP_S
            logger.debug("%s: slow_down: polling every %gs", connector, interval)
        elif outcome != "pending":
            return outcome


# -- authorization code with PKCE: loopback and paste-back ----------------------------------


class _Callback(BaseHTTPRequestHandler):
    """Answers the browser's redirect to the loopback listener and hands the URL over."""

    server: _CallbackServer

    def do_GET(self) -> None:
        if urlsplit(self.path).path != CALLBACK_PATH:
            self.send_error(404)
            return
        failed = "error=" in urlsplit(self.path).query
        text = (
            "tokend: the authorization failed; see the terminal."
            if failed
            else "tokend: authorization received. You can close this tab."
        )
        body = f"<!doctype html><title>tokend</title><p>{html.escape(text)}</p>\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        self.server.deliver(self.path)

    def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
        pass  # the query holds the authorization code: never logged


class _CallbackServer(HTTPServer):
    def __init__(self, address: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.received: asyncio.Future[str] = loop.create_future()
        super().__init__(address, _Callback)

    def deliver(self, path: str) -> None:
        def settle() -> None:
            if not self.received.done():
                self.received.set_result(path)

        self.loop.call_soon_threadsafe(settle)


@contextlib.contextmanager
def loopback_listener(
    host: str, port: int, *, connector: str
) -> Iterator[tuple[str, _CallbackServer]]:
    """Listen on `host`:`port` (0: any free port); yields the redirect URI and the server.

    Raises LoginError when the port is taken (a fixed `redirect_port`).
    """
    loop = asyncio.get_running_loop()
    address = "127.0.0.1" if host == "127.0.0.1" else "localhost"
    try:
        server = _CallbackServer((address, port), loop)
    except OSError as exc:
        raise LoginError(
            connector, f"cannot listen on {host}:{port} for the redirect: {exc.strerror or exc}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="tokend-login", daemon=True)
    thread.start()
    try:
        bound = server.server_address[1]
        yield f"http://{host}:{bound}{CALLBACK_PATH}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def free_port(host: str) -> int:
    """A port free right now on `host`, for a paste-back redirect URI nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1" if host == "127.0.0.1" else "localhost", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One authorization request: its PKCE verifier, `state` and URL, until its redirect."""

    verifier: Secret
    state: str
    redirect_uri: str
    url: str

    @classmethod
    def start(cls, req: CodeRequest, redirect_uri: str) -> _Attempt:
        verifier, challenge = grants.new_pkce()
        state = grants.new_state()
        url = grants.authorization_url(
            req.authorization_endpoint, connector=req.connector, client_id=req.creds.client_id,
            redirect_uri=redirect_uri, state=state, code_challenge=challenge, scope=req.scope,
            resource=req.resource, prompt=req.prompt,
        )  # fmt: skip
        return cls(verifier, state, redirect_uri, url)

    async def finish(
        self, http: httpx.AsyncClient, clock: Clock, req: CodeRequest, redirect: str
    ) -> TokenSet:
        """Check the redirect (state, issuer, error) and exchange its code (RFC 6749 §4.1.3)."""
        code = grants.code_from_redirect(
            redirect, expected_state=self.state, issuer=req.issuer, connector=req.connector,
            iss_required=req.iss_required,
        )  # fmt: skip
        request = grants.build_code_exchange(
            req.token_endpoint, req.creds, connector=req.connector, code=code,
            redirect_uri=self.redirect_uri, code_verifier=self.verifier, resource=req.resource,
        )  # fmt: skip
        obtained_at = clock.now()
        response = await transport.send(
            http, request, connector=req.connector,
            redact=(code.reveal(), self.verifier.reveal()),
        )  # fmt: skip
        return parse_token_response(
            response, connector=req.connector, obtained_at=obtained_at, previous=None,
            default_lifetime=req.default_lifetime,
        )  # fmt: skip


async def loopback_flow(
    http: httpx.AsyncClient,
    prompt: Prompt,
    clock: Clock,
    req: CodeRequest,
    *,
    redirect_uri: str,
    server: _CallbackServer,
    timeout_s: float,
    open_browser: bool,
) -> TokenSet:
    """Send the user to the authorization URL and wait for the browser's redirect."""
    attempt = _Attempt.start(req, redirect_uri)
    url = attempt.url
    prompt.say(f"Open this URL in a browser to authorize {req.connector}:\n\n  {url}\n")
    port = urlsplit(redirect_uri).port
    prompt.say(
        f"Waiting for the redirect to {redirect_uri} ... (from another machine: "
        f"ssh -L {port}:127.0.0.1:{port} this-host, or run again with --flow paste)"
    )
    if open_browser:
        with contextlib.suppress(webbrowser.Error):
            webbrowser.open(url)
    try:
        async with asyncio.timeout(timeout_s):
            path = await server.received
    except TimeoutError:
        raise LoginError(
            req.connector, f"no redirect arrived within {timeout_s:g}s; start the login again"
        ) from None
    return await attempt.finish(http, clock, req, path)


async def paste_flow(
    http: httpx.AsyncClient,
    prompt: Prompt,
    clock: Clock,
    req: CodeRequest,
    *,
    redirect_uri: str,
) -> TokenSet:
    """Print the URL; the user authorizes anywhere and pastes back where the browser ended up."""
    attempt = _Attempt.start(req, redirect_uri)
    url = attempt.url
    prompt.say(f"Open this URL in a browser on any machine to authorize {req.connector}:\n")
    prompt.say(f"  {url}\n")
    prompt.say(
        f"The browser then tries to load {redirect_uri}?code=... and shows an error page; "
        "that is expected."
    )
    prompt.say("Copy the whole address from the address bar and paste it here:")
    line = await asyncio.to_thread(prompt.ask)
    if line is None or not line.strip():
        raise LoginError(req.connector, "no redirect URL was pasted")
    return await attempt.finish(http, clock, req, line)
