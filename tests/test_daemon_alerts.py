"""Alerts from the running daemon: a local webhook receiver and an exec sink get one alert per
state change, a reminder while it lasts and `recovered` when it ends; sinks never slow refreshes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.harness import MemoryKeyring, aget, make_config, memory_store, running_daemon
from tokend.authserver import AuthServer
from tokend.config import AlertSettings, Config

pytestmark = pytest.mark.anyio


class Receiver:
    """A webhook endpoint on loopback that records the JSON bodies POSTed to it."""

    def __init__(self, *, hang: bool = False) -> None:
        self.events: list[dict] = []
        events, stall = self.events, hang

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if stall:
                    time.sleep(30)
                    return
                events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _exec_sink(root: Path) -> tuple[list[str], Path]:
    out = root / "exec-events.jsonl"
    script = root / "page-me"
    script.write_text(f'#!/bin/sh\ncat >> "{out}"\necho >> "{out}"\n')
    script.chmod(0o755)
    return [str(script)], out


def _exec_events(out: Path) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_needs_reauth_alert_reminder_and_recovered(tmp_short):
    """invalid_grant sends exactly one needs_reauth to the webhook and the exec sink, a reminder
    after `repeat`, and one recovered once a new grant is installed."""
    receiver = Receiver()
    argv, out = _exec_sink(tmp_short)
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            config = _with_alerts(
                make_config(tmp_short, auth.token_url), argv, receiver.url, repeat=_s(1.5)
            )
            async with running_daemon(config) as daemon:
                sock = daemon.config.daemon.socket
                await aget(sock, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
                auth.fail_next("invalid_grant")
                await aget(sock, "/v1/connectors/demo/refresh", "POST")
                await _until(lambda: receiver.events and _exec_events(out))
                first = receiver.events[0]
                await _until(lambda: len(receiver.events) >= 2, timeout=6)
                reminder = receiver.events[1]
                await aget(sock, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
                await _until(lambda: receiver.events[-1]["event"] == "recovered")
                await _until(lambda: _exec_events(out)[-1]["event"] == "recovered")
                await asyncio.sleep(0.5)
    finally:
        receiver.close()
    print(json.dumps(first))  # with -s: an alert as the webhook received it
    assert first["event"] == "needs_reauth"
    assert first["connector"] == "demo"
    assert first["severity"] == "critical"
    assert first["action"] == "tokend import demo"
    assert "invalid_grant" in first["message"]
    assert set(first) >= {
        "event",
        "connector",
        "severity",
        "message",
        "since",
        "attempts",
        "action",
        "host",
        "at",
    }
    assert reminder["event"] == "needs_reauth" and reminder.get("reminder") is True
    kinds = [e["event"] for e in receiver.events]
    assert kinds.count("recovered") == 1
    assert kinds[0] == "needs_reauth" and not any(
        k not in ("needs_reauth", "recovered") for k in kinds
    )
    exec_kinds = [e["event"] for e in _exec_events(out)]
    assert exec_kinds[0] == "needs_reauth" and exec_kinds.count("recovered") == 1


async def test_persist_failed_alert_and_hanging_sink_does_not_delay_refresh(tmp_short):
    """A keyring write failure alerts persist_failed and then recovered once written; a webhook
    that hangs does not slow the refreshes down."""
    receiver = Receiver(hang=True)
    argv, out = _exec_sink(tmp_short)
    backend = MemoryKeyring()
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            config = _with_alerts(
                make_config(tmp_short, auth.token_url), argv, receiver.url, repeat=_s(3600)
            )
            async with running_daemon(config, store=memory_store(backend)) as daemon:
                sock = daemon.config.daemon.socket
                await aget(sock, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
                backend.fail_writes = True
                started = time.monotonic()
                await aget(sock, "/v1/connectors/demo/refresh", "POST")
                backend.fail_writes = False
                await _until(lambda: not daemon.connectors["demo"].unpersisted)
                for _ in range(3):
                    await aget(sock, "/v1/connectors/demo/refresh", "POST")
                elapsed = time.monotonic() - started
                await _until(lambda: len(_exec_events(out)) >= 2)
    finally:
        receiver.close()
    kinds = [e["event"] for e in _exec_events(out)]
    assert kinds[:2] == ["persist_failed", "recovered"]
    assert elapsed < 10  # the hanging webhook (30 s) never held a refresh up
    assert auth.refreshes_ok == 4


def _with_alerts(config: Config, argv: list[str], webhook: str, *, repeat: timedelta) -> Config:
    """`config` with an exec sink and a webhook sink."""
    alerts = AlertSettings(exec=tuple(argv), webhook=webhook, repeat=repeat)
    return dataclasses.replace(config, alerts=alerts)


def _s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)
