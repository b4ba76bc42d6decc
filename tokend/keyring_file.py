"""tokend's encrypted-file `keyring` backend, for headless hosts with no Secret Service.

Owns one file of secrets, `{service: {username: password}}` encrypted with AES-256-GCM, and the
32-byte key that opens it (a file of its own, or a systemd credential). Writes are serialised by
an `flock` on a sibling lock file and land by atomic rename, so concurrent writers lose nothing and
a crash leaves either the old or the new file, never a torn one. Reads take no lock.

The backend is never chosen automatically (`viable` is false), only by name:
`PYTHON_KEYRING_BACKEND=tokend.keyring_file.EncryptedFileKeyring`, `keyringrc.cfg`, or
`keyring.core.load_keyring(...)`. It must not print, log, or put a secret in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from keyring.backend import KeyringBackend
from keyring.compat import properties
from keyring.credentials import Credential, SimpleCredential
from keyring.errors import KeyringError, PasswordDeleteError, PasswordSetError

FORMAT = "tokend-keyring"
VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
CREDENTIAL_NAME = "tokend-keyring-key"
# Binds the header to the ciphertext: a file relabelled as another format or version fails to open.
_AAD = f"{FORMAT}/{VERSION}".encode()
# File timestamps are coarse (a clock tick, up to 2 s on some filesystems): a cached decryption is
# trusted only if the file was already this old when we read it, so that a later file that reuses
# the inode, size and mtime cannot be mistaken for it (git's "racy" rule).
_RACY_WINDOW_NS = 2_000_000_000
_PRIVATE = 0o600

Secrets = dict[str, dict[str, str]]


class EncryptedFileError(KeyringError):
    """The keyring file or its key cannot be used; the message names the file, never a secret."""


class KeyFileError(EncryptedFileError):
    """The key file is missing, of the wrong size, or open to group or others."""


class KeyMismatchError(EncryptedFileError):
    """The key does not open the file: it is the wrong key, or the file was modified."""


def default_file_path(environ: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """Where the keyring file lives unless `file_path` says otherwise.

    `$TOKEND_KEYRING_FILE`, else `$STATE_DIRECTORY/keyring.enc` (systemd), else
    `/var/lib/tokend/keyring.enc` for root, else `$XDG_STATE_HOME/tokend/keyring.enc`.
    `environ` and `euid` default to this process's.
    """
    env = os.environ if environ is None else environ
    if env.get("TOKEND_KEYRING_FILE"):
        return Path(env["TOKEND_KEYRING_FILE"])
    state_dirs = env.get("STATE_DIRECTORY", "").split(":")
    if state_dirs[0]:
        return Path(state_dirs[0], "keyring.enc")
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/tokend/keyring.enc")
    xdg_state = env.get("XDG_STATE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg_state) if os.path.isabs(xdg_state) else Path.home() / ".local" / "state"
    return base / "tokend" / "keyring.enc"


def default_key_path(file_path: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where the key lives unless `key_file` says otherwise.

    `$TOKEND_KEYRING_KEY_FILE`, else the systemd credential `tokend-keyring-key` if present,
    else `<file_path>.key` (generated on first write).
    """
    env = os.environ if environ is None else environ
    if env.get("TOKEND_KEYRING_KEY_FILE"):
        return Path(env["TOKEND_KEYRING_KEY_FILE"])
    if env.get("CREDENTIALS_DIRECTORY"):
        credential = Path(env["CREDENTIALS_DIRECTORY"], CREDENTIAL_NAME)
        if credential.exists():
            return credential
    return file_path.with_name(file_path.name + ".key")


class _Cached(NamedTuple):
    path: Path
    ident: tuple[int, int, int, int]
    trusted: bool
    data: Secrets


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class EncryptedFileKeyring(KeyringBackend):
    """An AES-256-GCM encrypted file of secrets; settings `file_path` and `key_file` (str).

    keyring sets `KEYRING_PROPERTY_FILE_PATH` / `KEYRING_PROPERTY_KEY_FILE` as these attributes.
    An empty `key_file` means `default_key_path(file_path)`.
    """

    file_path: str
    key_file: str

    def __init__(
        self, file_path: str | os.PathLike[str] | None = None, key_file: str | None = None
    ) -> None:
        self.file_path = str(default_file_path())
        self.key_file = ""
        self._cache: _Cached | None = None
        # KeyringBackend.__init__ applies KEYRING_PROPERTY_* from the environment.
        super().__init__()  # type: ignore[no-untyped-call]  # keyring leaves it unannotated
        if file_path is not None:
            self.file_path = os.fspath(file_path)
        if key_file is not None:
            self.key_file = key_file

    # keyring's load_keyring() reads `priority` to check a named backend, so a raising priority
    # would also refuse explicit loading; automatic selection filters on `viable` instead.
    @properties.classproperty
    def priority(cls) -> float:
        """Priority once chosen explicitly; never used for automatic selection."""
        return 1.0

    @properties.classproperty
    def viable(cls) -> bool:
        """Never viable for automatic selection: choose it explicitly by name."""
        return False

    @property
    def path(self) -> Path:
        """The keyring file, absolute."""
        return Path(os.path.abspath(os.path.expanduser(self.file_path)))

    @property
    def key_path(self) -> Path:
        """The key file, absolute."""
        if self.key_file:
            return Path(os.path.abspath(os.path.expanduser(self.key_file)))
        return Path(os.path.abspath(default_key_path(self.path)))

    # -- keyring API ---------------------------------------------------------------------------

    def get_password(self, service: str, username: str) -> str | None:
        """The stored password, or None; raises EncryptedFileError if the file cannot be opened."""
        return self._load().get(service, {}).get(username)

    def get_credential(self, service: str, username: str | None) -> Credential | None:
        """The credential for `username`, or the first one stored for `service` if it is None."""
        users = self._load().get(service)
        if not users:
            return None
        if username is None:
            username, password = next(iter(users.items()))
            return SimpleCredential(username, password)
        stored = users.get(username)
        return None if stored is None else SimpleCredential(username, stored)

    def set_password(self, service: str, username: str, password: str) -> None:
        """Store `password`; raises PasswordSetError if the file cannot be written."""
        if not isinstance(password, str):
            raise TypeError("password must be a str")

        def change(data: Secrets) -> None:
            data.setdefault(service, {})[username] = password

        try:
            self._update(change)
        except OSError as exc:
            raise PasswordSetError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def delete_password(self, service: str, username: str) -> None:
        """Delete the password; raises PasswordDeleteError if none is stored."""

        def change(data: Secrets) -> None:
            users = data.get(service)
            if users is None or username not in users:
                raise PasswordDeleteError(
                    f"no password for {username!r} on {service!r} in {self.path}"
                )
            del users[username]
            if not users:
                del data[service]

        try:
            self._update(change)
        except OSError as exc:
            raise EncryptedFileError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    # -- reading -------------------------------------------------------------------------------

    def _load(self) -> Secrets:
        """The decrypted mapping (do not mutate it); a missing file is an empty keyring."""
        path = self.path
        try:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return {}
            cached = self._cache
            if cached and cached.trusted and cached.path == path and cached.ident == _ident(st):
                return cached.data
            started_ns = time.time_ns()
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return {}
            with os.fdopen(fd, "rb") as file:
                st = os.fstat(file.fileno())
                blob = file.read()
        except OSError as exc:
            raise EncryptedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        data = self._decrypt(path, blob)
        trusted = started_ns - st.st_mtime_ns > _RACY_WINDOW_NS
        self._cache = _Cached(path, _ident(st), trusted, data)
        return data

    def _decrypt(self, path: Path, blob: bytes) -> Secrets:
        damaged = EncryptedFileError(f"{path} is not a readable tokend keyring file (damaged?)")
        try:
            doc = json.loads(blob)
        except ValueError:
            raise damaged from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise damaged
        if doc.get("version") != VERSION:
            raise EncryptedFileError(f"{path}: unsupported tokend keyring file version")
        try:
            nonce = base64.b64decode(doc["nonce"], validate=True)
            ciphertext = base64.b64decode(doc["ciphertext"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise damaged from None
        if len(nonce) != NONCE_SIZE:
            raise damaged
        key = self._key(create=False)
        try:
            plain = AESGCM(key).decrypt(nonce, ciphertext, _AAD)
        except InvalidTag:
            raise KeyMismatchError(
                f"cannot decrypt {path}: the key in {self.key_path} does not match it,"
                " or the file was modified"
            ) from None
        # `from None` throughout: a decoding error would carry (a part of) the plaintext.
        try:
            data = json.loads(plain)
        except ValueError:
            raise damaged from None
        if not isinstance(data, dict) or not all(
            isinstance(users, dict)
            and all(isinstance(u, str) and isinstance(p, str) for u, p in users.items())
            for users in data.values()
        ):
            raise damaged
        return data

    # -- the key -------------------------------------------------------------------------------

    def _key(self, *, create: bool) -> bytes:
        """The key; with `create`, generate it if missing (only writes do)."""
        path = self.key_path
        managed = _under_credentials_directory(path)
        try:
            return _read_key(path, managed=managed)
        except FileNotFoundError:
            if not create or managed:
                raise KeyFileError(
                    f"key file {path} is missing; {self.path} cannot be opened without it"
                ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        return _create_key(path)

    # -- writing -------------------------------------------------------------------------------

    def _update(self, change: Callable[[Secrets], None]) -> None:
        """Apply `change` to the current mapping and replace the file, under the write lock."""
        path = self.path
        parent = path.parent
        if not parent.is_dir():
            os.makedirs(parent, mode=0o700, exist_ok=True)
        lock_fd = os.open(
            f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _PRIVATE
        )
        try:
            # Closing the descriptor (or the process dying) releases the lock.
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            data = {service: dict(users) for service, users in self._load().items()}
            change(data)
            blob = _encrypt(self._key(create=True), data)
            _remove_stale_temps(parent, path.name)
            temp = _write_temp(parent, path.name, blob)
            try:
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
            _fsync_dir(parent)
            st = os.stat(path)
            trusted = time.time_ns() - st.st_mtime_ns > _RACY_WINDOW_NS
            self._cache = _Cached(path, _ident(st), trusted, data)
        finally:
            os.close(lock_fd)


def _encrypt(key: bytes, data: Secrets) -> bytes:
    nonce = os.urandom(NONCE_SIZE)  # fresh per write: GCM must never reuse a nonce under a key
    plain = json.dumps(data, separators=(",", ":")).encode()
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(AESGCM(key).encrypt(nonce, plain, _AAD)).decode(),
    }
    return (json.dumps(doc) + "\n").encode()


def _under_credentials_directory(path: Path) -> bool:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return False
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(credentials))


def _read_key(path: Path, *, managed: bool) -> bytes:
    """Read a key file: raw 32 bytes or their base64; refuse one open to group or others."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode & 0o777
        # systemd manages the modes under $CREDENTIALS_DIRECTORY itself.
        if not managed and mode & 0o077:
            raise KeyFileError(
                f"key file {path} is open to group or others (mode {mode:04o}); chmod 600 it"
            )
        raw = file.read(4096)
    if len(raw) == KEY_SIZE:
        return raw
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"key file {path} must hold a {KEY_SIZE}-byte key, raw or base64")
    return key


def _create_key(path: Path) -> bytes:
    """Generate a key file; if another process wins the race, use its key instead."""
    parent = path.parent
    if not parent.is_dir():
        os.makedirs(parent, mode=0o700, exist_ok=True)
    key = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
    temp = _write_temp(parent, path.name, base64.b64encode(key) + b"\n")
    try:
        # link() publishes a complete file or fails if one exists: no reader sees a partial key.
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    _fsync_dir(parent)
    return _read_key(path, managed=False)


def _write_temp(directory: Path, base: str, data: bytes) -> str:
    """Write `data` to a new private temp file beside `base`, fsynced; return its path."""
    temp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temp, flags, _PRIVATE)
    try:
        os.fchmod(fd, _PRIVATE)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    return temp


def _remove_stale_temps(directory: Path, base: str) -> None:
    """Remove temp files left by a writer that died; only call this under the write lock."""
    pattern = re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{16}}\.tmp")
    with os.scandir(directory) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
