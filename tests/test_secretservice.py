"""Tests for the Secret Service harness (tests/secretservice.py) and keyring clients against it.

Each client runs in its own process with the harness's environment, as a job script or the daemon
would. Transient SecretService errors are counted and reported, not asserted away: tokend's store
retries them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.secretservice import secret_service

pytestmark = pytest.mark.secretservice

BACKEND = "keyring.backends.SecretService.Keyring"


@pytest.fixture(scope="module")
def ss_env() -> Iterator[dict[str, str]]:
    """One private Secret Service for the module; its env with the SecretService backend chosen."""
    with secret_service() as env:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KEYRING_PROPERTY_") and not k.startswith("XDG_")
        }
        yield {**base, **env, "PYTHON_KEYRING_BACKEND": BACKEND}


def run_client(code: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter and return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_set_get_replace_delete(ss_env: dict[str, str]) -> None:
    """keyring stores, replaces and deletes a password in the real daemon, across processes."""
    code = """
        import json, sys
        import keyring
        from keyring.errors import PasswordDeleteError
        step, value = sys.argv[1], sys.argv[2]
        result = {"backend": type(keyring.get_keyring()).__module__}
        if step == "set":
            keyring.set_password("tokend-test", "alice", value)
        elif step == "delete":
            keyring.delete_password("tokend-test", "alice")
            try:
                keyring.delete_password("tokend-test", "alice")
            except PasswordDeleteError:
                result["second_delete"] = "PasswordDeleteError"
        result["value"] = keyring.get_password("tokend-test", "alice")
        print(json.dumps(result))
    """
    assert run_client(code, ss_env, "get", "") == {
        "backend": "keyring.backends.SecretService",
        "value": None,
    }
    assert run_client(code, ss_env, "set", "first \u00e9")["value"] == "first \u00e9"
    assert run_client(code, ss_env, "get", "")["value"] == "first \u00e9"
    assert run_client(code, ss_env, "set", "second")["value"] == "second"
    assert run_client(code, ss_env, "delete", "") == {
        "backend": "keyring.backends.SecretService",
        "second_delete": "PasswordDeleteError",
        "value": None,
    }


_WRITER = """
    import json, sys, time
    import keyring
    tag, count = sys.argv[1], int(sys.argv[2])
    errors, failed = {}, []
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        for attempt in range(40):  # up to ~15 s: gnome-keyring may drop a client for seconds
            try:
                keyring.set_password("tokend-concurrent", f"{tag}-{i}", f"value-{tag}-{i}")
                break
            except Exception as exc:  # count what the daemon throws at concurrent clients
                name = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:60]}"
                errors[name] = errors.get(name, 0) + 1
                time.sleep(min(0.5, 0.05 * (attempt + 1)))
        else:
            failed.append(i)
    print(json.dumps({"errors": errors, "failed": failed}))
"""


def test_concurrent_clients_lose_nothing(
    ss_env: dict[str, str], record_property: Callable[[str, object], None]
) -> None:
    """Four processes writing 25 distinct keys each at once: all 100 are stored."""
    tags = ["a", "b", "c", "d"]
    with contextlib.ExitStack() as stack:
        procs = []
        for tag in tags:
            proc = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", textwrap.dedent(_WRITER), tag, "25"],
                    env=ss_env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            stack.callback(proc.kill)
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.splitlines()[-1]))
    errors: dict[str, int] = {}
    for report in reports:
        assert report["failed"] == [], report
        for name, count in report["errors"].items():
            errors[name] = errors.get(name, 0) + count
    record_property("secretservice_transient_errors", json.dumps(errors))
    print(f"SecretService transient errors during 4x25 concurrent writes: {errors}")
    reader = """
        import json, sys
        import keyring
        tags, count = sys.argv[1].split(","), int(sys.argv[2])
        print(json.dumps({
            f"{t}-{i}": keyring.get_password("tokend-concurrent", f"{t}-{i}")
            for t in tags for i in range(count)
        }))
    """
    stored = run_client(reader, ss_env, ",".join(tags), "25")
    assert stored == {f"{t}-{i}": f"value-{t}-{i}" for t in tags for i in range(25)}


def test_harness_leaves_nothing_running() -> None:
    """After the context exits, no daemon of it runs and its temp HOME is removed."""
    with secret_service() as env:
        home = Path(env["HOME"])
        bus_path = Path(env["DBUS_SESSION_BUS_ADDRESS"].removeprefix("unix:path="))
        assert bus_path.exists()
        assert processes_mentioning(str(home.parent))
    assert not home.exists()
    assert not bus_path.exists()
    assert processes_mentioning(str(home.parent)) == []


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment contains `text` (we run as their user)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                if text.encode() in (entry / part).read_bytes():
                    found.append(int(entry.name))
                    break
    return found


@pytest.mark.parametrize(
    ("ci", "outcome"), [("", pytest.skip.Exception), ("true", pytest.fail.Exception)]
)
def test_missing_daemons_skip_or_fail_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    """Without the daemons the harness skips, but under CI=true it fails instead."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="dbus-daemon not found"), secret_service():
        pass
