"""Tests for tokend.keyring_file, the encrypted-file keyring backend: real files, real processes."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import keyring.backend
import keyring.core
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keyring.errors import KeyringError, PasswordDeleteError

from tokend.keyring_file import (
    EncryptedFileError,
    EncryptedFileKeyring,
    KeyFileError,
    KeyMismatchError,
    default_file_path,
    default_key_path,
)

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "tokend.keyring_file.EncryptedFileKeyring"
PASSWORD = "canary-s3cret-\u00e9-value"
_ENV_PREFIXES = ("KEYRING_PROPERTY_", "TOKEND_KEYRING_")
_ENV_NAMES = ("PYTHON_KEYRING_BACKEND", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the host's keyring settings out of every test."""
    for name in os.environ:
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            monkeypatch.delenv(name)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keyring.enc"


@pytest.fixture
def ring(store_path: Path) -> EncryptedFileKeyring:
    return EncryptedFileKeyring(file_path=store_path)


def _open_sealed(path: Path, key: bytes, fmt: str, aad: bytes) -> bytes:
    """Decrypt one file of the documented format {format, version, nonce, ciphertext}."""
    doc = json.loads(path.read_bytes())
    assert (doc["format"], doc["version"]) == (fmt, 2)
    nonce = base64.b64decode(doc["nonce"])
    assert len(nonce) == 12
    return AESGCM(key).decrypt(nonce, base64.b64decode(doc["ciphertext"]), aad)


def read_store(path: Path, key_path: Path | None = None) -> dict[str, dict[str, str]]:
    """Decrypt a keyring independently of the backend, following the documented format: the
    header proves the key, each file in `<path>.d` holds one [service, username, password]."""
    raw = (key_path or path.with_name(path.name + ".key")).read_bytes()
    key = raw if len(raw) == 32 else base64.b64decode(raw)
    assert _open_sealed(path, key, "tokend-keyring", b"tokend-keyring/2") == (
        b"tokend-keyring key check"
    )
    names = hmac.new(key, b"tokend-keyring/2 item names", hashlib.sha256).digest()
    result: dict[str, dict[str, str]] = {}
    items = path.with_name(path.name + ".d")
    for item in sorted(items.iterdir()) if items.exists() else []:
        if item.name.startswith("."):
            continue
        aad = b"tokend-keyring-item/2/" + item.name.encode()
        service, user, password = json.loads(_open_sealed(item, key, "tokend-keyring-item", aad))
        expected = hmac.new(names, json.dumps([service, user]).encode(), hashlib.sha256)
        assert item.name == expected.hexdigest()
        result.setdefault(service, {})[user] = password
    return result


def item_files(path: Path) -> list[Path]:
    """The item files of the keyring at `path` (no temp files)."""
    items = path.with_name(path.name + ".d")
    return sorted(p for p in items.iterdir() if not p.name.startswith("."))


def child_env(**extra: str) -> dict[str, str]:
    """A subprocess environment that imports tokend from this tree and has no keyring config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_ENV_PREFIXES) and k not in _ENV_NAMES
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(code: str, env: dict[str, str], *args: str) -> str:
    """Run `code` in a fresh interpreter; return its stdout, failing the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def age(path: Path, seconds: float = 3600) -> None:
    """Set the file's mtime into the past, so a cached read of it counts as settled."""
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


# -- basic behaviour ---------------------------------------------------------------------------


def test_round_trip(ring: EncryptedFileKeyring) -> None:
    """A stored password reads back; a replaced one reads back new; unknown items are None."""
    assert ring.get_password("svc", "alice") is None
    ring.set_password("svc", "alice", PASSWORD)
    assert ring.get_password("svc", "alice") == PASSWORD
    ring.set_password("svc", "alice", "second")
    assert ring.get_password("svc", "alice") == "second"
    assert ring.get_password("svc", "bob") is None
    assert ring.get_password("other", "alice") is None


def test_many_services_and_users(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """Services and usernames are independent; get_credential finds by user or the first one."""
    for service in ("a", "b"):
        for user in ("x", "y"):
            ring.set_password(service, user, f"{service}-{user}")
    fresh = EncryptedFileKeyring(file_path=store_path)
    assert fresh.get_password("b", "x") == "b-x"
    cred = fresh.get_credential("a", "y")
    assert cred is not None
    assert (cred.username, cred.password) == ("y", "a-y")
    anyone = fresh.get_credential("b", None)
    assert anyone is not None
    assert anyone.password == f"b-{anyone.username}"
    assert fresh.get_credential("c", None) is None
    assert fresh.get_credential("a", "z") is None
    assert read_store(store_path) == {"a": {"x": "a-x", "y": "a-y"}, "b": {"x": "b-x", "y": "b-y"}}


def test_delete(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """Deleting removes only that item, and an emptied service disappears."""
    ring.set_password("svc", "a", "1")
    ring.set_password("svc", "b", "2")
    ring.set_password("gone", "c", "3")
    ring.delete_password("svc", "a")
    ring.delete_password("gone", "c")
    assert ring.get_password("svc", "a") is None
    assert ring.get_password("svc", "b") == "2"
    assert read_store(store_path) == {"svc": {"b": "2"}}


def test_delete_missing_raises(ring: EncryptedFileKeyring) -> None:
    """Deleting an item that is not stored raises PasswordDeleteError, with or without a file."""
    with pytest.raises(PasswordDeleteError):
        ring.delete_password("svc", "nobody")
    ring.set_password("svc", "a", "1")
    with pytest.raises(PasswordDeleteError, match="nobody"):
        ring.delete_password("svc", "nobody")
    assert ring.get_password("svc", "a") == "1"


def test_reading_creates_nothing(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A read of a keyring that does not exist yet is empty and creates no file, dir or key."""
    assert ring.get_password("svc", "a") is None
    assert ring.get_credential("svc", None) is None
    assert not store_path.parent.exists()


def test_modes_are_private(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """Whatever the umask, the directory is 0700 and file, key and lock are 0600."""
    old = os.umask(0)
    try:
        ring.set_password("svc", "a", PASSWORD)
    finally:
        os.umask(old)
    assert store_path.parent.stat().st_mode & 0o777 == 0o700
    for path in (store_path, ring.key_path, Path(f"{store_path}.lock")):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert ring.key_path == store_path.with_name("keyring.enc.key")
    assert len(base64.b64decode(ring.key_path.read_bytes())) == 32


def test_ciphertext_hides_everything(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """The file shows neither the password nor the service and username, in any encoding."""
    ring.set_password("my-service", "my-user", PASSWORD)
    (item,) = item_files(store_path)
    for path in (store_path, item):
        blob = path.read_bytes()
        for text in (PASSWORD, "canary", "my-service", "my-user"):
            for form in (text.encode(), base64.b64encode(text.encode()), json.dumps(text).encode()):
                assert form not in blob and form not in path.name.encode()
        assert set(json.loads(blob)) == {"format", "version", "nonce", "ciphertext"}


def test_every_write_uses_a_fresh_nonce(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """Rewriting the same contents produces a different nonce and ciphertext."""
    ring.set_password("svc", "a", PASSWORD)
    (item,) = item_files(store_path)
    first = json.loads(item.read_bytes())
    ring.set_password("svc", "a", PASSWORD)
    second = json.loads(item.read_bytes())
    assert first["nonce"] != second["nonce"]
    assert first["ciphertext"] != second["ciphertext"]


def test_stale_temp_files_are_removed(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A new writer removes temp files left by a killed writer, and nothing else."""
    ring.set_password("svc", "a", "1")
    (item,) = item_files(store_path)
    stale = item.with_name(f".{item.name}.0123456789abcdef.tmp")
    stale.write_bytes(b"half")
    unrelated = item.with_name(f".{item.name}.notours.tmp")
    unrelated.write_bytes(b"keep")
    EncryptedFileKeyring(file_path=store_path).set_password("svc", "b", "2")
    assert not stale.exists()
    assert unrelated.exists()
    names = sorted(p.name for p in store_path.parent.iterdir())
    assert names == ["keyring.enc", "keyring.enc.d", "keyring.enc.key", "keyring.enc.lock"]
    assert len(item_files(store_path)) == 2


# -- keys and damaged files --------------------------------------------------------------------


def test_wrong_key_is_refused(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """With another key, reads and writes fail with a clear error and leave the file untouched."""
    ring.set_password("svc", "a", PASSWORD)
    before = store_path.read_bytes()
    ring.key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    fresh = EncryptedFileKeyring(file_path=store_path)
    with pytest.raises(KeyMismatchError) as info:
        fresh.get_password("svc", "a")
    message = str(info.value)
    assert str(store_path) in message
    assert "does not match" in message
    assert PASSWORD not in message
    assert isinstance(info.value, KeyringError)
    with pytest.raises(KeyMismatchError):
        fresh.set_password("svc", "b", "x")
    assert store_path.read_bytes() == before


def test_tampered_file_is_refused(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A flipped ciphertext bit or a changed header fails to open; it is never half-trusted."""
    ring.set_password("svc", "a", PASSWORD)
    (item,) = item_files(store_path)
    item_doc = json.loads(item.read_bytes())
    doc = json.loads(store_path.read_bytes())
    for path, original in ((item, item_doc), (store_path, doc)):
        ciphertext = bytearray(base64.b64decode(original["ciphertext"]))
        ciphertext[0] ^= 1
        flipped = {**original, "ciphertext": base64.b64encode(ciphertext).decode()}
        path.write_text(json.dumps(flipped))
        with pytest.raises(KeyMismatchError, match="modified"):
            EncryptedFileKeyring(file_path=store_path).get_password("svc", "a")
    store_path.write_text(json.dumps({**doc, "version": 3}))
    with pytest.raises(EncryptedFileError, match="version"):
        EncryptedFileKeyring(file_path=store_path).get_password("svc", "a")
    for garbage in (b"", b"{", b"[]", json.dumps({**doc, "nonce": "!!"}).encode()):
        store_path.write_bytes(garbage)
        with pytest.raises(EncryptedFileError, match="not a readable") as info:
            EncryptedFileKeyring(file_path=store_path).get_password("svc", "a")
        assert str(store_path) in str(info.value)


def test_raw_and_base64_keys_are_equivalent(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A key file may hold the raw 32 bytes or their base64, with or without a newline."""
    ring.set_password("svc", "a", PASSWORD)
    key = base64.b64decode(ring.key_path.read_bytes())
    for content in (key, base64.b64encode(key), base64.b64encode(key) + b"\r\n"):
        ring.key_path.write_bytes(content)
        assert EncryptedFileKeyring(file_path=store_path).get_password("svc", "a") == PASSWORD


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(16), os.urandom(33), b"not base64 at all!", base64.b64encode(os.urandom(31))],
    ids=["empty", "raw16", "raw33", "text", "base64-31"],
)
def test_key_of_wrong_size_is_refused(
    ring: EncryptedFileKeyring, store_path: Path, content: bytes
) -> None:
    """A key file that does not hold exactly 32 bytes is an error that names it."""
    ring.key_path.parent.mkdir(mode=0o700)
    ring.key_path.write_bytes(content)
    ring.key_path.chmod(0o600)
    with pytest.raises(KeyFileError, match="32-byte") as info:
        ring.set_password("svc", "a", "x")
    assert str(ring.key_path) in str(info.value)
    assert not store_path.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_key_open_to_others_is_refused(
    ring: EncryptedFileKeyring, store_path: Path, mode: int
) -> None:
    """A key file readable or writable by group or others is refused, naming the fix."""
    ring.set_password("svc", "a", PASSWORD)
    ring.key_path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        EncryptedFileKeyring(file_path=store_path).get_password("svc", "a")


def test_missing_key_is_not_regenerated(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """If the key is lost, the file is refused instead of silently getting a new key."""
    ring.set_password("svc", "a", PASSWORD)
    ring.key_path.unlink()
    with pytest.raises(KeyFileError, match="missing"):
        EncryptedFileKeyring(file_path=store_path).get_password("svc", "a")
    with pytest.raises(KeyFileError, match="missing"):
        EncryptedFileKeyring(file_path=store_path).set_password("svc", "b", "x")
    assert not ring.key_path.exists()


def test_key_from_credentials_directory(
    tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A systemd credential `tokend-keyring-key` is used as the key, whatever its mode."""
    creds = tmp_path / "creds"
    creds.mkdir()
    key = os.urandom(32)
    (creds / "tokend-keyring-key").write_bytes(key)
    (creds / "tokend-keyring-key").chmod(0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    ring = EncryptedFileKeyring(file_path=store_path)
    assert ring.key_path == creds / "tokend-keyring-key"
    ring.set_password("svc", "a", PASSWORD)
    assert ring.get_password("svc", "a") == PASSWORD
    assert not store_path.with_name("keyring.enc.key").exists()
    assert read_store(store_path, creds / "tokend-keyring-key") == {"svc": {"a": PASSWORD}}


def test_explicit_key_file_wins(
    tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`key_file` (or $TOKEND_KEYRING_KEY_FILE) names the key, generated there on first write."""
    monkeypatch.setenv("TOKEND_KEYRING_KEY_FILE", str(tmp_path / "env.key"))
    assert EncryptedFileKeyring(file_path=store_path).key_path == tmp_path / "env.key"
    ring = EncryptedFileKeyring(file_path=store_path, key_file=str(tmp_path / "keys" / "k"))
    ring.set_password("svc", "a", PASSWORD)
    assert (tmp_path / "keys" / "k").stat().st_mode & 0o777 == 0o600
    assert read_store(store_path, tmp_path / "keys" / "k") == {"svc": {"a": PASSWORD}}


def test_default_paths(tmp_path: Path) -> None:
    """File and key paths follow TOKEND_*, systemd's directories, then root or XDG defaults."""
    assert default_file_path({"TOKEND_KEYRING_FILE": "/x/k.enc"}) == Path("/x/k.enc")
    assert default_file_path({"STATE_DIRECTORY": "/s/a:/s/b"}) == Path("/s/a/keyring.enc")
    for euid in (0, 1000):
        assert default_file_path({"STATE_DIRECTORY": "/s"}, euid=euid) == Path("/s/keyring.enc")
    root = Path("/var/lib/tokend/keyring.enc")
    assert default_file_path({"XDG_STATE_HOME": "/xdg"}, euid=0) == root
    assert default_file_path({"XDG_STATE_HOME": "/xdg"}, euid=1000) == Path(
        "/xdg/tokend/keyring.enc"
    )
    home_default = Path.home() / ".local/state/tokend/keyring.enc"
    assert default_file_path({"XDG_STATE_HOME": "relative"}, euid=1000) == home_default
    assert default_file_path({}, euid=1000) == home_default
    store = Path("/s/keyring.enc")
    assert default_key_path(store, {}) == Path("/s/keyring.enc.key")
    assert default_key_path(store, {"TOKEND_KEYRING_KEY_FILE": "/k"}) == Path("/k")
    assert default_key_path(store, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == Path(
        "/s/keyring.enc.key"
    )
    (tmp_path / "tokend-keyring-key").write_bytes(b"x")
    assert default_key_path(store, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == (
        tmp_path / "tokend-keyring-key"
    )


# -- caching -----------------------------------------------------------------------------------


def test_item_moved_to_another_name_is_refused(
    ring: EncryptedFileKeyring, store_path: Path
) -> None:
    """An item file renamed to another item's name fails to open: its name is authenticated."""
    ring.set_password("svc", "a", "value-a")
    ring.set_password("svc", "b", "value-b")
    first, second = item_files(store_path)
    os.replace(first, second)
    outcomes = []
    for user in ("a", "b"):
        try:
            outcomes.append(ring.get_password("svc", user))
        except KeyMismatchError as exc:
            outcomes.append("refused" if "modified" in str(exc) else str(exc))
    # One name's file is gone; the other name's file holds an item sealed under another name.
    assert sorted(outcomes, key=str) == [None, "refused"]


def test_cache_sees_another_process_write(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A value written by another process is read, not the cached one (same-size values)."""
    ring.set_password("svc", "a", "old-value-1")
    age(store_path)
    assert ring.get_password("svc", "a") == "old-value-1"
    code = """
        import sys
        from tokend.keyring_file import EncryptedFileKeyring
        EncryptedFileKeyring(file_path=sys.argv[1]).set_password("svc", "a", "new-value-2")
    """
    run_python(code, child_env(), str(store_path))
    assert ring.get_password("svc", "a") == "new-value-2"


# -- one file per item, and the version-1 single file ------------------------------------------


def write_legacy(path: Path, data: dict[str, dict[str, str]]) -> bytes:
    """Write a version-1 keyring (every item in one file, AAD `tokend-keyring/1`) and its key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = os.urandom(32)
    key_path = path.with_name(path.name + ".key")
    key_path.write_bytes(base64.b64encode(key) + b"\n")
    key_path.chmod(0o600)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, json.dumps(data).encode(), b"tokend-keyring/1")
    doc = {
        "format": "tokend-keyring",
        "version": 1,
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(sealed).decode(),
    }
    path.write_text(json.dumps(doc) + "\n")
    path.chmod(0o600)
    return key


LEGACY = {"tokend": {"demo": "grant-json", "demo:client_secret": "cs"}, "other": {"u": "p"}}


def test_write_touches_only_its_item(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """A write replaces its own item file; the header and every other item stay as they were."""
    for i in range(20):
        ring.set_password("svc", f"u{i}", f"v{i}")
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in item_files(store_path)}
    header = (store_path.stat().st_ino, store_path.read_bytes())
    ring.set_password("svc", "u7", "changed")
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in item_files(store_path)}
    changed = [name for name in before if before[name] != after[name]]
    assert len(changed) == 1 and after.keys() == before.keys()
    assert (store_path.stat().st_ino, store_path.read_bytes()) == header
    assert read_store(store_path)["svc"]["u7"] == "changed"


def test_version_1_file_is_migrated_on_first_read(store_path: Path) -> None:
    """A version-1 file is read, then rewritten as header and items under the same key."""
    key = write_legacy(store_path, LEGACY)
    ring = EncryptedFileKeyring(file_path=store_path)
    assert ring.get_password("tokend", "demo") == "grant-json"
    assert json.loads(store_path.read_bytes())["version"] == 2
    assert read_store(store_path) == LEGACY
    assert base64.b64decode(ring.key_path.read_bytes()) == key
    assert store_path.stat().st_mode & 0o777 == 0o600
    for item in item_files(store_path):
        assert item.stat().st_mode & 0o777 == 0o600
    assert EncryptedFileKeyring(file_path=store_path).get_password("other", "u") == "p"


def test_version_1_file_is_migrated_on_first_write(store_path: Path) -> None:
    """A write to a version-1 keyring keeps every old item beside the new one."""
    write_legacy(store_path, LEGACY)
    EncryptedFileKeyring(file_path=store_path).set_password("tokend", "new", "n")
    assert read_store(store_path) == {**LEGACY, "tokend": {**LEGACY["tokend"], "new": "n"}}


def test_interrupted_migration_is_redone_from_the_old_file(store_path: Path) -> None:
    """Until the header replaces it, the version-1 file is what counts: item files left by an
    interrupted migration, or by a newer keyring a backup was restored over, are replaced."""
    write_legacy(store_path, {"other": {"u": "p"}})
    ring = EncryptedFileKeyring(file_path=store_path)
    ring.set_password("svc", "later", "x")  # migrates, then adds an item
    ring.set_password("other", "u", "newer")
    items = {p.name: p.read_bytes() for p in item_files(store_path)}
    key = write_legacy(store_path, {"other": {"u": "p"}, "svc": {"old": "o"}})
    ring.key_path.write_bytes(base64.b64encode(key) + b"\n")  # the restored file's key
    assert items  # the directory still holds the newer items, sealed under the old key
    assert EncryptedFileKeyring(file_path=store_path).get_password("other", "u") == "p"
    assert read_store(store_path) == {"other": {"u": "p"}, "svc": {"old": "o"}}


def test_version_1_file_stays_readable_when_it_cannot_be_migrated(store_path: Path) -> None:
    """If the item directory cannot be made, reads serve the version-1 file as it is; writes
    fail without touching it."""
    write_legacy(store_path, LEGACY)
    before = store_path.read_bytes()
    store_path.with_name("keyring.enc.d").write_bytes(b"")  # a file where the directory goes
    ring = EncryptedFileKeyring(file_path=store_path)
    assert ring.get_password("tokend", "demo:client_secret") == "cs"
    cred = ring.get_credential("other", None)
    assert cred is not None and (cred.username, cred.password) == ("u", "p")
    with pytest.raises(KeyringError):
        ring.set_password("tokend", "demo", "x")
    assert store_path.read_bytes() == before


def test_wrong_key_is_refused_before_migrating(
    ring: EncryptedFileKeyring, store_path: Path
) -> None:
    """A version-1 file with the wrong key is refused and left as it was, nothing migrated."""
    write_legacy(store_path, LEGACY)
    before = store_path.read_bytes()
    ring.key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    with pytest.raises(KeyMismatchError):
        ring.get_password("tokend", "demo")
    with pytest.raises(KeyMismatchError):
        ring.set_password("tokend", "demo", "x")
    assert store_path.read_bytes() == before
    assert not store_path.with_name("keyring.enc.d").exists()


def test_wrong_key_is_refused_for_items_not_stored(
    ring: EncryptedFileKeyring, store_path: Path
) -> None:
    """With another key, even a lookup of an item that was never stored fails (the header
    proves the key), rather than answering None."""
    ring.set_password("svc", "a", PASSWORD)
    ring.key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    with pytest.raises(KeyMismatchError):
        EncryptedFileKeyring(file_path=store_path).get_password("svc", "never-stored")


# -- concurrency and crashes -------------------------------------------------------------------

_WRITER = """
    import sys
    from tokend.keyring_file import EncryptedFileKeyring
    ring = EncryptedFileKeyring(file_path=sys.argv[1], key_file=sys.argv[2] or None)
    tag, count = sys.argv[3], int(sys.argv[4])
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        ring.set_password("svc", f"{tag}-{i}", f"value-{tag}-{i}")
"""


def run_writers(jobs: list[tuple[Path, str, str, int]]) -> None:
    """Start one writer process per job, release them together, and wait for all to succeed."""
    with contextlib.ExitStack() as stack:
        procs = []
        for path, key, tag, count in jobs:
            proc = stack.enter_context(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        textwrap.dedent(_WRITER),
                        str(path),
                        key,
                        tag,
                        str(count),
                    ],
                    env=child_env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            stack.callback(proc.kill)  # runs before the Popen's own exit, which waits for it
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err


def test_concurrent_writers_lose_nothing(store_path: Path) -> None:
    """Three processes writing 200 distinct keys each into one file: all 600 are there."""
    run_writers([(store_path, "", tag, 200) for tag in ("a", "b", "c")])
    stored = read_store(store_path)["svc"]
    expected = {f"{t}-{i}": f"value-{t}-{i}" for t in "abc" for i in range(200)}
    assert stored == expected


def test_threads_writing_at_once_lose_nothing(ring: EncryptedFileKeyring, store_path: Path) -> None:
    """Threads sharing one backend instance serialise their writes: nothing is lost."""

    def write(tag: str) -> None:
        for i in range(50):
            ring.set_password("svc", f"{tag}-{i}", tag)

    threads = [threading.Thread(target=write, args=(tag,)) for tag in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(read_store(store_path)["svc"]) == 200
    assert ring.get_password("svc", "d-49") == "d"


def test_concurrent_key_creation_agrees(tmp_path: Path) -> None:
    """Processes that create the same key file at once all end up using one key."""
    key = tmp_path / "shared.key"
    files = [tmp_path / f"ring{i}.enc" for i in range(4)]
    run_writers([(p, str(key), "k", 1) for p in files])
    for path in files:
        assert read_store(path, key) == {"svc": {"k-0": "value-k-0"}}


_ZYGOTE = """
    import os, sys, traceback
    from tokend.keyring_file import EncryptedFileKeyring
    path = sys.argv[1]
    for line in sys.stdin:
        pid = os.fork()  # this process is single-threaded, so forking is safe
        if pid == 0:
            try:
                ring = EncryptedFileKeyring(file_path=path)
                i = int(line)
                while True:
                    ring.set_password("svc", f"k{i}", f"v{i}")
                    os.write(1, b"%d\\n" % i)
                    i += 1
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        os.write(1, b"pid %d\\n" % pid)
        _, status = os.waitpid(pid, 0)
        os.write(1, b"dead %d\\n" % os.waitstatus_to_exitcode(status))
"""


class _Lines:
    """Lines from a pipe, read with a deadline so that a stuck child fails the test."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buffer = b""

    def next(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._fd], [], [], max(0.0, remaining))
            assert ready, "child process stopped answering"
            chunk = os.read(self._fd, 65536)
            assert chunk, "child process closed its output"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@pytest.fixture
def zygote(store_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], _Lines]]:
    """A process that forks writer children on demand (a fork costs far less than a spawn)."""
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_ZYGOTE), str(store_path)],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        try:
            yield proc, _Lines(proc)
        finally:
            proc.kill()


def test_sigkill_during_writes_never_loses_data(
    store_path: Path, zygote: tuple[subprocess.Popen[bytes], _Lines]
) -> None:
    """Writers SIGKILLed at random moments leave a readable file holding every confirmed write."""
    proc, lines = zygote
    assert proc.stdin is not None
    rng = random.Random(1234)
    confirmed: set[int] = set()
    next_index = 0
    for _ in range(30):
        proc.stdin.write(b"%d\n" % next_index)
        proc.stdin.flush()
        pid = None
        while pid is None:
            line = lines.next()
            if line.startswith("pid "):
                pid = int(line.split()[1])
            else:
                assert not line.startswith("dead"), "writer died by itself"
                confirmed.add(int(line))
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        while not (line := lines.next()).startswith("dead"):
            confirmed.add(int(line))
        assert line == f"dead {-signal.SIGKILL}", "writer died by itself"
        # The store is whole and holds every write the killed writer had confirmed.
        if confirmed:
            stored = read_store(store_path)["svc"]
            assert {f"k{i}" for i in confirmed} <= stored.keys()
            next_index = max(confirmed) + 1
        # The dead writer's lock is gone with it.
        lock_fd = os.open(f"{store_path}.lock", os.O_RDWR)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(lock_fd)
    assert confirmed, "no write completed at all"
    ring = EncryptedFileKeyring(file_path=store_path)
    ring.set_password("svc", "after", "ok")
    assert all(ring.get_password("svc", f"k{i}") == f"v{i}" for i in confirmed)
    assert ring.get_password("svc", "after") == "ok"


# -- how keyring finds and chooses the backend -------------------------------------------------


def test_never_viable_for_automatic_selection() -> None:
    """The backend is never among keyring's viable backends, yet has a usable priority."""
    assert not EncryptedFileKeyring.viable
    assert EncryptedFileKeyring not in set(keyring.backend.KeyringBackend.get_viable_backends())
    assert EncryptedFileKeyring.priority == 1


def test_load_keyring_by_name(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keyring.core.load_keyring returns ours, configured by KEYRING_PROPERTY_FILE_PATH."""
    monkeypatch.setenv("KEYRING_PROPERTY_FILE_PATH", str(store_path))
    backend = keyring.core.load_keyring(BACKEND)
    assert isinstance(backend, EncryptedFileKeyring)
    assert backend.path == store_path
    backend.set_password("svc", "a", PASSWORD)
    assert read_store(store_path) == {"svc": {"a": PASSWORD}}
    assert "EncryptedFileKeyring" in str(backend)


_CLIENT = """
    import keyring
    backend = keyring.get_keyring()
    print(type(backend).__module__ + "." + type(backend).__qualname__)
    keyring.set_password("svc", "user", "from-child")
    print(keyring.get_password("svc", "user"))
"""


def test_chosen_by_environment_variable(tmp_path: Path, store_path: Path) -> None:
    """PYTHON_KEYRING_BACKEND selects ours; KEYRING_PROPERTY_* place the file and the key."""
    env = child_env(
        PYTHON_KEYRING_BACKEND=BACKEND,
        KEYRING_PROPERTY_FILE_PATH=str(store_path),
        KEYRING_PROPERTY_KEY_FILE=str(tmp_path / "my.key"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    assert run_python(_CLIENT, env).split() == [BACKEND, "from-child"]
    assert read_store(store_path, tmp_path / "my.key") == {"svc": {"user": "from-child"}}


def test_chosen_by_keyringrc(tmp_path: Path, store_path: Path) -> None:
    """keyringrc.cfg under XDG_CONFIG_HOME selects ours; TOKEND_KEYRING_FILE places the file."""
    config = tmp_path / "config" / "python_keyring"
    config.mkdir(parents=True)
    (config / "keyringrc.cfg").write_text(f"[backend]\ndefault-keyring = {BACKEND}\n")
    env = child_env(XDG_CONFIG_HOME=str(tmp_path / "config"), TOKEND_KEYRING_FILE=str(store_path))
    assert run_python(_CLIENT, env).split() == [BACKEND, "from-child"]
    assert read_store(store_path) == {"svc": {"user": "from-child"}}


def test_not_chosen_by_default(tmp_path: Path) -> None:
    """Unconfigured, keyring imports ours through its entry point but never picks it."""
    # A minimal installed distribution that registers the entry point the way pyproject.toml does.
    site = tmp_path / "site"
    dist = site / "tokend_entry_point_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokend-entry-point-probe\n")
    (dist / "entry_points.txt").write_text(
        "[keyring.backends]\ntokend-file = tokend.keyring_file\n"
    )
    code = """
        import json, sys
        import keyring, keyring.backend
        rings = keyring.backend.get_all_keyring()
        print(json.dumps({
            "loaded": "tokend.keyring_file" in sys.modules,
            "all": [type(r).__name__ for r in rings],
            "chosen": type(keyring.get_keyring()).__name__,
        }))
    """
    env = child_env(XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    result = json.loads(run_python(code, env))
    assert result["loaded"], "the keyring.backends entry point did not import tokend.keyring_file"
    assert "EncryptedFileKeyring" not in result["all"]
    assert result["chosen"] != "EncryptedFileKeyring"
