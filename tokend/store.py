"""Where grants live: secrets in the OS keyring, non-secret state in `state.json`, and the lock
that makes one daemon the only refresher of a state directory.

The keyring holds one item per connector (service `keyring_service`, username = connector name):
the whole token set as JSON, so one write replaces it atomically. Client secrets are separate items
(`NAME:client_secret`; `:` cannot occur in a connector name). This module never logs a secret and
never falls back to plaintext or memory when the keyring is unusable. When the configuration names
tokend's own file backend, its store (`tokend.encrypted_file`) is used without loading `keyring`,
which saves the daemon about 2 MB of memory; any other backend comes through `keyring`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tokend.config import DaemonSettings
from tokend.errors import (
    GenerationConflictError,
    KeyringUnusableError,
    StateLockedError,
    StoreError,
)
from tokend.model import ConnectorState, Secret, TokenSet

logger = logging.getLogger(__name__)

T = TypeVar("T")

FILE_BACKEND = "tokend.keyring_file.EncryptedFileKeyring"
_FILE_STORE = "tokend.encrypted_file.core.EncryptedFile"  # FILE_BACKEND's store, without keyring
HEADLESS_HINT = (
    "on a host without a desktop session set keyring_backend = "
    f'"{FILE_BACKEND}" (encrypted file, key from a systemd credential) or run '
    "gnome-keyring-daemon --unlock in a D-Bus session (README: Keyring backends)"
)
# Secret Service answers these now and then under concurrent clients; a retry succeeds.
_TRANSIENT_MARKERS = (
    "ItemNotFoundException",
    "Prompt dismissed",
    "NoReply",
    "ServiceUnknown",
    "Timeout",
)
_RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0)


class SecretBackend(Protocol):
    """What KeyringStore needs of a backend: a `keyring` backend, or tokend's encrypted file."""

    def get_password(self, service: str, username: str) -> str | None: ...

    def set_password(self, service: str, username: str, password: str) -> None: ...

    def delete_password(self, service: str, username: str) -> None: ...


class GrantStore(Protocol):
    """The storage interface the daemon needs; a shared backend (a database with advisory locks)
    can implement it later so several hosts share connectors with exactly one refresher."""

    def load(self, name: str) -> TokenSet | None: ...

    def save(self, name: str, token: TokenSet, *, expected_generation: int | None) -> TokenSet: ...

    def delete(self, name: str) -> bool: ...

    def load_client_secret(self, name: str) -> Secret | None: ...

    def save_client_secret(self, name: str, secret: Secret) -> None: ...

    def lock(self, name: str) -> contextlib.AbstractContextManager[Any]: ...


def backend_name(backend: SecretBackend) -> str:
    """The backend's class path; tokend's file store answers to its keyring backend's name."""
    cls = type(backend)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return FILE_BACKEND if name == _FILE_STORE else name


def _is_transient(exc: BaseException) -> bool:
    errors = sys.modules.get("keyring.errors")  # not loaded: exc is none of keyring's errors
    if errors is not None and isinstance(exc, errors.KeyringLocked | errors.NoKeyringError):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _TRANSIENT_MARKERS)


class KeyringStore:
    """Token sets and client secrets in a `keyring` backend; every call blocks (use a thread)."""

    def __init__(
        self,
        *,
        service: str,
        backend: SecretBackend,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.service = service
        self.backend = backend
        self._sleep = sleep
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # One keyring call at a time per process: concurrent Secret Service clients are where
        # gnome-keyring raises spurious errors (and, rarely, crashes). A backend that says it is
        # safe under concurrent calls (tokend's file keyring) is not serialised.
        self._serial: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext()
            if getattr(backend, "concurrent_calls_safe", False)
            else threading.Lock()
        )

    @classmethod
    def from_settings(cls, settings: DaemonSettings) -> KeyringStore:
        """The backend named by `keyring_backend`, else keyring's own choice (environment
        `PYTHON_KEYRING_BACKEND`, `keyringrc.cfg`, then the best available).

        Raises KeyringUnusableError when the named backend cannot be loaded.
        """
        backend: SecretBackend
        try:
            named = settings.keyring_backend or os.environ.get("PYTHON_KEYRING_BACKEND")
            if named == FILE_BACKEND:
                from tokend.encrypted_file import EncryptedFile

                backend = EncryptedFile()
            else:
                import keyring.core

                if settings.keyring_backend:
                    backend = keyring.core.load_keyring(settings.keyring_backend)
                else:
                    backend = keyring.core.get_keyring()
        except Exception as exc:
            name = settings.keyring_backend or "the default keyring"
            raise KeyringUnusableError(
                f"keyring backend {name} cannot be loaded ({type(exc).__name__}: {exc}); "
                + HEADLESS_HINT
            ) from exc
        _place_file_backend(backend, settings.state_dir)
        return cls(service=settings.keyring_service, backend=backend)

    @property
    def backend_name(self) -> str:
        return backend_name(self.backend)

    def lock(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A per-connector lock inside this process; across processes the `StateDirLock` rules."""
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        return lock

    def _call(self, what: str, func: Callable[[], T]) -> T:
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                with self._serial:
                    return func()
            except Exception as exc:
                if delay is None or not _is_transient(exc):
                    raise StoreError(
                        f"keyring {self.backend_name}: {what} failed: {type(exc).__name__}"
                    ) from exc
                logger.debug("keyring %s: %s failed (attempt %d), retrying", what, attempt + 1, exc)
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover  # the loop always returns or raises

    def probe(self) -> None:
        """Write, read back and delete a probe item.

        Raises KeyringUnusableError naming the backend and the headless options.
        """
        name = self.backend_name
        if name.startswith("keyring.backends.fail."):
            raise KeyringUnusableError(
                f"no usable keyring backend (tried {name}); " + HEADLESS_HINT
            )
        user = f"probe:{os.getpid()}:{secrets.token_hex(4)}"
        value = secrets.token_urlsafe(16)
        try:
            self.backend.set_password(self.service, user, value)
            read = self.backend.get_password(self.service, user)
            self.backend.delete_password(self.service, user)
        except Exception as exc:
            raise KeyringUnusableError(
                f"keyring backend {name} is not usable ({type(exc).__name__}: {exc}); "
                + HEADLESS_HINT
            ) from exc
        if read != value:
            raise KeyringUnusableError(
                f"keyring backend {name} did not read back what was written; " + HEADLESS_HINT
            )

    def load(self, name: str) -> TokenSet | None:
        """The stored token set, or None. Raises StoreError if unreadable or corrupt."""
        text = self._read(name)
        return None if text is None else self._parse(name, text)

    def _read(self, name: str) -> str | None:
        return self._call(f"reading {name}", lambda: self.backend.get_password(self.service, name))

    def _parse(self, name: str, text: str) -> TokenSet:
        try:
            return TokenSet.from_json(text)
        except ValueError as exc:
            raise StoreError(f"keyring item {self.service}/{name} is unusable: {exc}") from None

    def save(self, name: str, token: TokenSet, *, expected_generation: int | None) -> TokenSet:
        """Write the token set, read it back, and return it with its new generation.

        `expected_generation` is the generation the caller believes is stored (0: none); when the
        store holds another one, nothing is written and GenerationConflictError is raised. None
        replaces whatever is stored (installing a new grant), even an unusable item.
        """
        stored = self._read(name)
        try:
            current_generation = 0 if stored is None else self._parse(name, stored).generation
        except StoreError:
            if expected_generation is not None:
                raise
            current_generation = 0  # a corrupt item: installing a grant is how a human repairs it
        if expected_generation is not None and current_generation != expected_generation:
            raise GenerationConflictError(
                f"{name}: stored grant changed (generation {current_generation}, "
                f"expected {expected_generation}); not overwritten"
            )
        new = token.with_generation(max(current_generation, token.generation) + 1)
        text = new.to_json()
        self._call(f"writing {name}", lambda: self.backend.set_password(self.service, name, text))
        read = self._call(
            f"reading back {name}", lambda: self.backend.get_password(self.service, name)
        )
        if read != text:
            raise StoreError(f"keyring {self.backend_name}: {name} did not read back as written")
        return new

    def delete(self, name: str) -> bool:
        """Forget the grant (even an unusable one); False when none was stored."""
        if self._read(name) is None:
            return False
        self._call(f"deleting {name}", lambda: self.backend.delete_password(self.service, name))
        return True

    def load_client_secret(self, name: str) -> Secret | None:
        user = f"{name}:client_secret"
        text = self._call(
            f"reading {name} client secret", lambda: self.backend.get_password(self.service, user)
        )
        return None if text is None else Secret(text)

    def save_client_secret(self, name: str, secret: Secret) -> None:
        user = f"{name}:client_secret"
        value = secret.reveal()
        self._call(
            f"writing {name} client secret",
            lambda: self.backend.set_password(self.service, user, value),
        )


def _place_file_backend(backend: SecretBackend, state_dir: Path) -> None:
    """Keep tokend's encrypted file beside the state unless the environment names a file."""
    if backend_name(backend) != FILE_BACKEND:
        return
    if "TOKEND_KEYRING_FILE" in os.environ or "KEYRING_PROPERTY_FILE_PATH" in os.environ:
        return
    backend.file_path = str(state_dir / "keyring.enc")  # type: ignore[attr-defined]  # our backend's setting


def ensure_private_dir(path: Path) -> None:
    """Create `path` (0700) if missing; raises StoreError if it cannot be."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot create the directory: {exc.strerror}") from exc


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Temp file, fsync, rename, fsync directory: a reader sees the old or the new file, whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateFile:
    """`state_dir/state.json`: every connector's non-secret state, written atomically, 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ConnectorState]:
        """The saved states; a missing file is empty, a corrupt one is set aside and logged."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
            entries: Mapping[str, Any] = data["connectors"]
            return {name: ConnectorState.from_dict(entry) for name, entry in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            logger.warning(
                "%s is corrupt; set aside as %s; starting from the keyring", self.path, aside
            )
            return {}

    def save(self, states: Mapping[str, ConnectorState]) -> None:
        """Replace the file atomically. Raises StoreError when the directory is unwritable."""
        body = {"version": 1, "connectors": {n: s.to_dict() for n, s in sorted(states.items())}}
        data = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write: {exc.strerror}") from exc


class StateDirLock:
    """An exclusive `flock` on `state_dir/tokend.lock`: one daemon (one refresher) per directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "tokend.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateLockedError naming the PID that holds it."""
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"PID {pid}" if pid else "another process"
            raise StateLockedError(
                f"{self.path.parent}: already in use by {holder} (another tokend is the refresher)",
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
