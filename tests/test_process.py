"""The daemon as a real process: SIGKILL and restart, SIGSTOP/SIGCONT, peer credentials of another
user, and the secret canary across logs, state, stderr, argv and environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get, require
from tokend.authserver import AuthServer

SECRET_SERVICE = "keyring.backends.SecretService.Keyring"


def _config(root: Path, auth: AuthServer, **kwargs):
    daemon = {"keyring_backend": FILE_BACKEND, **kwargs.pop("daemon", {})}
    return config_dict(root, auth.token_url, daemon=daemon, **kwargs)


def _token(proc: DaemonProcess, name: str = "demo") -> tuple[int, dict]:
    return get(proc.socket, f"/v1/connectors/{name}/token")


def _import(proc: DaemonProcess, auth: AuthServer, name: str = "demo", client: str = "tokend-demo"):
    done = proc.cli("import", name, stdin=json.dumps(auth.issue_grant(client)))
    assert done.returncode == 0, done.stderr


def test_sigkill_restart_serves_stored_token_and_chain_continues(tmp_short):
    """After SIGKILL, a restarted daemon serves the still-valid stored token at once without
    calling the token endpoint, and the next refresh continues the rotation chain."""
    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        try:
            _import(proc, auth)
            status, first = _token(proc)
            assert status == 200
            proc.kill()
            calls = auth.token_calls
            proc.start()
            status, again = _token(proc)
            assert status == 200
            assert again["access_token"] == first["access_token"]
            assert auth.token_calls == calls
            done = proc.cli("refresh", "demo")
            assert done.returncode == 0, done.stderr
            status, fresh = _token(proc)
            assert status == 200 and fresh["access_token"] != first["access_token"]
            assert auth.is_valid_access_token(fresh["access_token"])
        finally:
            assert proc.stop() == 0
    assert auth.reuse_detected == 0
    assert auth.refreshes_ok == 1


def test_sigkill_mid_refresh_loses_nothing_after_persist(tmp_short):
    """Killing the daemon repeatedly right after refreshes never leaves it with a refresh token
    the server has already retired: every restart can still refresh."""
    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        try:
            _import(proc, auth)
            for _ in range(5):
                done = proc.cli("refresh", "demo")
                assert done.returncode == 0, done.stderr
                proc.kill()
                proc.start()
            done = proc.cli("refresh", "demo")
            assert done.returncode == 0, done.stderr
        finally:
            proc.stop()
    assert auth.reuse_detected == 0
    assert auth.refreshes_ok == 6


def test_refresh_due_while_stopped_runs_on_resume(tmp_short):
    """A refresh that falls due while the daemon is SIGSTOPped runs right after SIGCONT (it is not
    dropped as a misfire), and lookups get a valid token again."""
    with AuthServer(lifetime_s=4.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        try:
            _import(proc, auth)
            proc.signal(signal.SIGSTOP)
            time.sleep(5.0)  # the refresh was due 2.3-2.7 s in; the token expired at 4 s
            before = auth.refreshes_ok
            proc.signal(signal.SIGCONT)
            deadline = time.monotonic() + 5
            while auth.refreshes_ok == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert auth.refreshes_ok > before, proc.log()[-3000:]
            status, body = _token(proc)
            assert status == 200
            assert auth.is_valid_access_token(body["access_token"])
        finally:
            proc.stop()
    assert "skipped" not in proc.log()
    assert "missed" not in proc.log()


def test_sigterm_exits_cleanly_and_removes_socket(tmp_short):
    """SIGTERM stops the daemon with exit 0, removes its socket and leaves state.json 0600."""
    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        _import(proc, auth)
        assert proc.stop() == 0
    assert not proc.socket.exists()
    state = tmp_short / "state" / "state.json"
    assert state.stat().st_mode & 0o777 == 0o600
    assert json.loads(state.read_text())["connectors"]["demo"]["state"] == "ok"


def test_socket_and_directory_modes(tmp_short):
    """The socket is 0660 in a 0750 directory."""
    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        try:
            assert proc.socket.stat().st_mode & 0o777 == 0o660
            assert proc.socket.parent.stat().st_mode & 0o777 == 0o750
        finally:
            proc.stop()


def test_other_uid_gets_403_unless_allowed(tmp_short):
    """A client running as another user (nobody) is refused the token of a connector that does
    not allow it (403 forbidden) and served the one whose allow list names it; status answers
    anyone who can connect, admin routes are refused."""
    require(os.geteuid() == 0, "needs root to run a client as another user")
    require(shutil.which("curl") is not None, "needs curl")
    os.chmod(tmp_short, 0o755)
    with AuthServer(lifetime_s=60.0) as auth:
        config = _config(
            tmp_short,
            auth,
            connectors={"private": {}, "shared": {"allow": ["user:nobody"]}},
            daemon={"socket_group": "nogroup"},
        )
        proc = DaemonProcess(tmp_short, config).start()
        try:
            _import(proc, auth, "private")
            _import(proc, auth, "shared")

            def curl(path: str, method: str = "GET") -> tuple[int, dict]:
                done = subprocess.run(
                    [
                        "curl",
                        "-s",
                        "-X",
                        method,
                        "-w",
                        "\n%{http_code}",
                        "--unix-socket",
                        str(proc.socket),
                        f"http://tokend{path}",
                    ],
                    capture_output=True,
                    text=True,
                    user=65534,
                    group=65534,
                    extra_groups=[],
                    timeout=30,
                    check=False,
                )
                body, _, code = done.stdout.rpartition("\n")
                return int(code), json.loads(body)

            code, body = curl("/v1/connectors/private/token")
            assert code == 403
            assert body["error"] == "forbidden" and body["connector"] == "private"
            code, body = curl("/v1/connectors/shared/token")
            assert code == 200 and auth.is_valid_access_token(body["access_token"])
            code, body = curl("/v1/connectors")
            assert code == 200 and len(body["connectors"]) == 2
            code, body = curl("/v1/connectors/shared/refresh", "POST")
            assert code == 403
        finally:
            proc.stop()


def test_secret_canary_never_leaks(tmp_short):
    """Client secret, refresh tokens and access tokens appear in no log line (at DEBUG), no state
    file, no CLI stderr, and not in the daemon's argv or environment, across install, refreshes,
    lookups, a transient failure and invalid_grant."""
    canary = "CANARY-client-secret-7f3a9c"
    with AuthServer(lifetime_s=60.0, clients={"conf": canary}) as auth:
        config = _config(
            tmp_short,
            auth,
            connectors={"demo": {"client_id": "conf", "client_auth": "client_secret_post"}},
        )
        proc = DaemonProcess(tmp_short, config).start()
        stderr: list[str] = []
        seen: set[str] = {canary}
        try:
            done = proc.cli("secret", "demo", stdin=canary + "\n")
            stderr.append(done.stderr)
            assert done.returncode == 0, done.stderr
            grant = auth.issue_grant("conf")
            seen.update({str(grant["access_token"]), str(grant["refresh_token"])})
            done = proc.cli("import", "demo", stdin=json.dumps(grant))
            stderr.append(done.stderr)
            for _ in range(3):
                done = proc.cli("refresh", "demo")
                stderr.append(done.stderr)
                assert done.returncode == 0, done.stderr
                done = proc.cli("token", "demo")
                stderr.append(done.stderr)
                seen.add(done.stdout.strip())
            auth.fail_next("garbage")
            stderr.append(proc.cli("refresh", "demo").stderr)
            auth.fail_next("invalid_grant")
            stderr.append(proc.cli("refresh", "demo").stderr)
            stderr.append(proc.cli("token", "demo").stderr)
            stderr.append(proc.cli("status").stderr)
            assert proc.proc is not None
            pid = proc.proc.pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        finally:
            proc.stop()
    for request in auth.requests:
        for key in ("refresh_token", "client_secret"):
            if request.form.get(key):
                seen.add(request.form[key])
    seen.discard("")
    assert len(seen) >= 6
    haystacks = {
        "daemon log": proc.log(),
        "cli stderr": "\n".join(stderr),
        "argv": cmdline,
        "environment": environ,
    }
    for path in (tmp_short / "state").iterdir():
        if path.name != "keyring.enc" and path.is_file():
            haystacks[str(path)] = path.read_text(errors="replace")
    assert "refreshed demo" in haystacks["daemon log"]  # the log is there and verbose
    for where, text in haystacks.items():
        for secret in seen:
            assert secret not in text, f"a secret leaked into {where}"


def test_secret_service_backend_end_to_end(tmp_short):
    """With a real gnome-keyring-daemon on a private D-Bus session as the keyring, the daemon
    stores a grant, serves it, keeps it across SIGKILL and refreshes it (skipped locally without
    gnome-keyring; CI fails instead of skipping)."""
    from tests.secretservice import secret_service

    with secret_service() as env, AuthServer(lifetime_s=60.0) as auth:
        config = _config(tmp_short, auth, daemon={"keyring_backend": SECRET_SERVICE})
        proc = DaemonProcess(tmp_short, config, env=env).start()
        try:
            _import(proc, auth)
            status, first = _token(proc)
            assert status == 200
            proc.kill()
            proc.start()
            status, again = _token(proc)
            assert status == 200 and again["access_token"] == first["access_token"]
            done = proc.cli("refresh", "demo")
            assert done.returncode == 0, done.stderr
            check = proc.cli("check")
            assert f"ok    keyring    {SECRET_SERVICE}" in check.stdout
        finally:
            assert proc.stop() == 0
        assert "keyring backend keyring.backends.SecretService.Keyring" in proc.log()
        assert not (tmp_short / "state" / "keyring.enc").exists()
    assert auth.reuse_detected == 0


def test_unusable_keyring_refuses_to_start(tmp_short):
    """With keyring's fail backend the daemon exits 78 before binding its socket, naming the
    backend it tried and the headless options; it never falls back to plaintext or memory."""
    with AuthServer(lifetime_s=60.0) as auth:
        config = _config(
            tmp_short, auth, daemon={"keyring_backend": "keyring.backends.fail.Keyring"}
        )
        proc = DaemonProcess(tmp_short, config)
        proc.start(wait=False)
        assert proc.proc is not None
        assert proc.proc.wait(30) == 78
    log = proc.log()
    assert "keyring.backends.fail.Keyring" in log
    assert "tokend.keyring_file.EncryptedFileKeyring" in log
    assert len([line for line in log.splitlines() if line.startswith("tokend:")]) == 1
    assert not proc.socket.exists()


def test_sigterm_waits_for_refresh_in_flight_to_be_persisted(tmp_short):
    """SIGTERM during a slow refresh waits for it: the rotated refresh token reaches the keyring
    before the daemon exits 0, so the restarted daemon serves the new token and refreshes on."""
    import threading

    with AuthServer(lifetime_s=60.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth)).start()
        _import(proc, auth)
        auth.fail_next("slow", delay_s=3.0)
        client = threading.Thread(target=lambda: proc.cli("refresh", "demo"), daemon=True)
        client.start()
        deadline = time.monotonic() + 10
        while get(proc.socket, "/v1/connectors/demo")[1]["state"] != "refreshing":
            assert time.monotonic() < deadline, "the refresh never started"
            time.sleep(0.02)
        proc.signal(signal.SIGTERM)
        assert proc.stop() == 0
        assert auth.refreshes_ok == 1
        calls = auth.token_calls
        proc.start()
        status, body = _token(proc)
        assert status == 200
        assert auth.is_valid_access_token(body["access_token"])
        assert auth.token_calls == calls  # the refreshed set was stored: no new call needed
        done = proc.cli("refresh", "demo")
        assert done.returncode == 0, done.stderr
        proc.stop()
        client.join(30)
    assert auth.reuse_detected == 0
    assert "waiting for 1 refreshes in flight" in proc.log()
