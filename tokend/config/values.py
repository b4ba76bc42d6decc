"""Value parsers and the `Table` walker behind `config_from_mapping`.

`parse_duration` and `resolve_allow` read one value each; `Table` wraps one TOML table and reads
typed values from it, raising ConfigError "<file>: <dotted.key>: <reason>" at the first problem.
"""

from __future__ import annotations

import difflib
import grp
import importlib.util
import ipaddress
import json
import pwd
import re
from collections.abc import Collection, Mapping
from datetime import timedelta
from pathlib import Path
from typing import NoReturn
from urllib.parse import SplitResult, urlsplit

from tokend.config.types import AllowRule
from tokend.errors import ConfigError

# --- durations and allow rules -------------------------------------------------------------------

_DURATION_HINT = 'expected a duration like "30s", "5m", "2h", "7d" or integer seconds'
_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_KEYWORD = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def quoted(text: str) -> str:
    """`text` in double quotes with escapes, so a message stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def parse_duration(value: object, *, where: str) -> timedelta:
    """A duration: a string of number+unit parts ("30s", "1h30m", "1.5h", "500ms"; units ms, s, m,
    h, d) or non-negative integer seconds.

    Floats are refused, as are booleans: the contract says integer seconds, and a fraction reads
    more clearly as "1.5s" or "1500ms" (and a float could be inf or nan). Negative durations
    cannot be written. Raises ConfigError "<where>: <reason>".
    """
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{where}: must not be negative")
            return timedelta(seconds=value)
        if isinstance(value, str) and _DURATION_RE.fullmatch(value):
            total = timedelta()
            for number, unit in _DURATION_PART_RE.findall(value):
                total += timedelta(**{_UNIT_KEYWORD[unit]: float(number)})
            return total
    except OverflowError:
        raise ConfigError(f"{where}: duration is too long") from None
    raise ConfigError(f"{where}: {_DURATION_HINT}")


def _parse_id(kind: str, number: str, where: str, text: str) -> int:
    # uid_t/gid_t are 32 bits and (uid_t)-1 means "no change", so it names nobody.
    if not (number.isascii() and number.isdigit()) or int(number) >= 2**32 - 1:
        raise ConfigError(f"{where}: {quoted(text)}: {kind} must be a number below 4294967295")
    return int(number)


def resolve_allow(text: str, *, where: str) -> AllowRule:
    """One `allow` entry ("user:NAME", "uid:N", "group:NAME", "gid:N"), names resolved now.

    Raises ConfigError naming `where` when the syntax is wrong or the user or group is unknown.
    """
    kind, sep, value = text.partition(":")
    if sep and kind == "uid":
        return AllowRule(kind="uid", id=_parse_id(kind, value, where, text), text=text)
    if sep and kind == "gid":
        return AllowRule(kind="gid", id=_parse_id(kind, value, where, text), text=text)
    if sep and kind == "user":
        try:
            return AllowRule(kind="uid", id=pwd.getpwnam(value).pw_uid, text=text)
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            raise ConfigError(f"{where}: no such user {quoted(value)}") from None
    if sep and kind == "group":
        try:
            return AllowRule(kind="gid", id=grp.getgrnam(value).gr_gid, text=text)
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: no such group {quoted(value)}") from None
    raise ConfigError(
        f'{where}: {quoted(text)} is not "user:NAME", "group:NAME", "uid:N" or "gid:N"'
    )


def module_available(name: str) -> bool:
    """Whether `import name` would find the module, without importing it (a cheap check at load)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


# --- the table walker ----------------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# Keys that would hold a secret, and the command that stores that secret where it belongs.
_SECRET_KEYS = dict.fromkeys(("client_secret", "secret", "password", "api_key"), "secret") | (
    dict.fromkeys(("access_token", "refresh_token", "id_token", "token"), "import")
)


def _dotted(keys: tuple[str, ...]) -> str:
    """Keys joined as TOML writes them: bare where possible, else quoted (one line either way)."""
    return ".".join(key if _BARE_KEY_RE.fullmatch(key) else quoted(key) for key in keys)


def is_loopback_host(host: str) -> bool:
    """ "localhost" or a loopback IP address: where plain http cannot be overheard."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Table:
    """One TOML table with the file name and dotted key its messages need."""

    def __init__(self, source: str, keys: tuple[str, ...], data: Mapping[str, object]) -> None:
        self.source = source
        self.keys = keys
        self.data = data

    def where(self, key: str) -> str:
        return f"{self.source}: {_dotted((*self.keys, key))}"

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(f"{self.where(key)}: {reason}")

    def check_keys(self, allowed: Collection[str], *, connector: str | None = None) -> None:
        """Refuse keys outside `allowed`, with a specific word for secrets and discovery keys."""
        for key in self.data:
            if key in allowed:
                continue
            command = _SECRET_KEYS.get(key.lower().replace("-", "_"))
            if command is not None:
                self.fail(
                    key,
                    "secrets do not belong in the config file; "
                    f"use `tokend {command} {connector or 'NAME'}`",
                )
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            self.fail(key, "unknown key" + (f"; did you mean {quoted(close[0])}?" if close else ""))

    def table(self, key: str) -> Table:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(key, "expected a table")
        return Table(self.source, (*self.keys, key), value)

    def string(self, key: str) -> str | None:
        value = self.data.get(key)  # TOML has no null: None means the key is absent
        if value is not None and not isinstance(value, str):
            self.fail(key, "expected a string")
        return value

    def nonempty(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and not value.strip():
            self.fail(key, "must not be empty")
        return value

    def path(self, key: str) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        if "\0" in value:
            self.fail(key, "must not contain a NUL character")
        if not value.startswith("/"):
            self.fail(key, "must be an absolute path")
        return Path(value)

    def strings(self, key: str) -> list[str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(key, "expected a list of strings")
        return value

    def duration(self, key: str, *, positive: bool = False) -> timedelta | None:
        value = self.data.get(key)
        if value is None:
            return None
        duration = parse_duration(value, where=self.where(key))
        if positive and duration <= timedelta(0):
            self.fail(key, "must be greater than zero")
        return duration

    def _url(self, key: str) -> tuple[str, SplitResult] | None:
        value = self.string(key)
        if value is None:
            return None
        if any(ch <= " " or ch == "\x7f" for ch in value):
            self.fail(key, "is not a valid URL (it contains a space or control character)")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  # parses the port, raising ValueError when it is not a number
        except ValueError:
            self.fail(key, "is not a valid URL")
        if parts.username is not None or parts.password is not None:
            self.fail(key, "must not contain a user name or password; secrets do not belong here")
        if "#" in value:
            self.fail(key, "must not contain a fragment")
        if not parts.scheme or not parts.hostname:
            self.fail(key, 'must be an absolute URL like "https://host.example/path"')
        return value, parts

    def endpoint_url(self, key: str) -> str | None:
        """An URL tokend sends requests to: https, or http to a loopback host only."""
        found = self._url(key)
        if found is None:
            return None
        value, parts = found
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback_host(parts.hostname or "")
        ):
            self.fail(key, "must be an https URL (http is allowed only for loopback hosts)")
        return value

    def resource_url(self, key: str) -> str | None:
        """An RFC 8707 resource indicator: an absolute URL without a fragment."""
        found = self._url(key)
        return None if found is None else found[0]
