"""`EncryptedFile`: the items, the header, the migration from version 1 (see the package
docstring for the layout and the guarantees)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokend.encrypted_file.files import (
    FORMAT,
    HEADER_AAD,
    ITEM_AAD_PREFIX,
    ITEM_FORMAT,
    ITEM_NAME,
    ITEM_TEMP,
    KEY_CHECK,
    LEGACY_AAD,
    LEGACY_VERSION,
    NAMES_LABEL,
    NONCE_SIZE,
    PRIVATE_MODE,
    VERSION,
    EncryptedFileError,
    KeyFileError,
    KeyMismatchError,
    NotStoredError,
    Secrets,
    WriteError,
    create_key,
    default_file_path,
    default_key_path,
    fsync_dir,
    read_key,
    remove_stale_temps,
    replace_file,
    sealed_doc,
    under_credentials_directory,
    write_atomic,
)


class _Header(NamedTuple):
    version: int
    nonce: bytes
    ciphertext: bytes
    ident: tuple[int, int, int, int]


def _ident(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class EncryptedFile:
    """AES-256-GCM encrypted files of secrets; settings `file_path` and `key_file` (str).

    Like keyring backends, it takes `KEYRING_PROPERTY_FILE_PATH` / `KEYRING_PROPERTY_KEY_FILE`
    from the environment as these settings. An empty `key_file` means
    `default_key_path(file_path)`. Safe to use from several threads and processes at once.
    """

    file_path: str
    key_file: str
    concurrent_calls_safe = True  # an flock and atomic renames: callers need not serialise

    def __init__(
        self, file_path: str | os.PathLike[str] | None = None, key_file: str | None = None
    ) -> None:
        self.file_path = str(default_file_path())
        self.key_file = ""
        self._verified: tuple[Path, tuple[int, int, int, int], bytes] | None = None
        self._names: tuple[bytes, bytes] | None = None  # (key, file-name key)
        self._swept: Path | None = None  # items directory whose stale temp files are gone
        self.apply_environment()
        if file_path is not None:
            self.file_path = os.fspath(file_path)
        if key_file is not None:
            self.key_file = key_file

    def apply_environment(self) -> None:
        """Take `KEYRING_PROPERTY_FILE_PATH` and `KEYRING_PROPERTY_KEY_FILE`, as keyring would."""
        for name in ("file_path", "key_file"):
            value = os.environ.get(f"KEYRING_PROPERTY_{name.upper()}")
            if value is not None:
                setattr(self, name, value)

    @property
    def path(self) -> Path:
        """The keyring's header file (a version-1 keyring: the whole keyring), absolute."""
        return Path(os.path.abspath(os.path.expanduser(self.file_path)))

    @property
    def items_path(self) -> Path:
        """The directory of item files, beside the header."""
        path = self.path
        return path.with_name(path.name + ".d")

    @property
    def key_path(self) -> Path:
        """The key file, absolute."""
        if self.key_file:
            return Path(os.path.abspath(os.path.expanduser(self.key_file)))
        return Path(os.path.abspath(default_key_path(self.path)))

    # -- the keyring-like API -------------------------------------------------------------------

    def get_password(self, service: str, username: str) -> str | None:
        """The stored password, or None; raises EncryptedFileError if the keyring cannot be
        opened."""
        key, legacy = self._open_for_reading()
        if legacy is not None:
            return legacy.get(service, {}).get(username)
        if key is None:
            return None
        return self._read_item(key, service, username)

    def first_item(self, service: str) -> tuple[str, str] | None:
        """(username, password) of one item stored for `service` (the first by file name)."""
        key, legacy = self._open_for_reading()
        if legacy is not None:
            users = legacy.get(service)
            return next(iter(users.items())) if users else None
        if key is None:
            return None
        for item_service, item_user, password in self._all_items(key):
            if item_service == service:
                return item_user, password
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        """Store `password`; raises WriteError if the keyring cannot be written."""
        if not isinstance(password, str):
            raise TypeError("password must be a str")
        try:
            with self._write_lock():
                key = self._open_for_writing(create=True)
                if key is None:
                    raise AssertionError("unreachable: create=True always gives a key")
                self._write_item(key, service, username, password)
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def delete_password(self, service: str, username: str) -> None:
        """Delete the password; raises NotStoredError if none is stored."""
        missing = NotStoredError(f"no password for {username!r} on {service!r} in {self.path}")
        try:
            with self._write_lock():
                key = self._open_for_writing(create=False)
                if key is None:
                    raise missing
                item = self.items_path / self._item_name(key, service, username)
                try:
                    os.unlink(item)
                except FileNotFoundError:
                    raise missing from None
                fsync_dir(item.parent)
        except OSError as exc:
            raise EncryptedFileError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    # -- the header ----------------------------------------------------------------------------

    def _damaged(self, path: Path) -> EncryptedFileError:
        return EncryptedFileError(f"{path} is not a readable tokend keyring file (damaged?)")

    def _read_header(self) -> _Header | None:
        """The header (or a version-1 file), parsed but not decrypted; None if there is none."""
        path = self.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EncryptedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "rb") as file:
                ident = _ident(os.fstat(file.fileno()))
                blob = file.read()
        except OSError as exc:
            raise EncryptedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            doc = json.loads(blob)
        except ValueError:
            raise self._damaged(path) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise self._damaged(path)
        version = doc.get("version")
        if version not in (VERSION, LEGACY_VERSION):
            raise EncryptedFileError(f"{path}: unsupported tokend keyring file version")
        nonce, ciphertext = self._sealed(path, doc)
        return _Header(version, nonce, ciphertext, ident)

    def _sealed(self, path: Path, doc: dict[str, object]) -> tuple[bytes, bytes]:
        try:
            nonce = base64.b64decode(doc["nonce"], validate=True)  # type: ignore[arg-type]
            ciphertext = base64.b64decode(doc["ciphertext"], validate=True)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise self._damaged(path) from None
        if len(nonce) != NONCE_SIZE:
            raise self._damaged(path)
        return nonce, ciphertext

    def _open_sealed(
        self, path: Path, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes
    ) -> bytes:
        try:
            return AESGCM(key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise KeyMismatchError(
                f"cannot decrypt {path}: the key in {self.key_path} does not match it,"
                " or the file was modified"
            ) from None

    def _check_key(self, header: _Header, key: bytes) -> None:
        """Prove `key` opens this keyring (once per header and key)."""
        path = self.path
        if self._verified == (path, header.ident, key):
            return
        plain = self._open_sealed(path, key, header.nonce, header.ciphertext, HEADER_AAD)
        if plain != KEY_CHECK:
            raise self._damaged(path)
        self._verified = (path, header.ident, key)

    def _legacy_items(self, header: _Header, key: bytes) -> Secrets:
        """Decrypt a version-1 file: `{service: {username: password}}`."""
        path = self.path
        plain = self._open_sealed(path, key, header.nonce, header.ciphertext, LEGACY_AAD)
        # `from None` throughout: a decoding error would carry (a part of) the plaintext.
        try:
            data = json.loads(plain)
        except ValueError:
            raise self._damaged(path) from None
        if not isinstance(data, dict) or not all(
            isinstance(users, dict)
            and all(isinstance(u, str) and isinstance(p, str) for u, p in users.items())
            for users in data.values()
        ):
            raise self._damaged(path)
        return data

    def _open_for_reading(self) -> tuple[bytes | None, Secrets | None]:
        """(key, None) for a usable keyring, (None, None) when there is none yet, or
        (key, items) for a version-1 file that could not be migrated (read it as it is)."""
        header = self._read_header()
        if header is None:
            return None, None
        key = self._key(create=False)
        if header.version == VERSION:
            self._check_key(header, key)
            return key, None
        legacy = self._legacy_items(header, key)  # proves the key before anything is written
        try:
            with self._write_lock():
                self._open_for_writing(create=False)
        except OSError:
            return key, legacy  # a read-only directory: keep reading the old file
        return key, None

    def _open_for_writing(self, *, create: bool) -> bytes | None:
        """The key of a usable keyring, under the write lock: creates the key and the header
        (with `create`) or migrates a version-1 file first. None: no keyring and not `create`."""
        header = self._read_header()
        if header is None:
            if not create:
                return None
            key = self._key(create=True)
            self._write_header(key)
            return key
        key = self._key(create=False)
        if header.version == LEGACY_VERSION:
            self._migrate(self._legacy_items(header, key), key)
        else:
            self._check_key(header, key)
        return key

    def _write_header(self, key: bytes) -> None:
        path = self.path
        nonce = os.urandom(NONCE_SIZE)  # fresh per write: GCM must never reuse a nonce under a key
        blob = sealed_doc(FORMAT, nonce, AESGCM(key).encrypt(nonce, KEY_CHECK, HEADER_AAD))
        remove_stale_temps(
            path.parent, re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{16}}\.tmp")
        )
        replace_file(path, blob)

    def _migrate(self, legacy: Secrets, key: bytes) -> None:
        """Write every item of a version-1 file into the directory, then swap the header in.

        The old file stays authoritative until the rename: item files it does not hold (left by
        a keyring that was restored from a backup, say) are removed first."""
        items = self.items_path
        self._make_items_dir()
        keep = set()
        for service, users in legacy.items():
            for username, password in users.items():
                name = self._item_name(key, service, username)
                keep.add(name)
                write_atomic(
                    items / name,
                    self._seal_item(key, name, service, username, password),
                    sync_dir=False,
                )
        with os.scandir(items) as entries:
            stale = [e.path for e in entries if ITEM_NAME.fullmatch(e.name) and e.name not in keep]
        for entry in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry)
        fsync_dir(items)
        self._write_header(key)

    # -- items ---------------------------------------------------------------------------------

    def _item_name(self, key: bytes, service: str, username: str) -> str:
        """The item's file name: an HMAC of service and username, which it does not reveal."""
        names = self._names
        if names is None or names[0] != key:
            names = (key, hmac.new(key, NAMES_LABEL, hashlib.sha256).digest())
            self._names = names
        ident = json.dumps([service, username]).encode()
        return hmac.new(names[1], ident, hashlib.sha256).hexdigest()

    def _seal_item(
        self, key: bytes, name: str, service: str, username: str, password: str
    ) -> bytes:
        nonce = os.urandom(NONCE_SIZE)  # fresh per write: GCM must never reuse a nonce under a key
        plain = json.dumps([service, username, password], separators=(",", ":")).encode()
        sealed = AESGCM(key).encrypt(nonce, plain, ITEM_AAD_PREFIX + name.encode())
        return sealed_doc(ITEM_FORMAT, nonce, sealed)

    def _open_item(self, key: bytes, path: Path, blob: bytes) -> tuple[str, str, str]:
        """Decrypt an item file: (service, username, password)."""
        try:
            doc = json.loads(blob)
        except ValueError:
            raise self._damaged(path) from None
        if not isinstance(doc, dict) or doc.get("format") != ITEM_FORMAT:
            raise self._damaged(path)
        if doc.get("version") != VERSION:
            raise EncryptedFileError(f"{path}: unsupported tokend keyring file version")
        nonce, ciphertext = self._sealed(path, doc)
        plain = self._open_sealed(
            path, key, nonce, ciphertext, ITEM_AAD_PREFIX + path.name.encode()
        )
        try:
            fields = json.loads(plain)
        except ValueError:
            raise self._damaged(path) from None
        if not (
            isinstance(fields, list)
            and len(fields) == 3
            and all(isinstance(field, str) for field in fields)
            and self._item_name(key, fields[0], fields[1]) == path.name
        ):
            raise self._damaged(path)
        return fields[0], fields[1], fields[2]

    def _read_item(self, key: bytes, service: str, username: str) -> str | None:
        path = self.items_path / self._item_name(key, service, username)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EncryptedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return self._open_item(key, path, blob)[2]

    def _all_items(self, key: bytes) -> Iterator[tuple[str, str, str]]:
        items = self.items_path
        try:
            names = sorted(e.name for e in os.scandir(items) if ITEM_NAME.fullmatch(e.name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EncryptedFileError(f"cannot read {items}: {exc.strerror or exc}") from exc
        for name in names:
            path = items / name
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                continue  # deleted meanwhile
            except OSError as exc:
                raise EncryptedFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
            yield self._open_item(key, path, blob)

    def _make_items_dir(self) -> None:
        items = self.items_path
        if not items.is_dir():
            os.makedirs(items, mode=0o700, exist_ok=True)
            fsync_dir(items.parent)
        if self._swept != items:
            remove_stale_temps(items, ITEM_TEMP)  # left by writers that died; we hold the lock
            self._swept = items

    def _write_item(self, key: bytes, service: str, username: str, password: str) -> None:
        self._make_items_dir()
        name = self._item_name(key, service, username)
        write_atomic(
            self.items_path / name,
            self._seal_item(key, name, service, username, password),
            sync_dir=True,
        )

    # -- the key -------------------------------------------------------------------------------

    def _key(self, *, create: bool) -> bytes:
        """The key; with `create`, generate it if missing (only writes do)."""
        path = self.key_path
        managed = under_credentials_directory(path)
        try:
            return read_key(path, managed=managed)
        except FileNotFoundError:
            if not create or managed:
                raise KeyFileError(
                    f"key file {path} is missing; {self.path} cannot be opened without it"
                ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        return create_key(path)

    # -- locking -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """The cross-process write lock (`flock` on `<file_path>.lock`)."""
        path = self.path
        if not path.parent.is_dir():
            os.makedirs(path.parent, mode=0o700, exist_ok=True)
        lock_fd = os.open(
            f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_MODE
        )
        try:
            # Closing the descriptor (or the process dying) releases the lock.
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)
