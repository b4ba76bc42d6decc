"""`tokend demo`: the daemon against the built-in loopback authorization server, end to end.

Everything lives in a temporary directory: an encrypted-file keyring, the state, the socket. One
connector with short-lived tokens whose refresh tokens rotate (and whose reuse revokes the grant),
a job that looks the token up over the socket every second and proves it against the server's
protected resource, and a line per refresh. Ctrl-C (or `--duration`) stops it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import httpx

from tokend.authserver import AuthServer
from tokend.client import request_json
from tokend.config import Config, ConnectorConfig, DaemonSettings, RefreshSettings
from tokend.daemon import Daemon
from tokend.errors import TokendError
from tokend.store import FILE_BACKEND

NAME = "demo"


def _fingerprint(token: str) -> str:
    """A short, non-reversible tag so the demo can show tokens changing without showing them."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _command() -> str:
    """How this shell can run tokend again: `tokend` if that is on PATH, else this program."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "tokend" and shutil.which("tokend") != os.path.abspath(argv0):
        return os.path.relpath(argv0) if not os.path.isabs(argv0) else argv0
    if os.path.basename(argv0) == "tokend":
        return "tokend"
    return f"{sys.executable} -m tokend"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo_config(root: Path, token_url: str, lifetime_s: float) -> Config:
    """The demo's configuration: one connector, the encrypted-file keyring under `root`."""
    refresh = RefreshSettings(
        skew=timedelta(seconds=max(1.0, lifetime_s / 6)),
        min_interval=timedelta(seconds=1),
        default_lifetime=timedelta(seconds=lifetime_s),
    )
    return Config(
        path=None,
        daemon=DaemonSettings(
            socket=root / "tokend.sock",
            state_dir=root / "state",
            keyring_backend=FILE_BACKEND,
        ),
        refresh=refresh,
        connectors={
            NAME: ConnectorConfig(
                name=NAME,
                token_url=token_url,
                client_id="tokend-demo",
                client_auth="none",
                scope="demo offline_access",
                refresh=refresh,
            )
        },
    )


async def _job(daemon: Daemon, auth: AuthServer, counts: dict[str, int]) -> None:
    """A job script's view: look the token up over the socket, then use it."""
    socket_path = str(daemon.config.daemon.socket)
    async with httpx.AsyncClient(timeout=5.0) as http:
        while True:
            await asyncio.sleep(1.0)
            try:
                body = await asyncio.to_thread(
                    request_json, socket_path, "GET", f"/v1/connectors/{NAME}/token"
                )
                answer = await http.get(
                    f"{auth.url}/api/whoami",
                    headers={"Authorization": f"Bearer {body['access_token']}"},
                )
                ok = answer.status_code == 200
            except (TokendError, httpx.HTTPError):
                ok = False
            counts["ok" if ok else "failed"] += 1
            if not ok:
                _say("  lookup FAILED: the served token was refused")


async def _watch(daemon: Daemon, counts: dict[str, int]) -> None:
    """Print one line per refresh."""
    connector = daemon.connectors[NAME]
    seen = connector.record.refreshes
    while True:
        await asyncio.sleep(0.25)
        record = connector.record
        if record.refreshes != seen and connector.token is not None:
            seen = record.refreshes
            left = int(connector.token.remaining(daemon.clock.now()).total_seconds())
            tag = _fingerprint(connector.token.access_token.reveal())
            _say(
                f"  refresh #{seen}: new access token {tag}, expires in {left}s, refresh token "
                f"rotated and stored; lookups ok {counts['ok']}, failed {counts['failed']}"
            )


async def _main(root: Path, lifetime_s: float, duration_s: float | None) -> int:
    counts = {"ok": 0, "failed": 0}
    with AuthServer(lifetime_s=lifetime_s) as auth:
        daemon = Daemon(demo_config(root, auth.token_url, lifetime_s))
        runner = asyncio.create_task(daemon.run(), name="daemon")
        ready = asyncio.create_task(daemon.ready_event.wait())
        await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            ready.cancel()
            await runner  # raises the start-up error
            return 1
        await daemon.source.install_grant(NAME, auth.issue_grant())
        sock = daemon.config.daemon.socket
        _say(
            "\n".join(
                [
                    "tokend demo",
                    f"  authorization server {auth.url} (tokens live {lifetime_s:g}s; refresh "
                    "tokens rotate; presenting an old one revokes the grant)",
                    f"  keyring              encrypted file {root / 'state' / 'keyring.enc'}",
                    f"  socket               {sock}",
                    "try it from another shell:",
                    f"  curl --unix-socket {sock} http://tokend/v1/connectors/{NAME}/token",
                    f"  TOKEND_SOCKET={sock} {_command()} status",
                    "Ctrl-C stops the demo.",
                ]
            )
        )
        helpers = [
            asyncio.create_task(_job(daemon, auth, counts)),
            asyncio.create_task(_watch(daemon, counts)),
        ]
        if duration_s is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(duration_s, daemon.stop_event.set)
        try:
            await runner
        finally:
            for task in helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        refreshes = daemon.connectors[NAME].record.refreshes
        _say(
            f"stopped: {refreshes} refreshes, {counts['ok']} lookups ok, {counts['failed']} "
            f"failed; the server saw {auth.refreshes_ok} refreshes and "
            f"{auth.reuse_detected} refresh-token reuses"
        )
        return 0 if counts["failed"] == 0 and auth.reuse_detected == 0 else 1


def run_demo(*, lifetime_s: float = 30.0, duration_s: float | None = None) -> int:
    """Run the demo until Ctrl-C or `duration_s`; 0 when every lookup succeeded."""
    # A short path: AF_UNIX socket paths longer than ~107 bytes cannot be bound.
    root = Path(tempfile.mkdtemp(prefix="tokend-demo-", dir="/tmp"))
    try:
        return asyncio.run(_main(root, lifetime_s, duration_s))
    finally:
        shutil.rmtree(root, ignore_errors=True)
