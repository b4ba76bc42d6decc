"""The `tokend` command as users run it: real `python -m tokend` processes against a real daemon
process (tokend's encrypted-file keyring under the state directory) and the loopback
authorization server. Pins DESIGN §6: what each command prints, its exit code, and the one-line
error (or JSON skip record) on stderr.

Most tests share one module-scoped daemon (`live`); each of those works on its own connector so
that the order of the tests does not matter.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonProcess, config_dict, one_line, short_tmp, skip_record, why
from tokend import __version__
from tokend.authserver import AuthServer
from tokend.keyring_file import EncryptedFileKeyring

FILE_BACKEND = "tokend.keyring_file.EncryptedFileKeyring"
# Variables that would change what the CLI does if the test runner happened to have them set.
_SCRUBBED = (
    "TOKEND_SOCKET",
    "CLAUDE_CODE_MCP_SERVER_NAME",
    "TOKEND_ACCESS_TOKEN",
    "PYTHON_KEYRING_BACKEND",
    "TOKEND_KEYRING_FILE",
    "KEYRING_PROPERTY_FILE_PATH",
)


def _daemon(root: Path, token_url: str, **kwargs: Any) -> DaemonProcess:
    """A DaemonProcess (not started) on the encrypted-file keyring, with a scrubbed environment."""
    daemon_settings = {"keyring_backend": FILE_BACKEND, **kwargs.pop("daemon", {})}
    proc = DaemonProcess(root, config_dict(root, token_url, daemon=daemon_settings, **kwargs))
    for name in _SCRUBBED:
        proc.env.pop(name, None)
    return proc


def _cli(
    daemon: DaemonProcess,
    *args: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`tokend ARGS` with the daemon's config, plus `env` on top of its environment."""
    if env is None:
        return daemon.cli(*args, stdin=stdin)
    return subprocess.run(
        [sys.executable, "-m", "tokend", *args],
        env={**daemon.env, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _import(daemon: DaemonProcess, name: str, grant: Mapping[str, object]) -> None:
    result = daemon.cli("import", name, stdin=json.dumps(grant))
    assert result.returncode == 0, why(result)


# ----------------------------------------------------------------------------- the shared daemon


@dataclass
class Live:
    """The module's running daemon, its authorization server, and the grant imported for `demo`."""

    daemon: DaemonProcess
    auth: AuthServer
    grant: dict[str, Any]

    @property
    def token(self) -> str:
        return str(self.grant["access_token"])


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """One daemon for the module: `demo` holds a grant (imported with `tokend import` through the
    socket), `other` never gets one, `conf` is a confidential client, `dead` and `lock` are for
    the tests that need a connector of their own. Tokens live an hour, so no scheduled refresh
    runs while the module does."""
    root = short_tmp()
    clients = {"tokend-demo": None, "conf": "s3cret"}
    with AuthServer(lifetime_s=3600.0, clients=clients) as auth:
        connectors = {
            "demo": {},
            "other": {},
            "dead": {},
            "conf": {"client_id": "conf", "client_auth": "client_secret_basic"},
        }
        daemon = _daemon(root, auth.token_url, connectors=connectors)
        daemon.start()
        try:
            grant = auth.issue_grant()
            result = daemon.cli("import", "demo", stdin=json.dumps(grant))
            assert result.returncode == 0, why(result)
            assert "demo: grant installed; state ok" in one_line(result.stderr)
            assert result.stdout == ""
            yield Live(daemon, auth, grant)
            assert daemon.stop() == 0, daemon.log()[-2000:]
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill()
            shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- reading a token


def test_token_prints_exactly_the_access_token(live):
    """`token NAME` prints the imported access token and a newline, nothing else."""
    result = live.daemon.cli("token", "demo")
    assert result.returncode == 0, why(result)
    assert result.stdout == live.token + "\n"
    assert result.stderr == ""


def test_header_prints_authorization_line(live):
    """`header NAME` prints one `Authorization: Bearer <token>` line."""
    result = live.daemon.cli("header", "demo")
    assert result.returncode == 0, why(result)
    assert result.stdout == f"Authorization: Bearer {live.token}\n"


def test_headers_prints_one_json_object_of_strings(live):
    """`headers NAME` prints one JSON object of string values (Claude Code headersHelper)."""
    result = live.daemon.cli("headers", "demo")
    assert result.returncode == 0, why(result)
    headers = json.loads(one_line(result.stdout))
    assert headers == {"Authorization": f"Bearer {live.token}"}
    assert all(isinstance(v, str) for v in headers.values())


def test_headers_takes_the_name_from_claude_code(live):
    """`headers` without NAME uses $CLAUDE_CODE_MCP_SERVER_NAME; with neither it is exit 64."""
    named = _cli(live.daemon, "headers", env={"CLAUDE_CODE_MCP_SERVER_NAME": "demo"})
    assert named.returncode == 0, why(named)
    assert json.loads(named.stdout) == {"Authorization": f"Bearer {live.token}"}
    unnamed = live.daemon.cli("headers")
    assert unnamed.returncode == 64, why(unnamed)
    assert "CLAUDE_CODE_MCP_SERVER_NAME" in one_line(unnamed.stderr)
    assert unnamed.stdout == ""


def test_min_ttl(live):
    """`--min-ttl 5m` on an hour-long token serves it as is; a min-ttl at or above the token's
    lifetime, or one that is no duration, is bad_request (exit 64) naming the connector."""
    calls = live.auth.token_calls
    result = live.daemon.cli("token", "demo", "--min-ttl", "5m")
    assert result.returncode == 0, why(result)
    assert result.stdout == live.token + "\n"
    assert live.auth.token_calls == calls  # plenty of life left: no refresh
    too_long = live.daemon.cli("token", "demo", "--min-ttl", "2h")
    assert too_long.returncode == 64, why(too_long)
    line = one_line(too_long.stderr)
    assert "demo" in line
    assert "min_ttl" in line
    assert too_long.stdout == ""
    garbled = live.daemon.cli("token", "demo", "--min-ttl", "soon")
    assert garbled.returncode == 64, why(garbled)
    assert "--min-ttl" in one_line(garbled.stderr)


# ----------------------------------------------------------------------------- exec


def test_exec_puts_the_token_in_the_environment(live):
    """`exec NAME -- CMD` runs CMD with the token in $TOKEND_ACCESS_TOKEN (or --env VAR) and
    passes CMD's exit code through."""
    result = live.daemon.cli("exec", "demo", "--", "sh", "-c", 'printf %s "$TOKEND_ACCESS_TOKEN"')
    assert result.returncode == 0, why(result)
    assert result.stdout == live.token
    assert result.stderr == ""
    script = 'printf "%s|%s" "$MY_TOKEN" "${TOKEND_ACCESS_TOKEN-unset}"'
    custom = live.daemon.cli("exec", "demo", "--env", "MY_TOKEN", "--", "sh", "-c", script)
    assert custom.returncode == 0, why(custom)
    assert custom.stdout == f"{live.token}|unset"
    both = live.daemon.cli(
        "exec", "demo", "--min-ttl", "5m", "--env", "T", "--", "sh", "-c", 'printf %s "$T"'
    )
    assert both.returncode == 0, why(both)
    assert both.stdout == live.token
    failing = live.daemon.cli("exec", "demo", "--", "sh", "-c", "exit 3")
    assert failing.returncode == 3, why(failing)


def test_exec_keeps_the_token_out_of_argv(live):
    """The command's argv (what `ps` shows) does not contain the token."""
    script = 'tr "\\000" " " < /proc/$$/cmdline; printf "\\n%s" "${#TOKEND_ACCESS_TOKEN}"'
    result = live.daemon.cli("exec", "demo", "--", "sh", "-c", script)
    assert result.returncode == 0, why(result)
    argv, length = result.stdout.split("\n")
    assert argv.startswith("sh -c ")
    assert live.token not in argv
    assert int(length) == len(live.token)


@pytest.mark.parametrize(
    ("name", "error", "code", "action"),
    [
        ("nope", "unknown_connector", 78, "tokend status"),
        ("other", "needs_reauth", 10, "tokend import other"),
    ],
)
def test_exec_without_a_token_skips_the_command(live, tmp_path, name, error, code, action):
    """When no token can be had, exec does not run the command, prints one JSON skip record on
    stderr (connector, error, action, exit_code) and exits with the error's code."""
    marker = tmp_path / "ran"
    result = live.daemon.cli("exec", name, "--", "touch", str(marker))
    assert result.returncode == code, why(result)
    assert not marker.exists()
    assert result.stdout == ""
    record = skip_record(result)
    assert record["connector"] == name
    assert record["error"] == error
    assert record["exit_code"] == code
    assert action in record["action"]


# ----------------------------------------------------------------------------- status


def test_status_table(live):
    """`status` prints a header row and one row per connector with its state."""
    result = live.daemon.cli("status")
    assert result.returncode == 0, why(result)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["CONNECTOR", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"conf", "dead", "demo", "other"}
    assert rows["demo"][1] == "ok"
    assert rows["other"][1] == "unauthorized"
    assert "tokend import other" in " ".join(rows["other"])
    assert live.token not in result.stdout


def test_status_json_has_no_secrets(live):
    """`status --json` is a list of dicts, one per connector, with no token in it."""
    result = live.daemon.cli("status", "--json")
    assert result.returncode == 0, why(result)
    items = json.loads(result.stdout)
    assert isinstance(items, list)
    assert all(isinstance(item, dict) for item in items)
    by_name = {item["connector"]: item for item in items}
    assert by_name["demo"]["state"] == "ok"
    assert by_name["other"]["state"] == "unauthorized"
    for secret in (live.grant["access_token"], live.grant["refresh_token"]):
        assert secret not in result.stdout
    assert not {"access_token", "refresh_token"} & set(by_name["demo"])
    one = live.daemon.cli("status", "demo", "--json")
    assert one.returncode == 0, why(one)
    assert json.loads(one.stdout)["connector"] == "demo"


# ------------------------------------------------------------------- errors and exit codes


def test_unknown_connector_is_exit_78(live):
    """An unconfigured connector exits 78 with one stderr line naming it."""
    result = live.daemon.cli("token", "nope")
    assert result.returncode == 78, why(result)
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("tokend: nope: ")
    assert "tokend status" in line


def test_unauthorized_connector_is_exit_10(live):
    """A connector without a grant exits 10; the line names it and says `run: tokend import`."""
    result = live.daemon.cli("token", "other")
    assert result.returncode == 10, why(result)
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("tokend: other: ")
    assert "run: tokend import other" in line


@pytest.mark.parametrize(
    "args",
    [
        ("bogus",),
        ("token",),
        ("token", "demo", "--frobnicate"),
        ("exec", "demo", "--env", "T", "true"),  # no -- between the options and the command
    ],
)
def test_usage_error_is_exit_2(live, args):
    """A command line argparse refuses exits 2 with its usage message."""
    result = live.daemon.cli(*args)
    assert result.returncode == 2, why(result)
    assert "usage:" in result.stderr
    assert result.stdout == ""


def test_invalid_grant_then_needs_reauth(live):
    """After the provider answers invalid_grant, `refresh` and `token` exit 10 and tell the
    human to re-import; a new grant brings the connector back."""
    _import(live.daemon, "dead", live.auth.issue_grant())
    live.auth.fail_next("invalid_grant")
    refreshed = live.daemon.cli("refresh", "dead")
    assert refreshed.returncode == 10, why(refreshed)
    assert "run: tokend import dead" in one_line(refreshed.stderr)
    result = live.daemon.cli("token", "dead")
    assert result.returncode == 10, why(result)
    line = one_line(result.stderr)
    assert line.startswith("tokend: dead: ")
    assert "invalid_grant" in line
    assert "run: tokend import dead" in line
    grant = live.auth.issue_grant()
    _import(live.daemon, "dead", grant)
    again = live.daemon.cli("token", "dead")
    assert again.returncode == 0, why(again)
    assert again.stdout == f"{grant['access_token']}\n"


def test_secret_through_the_daemon(live):
    """Without its client secret a confidential connector cannot refresh (exit 10, `run: tokend
    secret conf`); `secret` through the running daemon stores it, and refreshes then authenticate
    with HTTP Basic. The secret is never echoed; an empty one is exit 64."""
    grant = live.auth.issue_grant("conf")
    _import(live.daemon, "conf", grant)
    missing = live.daemon.cli("refresh", "conf")
    assert missing.returncode == 10, why(missing)
    assert "run: tokend secret conf" in one_line(missing.stderr)
    stored = live.daemon.cli("secret", "conf", stdin="s3cret\n")
    assert stored.returncode == 0, why(stored)
    assert "s3cret" not in stored.stdout + stored.stderr
    refreshed = live.daemon.cli("refresh", "conf")
    assert refreshed.returncode == 0, why(refreshed)
    assert "conf: state ok" in one_line(refreshed.stderr)
    token = live.daemon.cli("token", "conf")
    assert token.returncode == 0, why(token)
    served = token.stdout.strip()
    assert served != grant["access_token"]
    assert live.auth.is_valid_access_token(served)
    last = [r for r in live.auth.requests if r.method == "POST"][-1]
    assert last.outcome == "ok"
    assert last.client_id == "conf"
    assert last.headers["authorization"].startswith("Basic ")
    empty = live.daemon.cli("secret", "conf", stdin="")
    assert empty.returncode == 64, why(empty)
    assert "conf" in one_line(empty.stderr)


def test_offline_commands_refuse_while_a_daemon_holds_the_lock(live):
    """With the daemon holding the state directory but its socket unreachable (wrong path),
    import, secret and refresh exit 69 naming the PID and the socket, and change nothing."""
    wrong = str(live.daemon.root / "elsewhere.sock")
    commands = [
        (("import", "demo"), json.dumps(live.auth.issue_grant())),
        (("secret", "demo"), "not-used\n"),
        (("refresh", "demo"), None),
    ]
    calls = live.auth.token_calls
    for args, stdin in commands:
        result = live.daemon.cli("--socket", wrong, *args, stdin=stdin)
        assert result.returncode == 69, why(result)
        line = one_line(result.stderr)
        assert wrong in line
        assert f"PID {live.daemon.proc.pid}" in line
    assert live.auth.token_calls == calls
    token = live.daemon.cli("token", "demo")
    assert token.stdout == live.token + "\n"


def test_second_daemon_refuses_to_run(live):
    """A second `tokend run` on the same state directory exits 75 naming the first one's PID,
    and leaves the first daemon serving."""
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "run"],
        env=live.daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 75, why(result)
    assert f"PID {live.daemon.proc.pid}" in one_line(result.stderr)
    token = live.daemon.cli("token", "demo")
    assert token.returncode == 0, why(token)
    assert token.stdout == live.token + "\n"


# ----------------------------------------------------------------------------- no daemon


def test_version_and_help_exit_0(tmp_path):
    """`--version` prints the version and `--help` the commands, both exit 0."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env["TOKEND_CONFIG"] = str(tmp_path / "absent.toml")
    run = [sys.executable, "-m", "tokend"]
    version = subprocess.run(
        [*run, "--version"], env=env, capture_output=True, text=True, check=False
    )
    assert version.returncode == 0, why(version)
    assert version.stdout == f"tokend {__version__}\n"
    helped = subprocess.run([*run, "--help"], env=env, capture_output=True, text=True, check=False)
    assert helped.returncode == 0, why(helped)
    for command in ("run", "token", "header", "headers", "exec", "status", "import", "secret"):
        assert command in helped.stdout


def test_daemon_not_running_is_exit_69(tmp_short):
    """With nothing at the socket path (no file, or a socket nobody listens on), client commands
    exit 69 with one line naming the socket path; exec skips with a record."""
    daemon = _daemon(tmp_short, "https://auth.example/token")
    result = daemon.cli("token", "demo")
    assert result.returncode == 69, why(result)
    assert str(daemon.socket) in one_line(result.stderr)
    assert result.stdout == ""
    daemon.socket.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as deaf:
        deaf.bind(str(daemon.socket))  # bound, never listening: connections are refused
        refused = daemon.cli("status")
        skipped = daemon.cli("exec", "demo", "--", "true")
    assert refused.returncode == 69, why(refused)
    assert str(daemon.socket) in one_line(refused.stderr)
    assert skipped.returncode == 69, why(skipped)
    record = skip_record(skipped)
    assert (record["connector"], record["exit_code"]) == ("demo", 69)


@pytest.mark.parametrize(
    ("connectors", "key"),
    [
        ({"demo": {"token_url": "http://auth.example.com/token"}}, "connectors.demo.token_url"),
        ({"demo": {"colour": "blue"}}, "connectors.demo.colour"),
    ],
)
def test_run_with_malformed_config_is_exit_78(tmp_short, connectors, key):
    """`run` with an invalid config exits 78 with one stderr line naming the file and the key."""
    daemon = _daemon(tmp_short, "http://127.0.0.1:9/token", connectors=connectors)
    result = daemon.cli("run")
    assert result.returncode == 78, why(result)
    line = one_line(result.stderr)
    assert str(daemon.config_path) in line
    assert key in line
    assert not daemon.socket.exists()


def test_offline_admin_commands_then_daemon_serves_without_refresh(tmp_short):
    """With no daemon running, import, secret and refresh write the encrypted-file keyring
    directly; a daemon started afterwards serves those grants without asking the provider."""
    clients = {"tokend-demo": None, "conf": "s3cret"}
    with AuthServer(lifetime_s=3600.0, clients=clients) as auth:
        connectors = {
            "demo": {},
            "conf": {"client_id": "conf", "client_auth": "client_secret_basic"},
            "other": {},
        }
        daemon = _daemon(tmp_short, auth.token_url, connectors=connectors)
        demo_grant = auth.issue_grant()
        conf_grant = auth.issue_grant("conf")
        _import(daemon, "demo", demo_grant)
        _import(daemon, "conf", conf_grant)
        stored = daemon.cli("secret", "conf", stdin="s3cret\n")
        assert stored.returncode == 0, why(stored)
        refreshed = daemon.cli("refresh", "conf")
        assert refreshed.returncode == 0, why(refreshed)
        assert "conf: state ok" in one_line(refreshed.stderr)
        assert auth.token_calls == 1
        no_grant = daemon.cli("refresh", "other")
        assert no_grant.returncode == 10, why(no_grant)
        assert "run: tokend import other" in one_line(no_grant.stderr)
        assert auth.token_calls == 1
        assert not daemon.socket.exists()
        state_dir = tmp_short / "state"
        assert (state_dir / "keyring.enc").exists()
        state_text = (state_dir / "state.json").read_text()
        for secret in (demo_grant["access_token"], demo_grant["refresh_token"], "s3cret"):
            assert secret not in state_text

        daemon.start()
        try:
            demo = daemon.cli("token", "demo")
            conf = daemon.cli("token", "conf")
            status = json.loads(daemon.cli("status", "--json").stdout)
        finally:
            assert daemon.stop() == 0
        assert demo.stdout == f"{demo_grant['access_token']}\n", why(demo)
        assert conf.returncode == 0, why(conf)
        served = conf.stdout.strip()
        assert served != conf_grant["access_token"]
        assert auth.is_valid_access_token(served)
        assert {item["connector"]: item["state"] for item in status} == {
            "conf": "ok",
            "demo": "ok",
            "other": "unauthorized",
        }
        assert auth.token_calls == 1  # the daemon refreshed nothing


def test_import_repairs_a_corrupt_stored_grant(tmp_short, auth):
    """A daemon finding an unusable keyring item answers exit 10 with `run: tokend import NAME`,
    and that import replaces the item."""
    keyring_file = EncryptedFileKeyring(file_path=tmp_short / "state" / "keyring.enc")
    keyring_file.set_password("tokend", "demo", "SEKRIT-garbage")
    daemon = _daemon(tmp_short, auth.token_url)
    daemon.start()
    try:
        broken = daemon.cli("token", "demo")
        grant = auth.issue_grant()
        _import(daemon, "demo", grant)
        repaired = daemon.cli("token", "demo")
    finally:
        assert daemon.stop() == 0
    assert broken.returncode == 10, why(broken)
    line = one_line(broken.stderr)
    assert "run: tokend import demo" in line
    assert "SEKRIT" not in line
    assert repaired.stdout == f"{grant['access_token']}\n", why(repaired)


# ----------------------------------------------------------------------------- outages


def test_expired_during_outage_is_exit_75(tmp_short, auth):
    """When the token expires while the token endpoint is down, `token` exits 75 at once (the
    retry is in backoff) with a line that names the connector and says when to retry; the
    status shows `expired`; a forced refresh recovers once the endpoint is back."""
    auth.lifetime_s = 2.0
    daemon = _daemon(tmp_short, auth.token_url)
    daemon.start()
    try:
        _import(daemon, "demo", auth.issue_grant())
        auth.go_down()
        status = json.loads(daemon.cli("status", "demo", "--json").stdout)
        expires_at = datetime.fromisoformat(status["expires_at"].replace("Z", "+00:00"))
        # expires_at is shown in whole seconds, rounded down: wait a second more than it says.
        time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()) + 1.2)
        started = time.monotonic()
        result = daemon.cli("token", "demo")
        elapsed = time.monotonic() - started
        assert result.returncode == 75, why(result)
        assert result.stdout == ""
        line = one_line(result.stderr)
        assert line.startswith("tokend: demo: ")
        assert "retry" in line.lower()
        assert elapsed < 8.0  # answered from the backoff, not after a wait for the network
        after = json.loads(daemon.cli("status", "demo", "--json").stdout)
        assert after["state"] == "expired"
        assert after["consecutive_failures"] >= 1
        auth.come_back()
        for _ in range(3):  # a scheduled retry that began before come_back may be joined once
            refreshed = daemon.cli("refresh", "demo")
            assert refreshed.returncode == 0, why(refreshed)
            if "demo: state ok" in refreshed.stderr:
                break
        token = daemon.cli("token", "demo")
        assert token.returncode == 0, why(token)
        assert auth.is_valid_access_token(token.stdout.strip())
    finally:
        auth.come_back()
        assert daemon.stop() == 0


def test_check_without_daemon(tmp_short, auth):
    """`check` with no daemon running prints ok lines for config, keyring, state and the token
    endpoint and exits 0; with the endpoint down it exits non-zero naming the connector."""
    daemon = _daemon(tmp_short, auth.token_url)
    result = daemon.cli("check")
    assert result.returncode == 0, why(result)
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    for what in ("config", "keyring", "state", "demo"):
        assert lines[what].startswith("ok "), result.stdout
    assert "reachable" in lines["demo"]
    assert auth.token_calls == 0  # GET only: no grant presented
    auth.go_down()
    try:
        down = daemon.cli("check")
    finally:
        auth.come_back()
    assert down.returncode not in (0, 1), why(down)
    failed = [line for line in down.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, down.stdout
    assert failed[0].split()[1] == "demo"


def test_alert_command_without_sinks(tmp_short, auth):
    """`alert --unit U` with no sink configured logs the daemon_failed alert and exits 0."""
    daemon = _daemon(tmp_short, auth.token_url)
    result = daemon.cli("alert", "--unit", "tokend.service", "--result", "watchdog")
    assert result.returncode == 0, why(result)
    assert "no alert sinks configured" in result.stdout
    assert "alert daemon_failed: The tokend service tokend.service failed on" in result.stderr
    assert "(watchdog)" in result.stderr
