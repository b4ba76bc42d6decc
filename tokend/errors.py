"""The tokend exception tree and the socket API's error codes.

Imports nothing from tokend. Messages are one sentence and never contain a secret; from a provider
they quote only the `error` and `error_description` fields.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the CLI (DESIGN §6)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    NEEDS_REAUTH = 10
    BAD_REQUEST = 64
    UNAVAILABLE = 69
    TEMPORARY = 75
    FORBIDDEN = 77
    CONFIG = 78


# Socket API error code -> (HTTP status, CLI exit code) (DESIGN §5): the one table. ApiError
# refuses a code outside it (a bug, caught by tests/test_errors.py, never a silent 500).
API_ERRORS: dict[str, tuple[int, ExitCode]] = {
    "unknown_connector": (404, ExitCode.CONFIG),
    "forbidden": (403, ExitCode.FORBIDDEN),
    "needs_reauth": (503, ExitCode.NEEDS_REAUTH),
    "temporarily_unavailable": (503, ExitCode.TEMPORARY),
    "bad_request": (400, ExitCode.BAD_REQUEST),
    "internal_error": (500, ExitCode.INTERNAL),  # a bug in the daemon, or an answer not understood
}


class TokendError(Exception):
    """Base of every error tokend raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(TokendError):
    """The configuration file is missing, unparseable or invalid; the message names file and key."""

    exit_code = ExitCode.CONFIG


class StoreError(TokendError):
    """The keyring or the state file cannot be used."""

    exit_code = ExitCode.TEMPORARY


class SecretMissingError(StoreError):
    """A secret the operation needs (grant, client secret) is not stored."""


class GenerationConflictError(StoreError):
    """The stored grant changed since it was read (someone else wrote it); nothing was written."""


class KeyringUnusableError(StoreError):
    """No usable keyring backend: the daemon refuses to start rather than fall back."""

    exit_code = ExitCode.CONFIG


class StateLockedError(TokendError):
    """Another tokend holds the state directory's lock; `pid` names it when known."""

    exit_code = ExitCode.TEMPORARY

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class OAuthError(TokendError):
    """The authorization server refused the request for good (`invalid_client` and the like)."""

    exit_code = ExitCode.NEEDS_REAUTH

    def __init__(
        self,
        connector: str,
        error: str,
        description: str | None = None,
        status: int | None = None,
    ) -> None:
        self.connector = connector
        self.error = error
        self.description = description
        self.status = status
        detail = f" ({description})" if description else ""
        super().__init__(f"{connector}: token endpoint refused the grant: {error}{detail}")


class InvalidGrantError(OAuthError):
    """The refresh token is dead (`invalid_grant`): a human must re-authorize; never retried."""


class TransientError(TokendError):
    """Network error, timeout, 5xx, 429 or an unusable response: back off and retry."""

    exit_code = ExitCode.TEMPORARY

    def __init__(self, connector: str, reason: str, *, retry_after: float | None = None) -> None:
        self.connector = connector
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(f"{connector}: {reason}")


class DiscoveryError(TokendError):
    """Discovery or client registration failed; the message names the connector and the URL.

    `transient` marks network failures and 5xx/429 answers (exit 75): trying later may work.
    Anything else (missing or unusable metadata, a refused registration) is a configuration
    problem of the connector or the server (exit 78).
    """

    def __init__(self, connector: str, reason: str, *, transient: bool = False) -> None:
        self.connector = connector
        self.reason = reason
        self.transient = transient
        super().__init__(f"{connector}: {reason}")

    @property
    def exit_code(self) -> ExitCode:  # type: ignore[override]  # per instance
        return ExitCode.TEMPORARY if self.transient else ExitCode.CONFIG


class LoginError(TokendError):
    """The user's authorization did not complete: denied, expired, wrong `state`, bad paste."""

    exit_code = ExitCode.NEEDS_REAUTH

    def __init__(self, connector: str, reason: str) -> None:
        self.connector = connector
        self.reason = reason
        super().__init__(f"{connector}: {reason}")


class DaemonUnavailableError(TokendError):
    """The CLI cannot reach the daemon's socket."""

    exit_code = ExitCode.UNAVAILABLE


class SocketPermissionError(DaemonUnavailableError):
    """The daemon's socket exists but this user may not connect to it (not in its group)."""


class ApiError(TokendError):
    """An error answer of the socket API (DESIGN §5), raised by the daemon or read by the CLI.

    `code` is one of `API_ERRORS`; the HTTP status and the CLI's exit code follow from it.
    Raises ValueError for any other code: that is a bug in the caller.
    """

    def __init__(
        self,
        code: str,
        description: str,
        *,
        connector: str | None = None,
        since: str | None = None,
        action: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        if code not in API_ERRORS:
            raise ValueError(f"unknown API error code {code!r}: add it to API_ERRORS")
        super().__init__(description)
        self.code = code
        self.description = description
        self.connector = connector
        self.since = since
        self.action = action
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return API_ERRORS[self.code][0]

    @property
    def exit_code(self) -> ExitCode:  # type: ignore[override]  # derived from the code, per instance
        return API_ERRORS[self.code][1]

    def to_json(self) -> dict[str, object]:
        """The error body of the socket API; absent fields are left out."""
        body: dict[str, object] = {"error": self.code, "error_description": self.description}
        if self.connector is not None:
            body["connector"] = self.connector
        if self.since is not None:
            body["since"] = self.since
        if self.action is not None:
            body["action"] = self.action
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


def unknown_connector(name: str, where: object) -> ApiError:
    """The error for a connector name that `where` (a config file, or None) does not define."""
    place = f" in {where}" if where is not None else ""
    return ApiError(
        "unknown_connector",
        f"no connector named {name!r}{place}",
        connector=name,
        action="check the name with: tokend status",
    )
