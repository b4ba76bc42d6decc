"""Where things are by default, and the few config reads a client command needs.

Kept light (os, pathlib, re; `tomllib` only when a config file exists) because `tokend token NAME`
resolves the socket path through here on every call; `config` uses the same defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_WHOLE_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d))+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_seconds(text: str) -> float:
    """A duration string ("30s", "1h30m", "500ms"; units ms, s, m, h, d) or plain integer seconds,
    in seconds. Raises ValueError with a reason."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    if not _WHOLE_RE.fullmatch(text):
        raise ValueError('expected a duration like "30s", "5m", "2h", "7d" or integer seconds')
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART_RE.findall(text))


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _euid(uid: int | None) -> int:
    return os.geteuid() if uid is None else uid


def _env_dir(env: Mapping[str, str], name: str) -> Path | None:
    """An absolute directory from `name`; systemd may list several, separated by ':' (first wins).

    Unset, empty and relative values count as unset (the XDG base directory spec says so).
    """
    value = env.get(name, "").split(":", 1)[0]
    return Path(value) if value.startswith("/") else None


def _home(env: Mapping[str, str]) -> Path:
    return _env_dir(env, "HOME") or Path.home()


def default_config_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """`$TOKEND_CONFIG`, else /etc/tokend/config.toml for root, else the XDG config directory."""
    env = _environ(env)
    if env.get("TOKEND_CONFIG"):
        return Path(env["TOKEND_CONFIG"])
    if _euid(uid) == 0:
        return Path("/etc/tokend/config.toml")
    base = _env_dir(env, "XDG_CONFIG_HOME") or _home(env) / ".config"
    return base / "tokend" / "config.toml"


def default_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """`$RUNTIME_DIRECTORY/tokend.sock`, else `$XDG_RUNTIME_DIR/tokend/`, else /run/tokend/.

    `uid` is accepted for symmetry with the other defaults; the socket's place ignores it.
    """
    env = _environ(env)
    runtime = _env_dir(env, "RUNTIME_DIRECTORY")
    if runtime is not None:
        return runtime / "tokend.sock"
    xdg = _env_dir(env, "XDG_RUNTIME_DIR")
    return (xdg / "tokend" if xdg is not None else Path("/run/tokend")) / "tokend.sock"


def default_state_dir(env: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """`$STATE_DIRECTORY`, else /var/lib/tokend for root, else `$XDG_STATE_HOME/tokend`."""
    env = _environ(env)
    state = _env_dir(env, "STATE_DIRECTORY")
    if state is not None:
        return state
    if _euid(uid) == 0:
        return Path("/var/lib/tokend")
    base = _env_dir(env, "XDG_STATE_HOME") or _home(env) / ".local" / "state"
    return base / "tokend"


def config_path(given: str | None) -> Path:
    """`--config` if given, else the default path."""
    return Path(given) if given else default_config_path()


def configured_socket(path: Path) -> Path | None:
    """`daemon.socket` from the config file, read without validating the rest; None if the file or
    the key is absent or the file is unreadable (the daemon reports config errors, not clients)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"socket" not in raw:
        return None
    import tomllib

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None
    daemon = data.get("daemon")
    value = daemon.get("socket") if isinstance(daemon, dict) else None
    return Path(value) if isinstance(value, str) and value else None


SYSTEM_CONFIG = Path("/etc/tokend/config.toml")
SYSTEM_SOCKET = Path("/run/tokend/tokend.sock")


def client_socket_path(
    config: Path,
    *,
    env: Mapping[str, str] | None = None,
    system_config: Path = SYSTEM_CONFIG,
    system_socket: Path = SYSTEM_SOCKET,
) -> Path:
    """Where a client command finds the daemon when neither --socket nor TOKEND_SOCKET says.

    The config's `daemon.socket`, else the default for this user; and when that is absent, the
    system daemon's (`/etc/tokend/config.toml`'s socket, else /run/tokend/tokend.sock), so a
    job in a login session reaches the system daemon without setting TOKEND_SOCKET.
    """
    configured = configured_socket(config)
    if configured is not None:
        return configured
    default = default_socket_path(env)
    if default.exists():
        return default
    system = configured_socket(system_config) or system_socket
    return system if system.exists() else default


def socket_path(given: str | None, config: str | None) -> str:
    """The socket a command talks to: `--socket` if given, else $TOKEND_SOCKET, else the one the
    config file (`--config`, else the default path) names, else the default, falling back to the
    system daemon's socket."""
    if given:
        return given
    env = os.environ.get("TOKEND_SOCKET")
    if env:
        return env
    return str(client_socket_path(config_path(config)))
