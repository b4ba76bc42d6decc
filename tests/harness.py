"""Test harness: an in-memory keyring, configs, an in-process daemon and a daemon process.

The in-memory keyring is a real `keyring` backend (a fake of keyring's interface, not of ours)
for fast tests; the daemon-process helpers run `python -m tokend run` for real, with tokend's
encrypted-file keyring, so SIGKILL, SIGSTOP and a second daemon are the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import keyring.backend
import keyring.errors
import pytest

from tokend.client import call
from tokend.config import Config, config_from_mapping
from tokend.daemon import Daemon
from tokend.store import KeyringStore

FILE_BACKEND = "tokend.keyring_file.EncryptedFileKeyring"


IN_CI = os.environ.get("CI") == "true"


def require(ok: bool, message: str) -> None:
    """Skip the test unless `ok`; under CI=true fail instead: CI installs what every test needs
    (.ci/run), so a security-relevant test never passes there by not running."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing prerequisite fails instead of skipping)")
    pytest.skip(message)


def short_tmp(prefix: str = "tkd") -> Path:
    """A short directory under /tmp: AF_UNIX paths longer than ~107 bytes cannot be bound."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class MemoryKeyring(keyring.backend.KeyringBackend):
    """An in-memory keyring backend; `fail_writes` makes writes fail like a locked keyring."""

    priority = 1  # keyring declares a classproperty; a plain value reads the same

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}
        self.fail_writes = False
        self.writes = 0
        self._lock = threading.Lock()

    def get_password(self, service: str, username: str) -> str | None:
        with self._lock:
            return self.items.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        with self._lock:
            if self.fail_writes:
                raise keyring.errors.PasswordSetError("collection is locked")
            self.writes += 1
            self.items[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        with self._lock:
            if self.fail_writes:
                raise keyring.errors.PasswordDeleteError("collection is locked")
            if self.items.pop((service, username), None) is None:
                raise keyring.errors.PasswordDeleteError("no such item")


def memory_store(backend: MemoryKeyring | None = None) -> KeyringStore:
    """A KeyringStore on an in-memory backend, with no retry sleeps."""
    return KeyringStore(service="tokend", backend=backend or MemoryKeyring(), sleep=lambda _s: None)


def config_dict(
    root: Path,
    token_url: str,
    *,
    connectors: Mapping[str, Mapping[str, Any]] | None = None,
    refresh: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config as the TOML file would hold it: one connector `demo` unless told otherwise."""
    base_conn = {"token_url": token_url, "client_id": "tokend-demo", "client_auth": "none"}
    conns = connectors if connectors is not None else {"demo": {}}
    return {
        "daemon": {
            "socket": str(root / "run" / "tokend.sock"),
            "state_dir": str(root / "state"),
            **(daemon or {}),
        },
        "refresh": {"skew": "1s", "min_interval": "1s", **(refresh or {})},
        "connectors": {name: {**base_conn, **extra} for name, extra in conns.items()},
    }


def make_config(root: Path, token_url: str, **kwargs: Any) -> Config:
    """A validated Config (through the real validator) for an in-process daemon."""
    return config_from_mapping(config_dict(root, token_url, **kwargs), source="test.toml")


def to_toml(data: Mapping[str, Any]) -> str:
    """Just enough TOML for our configs: tables of strings, numbers, booleans and string lists."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        if scalars or not body:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}", v)

    for key, body in data.items():
        table(key, body)
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running_daemon(
    config: Config,
    *,
    store: KeyringStore | None = None,
    backoff_scale: float = 0.02,
    recheck_s: float = 0.5,
    request_timeout_s: float = 10.0,
) -> AsyncIterator[Daemon]:
    """An in-process daemon, READY on exit of the `async with` head, stopped at its end."""
    daemon = Daemon(
        config,
        store=store or memory_store(),
        backoff_scale=backoff_scale,
        recheck_s=recheck_s,
        request_timeout_s=request_timeout_s,
    )
    runner = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready_event.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    if runner.done():
        ready.cancel()
        runner.result()  # raises the start-up error
    assert daemon.ready_event.is_set(), "daemon not ready within 10 s"
    try:
        yield daemon
    finally:
        daemon.stop_event.set()
        await asyncio.wait_for(runner, 30)


def get(
    socket_path: Path | str, path: str, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    """One request over the real socket; returns (status, decoded JSON or text)."""
    status, ctype, data = call(str(socket_path), method, path, body)
    if ctype.startswith("application/json"):
        return status, json.loads(data)
    return status, data.decode()


# Clients get their own threads: on the daemon's loop, asyncio.to_thread would share the default
# executor (a handful of threads) with the daemon's keyring calls, and blocked clients waiting for
# the daemon would starve the very keyring write they wait for.
_CLIENTS = ThreadPoolExecutor(max_workers=128, thread_name_prefix="test-client")


async def aget(
    socket_path: Path | str, path: str, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    """`get` from async code, in a thread (the client is blocking, like a job script's)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_CLIENTS, get, socket_path, path, method, body)


# ----------------------------------------------------------------------------- daemon process


# Variables systemd sets for its services: a test passes them explicitly or not at all.
_SYSTEMD_VARS = {
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
}


class DaemonProcess:
    """`python -m tokend run` as a child process, its stderr kept in a file."""

    def __init__(self, root: Path, config: Mapping[str, Any], env: Mapping[str, str] | None = None):
        self.root = root
        self.config_path = root / "config.toml"
        self.config_path.write_text(to_toml(config))
        self.socket = Path(config["daemon"]["socket"])
        self.log_path = root / f"daemon-{time.monotonic_ns()}.log"
        inherited = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
        self.env = {**inherited, "TOKEND_CONFIG": str(self.config_path), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(
        self,
        *,
        wait: bool = True,
        extra_args: tuple[str, ...] = (),
        argv: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        verbose: bool = True,
    ) -> DaemonProcess:
        """Start `python -m tokend -v run` (or `argv`), stdout and stderr into a log file.

        Benchmarks pass verbose=False: a DEBUG line per request is not what production runs."""
        self.log_path = self.root / f"daemon-{time.monotonic_ns()}.log"
        self.logs.append(self.log_path)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv
                or [
                    sys.executable,
                    "-m",
                    "tokend",
                    *(["-v"] if verbose else []),
                    *extra_args,
                    "run",
                ],
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=pass_fds,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()[-2000:]}")
            with contextlib.suppress(Exception):
                status, _ = get(self.socket, "/v1/health")
                if status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready in {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def cli(
        self,
        *args: str,
        stdin: str | None = None,
        user: int | None = None,
        group: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `tokend ARGS` against this daemon's config as a separate process."""
        return subprocess.run(
            [sys.executable, "-m", "tokend", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            user=user,
            group=group,
            check=False,
        )


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll `predicate` every 0.1 s until it is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout:g}s")


# ----------------------------------------------------------------------------- CLI output


def why(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command's exit code, stdout and stderr, for an assertion message."""
    return f"exit {result.returncode}; stdout {result.stdout!r}; stderr {result.stderr!r}"


def one_line(text: str) -> str:
    """The single line of `text` (asserting there is exactly one)."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def skip_record(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON skip record `tokend exec` printed: exactly one line on stderr."""
    record = json.loads(one_line(result.stderr))
    assert isinstance(record, dict)
    assert record["event"] == "skipped"
    return record
