"""How client commands find the daemon's socket without --socket or TOKEND_SOCKET."""

from __future__ import annotations

import socket

from tokend.paths import client_socket_path, parse_seconds


def _listen(path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_config_socket_wins(tmp_short):
    """The config file's daemon.socket is used when it names one."""
    config = tmp_short / "config.toml"
    config.write_text('[daemon]\nsocket = "/srv/tokend.sock"\n')
    assert str(client_socket_path(config, env={})) == "/srv/tokend.sock"


def test_login_session_falls_back_to_system_daemon(tmp_short):
    """A job in a login session ($XDG_RUNTIME_DIR set, no per-user daemon) reaches the system
    daemon's socket; with a per-user daemon running, that one wins."""
    runtime = tmp_short / "user"
    system = tmp_short / "system.sock"
    sys_sock = _listen(system)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    try:
        got = client_socket_path(
            tmp_short / "none.toml", env=env, system_config=tmp_short / "no", system_socket=system
        )
        assert got == system
        (runtime / "tokend").mkdir(parents=True)
        user_sock = _listen(runtime / "tokend" / "tokend.sock")
        got = client_socket_path(
            tmp_short / "none.toml", env=env, system_config=tmp_short / "no", system_socket=system
        )
        assert got == runtime / "tokend" / "tokend.sock"
        user_sock.close()
    finally:
        sys_sock.close()


def test_system_config_names_the_system_socket(tmp_short):
    """The system config's daemon.socket is where the system daemon listens."""
    system_config = tmp_short / "etc.toml"
    custom = tmp_short / "custom.sock"
    system_config.write_text(f'[daemon]\nsocket = "{custom}"\n')
    held = _listen(custom)
    try:
        got = client_socket_path(
            tmp_short / "none.toml",
            env={"XDG_RUNTIME_DIR": str(tmp_short / "r")},
            system_config=system_config,
            system_socket=tmp_short / "absent.sock",
        )
    finally:
        held.close()
    assert got == custom


def test_parse_seconds():
    """--min-ttl durations: units, compounds and plain seconds."""
    assert parse_seconds("90") == 90
    assert parse_seconds("5m") == 300
    assert parse_seconds("1h30m") == 5400
    assert parse_seconds("500ms") == 0.5
