"""systemd integration: sd_notify on a real NOTIFY_SOCKET, the watchdog, SIGHUP reload, socket
activation with a pre-bound socket as fd 3, and journald priority prefixes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import (
    FILE_BACKEND,
    DaemonProcess,
    aget,
    config_dict,
    get,
    memory_store,
    running_daemon,
    to_toml,
)
from tokend.authserver import AuthServer
from tokend.config import load_config
from tokend.logs import JournalFormatter, stderr_is_journal


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, drained at once
    by a reader thread (as systemd does) so that nothing is lost while a test looks away."""

    def __init__(self, root: Path) -> None:
        self.path = root / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.cursor = 0  # wait_for() has looked at messages before this index
        self._arrived = threading.Condition()
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.messages.append((time.monotonic(), data.decode("latin-1")))
                self._arrived.notify_all()

    def drain(self, seconds: float) -> list[str]:
        """What arrives within the next `seconds`."""
        with self._arrived:
            first = len(self.messages)
        time.sleep(seconds)
        with self._arrived:
            return [m for _, m in self.messages[first:]]

    def wait_for(self, prefix: str, timeout: float = 15.0) -> str:
        """The next message (after the last one waited for) that starts with `prefix`."""
        end = time.monotonic() + timeout
        with self._arrived:
            while True:
                while self.cursor < len(self.messages):
                    message = self.messages[self.cursor][1]
                    self.cursor += 1
                    if message.startswith(prefix):
                        return message
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {prefix!r} within {timeout}s: {self.messages[-10:]}")
                self._arrived.wait(left)

    def close(self) -> None:
        self._closing = True
        self._reader.join(5)
        self.sock.close()


def _daemon_config(root: Path, auth: AuthServer, **kwargs):
    return config_dict(root, auth.token_url, daemon={"keyring_backend": FILE_BACKEND}, **kwargs)


def test_notify_ready_status_watchdog_reload_stopping(tmp_short):
    """The daemon tells systemd READY=1 with a STATUS line once serving, pings WATCHDOG=1 every
    WATCHDOG_USEC/2, sends RELOADING=1 (with MONOTONIC_USEC) then READY=1 on SIGHUP, updates
    STATUS when a connector changes state, and STOPPING=1 on SIGTERM."""
    listener = NotifyListener(tmp_short)
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            proc = DaemonProcess(tmp_short, _daemon_config(tmp_short, auth))
            proc.start(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"})
            ready = listener.wait_for("READY=1")
            assert "STATUS=1 unauthorized" in ready
            listener.cursor = len(listener.messages)
            for _ in range(6):  # pings keep coming, and never faster than every 0.2 s
                listener.wait_for("WATCHDOG=1")
            pinged = [t for t, m in listener.messages if m == "WATCHDOG=1"][-6:]
            assert pinged[-1] - pinged[0] >= 5 * 0.2 * 0.9
            done = proc.cli("import", "demo", stdin=json.dumps(auth.issue_grant()))
            assert done.returncode == 0, done.stderr
            status = listener.wait_for("STATUS=1 ok")
            assert "next refresh demo in" in status
            proc.signal(signal.SIGHUP)
            reloading = listener.wait_for("RELOADING=1")
            usec = int(reloading.split("MONOTONIC_USEC=")[1])
            assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
            assert listener.wait_for("READY=1").startswith("READY=1")
            proc.signal(signal.SIGTERM)
            listener.wait_for("STOPPING=1")
            assert proc.stop() == 0
    finally:
        listener.close()
    # With -s this shows what systemd would have received (WATCHDOG=1 pings summarised).
    ping_times = [t for t, m in listener.messages if m == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(ping_times)]
    start = listener.messages[0][0]
    for t, m in listener.messages:
        if m != "WATCHDOG=1":
            print(f"+{t - start:6.3f}s {m!r}")
    print(f"WATCHDOG=1 x{len(ping_times)}, median gap {sorted(gaps)[len(gaps) // 2]:.3f}s")


@pytest.mark.anyio
async def test_watchdog_pings_stop_when_scheduler_wedged(tmp_short, monkeypatch):
    """WATCHDOG=1 keeps coming while the daemon is healthy and stops once the scheduler's
    wall-clock re-check stalls, or the scheduler stops, so systemd restarts a wedged daemon."""
    listener = NotifyListener(tmp_short)
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            config = load_config(_write_config(tmp_short, auth.token_url, ["demo"]))
            async with running_daemon(config, recheck_s=0.3) as daemon:
                healthy = await asyncio.to_thread(listener.drain, 1.0)
                assert healthy.count("WATCHDOG=1") >= 5
                assert daemon.scheduler is not None
                task = daemon.scheduler._recheck_task  # the re-check loop, as if wedged
                assert task is not None
                task.cancel()
                await asyncio.sleep(2.5)  # > 3 re-check intervals + 1 s
                await asyncio.to_thread(listener.drain, 0.3)  # what queued up meanwhile
                wedged = await asyncio.to_thread(listener.drain, 1.0)
                assert "WATCHDOG=1" not in wedged
                assert daemon.health_problem() is not None
    finally:
        listener.close()


def _write_config(root: Path, token_url: str, names: list[str], **extra) -> Path:
    data = config_dict(root, token_url, connectors={n: extra.get(n, {}) for n in names})
    path = root / "config.toml"
    path.write_text(to_toml(data))
    return path


@pytest.mark.anyio
async def test_reload_adds_and_removes_connectors_without_failed_lookups(tmp_short):
    """SIGHUP with a changed config removes one connector, adds another and changes a third while
    `keep` is served continuously without a single failed lookup or an extra refresh; its stored
    token survives."""
    with AuthServer(lifetime_s=60.0) as auth:
        path = _write_config(tmp_short, auth.token_url, ["keep", "gone"])
        store = memory_store()
        async with running_daemon(load_config(path), store=store) as daemon:
            sock = daemon.config.daemon.socket
            for name in ("keep", "gone"):
                status, _ = await aget(
                    sock, f"/v1/connectors/{name}/grant", "PUT", auth.issue_grant()
                )
                assert status == 200
            _, before = await aget(sock, "/v1/connectors/keep/token")
            calls = auth.token_calls
            results: list[int] = []
            stop = asyncio.Event()

            async def hammer() -> None:
                while not stop.is_set():
                    status, _ = await aget(sock, "/v1/connectors/keep/token")
                    results.append(status)

            workers = [asyncio.create_task(hammer()) for _ in range(4)]
            await asyncio.sleep(0.3)
            _write_config(tmp_short, auth.token_url, ["keep", "new"], keep={"scope": "demo"})
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                if "new" in daemon.connectors and "gone" not in daemon.connectors:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*workers)
            status_gone, body_gone = await aget(sock, "/v1/connectors/gone/token")
            _, listing = await aget(sock, "/v1/connectors")
            _, after = await aget(sock, "/v1/connectors/keep/token")
            keep_scope = daemon.connectors["keep"].config.scope
    assert results and set(results) == {200}
    assert (status_gone, body_gone["error"]) == (404, "unknown_connector")
    assert {c["connector"]: c["state"] for c in listing["connectors"]} == {
        "keep": "ok",
        "new": "unauthorized",
    }
    assert after["access_token"] == before["access_token"]
    assert auth.token_calls == calls
    assert keep_scope == "demo"
    assert store.load("gone") is not None  # removing a connector never deletes its grant


@pytest.mark.anyio
async def test_invalid_reload_keeps_running_config(tmp_short):
    """An invalid config on reload changes nothing: the error is logged, shown in health and the
    STATUS summary, and the connectors keep being served; a fixed config clears it."""
    with AuthServer(lifetime_s=60.0) as auth:
        path = _write_config(tmp_short, auth.token_url, ["demo"])
        async with running_daemon(load_config(path)) as daemon:
            sock = daemon.config.daemon.socket
            await aget(sock, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
            path.write_text(path.read_text() + "\n[bogus]\nkey = 1\n")
            assert await daemon.reload() is False
            _, health = await aget(sock, "/v1/health")
            status, _ = await aget(sock, "/v1/connectors/demo/token")
            summary = daemon.summary()
            path.write_text(path.read_text().replace("\n[bogus]\nkey = 1\n", ""))
            assert await daemon.reload() is True
            _, healed = await aget(sock, "/v1/health")
    assert status == 200
    assert health["status"] == "degraded"
    assert "bogus" in health["config_error"]
    assert summary.startswith("config reload failed")
    assert healed["config_error"] is None and healed["status"] == "ok"


def test_socket_activation_with_prebound_socket(tmp_short):
    """Given a listening socket as fd 3 with LISTEN_FDS/LISTEN_PID (as systemd passes it), the
    daemon serves on it instead of binding, and leaves the socket file to systemd on exit."""
    path = tmp_short / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            config = _daemon_config(tmp_short, auth)
            proc = DaemonProcess(tmp_short, config)
            # What systemd does: the socket as fd 3, LISTEN_PID naming the exec'd process.
            launcher = (
                "import os, sys\n"
                f"os.dup2({fd}, 3)\n"
                f"os.close({fd})\n"
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
                "os.execv(sys.executable, [sys.executable, '-m', 'tokend', '-v', 'run'])\n"
            )
            proc.socket = path
            proc.start(argv=[sys.executable, "-c", launcher], pass_fds=(fd,))
            status, body = get(path, "/v1/connectors/demo/grant", "PUT", auth.issue_grant())
            assert status == 200, body
            status, body = get(path, "/v1/connectors/demo/token")
            assert status == 200 and auth.is_valid_access_token(body["access_token"])
            assert not Path(config["daemon"]["socket"]).exists()  # it did not bind its own
            assert proc.stop() == 0
            assert path.exists()  # systemd's socket, not ours to unlink
            assert "listening on the socket systemd passed" in proc.log()
    finally:
        listener.close()


def test_journal_priorities(tmp_short):
    """With stderr on the journal (JOURNAL_STREAM matches it), every log line carries an
    sd-daemon priority prefix and no timestamp; errors are <3>, lifecycle lines <6>."""
    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _daemon_config(tmp_short, auth))
        log_path = tmp_short / "journal.log"
        log_path.touch()
        st = log_path.stat()
        proc.log_path = log_path
        with log_path.open("ab") as log:
            proc.proc = __import__("subprocess").Popen(
                [sys.executable, "-m", "tokend", "run"],
                env={**proc.env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                stdin=__import__("subprocess").DEVNULL,
                stdout=log,
                stderr=log,
            )
        proc.logs.append(log_path)
        proc.wait_ready()
        done = proc.cli("import", "demo", stdin=json.dumps(auth.issue_grant()))
        assert done.returncode == 0
        auth.fail_next("invalid_grant")
        proc.cli("refresh", "demo")
        assert proc.stop() == 0
    lines = log_path.read_text().splitlines()
    assert lines and all(line[:3] in {"<3>", "<4>", "<6>", "<7>"} for line in lines), lines
    errors = [line for line in lines if line.startswith("<3>")]
    assert len(errors) == 1 and "demo" in errors[0] and "tokend import demo" in errors[0]
    assert any(line.startswith("<6>tokend.daemon: tokend") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamps: journald adds them


def test_journal_stream_must_match_stderr(tmp_short):
    """JOURNAL_STREAM naming another file does not switch on journal formatting."""
    assert stderr_is_journal({"JOURNAL_STREAM": "1:2"}) is False
    assert stderr_is_journal({"JOURNAL_STREAM": "garbage"}) is False
    import logging

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<3>a\n<3>b"


def test_undrained_notify_socket_never_wedges_the_daemon(tmp_short):
    """With nobody reading NOTIFY_SOCKET (kernel default queue of 10 datagrams), the daemon keeps
    answering lookups and exits on SIGTERM within a bound; the dropped datagrams are counted."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, never drained
    listener.bind(str(tmp_short / "notify.sock"))
    try:
        with AuthServer(lifetime_s=60.0) as auth:
            proc = DaemonProcess(tmp_short, _daemon_config(tmp_short, auth))
            # A ping every 10 ms fills the 10-datagram queue within a fraction of a second.
            notify = str(tmp_short / "notify.sock")
            proc.start(env={"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "20000"})
            deadline = time.monotonic() + 15
            health: dict = {}
            while health.get("notify_dropped", 0) < 20:
                assert time.monotonic() < deadline, f"pings not dropped: {health}"
                status, health = get(proc.socket, "/v1/health")
                assert status == 200
                time.sleep(0.05)
            done = proc.cli("import", "demo", stdin=json.dumps(auth.issue_grant()))
            assert done.returncode == 0, done.stderr
            status, body = get(proc.socket, "/v1/connectors/demo/token")
            assert status == 200, body
            assert auth.is_valid_access_token(body["access_token"])
            started = time.monotonic()
            assert proc.stop(timeout=10) == 0
            assert time.monotonic() - started < 10
        log = proc.log()
        assert log.count("NOTIFY_SOCKET") == 1, log  # logged once, not once per dropped datagram
    finally:
        listener.close()
