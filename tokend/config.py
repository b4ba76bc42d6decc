"""Configuration: `load_config(path) -> Config`, TOML (`tomllib`) into validated frozen dataclasses.

Loading never logs and never exits; every problem is a `ConfigError` whose one-line message names
the file, the key and the reason (`config.toml: connectors.github.token_url: must be an https URL`).
No secrets live in the file. `config_from_mapping` is the pure validator behind `load_config`;
`default_config_path`, `default_socket_path` and `default_state_dir` give the places used when
neither the file nor a flag names one. Users and groups in `allow` are resolved at load.
"""

from __future__ import annotations

import difflib
import grp
import importlib.util
import ipaddress
import json
import os
import pwd
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import SplitResult, urlsplit

from tokend.errors import ConfigError
from tokend.model import NAME_PATTERN

# The default places live in `paths` (light, for client commands); re-exported for config's callers.
from tokend.paths import default_config_path as default_config_path
from tokend.paths import default_socket_path as default_socket_path
from tokend.paths import default_state_dir as default_state_dir

ClientAuth = Literal["client_secret_basic", "client_secret_post", "none"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshSettings:
    """When to refresh (DESIGN §2); `[refresh]` gives defaults, each connector may override."""

    skew: timedelta = timedelta(minutes=5)
    min_interval: timedelta = timedelta(seconds=10)
    max_interval: timedelta = timedelta(days=7)
    default_lifetime: timedelta = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class AllowRule:
    """One `allow` entry resolved to a number: kind "uid" or "gid" (names resolved at load)."""

    kind: Literal["uid", "gid"]
    id: int
    text: str  # as written, for messages


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonSettings:
    socket: Path
    socket_group: str | None = None
    state_dir: Path
    keyring_service: str = "tokend"
    keyring_backend: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertSettings:
    """Where alerts go (DESIGN §7): an argv, a webhook URL and Apprise URLs, any combination."""

    exec: tuple[str, ...] | None = None
    webhook: str | None = None
    apprise: tuple[str, ...] = ()  # Apprise URLs; they may hold a service token, so never logged
    repeat: timedelta = timedelta(hours=6)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorConfig:
    name: str
    token_url: str
    client_id: str
    client_auth: ClientAuth = "client_secret_basic"
    scope: str | None = None
    resource: str | None = None
    allow: tuple[AllowRule, ...] = ()
    ca_file: Path | None = None
    refresh: RefreshSettings = field(default_factory=RefreshSettings)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    daemon: DaemonSettings
    refresh: RefreshSettings = field(default_factory=RefreshSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    connectors: Mapping[str, ConnectorConfig] = field(default_factory=dict)


# --- durations and allow rules -------------------------------------------------------------------

_DURATION_HINT = 'expected a duration like "30s", "5m", "2h", "7d" or integer seconds'
_DURATION_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_KEYWORD = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _quote(text: str) -> str:
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
        raise ConfigError(f"{where}: {_quote(text)}: {kind} must be a number below 4294967295")
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
            raise ConfigError(f"{where}: no such user {_quote(value)}") from None
    if sep and kind == "group":
        try:
            return AllowRule(kind="gid", id=grp.getgrnam(value).gr_gid, text=text)
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: no such group {_quote(value)}") from None
    raise ConfigError(
        f'{where}: {_quote(text)} is not "user:NAME", "group:NAME", "uid:N" or "gid:N"'
    )


# --- the validator -------------------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_NAME_RE = re.compile(NAME_PATTERN)
_SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
# An Apprise URL: a scheme, "://", then anything printable without spaces (each plugin parses the
# rest itself, so the daemon checks the form here and lets Apprise judge the details at start).
_APPRISE_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[\x21-\x7e]*")
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path on Linux, less the terminating NUL
_CLIENT_AUTHS: tuple[ClientAuth, ...] = ("client_secret_basic", "client_secret_post", "none")
_REFRESH_KEYS = ("skew", "min_interval", "max_interval", "default_lifetime")
_POSITIVE_REFRESH_KEYS = ("max_interval", "default_lifetime")
_CONNECTOR_KEYS = ("token_url", "client_id", "client_auth", "scope", "resource", "allow", "ca_file")
_DISCOVERY_KEYS = ("issuer", "mcp_url")
# Keys that would hold a secret, and the command that stores that secret where it belongs.
_SECRET_KEYS = dict.fromkeys(("client_secret", "secret", "password", "api_key"), "secret") | (
    dict.fromkeys(("access_token", "refresh_token", "id_token", "token"), "import")
)


def _dotted(keys: tuple[str, ...]) -> str:
    """Keys joined as TOML writes them: bare where possible, else quoted (one line either way)."""
    return ".".join(key if _BARE_KEY_RE.fullmatch(key) else _quote(key) for key in keys)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Table:
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
            if connector is not None and key in _DISCOVERY_KEYS:
                self.fail(
                    key,
                    "discovery (issuer/mcp_url) is not supported in this version; set token_url",
                )
            command = _SECRET_KEYS.get(key.lower().replace("-", "_"))
            if command is not None:
                self.fail(
                    key,
                    "secrets do not belong in the config file; "
                    f"use `tokend {command} {connector or 'NAME'}`",
                )
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            self.fail(key, "unknown key" + (f"; did you mean {_quote(close[0])}?" if close else ""))

    def table(self, key: str) -> _Table:
        value = self.data.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(key, "expected a table")
        return _Table(self.source, (*self.keys, key), value)

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
            parts.scheme == "http" and _is_loopback(parts.hostname or "")
        ):
            self.fail(key, "must be an https URL (http is allowed only for loopback hosts)")
        return value

    def resource_url(self, key: str) -> str | None:
        """An RFC 8707 resource indicator: an absolute URL without a fragment."""
        found = self._url(key)
        return None if found is None else found[0]


def _refresh(table: _Table, base: RefreshSettings) -> RefreshSettings:
    """`base` with the table's refresh durations over it (negatives cannot be written)."""
    changes: dict[str, Any] = {}
    for key in _REFRESH_KEYS:
        value = table.duration(key, positive=key in _POSITIVE_REFRESH_KEYS)
        if value is not None:
            changes[key] = value
    return replace(base, **changes)


def _daemon(table: _Table, env: Mapping[str, str] | None, uid: int | None) -> DaemonSettings:
    table.check_keys(("socket", "socket_group", "state_dir", "keyring_service", "keyring_backend"))
    changes: dict[str, Any] = {}
    socket = table.path("socket")
    if socket is not None:
        if len(os.fsencode(socket)) > _SUN_PATH_MAX:
            table.fail("socket", f"is too long for a unix socket (at most {_SUN_PATH_MAX} bytes)")
        changes["socket"] = socket
    group = table.nonempty("socket_group")
    if group is not None:
        try:
            grp.getgrnam(group)
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            table.fail("socket_group", f"no such group {_quote(group)}")
        changes["socket_group"] = group
    state_dir = table.path("state_dir")
    if state_dir is not None:
        changes["state_dir"] = state_dir
    service = table.nonempty("keyring_service")
    if service is not None:
        changes["keyring_service"] = service
    backend = table.string("keyring_backend")
    if backend:  # "" means keyring's own choice, as if the key were absent
        parts = backend.split(".")
        if len(parts) < 2 or not all(part.isidentifier() for part in parts):
            table.fail(
                "keyring_backend",
                'expected a dotted class path like "keyring.backends.SecretService.Keyring"',
            )
        changes["keyring_backend"] = backend
    defaults = DaemonSettings(
        socket=default_socket_path(env, uid), state_dir=default_state_dir(env, uid)
    )
    return replace(defaults, **changes)


def module_available(name: str) -> bool:
    """Whether `import name` would find the module, without importing it (a cheap check at load)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return False


def _apprise_urls(table: _Table) -> tuple[str, ...]:
    urls = table.strings("apprise")
    if not urls:
        return ()
    for number, url in enumerate(urls, 1):
        # Apprise URLs often carry a service token: messages give the entry's number, never the URL.
        if not _APPRISE_URL_RE.fullmatch(url):
            table.fail(
                "apprise",
                f'entry {number} is not an Apprise URL like "ntfy://ntfy.example/topic" '
                "(a scheme, ://, no spaces)",
            )
        if url in urls[: number - 1]:
            table.fail("apprise", f"entry {number} repeats entry {urls.index(url) + 1}")
    if not module_available("apprise"):
        table.fail(
            "apprise",
            "is set but apprise is not installed: pip install tokend[apprise] (or remove the key)",
        )
    return tuple(urls)


def _alerts(table: _Table) -> AlertSettings:
    table.check_keys(("exec", "webhook", "apprise", "repeat"))
    changes: dict[str, Any] = {}
    argv = table.strings("exec")
    if argv is not None:
        if not argv:
            table.fail("exec", "must not be empty")
        if any("\0" in arg for arg in argv):
            table.fail("exec", "must not contain a NUL character")
        if not argv[0].startswith("/"):
            table.fail("exec", "the first element must be an absolute path")
        changes["exec"] = tuple(argv)
    webhook = table.endpoint_url("webhook")
    if webhook is not None:
        changes["webhook"] = webhook
    changes["apprise"] = _apprise_urls(table)
    repeat = table.duration("repeat", positive=True)
    if repeat is not None:
        changes["repeat"] = repeat
    return replace(AlertSettings(), **changes)


def _client_auth(table: _Table) -> ClientAuth:
    value = table.string("client_auth")
    if value is None:
        return "client_secret_basic"
    for option in _CLIENT_AUTHS:
        if value == option:
            return option
    table.fail("client_auth", "must be one of " + ", ".join(_quote(o) for o in _CLIENT_AUTHS))


def _scope(table: _Table) -> str | None:
    value = table.string("scope")
    if value is None:
        return None
    tokens = [token for token in value.split(" ") if token]
    if not tokens:
        table.fail("scope", "must not be empty (leave the key out to send no scope)")
    if not all(_SCOPE_TOKEN_RE.fullmatch(token) for token in tokens):
        table.fail("scope", "must be scope tokens separated by spaces (RFC 6749 §3.3)")
    return " ".join(tokens)


def _connector(name: str, table: _Table, refresh: RefreshSettings) -> ConnectorConfig:
    table.check_keys((*_CONNECTOR_KEYS, *_REFRESH_KEYS), connector=name)
    token_url = table.endpoint_url("token_url")
    if token_url is None:
        table.fail("token_url", "is required")
    client_id = table.nonempty("client_id")
    if client_id is None:
        table.fail("client_id", "is required")
    allow = table.strings("allow") or []
    ca_file = table.path("ca_file")
    if ca_file is not None and not os.path.isfile(ca_file):
        table.fail("ca_file", "must name an existing file")
    return ConnectorConfig(
        name=name,
        token_url=token_url,
        client_id=client_id,
        client_auth=_client_auth(table),
        scope=_scope(table),
        resource=table.resource_url("resource"),
        allow=tuple(resolve_allow(text, where=table.where("allow")) for text in allow),
        ca_file=ca_file,
        refresh=_refresh(table, refresh),
    )


def config_from_mapping(
    data: Mapping[str, object],
    *,
    source: str,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> Config:
    """Validate parsed TOML into a `Config` (with `path` None); `source` names the file in messages.

    `env` and `uid` (default: the process's) choose the default socket and state directory.
    Raises ConfigError "<source>: <dotted.key>: <reason>" at the first problem.
    """
    root = _Table(source, (), data)
    root.check_keys(("daemon", "refresh", "alerts", "connectors"))
    refresh_table = root.table("refresh")
    refresh_table.check_keys(_REFRESH_KEYS)
    refresh = _refresh(refresh_table, RefreshSettings())
    section = root.table("connectors")
    connectors: dict[str, ConnectorConfig] = {}
    for name in section.data:
        if not _NAME_RE.fullmatch(name):
            section.fail(name, f"connector names must match {NAME_PATTERN}")
        connectors[name] = _connector(name, section.table(name), refresh)
    return Config(
        path=None,
        daemon=_daemon(root.table("daemon"), env, uid),
        refresh=refresh,
        alerts=_alerts(root.table("alerts")),
        connectors=connectors,
    )


def load_config(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
    missing_ok: bool = False,
) -> Config:
    """Read and validate the TOML file at `path`.

    A missing file is an error unless `missing_ok`, which gives the defaults, no connectors and
    `path` None. Raises ConfigError naming the file (and, when it parsed, the key).
    """
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not missing_ok:
            raise ConfigError(f"{source}: no such file") from None
        return config_from_mapping({}, source=source, env=env, uid=uid)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return replace(config_from_mapping(data, source=source, env=env, uid=uid), path=path)
