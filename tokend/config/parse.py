"""`load_config` and `config_from_mapping`: parsed TOML, section by section, into a `Config`."""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokend.config.types import (
    AlertSettings,
    ClientAuth,
    Config,
    ConnectorConfig,
    DaemonSettings,
    RedirectHost,
    RefreshSettings,
)
from tokend.config.values import Table, module_available, quoted, resolve_allow
from tokend.errors import ConfigError
from tokend.model import NAME_PATTERN
from tokend.paths import default_socket_path, default_state_dir

_NAME_RE = re.compile(NAME_PATTERN)
_SCOPE_TOKEN_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
# An Apprise URL: a scheme, "://", then anything printable without spaces (each plugin parses the
# rest itself, so the daemon checks the form here and lets Apprise judge the details at start).
_APPRISE_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[\x21-\x7e]*")
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path on Linux, less the terminating NUL
_CLIENT_AUTHS: tuple[ClientAuth, ...] = ("client_secret_basic", "client_secret_post", "none")
_REFRESH_KEYS = ("skew", "min_interval", "max_interval", "default_lifetime")
_POSITIVE_REFRESH_KEYS = ("max_interval", "default_lifetime")
_CONNECTOR_KEYS = (
    "token_url", "issuer", "mcp_url", "authorization_url", "device_authorization_url",
    "revocation_url", "client_id", "client_auth", "client_metadata_url", "scope", "resource",
    "redirect_host", "redirect_port", "allow", "ca_file",
)  # fmt: skip
_SOURCE_KEYS = ("token_url", "issuer", "mcp_url")
_EXPLICIT_ENDPOINTS = ("authorization_url", "device_authorization_url", "revocation_url")
_REDIRECT_HOSTS: tuple[RedirectHost, ...] = ("127.0.0.1", "localhost")


def _refresh(table: Table, base: RefreshSettings) -> RefreshSettings:
    """`base` with the table's refresh durations over it (negatives cannot be written)."""
    changes: dict[str, Any] = {}
    for key in _REFRESH_KEYS:
        value = table.duration(key, positive=key in _POSITIVE_REFRESH_KEYS)
        if value is not None:
            changes[key] = value
    return replace(base, **changes)


def _daemon(table: Table, env: Mapping[str, str] | None, uid: int | None) -> DaemonSettings:
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
            table.fail("socket_group", f"no such group {quoted(group)}")
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


def _apprise_urls(table: Table) -> tuple[str, ...]:
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


def _alerts(table: Table) -> AlertSettings:
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


def _client_auth(table: Table) -> ClientAuth:
    value = table.string("client_auth")
    if value is None:
        return "client_secret_basic"
    for option in _CLIENT_AUTHS:
        if value == option:
            return option
    table.fail("client_auth", "must be one of " + ", ".join(quoted(o) for o in _CLIENT_AUTHS))


def _scope(table: Table) -> str | None:
    value = table.string("scope")
    if value is None:
        return None
    tokens = [token for token in value.split(" ") if token]
    if not tokens:
        table.fail("scope", "must not be empty (leave the key out to send no scope)")
    if not all(_SCOPE_TOKEN_RE.fullmatch(token) for token in tokens):
        table.fail("scope", "must be scope tokens separated by spaces (RFC 6749 §3.3)")
    return " ".join(tokens)


def _source(table: Table) -> tuple[str | None, str | None, str | None]:
    """`token_url`, `issuer` and `mcp_url`: exactly one of them says where the endpoints are."""
    given = [key for key in _SOURCE_KEYS if key in table.data]
    if not given:
        table.fail("token_url", "is required (or issuer, or mcp_url, to discover it)")
    if len(given) > 1:
        table.fail(given[1], f"cannot be combined with {given[0]}: set exactly one")
    token_url = table.endpoint_url("token_url")
    issuer = table.endpoint_url("issuer")
    if issuer is not None and ("?" in issuer or issuer.endswith("/")):
        table.fail("issuer", "must have no query and no trailing slash (RFC 8414 §2)")
    mcp_url = table.endpoint_url("mcp_url")
    for key in _EXPLICIT_ENDPOINTS:
        if key in table.data and token_url is None:
            table.fail(key, "comes from discovery with issuer/mcp_url; set it only with token_url")
    return token_url, issuer, mcp_url


def _redirect(table: Table) -> tuple[RedirectHost, int]:
    host: RedirectHost = "127.0.0.1"
    value = table.string("redirect_host")
    if value is not None:
        for option in _REDIRECT_HOSTS:
            if value == option:
                host = option
                break
        else:
            table.fail("redirect_host", 'must be "127.0.0.1" or "localhost" (RFC 8252 §7.3)')
    port = table.data.get("redirect_port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        table.fail("redirect_port", "must be a port number from 1 to 65535 (or 0 for any)")
    return host, port


def _connector(name: str, table: Table, refresh: RefreshSettings) -> ConnectorConfig:
    table.check_keys((*_CONNECTOR_KEYS, *_REFRESH_KEYS), connector=name)
    token_url, issuer, mcp_url = _source(table)
    client_id = table.nonempty("client_id")
    if client_id is None and token_url is not None:
        table.fail("client_id", "is required with token_url (issuer/mcp_url can register one)")
    metadata_url = table.endpoint_url("client_metadata_url")
    if metadata_url is not None and client_id is not None:
        table.fail("client_metadata_url", "cannot be combined with client_id: set one of them")
    if metadata_url is not None and token_url is not None:
        table.fail("client_metadata_url", "needs issuer or mcp_url (the server must support it)")
    resource_text = table.string("resource")
    opt_out = resource_text == ""
    allow = table.strings("allow") or []
    ca_file = table.path("ca_file")
    if ca_file is not None and not os.path.isfile(ca_file):
        table.fail("ca_file", "must name an existing file")
    redirect_host, redirect_port = _redirect(table)
    return ConnectorConfig(
        name=name,
        token_url=token_url,
        client_id=client_id,
        client_auth=_client_auth(table),
        scope=_scope(table),
        resource=None if opt_out else table.resource_url("resource"),
        resource_opt_out=opt_out,
        issuer=issuer,
        mcp_url=mcp_url,
        authorization_url=table.endpoint_url("authorization_url"),
        device_authorization_url=table.endpoint_url("device_authorization_url"),
        revocation_url=table.endpoint_url("revocation_url"),
        client_metadata_url=metadata_url,
        redirect_host=redirect_host,
        redirect_port=redirect_port,
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
    root = Table(source, (), data)
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
    except (ValueError, RecursionError) as exc:  # an integer over 4300 digits; [[[[… recurses
        raise ConfigError(f"{source}: a number is too long or the tables nest too deeply") from exc
    return replace(config_from_mapping(data, source=source, env=env, uid=uid), path=path)
