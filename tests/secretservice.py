"""A private, real Secret Service for tests: its own D-Bus session bus and gnome-keyring-daemon.

`secret_service()` starts both in a throwaway HOME (so the login keyring is created fresh and
unlocked), waits until `org.freedesktop.secrets` is owned and has a default collection, yields the
environment variables a `keyring` client needs, and kills both process groups afterwards. If a
daemon is missing the test is skipped, except under `CI=true`, where it fails: CI must not skip.
The bus activates nothing, so a dead daemon shows up as an error instead of a desktop prompt.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SECRETS_NAME = "org.freedesktop.secrets"

# A session bus with no service directories: nothing is auto-started behind our back.
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def _require(program: str, package: str) -> str:
    """The program's path; skip the test if it is missing (fail it under CI=true)."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} not found: install the Debian package {package!r}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI must not skip Secret Service tests)")
        pytest.skip(message)
    return path


@contextmanager
def secret_service(timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """Run a session bus and gnome-keyring-daemon; yield the env vars that point clients at them.

    The dict holds DBUS_SESSION_BUS_ADDRESS, HOME and the XDG_* directories; merge it into a
    copy of `os.environ` for a subprocess. Raises RuntimeError (with the daemons' logs) if the
    service is not up within `timeout_s`.
    """
    dbus_daemon = _require("dbus-daemon", "dbus")
    keyring_daemon = _require("gnome-keyring-daemon", "gnome-keyring")
    with tempfile.TemporaryDirectory(prefix="tokend-ss-") as tmp:
        root = Path(tmp)
        env = _environment(root)
        config = root / "bus.conf"
        config.write_text(_BUS_CONFIG.format(address=env["DBUS_SESSION_BUS_ADDRESS"]))
        full_env = {**os.environ, **env}
        logs = root / "logs"
        logs.mkdir()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + timeout_s
            with open(logs / "dbus-daemon.log", "wb") as log:
                bus = subprocess.Popen(
                    [dbus_daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=full_env,
                    start_new_session=True,
                )
            processes.append(bus)
            _wait_for_address(bus, deadline, logs)
            with open(logs / "gnome-keyring-daemon.log", "wb") as log:
                daemon = subprocess.Popen(
                    [keyring_daemon, "--unlock", "--components=secrets", "--foreground"],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    cwd=env["HOME"],
                    start_new_session=True,
                )
            processes.append(daemon)
            assert daemon.stdin is not None
            # --unlock reads the login keyring's password from stdin, up to EOF.
            daemon.stdin.write(secrets.token_hex(16).encode())
            daemon.stdin.close()
            _wait_for_service(env["DBUS_SESSION_BUS_ADDRESS"], processes, deadline, logs)
            yield env
        finally:
            for process in reversed(processes):
                _stop(process)


def _environment(root: Path) -> dict[str, str]:
    home = root / "home"
    dirs = {
        "HOME": home,
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "XDG_STATE_HOME": home / ".local" / "state",
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_RUNTIME_DIR": root / "run",
    }
    for path in dirs.values():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
    env = {name: str(path) for name, path in dirs.items()}
    env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={root / 'bus'}"
    return env


def _logs(logs: Path) -> str:
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs.iterdir()]
    return "\n".join(parts)


def _wait_for_address(bus: subprocess.Popen[bytes], deadline: float, logs: Path) -> None:
    """Wait until dbus-daemon prints its address, which it does once it is listening."""
    assert bus.stdout is not None
    fd = bus.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            if os.read(fd, 4096).strip():
                return
            break  # EOF: the daemon died
    raise RuntimeError(f"dbus-daemon did not start\n{_logs(logs)}")


def _wait_for_service(
    address: str, processes: list[subprocess.Popen[bytes]], deadline: float, logs: Path
) -> None:
    """Poll the bus until the secrets service is owned and its default collection exists."""
    # jeepney (a dependency of keyring's SecretService backend) ships no type information.
    from jeepney import DBusAddress, MessageType, new_method_call  # type: ignore[import-untyped]
    from jeepney.io.blocking import open_dbus_connection  # type: ignore[import-untyped]

    bus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
    service = DBusAddress(
        "/org/freedesktop/secrets", SECRETS_NAME, "org.freedesktop.Secret.Service"
    )
    with contextlib.closing(open_dbus_connection(bus=address)) as conn:
        while time.monotonic() < deadline:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited early\n{_logs(logs)}")
            owned = conn.send_and_get_reply(
                new_method_call(bus, "NameHasOwner", "s", (SECRETS_NAME,)), timeout=5
            )
            if owned.body[0]:
                alias = conn.send_and_get_reply(
                    new_method_call(service, "ReadAlias", "s", ("default",)), timeout=5
                )
                if alias.header.message_type is MessageType.method_return and alias.body[0] != "/":
                    return
            time.sleep(0.05)
    raise RuntimeError(f"{SECRETS_NAME} did not appear on the bus\n{_logs(logs)}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the process's group (it leads its own session): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may still hold children that outlived the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.stdout is not None:
        process.stdout.close()
