"""Tests for tokend.config: TOML loading, validation messages, durations and default paths."""

from __future__ import annotations

import importlib.machinery
import os
import sys
import textwrap
import tomllib
import types
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

from tokend.config import (
    AlertSettings,
    AllowRule,
    Config,
    ConnectorConfig,
    DaemonSettings,
    RefreshSettings,
    config_from_mapping,
    default_config_path,
    default_socket_path,
    default_state_dir,
    load_config,
    module_available,
    parse_duration,
    resolve_allow,
)
from tokend.errors import ConfigError, ExitCode

ENV = {"HOME": "/home/test", "XDG_RUNTIME_DIR": "/run/user/1000"}
UID = 1000
DEFAULT_DAEMON = DaemonSettings(
    socket=Path("/run/user/1000/tokend/tokend.sock"),
    state_dir=Path("/home/test/.local/state/tokend"),
)
HINT = 'expected a duration like "30s", "5m", "2h", "7d" or integer seconds'
BACKEND_FORM = 'expected a dotted class path like "keyring.backends.SecretService.Keyring"'
HTTPS_ONLY = "must be an https URL (http is allowed only for loopback hosts)"
ABSOLUTE_URL = 'must be an absolute URL like "https://host.example/path"'
APPRISE_FORM = 'is not an Apprise URL like "ntfy://ntfy.example/topic" (a scheme, ://, no spaces)'


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def from_toml(text: str) -> Config:
    return config_from_mapping(
        tomllib.loads(textwrap.dedent(text)), source="config.toml", env=ENV, uid=UID
    )


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, source="config.toml", env=ENV, uid=UID)
    message = str(info.value)
    assert "\n" not in message
    return message


def with_connector(**fields: Any) -> dict[str, Any]:
    """A mapping with one connector "gh"; a field set to None is left out."""
    table = {"token_url": "https://auth.example.com/token", "client_id": "abc", **fields}
    return {"connectors": {"gh": {k: v for k, v in table.items() if v is not None}}}


# --- the whole file -------------------------------------------------------------------------------


def test_full_example_loads_into_the_expected_dataclasses(tmp_path: Path) -> None:
    """The DESIGN §4 example (https token_url, local allow entries) loads to the expected Config."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not checked here\n")
    path = write(
        tmp_path,
        f"""
        [daemon]
        socket = "/run/tokend/tokend.sock"
        socket_group = "root"
        state_dir = "/var/lib/tokend"
        keyring_service = "tokend"
        keyring_backend = ""

        [refresh]
        skew = "5m"
        min_interval = "10s"
        max_interval = "7d"
        default_lifetime = "1h"

        [alerts]
        exec = ["/usr/local/bin/page-me", "--tag", "tokend"]
        webhook = "https://ntfy.example/tokend"
        repeat = "6h"

        [connectors.github]
        token_url = "https://auth.example.com/oauth/token"
        client_id = "abc123"
        client_auth = "client_secret_basic"
        scope = "mcp offline_access"
        resource = "https://mcp.example.com/mcp"
        allow = ["user:root", "group:root", "uid:0", "gid:0"]

        [connectors."local.dev"]
        token_url = "http://127.0.0.1:8080/token"
        client_id = "dev"
        client_auth = "none"
        ca_file = "{ca_file}"
        skew = 30
        default_lifetime = "15m"
        """,
    )
    config = load_config(path, env=ENV, uid=UID)
    assert config == Config(
        path=path,
        daemon=DaemonSettings(
            socket=Path("/run/tokend/tokend.sock"),
            socket_group="root",
            state_dir=Path("/var/lib/tokend"),
            keyring_service="tokend",
            keyring_backend=None,
        ),
        refresh=RefreshSettings(),
        alerts=AlertSettings(
            exec=("/usr/local/bin/page-me", "--tag", "tokend"),
            webhook="https://ntfy.example/tokend",
            repeat=timedelta(hours=6),
        ),
        connectors={
            "github": ConnectorConfig(
                name="github",
                token_url="https://auth.example.com/oauth/token",
                client_id="abc123",
                client_auth="client_secret_basic",
                scope="mcp offline_access",
                resource="https://mcp.example.com/mcp",
                allow=(
                    AllowRule(kind="uid", id=0, text="user:root"),
                    AllowRule(kind="gid", id=0, text="group:root"),
                    AllowRule(kind="uid", id=0, text="uid:0"),
                    AllowRule(kind="gid", id=0, text="gid:0"),
                ),
            ),
            "local.dev": ConnectorConfig(
                name="local.dev",
                token_url="http://127.0.0.1:8080/token",
                client_id="dev",
                client_auth="none",
                ca_file=ca_file,
                refresh=RefreshSettings(
                    skew=timedelta(seconds=30), default_lifetime=timedelta(minutes=15)
                ),
            ),
        },
    )


def test_empty_file_gives_defaults_and_no_connectors(tmp_path: Path) -> None:
    """An empty file is valid: env-derived daemon defaults, default policy, zero connectors."""
    path = write(tmp_path, "")
    assert load_config(path, env=ENV, uid=UID) == Config(path=path, daemon=DEFAULT_DAEMON)


def test_empty_connectors_table_means_zero_connectors() -> None:
    """`[connectors]` with nothing in it is as good as no table at all."""
    assert from_toml("[connectors]\n").connectors == {}


def test_connector_overrides_merge_over_the_refresh_table() -> None:
    """A connector's durations override `[refresh]` key by key; the rest come from `[refresh]`."""
    config = from_toml(
        """
        [refresh]
        skew = "1m"
        max_interval = "2d"

        [connectors.gh]
        token_url = "https://auth.example.com/token"
        client_id = "abc"
        max_interval = "1d"
        min_interval = "0s"
        """
    )
    assert config.refresh == RefreshSettings(skew=timedelta(minutes=1), max_interval=timedelta(2))
    assert config.connectors["gh"].refresh == RefreshSettings(
        skew=timedelta(minutes=1), max_interval=timedelta(days=1), min_interval=timedelta(0)
    )


def test_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A missing config file raises ConfigError "<path>: no such file" (exit code 78)."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV, uid=UID)
    assert str(info.value) == f"{path}: no such file"
    assert info.value.exit_code == ExitCode.CONFIG


def test_missing_file_with_missing_ok_gives_defaults(tmp_path: Path) -> None:
    """With missing_ok a missing file gives the defaults, no connectors and path None."""
    config = load_config(tmp_path / "nope.toml", env=ENV, uid=UID, missing_ok=True)
    assert config == Config(path=None, daemon=DEFAULT_DAEMON)


def test_unparseable_toml_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and tomllib's line and column."""
    path = write(tmp_path, '[daemon]\nsocket = "/run/x.sock"\nstate_dir = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV, uid=UID)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "line 3" in message
    assert "\n" not in message


def test_non_utf8_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 give a ConfigError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'[daemon]\nkeyring_service = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env=ENV, uid=UID)


def test_unreadable_path_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """A path that cannot be read (a directory) gives "<path>: cannot read: <reason>"."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env=ENV, uid=UID)
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")


def test_validation_errors_from_a_file_name_the_file_path(tmp_path: Path) -> None:
    """Validation messages from load_config start with the path as given, then the dotted key."""
    path = write(tmp_path, '[refresh]\nskew = "5x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV, uid=UID)
    assert str(info.value) == f"{path}: refresh.skew: {HINT}"


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("7d", timedelta(days=7)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h3m4s5ms", timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=5)),
        ("1.5h", timedelta(minutes=90)),
        ("0.25s", timedelta(milliseconds=250)),
        ("0s", timedelta(0)),
        (0, timedelta(0)),
        (90, timedelta(seconds=90)),
    ],
)
def test_parse_duration_accepts(value: object, expected: timedelta) -> None:
    """Unit strings (also compound and decimal) and non-negative integer seconds parse."""
    assert parse_duration(value, where="here") == expected


@pytest.mark.parametrize(
    "value",
    [
        *("", "5x", "5", "s", " 5s", "5s ", "5 s", "-5s", "+5s", "1.s", ".5s", "5S", "1e3s"),
        *("\u0665s", True, False, 1.5, 30.0, float("inf"), None, [], ["5s"], {"s": 5}),
    ],
)
def test_parse_duration_rejects_with_the_hint(value: object) -> None:
    """Anything else, including bools and floats (write "1.5s"), names `where` and the forms."""
    with pytest.raises(ConfigError) as info:
        parse_duration(value, where="config.toml: refresh.skew")
    assert str(info.value) == f"config.toml: refresh.skew: {HINT}"


def test_parse_duration_rejects_negative_integers() -> None:
    """Negative integer seconds are refused with their own reason."""
    with pytest.raises(ConfigError) as info:
        parse_duration(-1, where="config.toml: refresh.skew")
    assert str(info.value) == "config.toml: refresh.skew: must not be negative"


@pytest.mark.parametrize("value", [10**20, "9" * 400 + "d", "99999999999d"])
def test_parse_duration_rejects_overflow(value: object) -> None:
    """Durations beyond what timedelta holds are a ConfigError, not an OverflowError."""
    with pytest.raises(ConfigError) as info:
        parse_duration(value, where="w")
    assert str(info.value) == "w: duration is too long"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"refresh": {"skew": "soon"}}, f"refresh.skew: {HINT}"),
        ({"refresh": {"min_interval": -5}}, "refresh.min_interval: must not be negative"),
        (
            {"refresh": {"default_lifetime": 0}},
            "refresh.default_lifetime: must be greater than zero",
        ),
        ({"refresh": {"max_interval": "0s"}}, "refresh.max_interval: must be greater than zero"),
        ({"alerts": {"repeat": "0ms"}}, "alerts.repeat: must be greater than zero"),
        ({"alerts": {"repeat": 1.5}}, f"alerts.repeat: {HINT}"),
        (with_connector(skew=True), f"connectors.gh.skew: {HINT}"),
        (
            with_connector(default_lifetime="0h"),
            "connectors.gh.default_lifetime: must be greater than zero",
        ),
    ],
)
def test_duration_keys_are_validated(data: dict[str, Any], message: str) -> None:
    """Duration keys name file and key; lifetime, max_interval and repeat must be positive."""
    assert error_of(data) == f"config.toml: {message}"


# --- default paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "uid", "expected"),
    [
        ({"TOKEND_CONFIG": "/srv/t.toml", "HOME": "/h"}, 0, "/srv/t.toml"),
        ({"TOKEND_CONFIG": "rel.toml"}, 1000, "rel.toml"),
        ({"TOKEND_CONFIG": "", "HOME": "/h"}, 1000, "/h/.config/tokend/config.toml"),
        ({"XDG_CONFIG_HOME": "/xdg"}, 0, "/etc/tokend/config.toml"),
        ({"XDG_CONFIG_HOME": "/xdg", "HOME": "/h"}, 1000, "/xdg/tokend/config.toml"),
        ({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}, 1000, "/h/.config/tokend/config.toml"),
    ],
)
def test_default_config_path(env: dict[str, str], uid: int, expected: str) -> None:
    """TOKEND_CONFIG wins; root gets /etc; others the XDG config home (relative ones ignored)."""
    assert default_config_path(env, uid) == Path(expected)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RUNTIME_DIRECTORY": "/run/tokend-a", "XDG_RUNTIME_DIR": "/x"},
            "/run/tokend-a/tokend.sock",
        ),
        ({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, "/run/a/tokend.sock"),
        (
            {"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": "/run/user/7"},
            "/run/user/7/tokend/tokend.sock",
        ),
        ({"XDG_RUNTIME_DIR": "run/user/7"}, "/run/tokend/tokend.sock"),
        ({}, "/run/tokend/tokend.sock"),
    ],
)
def test_default_socket_path(env: dict[str, str], expected: str) -> None:
    """$RUNTIME_DIRECTORY (first of a list), else $XDG_RUNTIME_DIR/tokend, else /run/tokend."""
    assert default_socket_path(env, 1000) == Path(expected)
    assert default_socket_path(env, 0) == Path(expected)


@pytest.mark.parametrize(
    ("env", "uid", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/tokend-a:/var/lib/b"}, 0, "/var/lib/tokend-a"),
        ({"STATE_DIRECTORY": "/var/lib/tokend-a"}, 1000, "/var/lib/tokend-a"),
        ({"XDG_STATE_HOME": "/xs", "HOME": "/h"}, 0, "/var/lib/tokend"),
        ({"XDG_STATE_HOME": "/xs", "HOME": "/h"}, 1000, "/xs/tokend"),
        ({"HOME": "/h"}, 1000, "/h/.local/state/tokend"),
    ],
)
def test_default_state_dir(env: dict[str, str], uid: int, expected: str) -> None:
    """$STATE_DIRECTORY (first of a list), else /var/lib/tokend for root, else XDG state home."""
    assert default_state_dir(env, uid) == Path(expected)


def test_defaults_without_home_in_env_use_the_account_home() -> None:
    """With no HOME in the given env, the per-user defaults fall back to Path.home()."""
    assert default_config_path({}, 1000) == Path.home() / ".config" / "tokend" / "config.toml"
    assert default_state_dir({}, 1000) == Path.home() / ".local" / "state" / "tokend"


def test_defaults_read_the_process_environment_and_euid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without env and uid arguments the defaults use os.environ and the effective uid."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/from-env")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/from-env")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/xdg-from-env")
    monkeypatch.delenv("TOKEND_CONFIG", raising=False)
    assert default_socket_path() == Path("/run/from-env/tokend.sock")
    assert default_state_dir() == Path("/var/lib/from-env")
    expected = (
        "/etc/tokend/config.toml" if os.geteuid() == 0 else "/xdg-from-env/tokend/config.toml"
    )
    assert default_config_path() == Path(expected)


# --- unknown keys, tables, secrets, discovery -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"deamon": {}}, 'deamon: unknown key; did you mean "daemon"?'),
        ({"refresh": {"skw": "5m"}}, 'refresh.skw: unknown key; did you mean "skew"?'),
        ({"daemon": {"sockets": "/s"}}, 'daemon.sockets: unknown key; did you mean "socket"?'),
        ({"alerts": {"zzz": 1}}, "alerts.zzz: unknown key"),
        (
            with_connector(tokne_url="x"),
            'connectors.gh.tokne_url: unknown key; did you mean "token_url"?',
        ),
        (with_connector(**{"bad\nkey": 1}), 'connectors.gh."bad\\nkey": unknown key'),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(data: dict[str, Any], message: str) -> None:
    """Unknown keys at any level are refused, suggesting the closest known key when there is one."""
    assert error_of(data) == f"config.toml: {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"daemon": 5}, "daemon: expected a table"),
        ({"connectors": ["gh"]}, "connectors: expected a table"),
        ({"connectors": {"gh": "https://x"}}, "connectors.gh: expected a table"),
    ],
)
def test_tables_must_be_tables(data: dict[str, Any], message: str) -> None:
    """A table key holding another type is refused with "expected a table"."""
    assert error_of(data) == f"config.toml: {message}"


@pytest.mark.parametrize(
    ("key", "command"),
    [
        ("client_secret", "secret"),
        ("client-secret", "secret"),
        ("password", "secret"),
        ("access_token", "import"),
        ("refresh_token", "import"),
    ],
)
def test_secret_keys_point_to_the_command_that_stores_them(key: str, command: str) -> None:
    """A secret in a connector table is refused, naming the CLI command that stores it instead."""
    assert error_of(with_connector(**{key: "s3cr3t-canary"})) == (
        f"config.toml: connectors.gh.{key}: secrets do not belong in the config file; "
        f"use `tokend {command} gh`"
    )


def test_secret_key_outside_a_connector_names_a_placeholder() -> None:
    """A secret key outside any connector gets the same advice with NAME, and no secret echoed."""
    message = error_of({"daemon": {"client_secret": "s3cr3t-canary"}})
    assert message == (
        "config.toml: daemon.client_secret: secrets do not belong in the config file; "
        "use `tokend secret NAME`"
    )


@pytest.mark.parametrize("key", ["issuer", "mcp_url"])
def test_discovery_sources_cannot_be_combined_with_token_url(key: str) -> None:
    """token_url, issuer and mcp_url are alternatives: a second one is refused, naming both."""
    assert error_of(with_connector(**{key: "https://auth.example.com"})) == (
        f"config.toml: connectors.gh.{key}: cannot be combined with token_url: set exactly one"
    )


def test_a_connector_needs_one_endpoint_source() -> None:
    """Without token_url, issuer or mcp_url the error names all three."""
    assert error_of(with_connector(token_url=None)) == (
        "config.toml: connectors.gh.token_url: is required (or issuer, or mcp_url, to discover it)"
    )


def test_mcp_url_connector_needs_no_client_id_and_defaults_its_redirect() -> None:
    """An mcp_url connector loads without token_url or client_id (login registers one), with
    the loopback redirect on 127.0.0.1 and any free port."""
    config = config_from_mapping(
        with_connector(token_url=None, client_id=None, mcp_url="https://mcp.example.com/mcp"),
        source="config.toml", env=ENV, uid=UID,
    )  # fmt: skip
    conn = config.connectors["gh"]
    assert (conn.token_url, conn.client_id, conn.mcp_url) == (
        None, None, "https://mcp.example.com/mcp",
    )  # fmt: skip
    assert (conn.source, conn.source_url) == ("mcp_url", "https://mcp.example.com/mcp")
    assert (conn.redirect_host, conn.redirect_port, conn.resource_opt_out) == (
        "127.0.0.1",
        0,
        False,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"token_url": None, "issuer": "https://a.example.com/", "client_id": None},
            "connectors.gh.issuer: must have no query and no trailing slash (RFC 8414 §2)",
        ),
        (
            {"token_url": None, "issuer": "http://a.example.com"},
            "connectors.gh.issuer: must be an https URL (http is allowed only for loopback hosts)",
        ),
        (
            {"client_id": None},
            "connectors.gh.client_id: is required with token_url (issuer/mcp_url can register one)",
        ),
        (
            {
                "token_url": None,
                "mcp_url": "https://m.example/mcp",
                "revocation_url": "https://a.example/r",
            },
            "connectors.gh.revocation_url: comes from discovery with issuer/mcp_url; set it only "
            "with token_url",
        ),
        (
            {
                "token_url": None,
                "mcp_url": "https://m.example/mcp",
                "client_metadata_url": "https://c.example/m.json",
            },
            "connectors.gh.client_metadata_url: cannot be combined with client_id: set one of them",
        ),
        (
            {"redirect_host": "0.0.0.0"},  # noqa: S104  # refused, never bound
            'connectors.gh.redirect_host: must be "127.0.0.1" or "localhost" (RFC 8252 §7.3)',
        ),
        (
            {"redirect_port": 70000},
            "connectors.gh.redirect_port: must be a port number from 1 to 65535 (or 0 for any)",
        ),
    ],
)
def test_login_keys_are_validated(fields: dict[str, Any], message: str) -> None:
    """Each login-related key has its own one-line error naming the key."""
    assert error_of(with_connector(**fields)) == f"config.toml: {message}"


def test_empty_resource_opts_out() -> None:
    """resource = "" means: never send a resource indicator (for servers that reject it)."""
    config = config_from_mapping(with_connector(resource=""), source="c", env=ENV, uid=UID)
    conn = config.connectors["gh"]
    assert (conn.resource, conn.resource_opt_out) == (None, True)


# --- connectors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["GitHub", "-gh", "_gh", "g h", "a" * 65, ""])
def test_connector_names_must_match_the_pattern(name: str) -> None:
    """Connector names outside [a-z0-9][a-z0-9_.-]{0,63} are refused, quoted when not bare."""
    message = error_of({"connectors": {name: {"token_url": "https://a.example/t"}}})
    assert message.startswith("config.toml: connectors.")
    assert message.endswith(": connector names must match [a-z0-9][a-z0-9_.-]{0,63}")


def test_dotted_connector_names_are_quoted_in_messages() -> None:
    """A connector name with a dot appears as a quoted TOML key in messages."""
    data = {"connectors": {"my.conn": {"token_url": "https://a.example/t"}}}
    assert error_of(data) == (
        'config.toml: connectors."my.conn".client_id: is required with token_url '
        "(issuer/mcp_url can register one)"
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://auth.example.com/oauth/token",
        "HTTPS://Auth.Example.com/token?x=1",
        "http://127.0.0.1:8080/token",
        "http://127.9.9.9/token",
        "http://[::1]:8080/token",
        "http://localhost/token",
        "http://LOCALHOST:1/token",
    ],
)
def test_token_url_accepts_https_and_loopback_http(url: str) -> None:
    """token_url may be any https URL, or http to 127.0.0.0/8, ::1 or localhost."""
    assert (
        from_toml(f'[connectors.gh]\ntoken_url = "{url}"\nclient_id = "abc"\n')
        .connectors["gh"]
        .token_url
        == url
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://auth.example.com/token", HTTPS_ONLY),
        ("http://10.0.0.1/token", HTTPS_ONLY),
        ("http://localhost.example.com/token", HTTPS_ONLY),
        ("http://[::ffff:127.0.0.1]/token", HTTPS_ONLY),
        ("ftp://auth.example.com/token", HTTPS_ONLY),
        ("auth.example.com/token", ABSOLUTE_URL),
        ("https://", ABSOLUTE_URL),
        ("https:///token", ABSOLUTE_URL),
        (
            "https://auth.example.com/to ken",
            "is not a valid URL (it contains a space or control character)",
        ),
        (
            "https://auth.example.com/\x7f",
            "is not a valid URL (it contains a space or control character)",
        ),
        ("https://auth.example.com:port/token", "is not a valid URL"),
        ("https://[::1/token", "is not a valid URL"),
        (
            "https://user:pw@auth.example.com/token",
            "must not contain a user name or password; secrets do not belong here",
        ),
        (
            "https://user@auth.example.com/token",
            "must not contain a user name or password; secrets do not belong here",
        ),
        ("https://auth.example.com/token#frag", "must not contain a fragment"),
        (42, "expected a string"),
    ],
)
def test_token_url_is_validated(url: object, reason: str) -> None:
    """A bad token_url names connectors.NAME.token_url and why, never echoing the URL."""
    assert (
        error_of(with_connector(token_url=url)) == f"config.toml: connectors.gh.token_url: {reason}"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token_url": None}, "token_url: is required (or issuer, or mcp_url, to discover it)"),
        (
            {"client_id": None},
            "client_id: is required with token_url (issuer/mcp_url can register one)",
        ),
        ({"client_id": " "}, "client_id: must not be empty"),
        ({"client_id": 123}, "client_id: expected a string"),
        (
            {"client_auth": "private_key_jwt"},
            'client_auth: must be one of "client_secret_basic", "client_secret_post", "none"',
        ),
        ({"client_auth": ["none"]}, "client_auth: expected a string"),
        ({"scope": ""}, "scope: must not be empty (leave the key out to send no scope)"),
        ({"scope": "   "}, "scope: must not be empty (leave the key out to send no scope)"),
        ({"scope": 'a "b"'}, "scope: must be scope tokens separated by spaces (RFC 6749 §3.3)"),
        ({"scope": "a\tb"}, "scope: must be scope tokens separated by spaces (RFC 6749 §3.3)"),
        ({"scope": ["a", "b"]}, "scope: expected a string"),
        ({"resource": "mcp"}, f"resource: {ABSOLUTE_URL}"),
        ({"resource": "https://mcp.example.com/mcp#x"}, "resource: must not contain a fragment"),
        ({"allow": "user:root"}, "allow: expected a list of strings"),
        ({"allow": ["user:root", 0]}, "allow: expected a list of strings"),
        ({"allow": ["user:no-such-user-tokend"]}, 'allow: no such user "no-such-user-tokend"'),
        ({"allow": ["group:no-such-group-tokend"]}, 'allow: no such group "no-such-group-tokend"'),
        ({"ca_file": "ca.pem"}, "ca_file: must be an absolute path"),
        ({"ca_file": "/no/such/ca.pem"}, "ca_file: must name an existing file"),
        ({"ca_file": "/"}, "ca_file: must name an existing file"),
        ({"ca_file": "/etc/\0ca.pem"}, "ca_file: must not contain a NUL character"),
    ],
)
def test_connector_keys_are_validated(fields: dict[str, Any], message: str) -> None:
    """Each connector rule fails with "<file>: connectors.NAME.<key>: <reason>"."""
    assert error_of(with_connector(**fields)) == f"config.toml: connectors.gh.{message}"


def test_connector_optional_keys_parse() -> None:
    """client_auth, scope (spaces normalised), resource, allow and ca_file parse to their types."""
    config = config_from_mapping(
        with_connector(
            client_auth="client_secret_post",
            scope="  mcp   offline_access ",
            resource="https://mcp.example.com/mcp?tenant=1",
            allow=["uid:4294967294", "gid:65534"],
            ca_file="/etc/passwd",
        ),
        source="config.toml",
        env=ENV,
        uid=UID,
    )
    connector = config.connectors["gh"]
    assert connector.client_auth == "client_secret_post"
    assert connector.scope == "mcp offline_access"
    assert connector.resource == "https://mcp.example.com/mcp?tenant=1"
    assert connector.allow == (
        AllowRule(kind="uid", id=4294967294, text="uid:4294967294"),
        AllowRule(kind="gid", id=65534, text="gid:65534"),
    )
    assert connector.ca_file == Path("/etc/passwd")


# --- allow rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "number"),
    [
        *(("user:root", "uid", 0), ("uid:0", "uid", 0), ("uid:1000", "uid", 1000)),
        *(("group:root", "gid", 0), ("gid:0", "gid", 0), ("gid:007", "gid", 7)),
    ],
)
def test_resolve_allow_resolves_names_and_numbers(
    text: str, kind: Literal["uid", "gid"], number: int
) -> None:
    """user:/uid: give uid rules, group:/gid: give gid rules; numbers need not exist."""
    assert resolve_allow(text, where="w") == AllowRule(kind=kind, id=number, text=text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("root", '"root" is not "user:NAME", "group:NAME", "uid:N" or "gid:N"'),
        ("users:root", '"users:root" is not "user:NAME", "group:NAME", "uid:N" or "gid:N"'),
        ("", '"" is not "user:NAME", "group:NAME", "uid:N" or "gid:N"'),
        ("uid:", '"uid:": uid must be a number below 4294967295'),
        ("uid:abc", '"uid:abc": uid must be a number below 4294967295'),
        ("uid:-1", '"uid:-1": uid must be a number below 4294967295'),
        ("uid:4294967295", '"uid:4294967295": uid must be a number below 4294967295'),
        ("gid:\u0661", '"gid:\u0661": gid must be a number below 4294967295'),
        ("user:", 'no such user ""'),
        ("user:ro\0ot", 'no such user "ro\\u0000ot"'),
        ("group:ro\0ot", 'no such group "ro\\u0000ot"'),
        ("user:no-such-user-tokend", 'no such user "no-such-user-tokend"'),
    ],
)
def test_resolve_allow_rejects(text: str, reason: str) -> None:
    """Bad syntax, bad numbers and unknown names fail with `where` and a one-line reason."""
    with pytest.raises(ConfigError) as info:
        resolve_allow(text, where="config.toml: connectors.gh.allow")
    assert str(info.value) == f"config.toml: connectors.gh.allow: {reason}"


# --- daemon and alerts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("daemon", "message"),
    [
        ({"socket": "tokend.sock"}, "socket: must be an absolute path"),
        ({"socket": 1}, "socket: expected a string"),
        ({"socket": "/" + "s" * 107}, "socket: is too long for a unix socket (at most 107 bytes)"),
        (
            {"socket_group": "no-such-group-tokend"},
            'socket_group: no such group "no-such-group-tokend"',
        ),
        ({"socket_group": "ro\0ot"}, 'socket_group: no such group "ro\\u0000ot"'),
        ({"socket_group": ""}, "socket_group: must not be empty"),
        ({"state_dir": "var/lib/tokend"}, "state_dir: must be an absolute path"),
        ({"keyring_service": ""}, "keyring_service: must not be empty"),
        ({"keyring_service": False}, "keyring_service: expected a string"),
        *(
            (
                {"keyring_backend": text},
                f"keyring_backend: {BACKEND_FORM}",
            )
            for text in ("Keyring", "keyring..Keyring", "keyring.1x", "keyring.backends.")
        ),
    ],
)
def test_daemon_keys_are_validated(daemon: dict[str, Any], message: str) -> None:
    """Each [daemon] rule fails with "<file>: daemon.<key>: <reason>"."""
    assert error_of({"daemon": daemon}) == f"config.toml: daemon.{message}"


def test_daemon_keys_parse() -> None:
    """[daemon] values replace the env-derived defaults; a backend class path is kept as written."""
    daemon = from_toml(
        """
        [daemon]
        socket = "/tmp/t/tokend.sock"
        state_dir = "/srv/tokend"
        keyring_service = "tokend-test"
        keyring_backend = "keyring.backends.SecretService.Keyring"
        """
    ).daemon
    assert daemon == DaemonSettings(
        socket=Path("/tmp/t/tokend.sock"),
        state_dir=Path("/srv/tokend"),
        keyring_service="tokend-test",
        keyring_backend="keyring.backends.SecretService.Keyring",
    )


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"exec": "/usr/local/bin/page-me"}, "exec: expected a list of strings"),
        ({"exec": ["/bin/page", 1]}, "exec: expected a list of strings"),
        ({"exec": []}, "exec: must not be empty"),
        ({"exec": ["page-me", "--tag"]}, "exec: the first element must be an absolute path"),
        ({"exec": ["/bin/page", "a\0b"]}, "exec: must not contain a NUL character"),
        ({"webhook": "http://ntfy.example/tokend"}, f"webhook: {HTTPS_ONLY}"),
        ({"webhook": "ntfy.example/tokend"}, f"webhook: {ABSOLUTE_URL}"),
        ({"apprise": "ntfy://ntfy.example/t"}, "apprise: expected a list of strings"),
        ({"apprise": ["ntfy://ntfy.example/t", 1]}, "apprise: expected a list of strings"),
        ({"apprise": ["ntfy"]}, f"apprise: entry 1 {APPRISE_FORM}"),
        ({"apprise": ["ntfy://a", "://b"]}, f"apprise: entry 2 {APPRISE_FORM}"),
        ({"apprise": ["ntfy://a", "gotify://h/tok en"]}, f"apprise: entry 2 {APPRISE_FORM}"),
        ({"apprise": ["ntfy://a", "ntfy://b\n"]}, f"apprise: entry 2 {APPRISE_FORM}"),
        ({"apprise": ["ntfy://a", "json://b", "ntfy://a"]}, "apprise: entry 3 repeats entry 1"),
    ],
)
def test_alert_keys_are_validated(alerts: dict[str, Any], message: str) -> None:
    """Each [alerts] rule fails with "<file>: alerts.<key>: <reason>"."""
    assert error_of({"alerts": alerts}) == f"config.toml: alerts.{message}"


def test_alert_keys_parse() -> None:
    """exec becomes a tuple argv; a loopback http webhook and a repeat duration are accepted."""
    alerts = from_toml(
        """
        [alerts]
        exec = ["/bin/page-me", ""]
        webhook = "http://127.0.0.1:9/hook"
        repeat = 3600
        """
    ).alerts
    assert alerts == AlertSettings(
        exec=("/bin/page-me", ""), webhook="http://127.0.0.1:9/hook", repeat=timedelta(hours=1)
    )


@pytest.fixture
def apprise_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `apprise` look installed (a module with a spec), whether or not it is."""
    module = types.ModuleType("apprise")
    module.__spec__ = importlib.machinery.ModuleSpec("apprise", None)
    monkeypatch.setitem(sys.modules, "apprise", module)


@pytest.fixture
def apprise_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `apprise` look not installed (None in sys.modules marks a blocked import)."""
    monkeypatch.setitem(sys.modules, "apprise", None)


@pytest.mark.usefixtures("apprise_installed")
def test_apprise_urls_parse_in_order() -> None:
    """alerts.apprise becomes a tuple of the URLs as written, in order."""
    alerts = from_toml(
        """
        [alerts]
        apprise = ["ntfy://ntfy.example/tokend", "gotify://gotify.example/AbCdEf", "json://127.0.0.1:9/x"]
        """
    ).alerts
    assert alerts.apprise == (
        "ntfy://ntfy.example/tokend",
        "gotify://gotify.example/AbCdEf",
        "json://127.0.0.1:9/x",
    )
    assert AlertSettings().apprise == ()


@pytest.mark.usefixtures("apprise_missing")
def test_apprise_set_but_not_installed_names_the_key_and_the_fix() -> None:
    """Apprise URLs without apprise installed fail at load, naming the key and the fix."""
    message = error_of({"alerts": {"apprise": ["gotify://gotify.example/S3CR3T"]}})
    assert message == (
        "config.toml: alerts.apprise: is set but apprise is not installed: "
        "pip install tokend[apprise] (or remove the key)"
    )
    assert "S3CR3T" not in message


@pytest.mark.usefixtures("apprise_missing")
def test_empty_apprise_list_needs_no_apprise() -> None:
    """`apprise = []` configures no Apprise sink, so apprise need not be installed."""
    assert config_from_mapping(
        {"alerts": {"apprise": []}}, source="c", env=ENV, uid=UID
    ).alerts == (AlertSettings())


def test_apprise_url_errors_never_quote_the_url() -> None:
    """An Apprise URL may hold a service token: messages give its entry number, not its text."""
    message = error_of({"alerts": {"apprise": ["pover://user@T0KEN extra"]}})
    assert "T0KEN" not in message


def test_module_available_finds_installed_modules_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """module_available: true for an importable module, false for a missing or blocked one."""
    assert module_available("json")
    assert not module_available("tokend_no_such_module")
    assert not module_available("tokend_no_such_package.sub")
    monkeypatch.setitem(sys.modules, "json", None)
    assert not module_available("json")
