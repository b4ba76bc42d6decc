"""tokend's encrypted secrets file: the store behind `tokend.keyring_file`, without `keyring`.

`EncryptedFile` holds `(service, username) -> password` items like a keyring backend does, and the
daemon uses it directly when its configuration names tokend's file backend, so that the `keyring`
package (and what it imports) is not loaded at all; `tokend.keyring_file.EncryptedFileKeyring` is
the same store as a `keyring` backend, for everyone else. Both read and write the same files.

Layout (version 2): one file per item in the directory `<file_path>.d`, each holding
`[service, username, password]` encrypted with AES-256-GCM under the 32-byte key (a file of its
own, or a systemd credential), with the item's file name as associated data. The file name is an
HMAC of service and username under a key derived from the encryption key, so names reveal nothing
and a file moved to another name fails to open. `<file_path>` itself is a small header whose
ciphertext proves the key (a wrong key is refused even for an item that is not stored). A write
costs one item, whatever the number of items.

Writes are serialised by an `flock` on `<file_path>.lock` and land by atomic rename (temp file,
fsync, rename, fsync of the directory), so concurrent writers lose nothing and a crash leaves
either the old or the new item, never a torn one. Reads take no lock.

A version-1 file (every item in the one file) is migrated on first use: every item is written
into the directory, then the header replaces the old file in one rename; until then the old file
is authoritative, so a crash during the migration loses nothing. Where the directory cannot be
written, the old file is still read.

It must not print, log, or put a secret in an exception message.
"""

from tokend.encrypted_file.core import EncryptedFile
from tokend.encrypted_file.files import (
    CREDENTIAL_NAME,
    FORMAT,
    ITEM_FORMAT,
    KEY_SIZE,
    LEGACY_VERSION,
    NONCE_SIZE,
    VERSION,
    EncryptedFileError,
    KeyFileError,
    KeyMismatchError,
    NotStoredError,
    Secrets,
    WriteError,
    default_file_path,
    default_key_path,
)

__all__ = [
    "CREDENTIAL_NAME",
    "FORMAT",
    "ITEM_FORMAT",
    "KEY_SIZE",
    "LEGACY_VERSION",
    "NONCE_SIZE",
    "VERSION",
    "EncryptedFile",
    "EncryptedFileError",
    "KeyFileError",
    "KeyMismatchError",
    "NotStoredError",
    "Secrets",
    "WriteError",
    "default_file_path",
    "default_key_path",
]
