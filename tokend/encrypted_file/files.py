"""The encrypted file's constants, errors and file handling: where the file and its key live,
reading and creating the key (0600, or a systemd credential), and atomic writes (temp file, fsync,
rename, fsync of the directory). No secret is ever put in a message."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT = "tokend-keyring"
VERSION = 2
LEGACY_VERSION = 1  # every item in the one file; migrated on first use
ITEM_FORMAT = "tokend-keyring-item"
KEY_SIZE = 32
NONCE_SIZE = 12
CREDENTIAL_NAME = "tokend-keyring-key"
# Bind each header to its format and version: a file relabelled as another one fails to open.
HEADER_AAD = f"{FORMAT}/{VERSION}".encode()
LEGACY_AAD = f"{FORMAT}/{LEGACY_VERSION}".encode()
ITEM_AAD_PREFIX = f"{ITEM_FORMAT}/{VERSION}/".encode()  # + the item's file name
KEY_CHECK = b"tokend-keyring key check"  # the header's plaintext
NAMES_LABEL = b"tokend-keyring/2 item names"  # derives the file-name key from the key
ITEM_NAME = re.compile(r"[0-9a-f]{64}")
ITEM_TEMP = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]{16}\.tmp")
PRIVATE_MODE = 0o600

Secrets = dict[str, dict[str, str]]


class EncryptedFileError(Exception):
    """The keyring file or its key cannot be used; the message names the file, never a secret."""


class KeyFileError(EncryptedFileError):
    """The key file is missing, of the wrong size, or open to group or others."""


class KeyMismatchError(EncryptedFileError):
    """The key does not open the file: it is the wrong key, or the file was modified."""


class NotStoredError(EncryptedFileError):
    """Deleting an item that is not stored."""


class WriteError(EncryptedFileError):
    """An item could not be written (the file system refused)."""


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


def sealed_doc(fmt: str, nonce: bytes, ciphertext: bytes) -> bytes:
    doc = {
        "format": fmt,
        "version": VERSION,
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return (json.dumps(doc) + "\n").encode()


def replace_file(path: Path, blob: bytes) -> None:
    """Temp file beside `path`, fsync, rename over `path`, fsync the directory."""
    write_atomic(path, blob, sync_dir=True)


def write_atomic(path: Path, blob: bytes, *, sync_dir: bool) -> None:
    temp = _write_temp(path.parent, path.name, blob)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def under_credentials_directory(path: Path) -> bool:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return False
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(credentials))


def read_key(path: Path, *, managed: bool) -> bytes:
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


def create_key(path: Path) -> bytes:
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
    fsync_dir(parent)
    return read_key(path, managed=False)


def _write_temp(directory: Path, base: str, data: bytes) -> str:
    """Write `data` to a new private temp file beside `base`, fsynced; return its path."""
    temp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temp, flags, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # whatever the umask
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


def remove_stale_temps(directory: Path, pattern: re.Pattern[str]) -> None:
    """Remove temp files left by a writer that died; only call this under the write lock."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
