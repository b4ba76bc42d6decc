"""The store (DESIGN §3): token sets and client secrets in a keyring backend, non-secret state in
`state.json`, and the state directory's lock. Keyring tests use the in-memory backend (a real
`keyring` backend) and tokend's encrypted-file backend; files and locks are real."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import keyring.backends.fail
import keyring.errors
import pytest

from tests.harness import MemoryKeyring, config_dict, make_config, memory_store
from tokend.encrypted_file import EncryptedFile
from tokend.errors import (
    ExitCode,
    GenerationConflictError,
    KeyringUnusableError,
    StateLockedError,
    StoreError,
)
from tokend.keyring_file import EncryptedFileKeyring
from tokend.model import ConnectorState, Secret, State, TokenSet
from tokend.store import FILE_BACKEND, KeyringStore, StateDirLock, StateFile

REPO = Path(__file__).resolve().parent.parent


def _token(access: str = "at_first", refresh: str | None = "rt_first") -> TokenSet:
    now = datetime.now(UTC)
    return TokenSet(
        access_token=Secret(access),
        refresh_token=None if refresh is None else Secret(refresh),
        scope="demo offline_access",
        obtained_at=now,
        expires_at=now + timedelta(hours=1),
    )


class ScriptedKeyring(MemoryKeyring):
    """Each get or set first takes the next scripted outcome: an exception to raise, or None to
    behave like MemoryKeyring; once the script runs out, every call succeeds."""

    def __init__(self, script: list[BaseException | None]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    def _next(self) -> None:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome

    def get_password(self, service: str, username: str) -> str | None:
        self._next()
        return super().get_password(service, username)

    def set_password(self, service: str, username: str, password: str) -> None:
        self._next()
        super().set_password(service, username, password)


class DroppingKeyring(MemoryKeyring):
    """Accepts writes and silently keeps nothing: what is read back differs from what was set."""

    def set_password(self, service: str, username: str, password: str) -> None:
        self.writes += 1

    def delete_password(self, service: str, username: str) -> None:
        pass


# ----------------------------------------------------------------------------- token sets


def test_save_and_load_round_trip():
    """A saved token set loads back equal, with generation 1."""
    store = memory_store()
    token = _token()
    saved = store.save("demo", token, expected_generation=0)
    assert saved == token.with_generation(1)
    assert store.load("demo") == saved
    assert store.load("other") is None


def test_generations_increase():
    """Each save bumps the generation by one, whatever generation the caller's set carries."""
    store = memory_store()
    first = store.save("demo", _token(), expected_generation=0)
    second = store.save("demo", _token("at_2", "rt_2"), expected_generation=first.generation)
    third = store.save("demo", _token("at_3", "rt_3"), expected_generation=second.generation)
    assert [first.generation, second.generation, third.generation] == [1, 2, 3]
    loaded = store.load("demo")
    assert loaded is not None
    assert loaded.generation == 3
    assert loaded.access_token.reveal() == "at_3"


@pytest.mark.parametrize("expected", [0, 1, 5])
def test_generation_conflict_writes_nothing(expected):
    """save(expected_generation=N) when another generation is stored raises
    GenerationConflictError and leaves the stored item untouched."""
    backend = MemoryKeyring()
    store = memory_store(backend)
    store.save("demo", _token(), expected_generation=0)
    store.save("demo", _token("at_2", "rt_2"), expected_generation=1)
    before = dict(backend.items)
    writes = backend.writes
    with pytest.raises(GenerationConflictError, match="generation 2"):
        store.save("demo", _token("at_x", "rt_x"), expected_generation=expected)
    assert backend.items == before
    assert backend.writes == writes


def test_expected_generation_none_replaces():
    """expected_generation=None (installing a grant) replaces whatever is stored."""
    store = memory_store()
    for i in range(3):
        store.save("demo", _token(f"at_{i}", f"rt_{i}"), expected_generation=None)
    loaded = store.load("demo")
    assert loaded is not None
    assert loaded.generation == 3
    assert loaded.refresh_token == Secret("rt_2")


def test_read_back_mismatch_is_store_error():
    """A backend that does not read back what was written fails the save with StoreError,
    whose message holds no token."""
    store = memory_store(DroppingKeyring())
    with pytest.raises(StoreError) as caught:
        store.save("demo", _token("at_SEKRIT", "rt_SEKRIT"), expected_generation=0)
    assert "read back" in str(caught.value)
    assert "SEKRIT" not in str(caught.value)


def test_client_secret_is_a_separate_item():
    """The client secret lives in its own item: saving, replacing and deleting the grant leave it
    alone, and it never appears in the grant's item."""
    backend = MemoryKeyring()
    store = memory_store(backend)
    assert store.load_client_secret("demo") is None
    store.save_client_secret("demo", Secret("cs_SEKRIT"))
    assert store.load("demo") is None
    store.save("demo", _token(), expected_generation=0)
    assert set(backend.items) == {("tokend", "demo"), ("tokend", "demo:client_secret")}
    assert "cs_SEKRIT" not in backend.items[("tokend", "demo")]
    assert store.delete("demo") is True
    assert store.load_client_secret("demo") == Secret("cs_SEKRIT")
    assert store.load_client_secret("other") is None


def test_delete():
    """delete forgets the grant and says whether there was one."""
    store = memory_store()
    assert store.delete("demo") is False
    store.save("demo", _token(), expected_generation=0)
    assert store.delete("demo") is True
    assert store.load("demo") is None
    assert store.delete("demo") is False


@pytest.mark.parametrize(
    "text",
    [
        "SEKRIT-not-json",
        json.dumps({"version": 1, "access_token": "at_SEKRIT", "refresh_token": "rt_SEKRIT"}),
        json.dumps({"version": 9, "access_token": "at_SEKRIT"}),
        json.dumps(["at_SEKRIT"]),
    ],
)
def test_corrupt_item_is_store_error_without_its_text(text):
    """An unusable keyring item raises StoreError; neither its message nor its traceback quotes
    the item."""
    backend = MemoryKeyring()
    backend.items[("tokend", "demo")] = text
    store = memory_store(backend)
    with pytest.raises(StoreError) as caught:
        store.load("demo")
    assert "demo" in str(caught.value)
    assert "SEKRIT" not in "".join(traceback.format_exception(caught.value))


def test_new_grant_replaces_a_corrupt_item():
    """Installing a grant (expected_generation=None) over an unusable item replaces it, since
    that is the repair the daemon asks for (`run: tokend import NAME`); a refresh's save (a
    generation expected) refuses and writes nothing."""
    backend = MemoryKeyring()
    backend.items[("tokend", "demo")] = "SEKRIT-not-json"
    store = memory_store(backend)
    with pytest.raises(StoreError):
        store.save("demo", _token(), expected_generation=1)
    assert backend.items[("tokend", "demo")] == "SEKRIT-not-json"
    saved = store.save("demo", _token(), expected_generation=None)
    assert saved.generation >= 1
    assert store.load("demo") == saved


def test_delete_removes_a_corrupt_item():
    """delete (logout) forgets an unusable item too."""
    backend = MemoryKeyring()
    backend.items[("tokend", "demo")] = "SEKRIT-not-json"
    store = memory_store(backend)
    assert store.delete("demo") is True
    assert store.load("demo") is None


def test_transient_errors_are_retried():
    """A Secret Service hiccup ("Prompt dismissed") is retried with growing pauses until the
    call succeeds."""
    dismissed = keyring.errors.KeyringError("Prompt dismissed")
    backend = ScriptedKeyring([dismissed, dismissed])
    backend.items[("tokend", "demo")] = _token().with_generation(4).to_json()
    sleeps: list[float] = []
    store = KeyringStore(service="tokend", backend=backend, sleep=sleeps.append)
    loaded = store.load("demo")
    assert loaded is not None
    assert loaded.generation == 4
    assert backend.calls == 3
    assert len(sleeps) == 2
    assert sleeps[0] < sleeps[1]


def test_transient_write_error_is_retried():
    """A transient failure while writing is retried and the save completes."""
    # The load before the write succeeds; the write then fails once with a D-Bus NoReply.
    no_reply = keyring.errors.PasswordSetError("org.freedesktop.DBus.Error.NoReply")
    backend = ScriptedKeyring([None, no_reply])
    store = KeyringStore(service="tokend", backend=backend, sleep=lambda _s: None)
    saved = store.save("demo", _token(), expected_generation=0)
    assert backend.calls == 4  # load, failed write, write, read back
    assert store.load("demo") == saved


def test_persistent_transient_error_gives_up():
    """A transient error that never clears becomes StoreError after a bounded number of tries."""
    backend = ScriptedKeyring([keyring.errors.KeyringError("Timeout")] * 20)
    sleeps: list[float] = []
    store = KeyringStore(service="tokend", backend=backend, sleep=sleeps.append)
    with pytest.raises(StoreError):
        store.load("demo")
    assert backend.calls == len(sleeps) + 1
    assert 2 <= backend.calls <= 10


@pytest.mark.parametrize(
    "error",
    [
        keyring.errors.KeyringLocked("Prompt dismissed"),  # locked wins over the marker
        keyring.errors.KeyringLocked("collection is locked"),
        keyring.errors.KeyringError("permission denied"),
    ],
)
def test_non_transient_errors_are_not_retried(error):
    """A locked keyring or any other error is reported at once as StoreError, not retried."""
    backend = ScriptedKeyring([error])
    sleeps: list[float] = []
    store = KeyringStore(service="tokend", backend=backend, sleep=sleeps.append)
    with pytest.raises(StoreError) as caught:
        store.load("demo")
    assert backend.calls == 1
    assert sleeps == []
    assert caught.value.__cause__ is error


def test_lock_is_per_connector():
    """store.lock(NAME) is one lock per connector name."""
    store = memory_store()
    assert store.lock("a") is store.lock("a")
    assert store.lock("a") is not store.lock("b")


# ----------------------------------------------------------------------------- probe and backends


def test_probe_refuses_the_fail_backend():
    """probe() on keyring's fail backend raises KeyringUnusableError (exit 78) naming the backend
    and the headless options."""
    store = KeyringStore(service="tokend", backend=keyring.backends.fail.Keyring())
    with pytest.raises(KeyringUnusableError) as caught:
        store.probe()
    message = str(caught.value)
    assert "keyring.backends.fail.Keyring" in message
    assert FILE_BACKEND in message
    assert "gnome-keyring-daemon" in message
    assert caught.value.exit_code == ExitCode.CONFIG


def test_probe_refuses_a_backend_whose_writes_fail():
    """probe() on a backend that cannot write raises KeyringUnusableError naming the backend."""
    backend = MemoryKeyring()
    backend.fail_writes = True
    with pytest.raises(KeyringUnusableError) as caught:
        memory_store(backend).probe()
    assert "MemoryKeyring" in str(caught.value)
    assert FILE_BACKEND in str(caught.value)


def test_probe_refuses_a_backend_that_drops_writes():
    """probe() notices a backend that does not read back what it wrote."""
    with pytest.raises(KeyringUnusableError, match="read back"):
        memory_store(DroppingKeyring()).probe()


def test_probe_leaves_nothing_behind():
    """A successful probe deletes its probe item."""
    backend = MemoryKeyring()
    memory_store(backend).probe()
    assert backend.items == {}
    assert backend.writes == 1


@pytest.fixture
def clean_keyring_env(monkeypatch):
    for name in (
        "PYTHON_KEYRING_BACKEND",
        "TOKEND_KEYRING_FILE",
        "TOKEND_KEYRING_KEY_FILE",
        "KEYRING_PROPERTY_FILE_PATH",
        "KEYRING_PROPERTY_KEY_FILE",
        "CREDENTIALS_DIRECTORY",
    ):
        monkeypatch.delenv(name, raising=False)


def test_from_settings_places_the_file_backend_under_state_dir(tmp_path, clean_keyring_env):
    """keyring_backend = the encrypted-file backend keeps its file in state_dir and works."""
    config = make_config(
        tmp_path,
        "https://auth.example/token",
        daemon={"keyring_backend": FILE_BACKEND, "keyring_service": "svc"},
    )
    store = KeyringStore.from_settings(config.daemon)
    assert isinstance(store.backend, EncryptedFile)
    assert store.backend_name == FILE_BACKEND
    assert store.service == "svc"
    state_dir = tmp_path / "state"
    assert Path(store.backend.file_path) == state_dir / "keyring.enc"
    store.probe()
    saved = store.save("demo", _token("at_SEKRIT", "rt_SEKRIT"), expected_generation=0)
    assert (state_dir / "keyring.enc").exists()
    assert b"SEKRIT" not in (state_dir / "keyring.enc").read_bytes()
    again = KeyringStore.from_settings(config.daemon)
    assert again.load("demo") == saved


def test_file_backend_is_used_without_loading_keyring(tmp_path):
    """Naming the encrypted-file backend (config or PYTHON_KEYRING_BACKEND) loads neither the
    keyring package nor its dependencies; what the store writes, the keyring backend reads."""
    code = textwrap.dedent(
        """
        import json, sys
        from tokend.config import config_from_mapping
        from tokend.model import Secret
        from tokend.store import KeyringStore
        config = config_from_mapping(json.loads(sys.argv[1]), source="test.toml")
        store = KeyringStore.from_settings(config.daemon)
        store.probe()
        store.save_client_secret("demo", Secret("cs-from-store"))
        print(json.dumps([store.backend_name, "keyring" in sys.modules]))
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYRING_", "TOKEND_"))}
    env["PYTHONPATH"] = str(root)
    for named_in_config in (True, False):
        env["PYTHON_KEYRING_BACKEND"] = "" if named_in_config else FILE_BACKEND
        daemon = {"keyring_backend": FILE_BACKEND} if named_in_config else {}
        config = config_dict(tmp_path, "https://auth.example/token", daemon=daemon)
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(config)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [FILE_BACKEND, False]
    ring = EncryptedFileKeyring(file_path=tmp_path / "state" / "keyring.enc")
    assert ring.get_password("tokend", "demo:client_secret") == "cs-from-store"


def test_from_settings_refuses_an_unloadable_backend(tmp_path, clean_keyring_env):
    """A keyring_backend that cannot be loaded is KeyringUnusableError naming it."""
    config = make_config(
        tmp_path, "https://auth.example/token", daemon={"keyring_backend": "nowhere.NoKeyring"}
    )
    with pytest.raises(KeyringUnusableError) as caught:
        KeyringStore.from_settings(config.daemon)
    assert "nowhere.NoKeyring" in str(caught.value)
    assert FILE_BACKEND in str(caught.value)


# ----------------------------------------------------------------------------- state.json


def _states() -> dict[str, ConnectorState]:
    now = datetime.now(UTC)
    return {
        "demo": ConnectorState(
            state=State.RETRYING,
            since=now,
            generation=3,
            obtained_at=now - timedelta(minutes=10),
            expires_at=now + timedelta(minutes=50),
            next_refresh_at=now + timedelta(seconds=30),
            last_refresh_at=now - timedelta(minutes=10),
            retry_at=now + timedelta(seconds=30),
            consecutive_failures=2,
            last_error="cannot reach the token endpoint",
            lifetime_assumed=True,
            clock_offset_s=-1.5,
            refreshes=7,
        ),
        "other": ConnectorState(),
    }


def test_state_file_round_trip(tmp_path):
    """Saved connector states load back equal; a missing file loads as empty."""
    state_file = StateFile(tmp_path / "state.json")
    assert state_file.load() == {}
    states = _states()
    state_file.save(states)
    assert state_file.load() == states


def test_state_file_is_private_and_leaves_no_temp_files(tmp_path):
    """state.json is mode 0600 and repeated saves leave no temporary files behind."""
    state_file = StateFile(tmp_path / "state.json")
    for _ in range(3):
        state_file.save(_states())
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"version": 1}',
        b'{"version": 1, "connectors": {"demo": {"state": "bogus"}}}',
        b"[]",
    ],
)
def test_corrupt_state_file_is_set_aside(tmp_path, raw):
    """A corrupt state.json is renamed aside (kept for a human) and load returns {}; the next
    save writes a fresh file."""
    path = tmp_path / "state.json"
    path.write_bytes(raw)
    state_file = StateFile(path)
    assert state_file.load() == {}
    assert not path.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == raw
    states = _states()
    state_file.save(states)
    assert state_file.load() == states


def test_unwritable_state_dir_is_store_error(tmp_path):
    """Saving where no directory can be (under a regular file: refused even to root) raises
    StoreError naming the path."""
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    path = blocker / "sub" / "state.json"
    with pytest.raises(StoreError) as caught:
        StateFile(path).save(_states())
    assert str(path) in str(caught.value)


def test_unreadable_state_file_is_store_error(tmp_path):
    """A state.json that cannot be read (here: a directory) raises StoreError, not {}."""
    path = tmp_path / "state.json"
    path.mkdir()
    with pytest.raises(StoreError, match="cannot read"):
        StateFile(path).load()


# ----------------------------------------------------------------------------- the state-dir lock

_TRY_LOCK = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from tokend.errors import StateLockedError
    from tokend.store import StateDirLock
    lock = StateDirLock(Path(sys.argv[1]))
    try:
        lock.acquire()
    except StateLockedError as exc:
        print(json.dumps({"locked": True, "pid": exc.pid, "message": str(exc)}))
    else:
        print(json.dumps({"locked": False, "content": lock.path.read_text(), "me": os.getpid()}))
        lock.release()
    """
)


def _try_lock_elsewhere(state_dir: Path) -> dict[str, Any]:
    """Try to take the lock from another process; returns what it saw."""
    result = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=True,
    )
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


def test_state_dir_lock_excludes_other_processes(tmp_path):
    """While held, another process's acquire fails with StateLockedError naming this PID; once
    released, it succeeds; the lock file records the holder's PID."""
    state_dir = tmp_path / "state"
    lock = StateDirLock(state_dir)
    lock.acquire()
    try:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        seen = _try_lock_elsewhere(state_dir)
        assert seen["locked"] is True
        assert seen["pid"] == os.getpid()
        assert f"PID {os.getpid()}" in str(seen["message"])
    finally:
        lock.release()
    seen = _try_lock_elsewhere(state_dir)
    assert seen["locked"] is False
    assert seen["content"] == f"{seen['me']}\n"


def test_state_dir_lock_in_the_same_process(tmp_path):
    """A second lock object in the same process is refused too (flock is per open file); the
    error is StateLockedError (exit 75); `held()` releases on exit."""
    first = StateDirLock(tmp_path)
    with first.held():
        with pytest.raises(StateLockedError) as caught:
            StateDirLock(tmp_path).acquire()
        assert caught.value.pid == os.getpid()
        assert caught.value.exit_code == ExitCode.TEMPORARY
    second = StateDirLock(tmp_path)
    second.acquire()
    second.release()
