"""tokend's encrypted-file `keyring` backend, for headless hosts with no Secret Service.

The store itself is `tokend.encrypted_file`: one AES-256-GCM encrypted file per item beside a
header that proves the key, atomic writes under an `flock`, and the migration of version-1 files
(every item in one file) on first use. This module makes it a `keyring` backend and turns its
errors into keyring's (`KeyringError`, `PasswordSetError`, `PasswordDeleteError`). The daemon
uses the store directly when its configuration names this backend, without loading `keyring`.

The backend is never chosen automatically (`viable` is false), only by name:
`PYTHON_KEYRING_BACKEND=tokend.keyring_file.EncryptedFileKeyring`, `keyringrc.cfg`, or
`keyring.core.load_keyring(...)`. It must not print, log, or put a secret in an exception message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from keyring.backend import KeyringBackend
from keyring.compat import properties
from keyring.credentials import Credential, SimpleCredential
from keyring.errors import KeyringError, PasswordDeleteError, PasswordSetError

from tokend import encrypted_file
from tokend.encrypted_file import (
    CREDENTIAL_NAME,
    FORMAT,
    KEY_SIZE,
    NONCE_SIZE,
    VERSION,
    default_file_path,
    default_key_path,
)

__all__ = [
    "CREDENTIAL_NAME",
    "FORMAT",
    "KEY_SIZE",
    "NONCE_SIZE",
    "VERSION",
    "EncryptedFileError",
    "EncryptedFileKeyring",
    "KeyFileError",
    "KeyMismatchError",
    "default_file_path",
    "default_key_path",
]


class EncryptedFileError(encrypted_file.EncryptedFileError, KeyringError):
    """The keyring file or its key cannot be used; the message names the file, never a secret."""


class KeyFileError(EncryptedFileError, encrypted_file.KeyFileError):
    """The key file is missing, of the wrong size, or open to group or others."""


class KeyMismatchError(EncryptedFileError, encrypted_file.KeyMismatchError):
    """The key does not open the file: it is the wrong key, or the file was modified."""


@contextlib.contextmanager
def _keyring_errors() -> Iterator[None]:
    """Raise the store's errors as keyring's, with the same messages (and no more context)."""
    try:
        yield
    except encrypted_file.NotStoredError as exc:
        raise PasswordDeleteError(str(exc)) from None
    except encrypted_file.WriteError as exc:
        raise PasswordSetError(str(exc)) from exc.__cause__
    except encrypted_file.KeyMismatchError as exc:
        raise KeyMismatchError(str(exc)) from exc.__cause__
    except encrypted_file.KeyFileError as exc:
        raise KeyFileError(str(exc)) from exc.__cause__
    except encrypted_file.EncryptedFileError as exc:
        raise EncryptedFileError(str(exc)) from exc.__cause__


class EncryptedFileKeyring(encrypted_file.EncryptedFile, KeyringBackend):
    """`tokend.encrypted_file.EncryptedFile` as a keyring backend; settings `file_path` and
    `key_file` (str), which keyring sets from `KEYRING_PROPERTY_FILE_PATH` /
    `KEYRING_PROPERTY_KEY_FILE`. An empty `key_file` means `default_key_path(file_path)`.
    """

    def apply_environment(self) -> None:
        """keyring's own rule: every `KEYRING_PROPERTY_*` variable sets that attribute."""
        self.set_properties_from_env()

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

    def get_password(self, service: str, username: str) -> str | None:
        """The stored password, or None; raises EncryptedFileError if the keyring cannot be
        opened."""
        with _keyring_errors():
            return super().get_password(service, username)

    def get_credential(self, service: str, username: str | None) -> Credential | None:
        """The credential for `username`, or the first one stored for `service` if it is None."""
        if username is not None:
            stored = self.get_password(service, username)
            return None if stored is None else SimpleCredential(username, stored)
        with _keyring_errors():
            found = self.first_item(service)
        return None if found is None else SimpleCredential(*found)

    def set_password(self, service: str, username: str, password: str) -> None:
        """Store `password`; raises PasswordSetError if the keyring cannot be written."""
        with _keyring_errors():
            super().set_password(service, username, password)

    def delete_password(self, service: str, username: str) -> None:
        """Delete the password; raises PasswordDeleteError if none is stored."""
        with _keyring_errors():
            super().delete_password(service, username)
