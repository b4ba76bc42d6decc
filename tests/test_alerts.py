"""Tests for tokend.alerts: events, real sinks (an exec script, a loopback webhook, Apprise's json://
plugin against the same webhook), deduplication, reminders, recovery, and that a hanging or failing
sink delays neither the caller nor the other sinks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from tokend.alerts.command import run_alert_command, run_alert_test
from tokend.alerts.event import check_event, daemon_failed_event
from tokend.alerts.manager import AlertManager
from tokend.clock import SystemClock
from tokend.config import AlertSettings, Config, DaemonSettings
from tokend.errors import ConfigError, ExitCode

T = TypeVar("T")
FIELDS = {"event", "connector", "severity", "message", "since", "attempts", "action", "host", "at"}
SINCE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- a webhook receiver and an exec script ------------------------------------------------------


class Receiver:
    """A webhook on 127.0.0.1 that records each POSTed JSON body and answers from a script of
    statuses (then `default`); with `hang`, it never answers until the test ends."""

    def __init__(self, statuses: tuple[int, ...] = (), *, default: int = 200, hang: bool = False):
        self.bodies: list[dict[str, Any]] = []
        self.statuses = list(statuses)
        self.default = default
        self.hang = hang
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.bodies.append(json.loads(body))
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                if receiver.hang:
                    receiver.release.wait(30)
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.bodies)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def make_script(tmp_path: Path, body: str, name: str = "sink.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


class Recorder:
    """An exec sink: a shell script appending each event (one JSON line) to a file."""

    def __init__(self, tmp_path: Path) -> None:
        self.out = tmp_path / "events.jsonl"
        self.argv = (str(make_script(tmp_path, 'cat >> "$1"\n', "record.sh")), str(self.out))

    def events(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


async def until(check: Callable[[], T], timeout_s: float = 10.0) -> T:
    """Poll `check` until it returns something truthy (generous bound for slow machines)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await anyio.sleep(0.02)
    return result


@asynccontextmanager
async def running(
    settings: AlertSettings, close_timeout_s: float = 2.0, **options: Any
) -> AsyncIterator[AlertManager]:
    manager = AlertManager(settings, clock=SystemClock(), host="test-host", **options)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close(timeout_s=close_timeout_s)


def needs_reauth(manager: AlertManager, name: str = "gh") -> None:
    manager.observe(
        name,
        "needs_reauth",
        reason="token endpoint refused the grant: invalid_grant (revoked)",
        action=f"tokend import {name}",
        since=SINCE,
        attempts=0,
    )


def observe(manager: AlertManager, state: str, name: str = "gh", **fields: Any) -> None:
    values: dict[str, Any] = {"reason": None, "action": None, "since": None, "attempts": None}
    manager.observe(name, state, **(values | fields))


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] + (" (reminder)" if e.get("reminder") else "") for e in events]


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# --- events ---------------------------------------------------------------------------------------


def test_daemon_failed_event_has_the_contract_fields() -> None:
    """daemon_failed: critical, no connector, the unit and systemd's result in the message."""
    event = daemon_failed_event("tokend.service", host="box", at=SINCE, result="watchdog")
    assert set(event) == FIELDS
    assert event["event"] == "daemon_failed"
    assert event["connector"] is None
    assert event["severity"] == "critical"
    assert event["since"] == event["at"] == "2030-01-02T03:04:05Z"
    assert "tokend.service" in str(event["message"]) and "watchdog" in str(event["message"])
    assert (
        event["action"] == "journalctl -u tokend.service -e; then: systemctl restart tokend.service"
    )


def test_check_event_is_an_info_test_event() -> None:
    """The `check --alerts` event is event "test", severity info, naming the host."""
    event = check_event(host="box", at=SINCE)
    assert (event["event"], event["severity"], event["host"]) == ("test", "info", "box")


# --- alert, reminder, recovery through real sinks -------------------------------------------------


@pytest.mark.anyio
async def test_alert_reminder_and_recovery_reach_webhook_and_exec(
    receiver: Receiver, recorder: Recorder
) -> None:
    """Each sink gets one needs_reauth, reminders every `repeat`, then exactly one recovered."""
    settings = AlertSettings(
        exec=recorder.argv, webhook=receiver.url, repeat=timedelta(milliseconds=300)
    )
    async with running(settings) as manager:
        needs_reauth(manager)
        for _ in range(3):
            needs_reauth(manager)  # the same state again is no new alert
        await until(lambda: len(receiver.events()) >= 2 and len(recorder.events()) >= 2)
        observe(manager, "ok")
        await until(lambda: "recovered" in names(receiver.events()))
        await until(lambda: "recovered" in names(recorder.events()))
        await anyio.sleep(0.8)  # more than two `repeat`s: nothing follows the recovery
    for events in (receiver.events(), recorder.events()):
        kinds = names(events)
        assert kinds[0] == "needs_reauth"
        assert kinds[-1] == "recovered"
        assert set(kinds[1:-1]) == {"needs_reauth (reminder)"}
        first = events[0]
        assert set(first) == FIELDS
        assert first["connector"] == "gh"
        assert first["severity"] == "critical"
        assert first["since"] == "2030-01-02T03:04:05Z"
        assert first["attempts"] == 0
        assert first["action"] == "tokend import gh"
        assert first["host"] == "test-host"
        assert first["message"] == (
            "Connector gh needs a new authorization: "
            "token endpoint refused the grant: invalid_grant (revoked)."
        )
        assert abs(datetime.fromisoformat(first["at"]) - datetime.now(UTC)) < HOUR
        reminder = events[1]
        assert reminder["since"] == first["since"] and reminder["message"] == first["message"]
        recovered = events[-1]
        assert recovered["severity"] == "info"
        assert recovered["resolves"] == "needs_reauth"
        assert recovered["since"] == first["since"]
        assert recovered["action"] is None


@pytest.mark.anyio
async def test_alerting_states_dedupe_and_a_change_between_them_is_a_new_alert(
    receiver: Receiver,
) -> None:
    """expired → refreshing → expired alerts once; expired → needs_reauth alerts again."""
    async with running(AlertSettings(webhook=receiver.url, repeat=HOUR)) as manager:
        observe(manager, "retrying", attempts=1)
        observe(manager, "expired", attempts=2, reason="token endpoint unreachable", since=SINCE)
        observe(manager, "refreshing")
        observe(manager, "expired", attempts=3, since=SINCE + HOUR)
        observe(manager, "retrying")
        observe(manager, "needs_reauth", action="tokend import gh")
        await until(lambda: len(receiver.events()) >= 2)
        await anyio.sleep(0.3)
    events = receiver.events()
    assert names(events) == ["expired", "needs_reauth"]
    assert events[0]["severity"] == "error"
    assert events[0]["attempts"] == 2
    assert events[0]["since"] == "2030-01-02T03:04:05Z"
    assert "after 2 failed attempts: token endpoint unreachable" in events[0]["message"]


@pytest.mark.anyio
async def test_unauthorized_never_alerts_and_clears_silently(receiver: Receiver) -> None:
    """unauthorized is no incident: no alert for it, and an alert it ends gets no `recovered`."""
    async with running(AlertSettings(webhook=receiver.url, repeat=HOUR)) as manager:
        observe(manager, "unauthorized", name="new")
        observe(manager, "ok", name="new")
        observe(manager, "rejected", reason="client secret missing")
        observe(manager, "unauthorized")
        observe(manager, "ok")
        await until(lambda: receiver.events())
        await anyio.sleep(0.3)
    assert names(receiver.events()) == ["rejected"]


@pytest.mark.anyio
async def test_forget_drops_a_removed_connectors_alert(receiver: Receiver) -> None:
    """A connector removed by reload leaves no reminder and no `recovered` behind."""
    settings = AlertSettings(webhook=receiver.url, repeat=timedelta(milliseconds=200))
    async with running(settings) as manager:
        needs_reauth(manager)
        manager.forget("gh")
        observe(manager, "ok")
        await until(lambda: receiver.events())
        await anyio.sleep(0.5)
    assert names(receiver.events()) == ["needs_reauth"]


@pytest.mark.anyio
async def test_persist_failed_alerts_once_and_recovers(receiver: Receiver) -> None:
    """persist_failed is one `error` alert however often the write fails, then one recovered."""
    async with running(AlertSettings(webhook=receiver.url, repeat=HOUR)) as manager:
        manager.persist_recovered("gh")  # nothing was alerted: nothing to recover
        manager.persist_failed("gh", reason="persist_failed: keyring locked", since=SINCE)
        manager.persist_failed("gh", reason="keyring still locked", since=SINCE + HOUR)
        observe(manager, "ok")  # the connector serves from memory: no state alert to end
        manager.persist_recovered("gh")
        manager.persist_recovered("gh")
        await until(lambda: len(receiver.events()) >= 2)
        await anyio.sleep(0.3)
    events = receiver.events()
    assert names(events) == ["persist_failed", "recovered"]
    assert events[0]["severity"] == "error"
    assert events[0]["action"] == "tokend check"
    assert events[0]["message"] == (
        "Connector gh was refreshed but the keyring write failed; the new tokens are held in "
        "memory only: keyring locked."
    )
    assert events[1]["resolves"] == "persist_failed"


@pytest.mark.anyio
async def test_queued_alerts_are_flushed_at_close(receiver: Receiver) -> None:
    """Alerts reported before start wait in the queue; close delivers them before stopping."""
    manager = AlertManager(AlertSettings(webhook=receiver.url), clock=SystemClock(), host="h")
    needs_reauth(manager, "a")
    needs_reauth(manager, "b")
    await manager.start()
    await manager.close(timeout_s=5.0)
    assert [e["connector"] for e in receiver.events()] == ["a", "b"]


@pytest.mark.anyio
async def test_a_full_queue_drops_the_oldest_and_says_so(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the queue limit the oldest waiting alert is dropped, with a WARNING."""
    manager = AlertManager(
        AlertSettings(webhook=receiver.url), clock=SystemClock(), host="h", queue_limit=2
    )
    for name in ("a", "b", "c"):
        needs_reauth(manager, name)
    await manager.start()
    await manager.close(timeout_s=5.0)
    assert [e["connector"] for e in receiver.events()] == ["b", "c"]
    assert "alert sink webhook: 2 alerts waiting; dropped needs_reauth for a" in caplog.text


# --- webhook retries and failures -----------------------------------------------------------------


@pytest.mark.anyio
async def test_webhook_retries_5xx_and_delivers_once() -> None:
    """Two 500s then a 200: three requests, delivered, and no request after the success."""
    with Receiver((500, 503)) as hook:
        manager = AlertManager(
            AlertSettings(webhook=hook.url), clock=SystemClock(), webhook_backoff_s=0.05
        )
        results = await manager.send_test()
        await manager.close()
        await anyio.sleep(0.2)
        assert results == [("webhook", None)]
        assert len(hook.events()) == 3
        assert {e["event"] for e in hook.events()} == {"test"}


@pytest.mark.anyio
async def test_webhook_that_always_fails_is_logged_and_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An always-503 webhook gets `webhook_attempts` tries, then one ERROR line; never raised."""
    with Receiver(default=503) as hook:
        settings = AlertSettings(webhook=hook.url, repeat=HOUR)
        async with running(settings, webhook_attempts=3, webhook_backoff_s=0.05) as manager:
            needs_reauth(manager)
            await until(lambda: "not delivered" in caplog.text)
        assert len(hook.events()) == 3
    assert (
        "alert sink webhook: needs_reauth for gh not delivered: "
        "127.0.0.1: HTTP 503 (gave up after 3 attempts)"
    ) in caplog.text


@pytest.mark.anyio
async def test_webhook_4xx_is_not_retried() -> None:
    """A 404 is the receiver's final word: one request, reported as the failure."""
    with Receiver(default=404) as hook:
        manager = AlertManager(AlertSettings(webhook=hook.url), clock=SystemClock())
        results = await manager.send_test()
        await manager.close()
        assert results == [("webhook", "127.0.0.1 answered HTTP 404")]
        assert len(hook.events()) == 1


@pytest.mark.anyio
async def test_unreachable_webhook_is_reported() -> None:
    """Nobody listening: the connection error is the reported reason, without the URL's path."""
    with Receiver() as hook:
        url = hook.url.replace("/hook", "/s3cr3t-path")
    manager = AlertManager(AlertSettings(webhook=url), clock=SystemClock(), webhook_backoff_s=0.01)
    [(name, error)] = await manager.send_test()
    await manager.close()
    assert name == "webhook"
    assert error is not None and error.startswith("127.0.0.1: ")
    assert "s3cr3t" not in error


# --- a hanging sink delays nobody -----------------------------------------------------------------


@pytest.mark.anyio
async def test_hanging_exec_delays_neither_observe_nor_the_webhook(
    tmp_path: Path, receiver: Receiver
) -> None:
    """While the exec sink hangs, observe() returns at once and the webhook gets every alert;
    close() kills the hanging program's whole process group."""
    pids = tmp_path / "pids"
    hang = make_script(tmp_path, f'echo $$ >> "{pids}"\nsleep 60 &\necho $! >> "{pids}"\nwait\n')
    settings = AlertSettings(exec=(str(hang),), webhook=receiver.url, repeat=HOUR)
    async with running(settings, close_timeout_s=0.2, exec_timeout_s=20.0) as manager:
        for name in ("a", "b", "c"):
            started = time.perf_counter()
            needs_reauth(manager, name)
            assert time.perf_counter() - started < 0.05  # it only enqueues (typically ~50 µs)
        await until(lambda: len(receiver.events()) == 3)
        await until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    for pid in map(int, pids.read_text().split()):
        await until(functools.partial(gone, pid))


@pytest.mark.anyio
async def test_exec_past_its_timeout_is_killed_and_reported(tmp_path: Path) -> None:
    """An exec sink running past exec_timeout_s is killed with its children and reported."""
    pids = tmp_path / "pids"
    hang = make_script(tmp_path, f'echo $$ >> "{pids}"\nsleep 60 &\necho $! >> "{pids}"\nwait\n')
    manager = AlertManager(
        AlertSettings(exec=(str(hang),)), clock=SystemClock(), exec_timeout_s=0.5
    )
    results = await manager.send_test()
    await manager.close()
    assert results == [("exec", f"{hang} did not finish within 0.5s and was killed")]
    for pid in map(int, pids.read_text().split()):
        await until(functools.partial(gone, pid))


@pytest.mark.anyio
async def test_hanging_webhook_delays_neither_observe_nor_exec(recorder: Recorder) -> None:
    """A webhook that never answers times out on its own; the exec sink gets every alert."""
    with Receiver(hang=True) as hook:
        settings = AlertSettings(exec=recorder.argv, webhook=hook.url, repeat=HOUR)
        options = {"webhook_timeout_s": 0.3, "webhook_attempts": 2, "webhook_backoff_s": 0.01}
        async with running(settings, close_timeout_s=0.2, **options) as manager:
            for name in ("a", "b", "c"):
                started = time.perf_counter()
                needs_reauth(manager, name)
                assert time.perf_counter() - started < 0.05
            await until(lambda: len(recorder.events()) == 3)
            assert [e["connector"] for e in recorder.events()] == ["a", "b", "c"]
            results = await manager.send_test()
        assert (
            dict(results)["webhook"]
            == "127.0.0.1: no answer within 0.3s (gave up after 2 attempts)"
        )


# --- send_test, exec failures, log lines ----------------------------------------------------------


@pytest.mark.anyio
async def test_send_test_reaches_every_sink_and_reports_each(
    tmp_path: Path, recorder: Recorder
) -> None:
    """send_test delivers a `test` event to each sink and reports per sink, failures included."""
    with Receiver(default=404) as hook:
        manager = AlertManager(
            AlertSettings(exec=recorder.argv, webhook=hook.url), clock=SystemClock(), host="h"
        )
        results = await manager.send_test()
        await manager.close()
        assert [e["event"] for e in hook.events()] == ["test"]
    assert results == [("exec", None), ("webhook", "127.0.0.1 answered HTTP 404")]
    [event] = recorder.events()
    assert (event["event"], event["host"], event["connector"]) == ("test", "h", None)


@pytest.mark.anyio
async def test_exec_failures_report_the_exit_code(tmp_path: Path) -> None:
    """A non-zero exit or a death by signal is a failure naming it; a missing program too."""
    failing = make_script(tmp_path, "cat >/dev/null\nexit 3\n", "exit3.sh")
    manager = AlertManager(AlertSettings(exec=(str(failing),)), clock=SystemClock())
    assert await manager.send_test() == [("exec", f"{failing} exited with 3")]
    killed = make_script(tmp_path, "kill -TERM $$\n", "killed.sh")
    manager = AlertManager(AlertSettings(exec=(str(killed),)), clock=SystemClock())
    assert await manager.send_test() == [("exec", f"{killed} was killed by signal 15")]
    missing = str(tmp_path / "missing")
    manager = AlertManager(AlertSettings(exec=(missing,)), clock=SystemClock())
    assert await manager.send_test() == [
        ("exec", f"cannot run {missing}: No such file or directory")
    ]


@pytest.mark.anyio
async def test_exec_sink_does_not_wait_for_a_background_child(tmp_path: Path) -> None:
    """A program that leaves a child running in the background has delivered when it exits."""
    child = tmp_path / "child"
    forks = make_script(tmp_path, f'cat >/dev/null\nsleep 60 &\necho $! > "{child}"\n', "fork.sh")
    manager = AlertManager(
        AlertSettings(exec=(str(forks),)), clock=SystemClock(), exec_timeout_s=20
    )
    started = time.monotonic()
    assert await manager.send_test() == [("exec", None)]
    assert time.monotonic() - started < 15  # well before the 60 s child or the 20 s timeout
    os.kill(int(child.read_text()), signal.SIGKILL)


@pytest.mark.anyio
async def test_every_alert_is_an_error_log_line_with_connector_and_action(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Alerts and reminders log at ERROR naming connector and action; recovered at INFO."""
    caplog.set_level(logging.INFO, logger="tokend.alerts")
    async with running(AlertSettings(repeat=timedelta(milliseconds=200))) as manager:
        assert manager.sink_names == []
        needs_reauth(manager)
        await until(lambda: "alert needs_reauth (reminder)" in caplog.text)
        observe(manager, "ok")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("tokend")]
    expected = (
        "alert needs_reauth: Connector gh needs a new authorization: token endpoint refused the "
        "grant: invalid_grant (revoked); run: tokend import gh"
    )
    assert lines[0] == ("ERROR", expected)
    assert lines[1] == ("ERROR", expected.replace("needs_reauth:", "needs_reauth (reminder):", 1))
    assert lines[-1] == (
        "INFO",
        "alert recovered: Connector gh recovered from needs_reauth: it is ok.",
    )


# --- reconfigure ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reconfigure_moves_to_new_sinks_keeping_alert_state(receiver: Receiver) -> None:
    """After a reload the new sink gets the `recovered` of an alert the old sink carried."""
    with Receiver() as other:
        async with running(AlertSettings(webhook=receiver.url, repeat=HOUR)) as manager:
            needs_reauth(manager)
            await manager.reconfigure(AlertSettings(webhook=other.url, repeat=HOUR))
            observe(manager, "ok")
            await until(lambda: other.events())
            await until(lambda: receiver.events())
        assert names(receiver.events()) == ["needs_reauth"]
        assert names(other.events()) == ["recovered"]


@pytest.mark.anyio
async def test_reconfigure_before_start_and_of_repeat_only(receiver: Receiver) -> None:
    """A new `repeat` alone keeps the sinks; sinks replaced before start are simply swapped."""
    manager = AlertManager(AlertSettings(exec=("/bin/true",)), clock=SystemClock(), host="h")
    await manager.reconfigure(AlertSettings(webhook=receiver.url))
    assert manager.sink_names == ["webhook"]
    await manager.reconfigure(AlertSettings(webhook=receiver.url, repeat=HOUR))
    assert manager.settings.repeat == HOUR
    assert manager.sink_names == ["webhook"]
    await manager.start()
    needs_reauth(manager)
    await manager.close()
    assert names(receiver.events()) == ["needs_reauth"]


# --- Apprise --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_apprise_url_delivers_title_and_body(receiver: Receiver) -> None:
    """An Apprise json:// URL gets "tokend: needs_reauth gh" with the message and the action."""
    url = receiver.url.replace("http://", "json://")
    async with running(AlertSettings(apprise=(url,), repeat=HOUR)) as manager:
        assert manager.sink_names == ["apprise #1 (json)"]
        needs_reauth(manager)
        [body] = await until(lambda: receiver.events())
    assert body["title"] == "tokend: needs_reauth gh"
    assert body["type"] == "failure"
    assert body["message"].splitlines() == [
        "Connector gh needs a new authorization: "
        "token endpoint refused the grant: invalid_grant (revoked).",
        "run: tokend import gh",
        "host: test-host",
    ]


@pytest.mark.anyio
async def test_apprise_url_it_cannot_use_is_a_config_error_without_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """start() refuses an Apprise URL apprise rejects, naming the entry, never logging the URL."""
    caplog.set_level(logging.DEBUG)
    settings = AlertSettings(apprise=("json://127.0.0.1:9/ok", "nosuchscheme://host/SECRETTOKEN"))
    manager = AlertManager(settings, clock=SystemClock())
    with pytest.raises(ConfigError) as info:
        await manager.start()
    await manager.close()
    assert str(info.value).startswith(
        "alerts.apprise: entry 2 (nosuchscheme://…) is not a URL apprise can use"
    )
    assert "SECRETTOKEN" not in caplog.text


@pytest.mark.anyio
async def test_apprise_failures_are_reported_and_a_bad_reload_keeps_the_old_sinks(
    receiver: Receiver,
) -> None:
    """A json:// URL nobody answers is a reported failure; a reload with a URL apprise refuses
    raises ConfigError and leaves the running sinks in place."""
    with Receiver() as closed:
        dead = closed.url.replace("http://", "json://")
    async with running(AlertSettings(apprise=(dead,), repeat=HOUR)) as manager:
        assert await manager.send_test() == [
            ("apprise #1 (json)", "apprise could not deliver it (its log lines say why)")
        ]
        with pytest.raises(ConfigError):
            await manager.reconfigure(AlertSettings(apprise=("nosuchscheme://x",)))
        assert manager.sink_names == ["apprise #1 (json)"]


# --- the CLI's entry points -----------------------------------------------------------------------


def config_with(alerts: AlertSettings, tmp_path: Path) -> Config:
    daemon = DaemonSettings(socket=tmp_path / "s.sock", state_dir=tmp_path)
    return Config(path=None, daemon=daemon, alerts=alerts)


def test_alert_command_sends_daemon_failed_with_systemds_result(
    tmp_path: Path, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """`tokend alert --unit` delivers daemon_failed, naming systemd's MONITOR_* result."""
    out = io.StringIO()
    env = {"MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_CODE": "exited"}
    env["MONITOR_EXIT_STATUS"] = "1"
    config = config_with(AlertSettings(exec=recorder.argv), tmp_path)
    assert run_alert_command(config, "tokend.service", env=env, out=out) == ExitCode.OK
    assert out.getvalue() == "exec: ok\n"
    [event] = recorder.events()
    assert event["event"] == "daemon_failed"
    assert "tokend.service failed on" in event["message"]
    assert "(exit-code: exited 1)" in event["message"]
    assert "alert daemon_failed: The tokend service tokend.service failed" in caplog.text


def test_alert_command_without_sinks_logs_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no sink configured, `tokend alert` says so and succeeds: the log line is the alert."""
    out = io.StringIO()
    config = config_with(AlertSettings(), tmp_path)
    env = {"MONITOR_SERVICE_RESULT": "watchdog"}
    assert run_alert_command(config, "tokend.service", env=env, out=out) == ExitCode.OK
    assert out.getvalue() == (
        "no alert sinks configured (alerts.exec, alerts.webhook, alerts.apprise)\n"
    )
    assert "tokend.service failed on" in caplog.text and "(watchdog)" in caplog.text


def test_alert_test_prints_one_line_per_sink(tmp_path: Path, recorder: Recorder) -> None:
    """`check --alerts` prints each sink's outcome; 75 when one failed, 78 with none configured."""
    with Receiver(default=404) as hook:
        settings = AlertSettings(exec=recorder.argv, webhook=hook.url)
        out = io.StringIO()
        code = run_alert_test(config_with(settings, tmp_path), out=out)
    assert code == ExitCode.TEMPORARY
    assert out.getvalue() == "exec: ok\nwebhook: failed: 127.0.0.1 answered HTTP 404\n"
    assert [e["event"] for e in recorder.events()] == ["test"]
    out = io.StringIO()
    assert run_alert_test(config_with(AlertSettings(), tmp_path), out=out) == ExitCode.CONFIG
    assert out.getvalue() == (
        "no alert sinks configured (alerts.exec, alerts.webhook, alerts.apprise)\n"
    )
