"""Security properties of the daemon as a real process: allow lists enforced against real other
users (and re-read on reload), private file modes, no token in any process's argv or environment,
no secret in status, health, metrics or alerts, and token endpoints that must be TLS-verified.

Tests that need other users create throwaway system users and groups (`tkdtest-*`) and remove
them afterwards; they need root and are skipped without it. A tool they need (curl, useradd, a
system python3) that is missing skips the test locally and fails it under CI=true.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get, to_toml, why
from tests.pki import Pki, make_pki
from tokend.authserver import AuthServer

IN_CI = os.environ.get("CI") == "true"
needs_root = pytest.mark.skipif(  # under CI=true these run, and fail without root
    os.geteuid() != 0 and not IN_CI,
    reason="needs root: creates throwaway users and runs clients as them",
)

USER_A = "tkdtest-a"  # primary group GROUP_ALLOW, supplementary GROUP_SOCKET
USER_B = "tkdtest-b"  # its own primary group, supplementary GROUP_SOCKET and GROUP_ALLOW
USER_OUT = "tkdtest-out"  # in none of our groups: cannot even connect
GROUP_SOCKET = "tkdtest-sock"
GROUP_ALLOW = "tkdtest-allow"
USERS = (USER_A, USER_B, USER_OUT)
GROUPS = (GROUP_SOCKET, GROUP_ALLOW)
CONFIG_EXIT = 78


def require_tool(name: str, *candidates: str) -> str:
    """The path of tool `name` (or the first existing candidate path); skip, or fail under CI."""
    found = next((c for c in candidates if os.access(c, os.X_OK)), None) or shutil.which(name)
    if found is None:
        message = f"needs {name} on this machine"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: a missing tool fails instead of skipping)")
        pytest.skip(message)
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _delete_accounts() -> None:
    """Remove our users and groups if they exist (also leftovers from a killed run)."""
    for user in USERS:
        if _exists(pwd.getpwnam, user):
            _run("userdel", user)
    for group in (*GROUPS, *USERS):  # useradd may have made a same-named primary group
        if _exists(grp.getgrnam, group):
            _run("groupdel", group)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _checked(*argv: str) -> None:
    done = _run(*argv)
    assert done.returncode == 0, f"{' '.join(argv)}: {why(done)}"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as the group database has them


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Account]]:
    """Throwaway users and groups, created for this module and removed at its end."""
    if os.geteuid() != 0 and not IN_CI:
        pytest.skip("needs root: creates throwaway users")
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "usermod"):
        require_tool(tool)
    _delete_accounts()
    try:
        for group in GROUPS:
            _checked("groupadd", "--system", group)
        nologin = ("--system", "--no-create-home", "--shell", "/usr/sbin/nologin")
        _checked("useradd", *nologin, "--no-user-group", "--gid", GROUP_ALLOW, USER_A)
        _checked("useradd", *nologin, "--user-group", USER_B)
        _checked("useradd", *nologin, "--user-group", USER_OUT)
        _checked("usermod", "-aG", GROUP_SOCKET, USER_A)
        _checked("usermod", "-aG", f"{GROUP_SOCKET},{GROUP_ALLOW}", USER_B)
        found: dict[str, Account] = {}
        for user in USERS:
            entry = pwd.getpwnam(user)
            extra = tuple(g for g in os.getgrouplist(user, entry.pw_gid) if g != entry.pw_gid)
            found[user] = Account(user, entry.pw_uid, entry.pw_gid, extra)
        yield found
    finally:
        _delete_accounts()
    assert not any(_exists(pwd.getpwnam, u) for u in USERS), "a throwaway user was left behind"
    assert not any(_exists(grp.getgrnam, g) for g in GROUPS), "a throwaway group was left behind"


def _config(root: Path, token_url: str, **kwargs: Any) -> dict[str, Any]:
    daemon = {"keyring_backend": FILE_BACKEND, **kwargs.pop("daemon", {})}
    return config_dict(root, token_url, daemon=daemon, **kwargs)


def _import(proc: DaemonProcess, auth: AuthServer, name: str, client: str = "tokend-demo") -> None:
    done = proc.cli("import", name, stdin=json.dumps(auth.issue_grant(client)))
    assert done.returncode == 0, why(done)


def _until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout:.0f} s"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- allow lists


def _curl_as(account: Account, socket_path: Path, path: str) -> tuple[int, dict[str, Any]]:
    """GET `path` over the socket with curl running as `account` (its real groups)."""
    curl = require_tool("curl")
    done = subprocess.run(
        [curl, "-sS", "-w", "\n%{http_code}", "--unix-socket", str(socket_path), f"http://t{path}"],
        capture_output=True,
        text=True,
        user=account.uid,
        group=account.gid,
        extra_groups=list(account.groups),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, why(done)
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def _connect_errno_as(account: Account, socket_path: Path) -> str:
    """Try to connect to the socket as `account`; "ok" or the errno name it failed with."""
    python = require_tool("python3", "/usr/bin/python3")  # ours under /root: not for others
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "    print('ok')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode.get(e.errno, str(e.errno)))\n"
    )
    done = subprocess.run(
        [python, "-I", "-c", code, str(socket_path)],
        capture_output=True,
        text=True,
        user=account.uid,
        group=account.gid,
        extra_groups=list(account.groups),
        timeout=30,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0, why(done)
    return done.stdout.strip()


def _allow_connectors(a: Account, b: Account, *, swapped: bool) -> dict[str, dict[str, Any]]:
    """`by-user` names A (B once swapped), `by-group` the allow group, `by-uid` B's uid (A's)."""
    first, second = (b, a) if swapped else (a, b)
    return {
        "by-user": {"allow": [f"user:{first.name}"]},
        "by-group": {"allow": [f"group:{GROUP_ALLOW}"]},
        "by-uid": {"allow": [f"uid:{second.uid}"]},
        "private": {},
    }


@needs_root
def test_allow_lists_with_real_users_and_reload(tmp_short: Path, accounts: dict[str, Account]):
    """Real other users get exactly the tokens their allow entries grant (user:, uid:, group: by
    primary and by supplementary group), 403 forbidden naming the connector otherwise; a user
    outside the socket group cannot connect (EACCES); SIGHUP applies a changed allow list."""
    a, b, out = accounts[USER_A], accounts[USER_B], accounts[USER_OUT]
    os.chmod(tmp_short, 0o755)  # the socket's parent must be traversable for the other users
    with AuthServer(lifetime_s=60.0) as auth:
        daemon = {"socket_group": GROUP_SOCKET}
        connectors = _allow_connectors(a, b, swapped=False)
        proc = DaemonProcess(
            tmp_short, _config(tmp_short, auth.token_url, daemon=daemon, connectors=connectors)
        ).start()
        try:
            for name in connectors:
                _import(proc, auth, name)

            def token(account: Account, name: str) -> tuple[int, dict[str, Any]]:
                return _curl_as(account, proc.socket, f"/v1/connectors/{name}/token")

            def assert_served(account: Account, name: str) -> None:
                code, body = token(account, name)
                assert code == 200, (account.name, name, body)
                assert auth.is_valid_access_token(body["access_token"])

            def assert_refused(account: Account, name: str) -> None:
                code, body = token(account, name)
                assert code == 403, (account.name, name, body)
                assert body["error"] == "forbidden" and body["connector"] == name
                assert "access_token" not in body

            assert_served(a, "by-user")  # user:
            assert_refused(b, "by-user")
            assert_served(a, "by-group")  # primary group
            assert_served(b, "by-group")  # supplementary group, via SO_PEERGROUPS
            assert_served(b, "by-uid")  # uid:
            assert_refused(a, "by-uid")
            assert_refused(a, "private")
            assert_refused(b, "private")
            assert _connect_errno_as(out, proc.socket) == "EACCES"
            assert _connect_errno_as(a, proc.socket) == "ok"

            swapped = _allow_connectors(a, b, swapped=True)
            config = _config(tmp_short, auth.token_url, daemon=daemon, connectors=swapped)
            proc.config_path.write_text(to_toml(config))
            proc.signal(signal.SIGHUP)
            _until(lambda: token(b, "by-user")[0] == 200, "reload applied to by-user")
            _until(lambda: token(a, "by-uid")[0] == 200, "reload applied to by-uid")
            assert_served(b, "by-user")
            assert_refused(a, "by-user")
            assert_served(a, "by-uid")
            assert_refused(b, "by-uid")
            assert_served(b, "by-group")
        finally:
            assert proc.stop() == 0, proc.log()[-3000:]


# ----------------------------------------------------------------------------- file modes


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_state_keyring_lock_and_key_files_are_private(tmp_short: Path):
    """The state dir is 0700; state.json, the keyring file, its key and the lock file are 0600,
    and stay so after refreshes rewrite them."""
    canary = "cs-CANARY-modes-5e1d"
    with AuthServer(lifetime_s=60.0, clients={"conf": canary}) as auth:
        connectors = {"demo": {"client_id": "conf", "client_auth": "client_secret_post"}}
        proc = DaemonProcess(
            tmp_short, _config(tmp_short, auth.token_url, connectors=connectors)
        ).start()
        state = tmp_short / "state"
        files = [state / n for n in ("state.json", "keyring.enc", "keyring.enc.key", "tokend.lock")]
        try:
            done = proc.cli("secret", "demo", stdin=canary + "\n")
            assert done.returncode == 0, why(done)
            _import(proc, auth, "demo", client="conf")
            for _ in range(2):
                done = proc.cli("refresh", "demo")
                assert done.returncode == 0, why(done)
            _until(lambda: (state / "state.json").exists(), "state.json written")
            assert _mode(state) == 0o700
            for path in files:
                assert _mode(path) == 0o600, f"{path.name} is {_mode(path):o}"
        finally:
            assert proc.stop() == 0
    assert auth.refreshes_ok == 2
    for path in files[:3]:
        assert _mode(path) == 0o600, f"{path.name} is {_mode(path):o} after stop"


# ----------------------------------------------------------------------------- argv and environ


def _all_argv_and_environ() -> dict[str, bytes]:
    """Every readable /proc/PID/cmdline and environ on the machine, by name."""
    found: dict[str, bytes] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            try:
                found[f"{entry.name}/{part}"] = (entry / part).read_bytes()
            except OSError:  # gone, or not ours to read
                continue
    return found


def test_no_token_in_any_process_argv_or_environment(tmp_short: Path):
    """While the daemon serves and refreshes on its own, no process on the machine has an access
    or refresh token in its argv or environment."""
    with AuthServer(lifetime_s=3.0) as auth:
        proc = DaemonProcess(tmp_short, _config(tmp_short, auth.token_url)).start()
        snapshots: list[dict[str, bytes]] = []
        secrets: set[str] = set()
        try:
            grant = auth.issue_grant()
            secrets.update({str(grant["access_token"]), str(grant["refresh_token"])})
            done = proc.cli("import", "demo", stdin=json.dumps(grant))
            assert done.returncode == 0, why(done)
            served: set[str] = set()
            deadline = time.monotonic() + 30
            while len(served) < 3 or len(snapshots) < 5:  # the grant's token and two refreshed
                assert time.monotonic() < deadline, "the daemon did not refresh twice in 30 s"
                status, body = get(proc.socket, "/v1/connectors/demo/token")
                assert status == 200, body
                served.add(body["access_token"])
                done = proc.cli("token", "demo")
                assert done.returncode == 0, why(done)
                secrets.add(done.stdout.strip())
                snapshots.append(_all_argv_and_environ())
                time.sleep(0.3)
        finally:
            assert proc.stop() == 0
    secrets.update(r.form["refresh_token"] for r in auth.requests if r.form.get("refresh_token"))
    secrets.discard("")
    assert len(secrets) >= 5  # the grant's pair, two refreshed access tokens, one rotated refresh
    assert proc.proc is not None
    assert all(f"{proc.proc.pid}/environ" in snapshot for snapshot in snapshots)  # it was scanned
    for snapshot in snapshots:
        for where, data in snapshot.items():
            for secret in secrets:
                assert secret.encode() not in data, f"a token is in /proc/{where}"


# ----------------------------------------------------------------------------- status, alerts


class _Receiver:
    """A loopback webhook endpoint that keeps the raw bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_secrets_absent_from_status_health_metrics_and_alerts(tmp_short: Path):
    """After a transient failure and invalid_grant, connector status, health, /metrics and every
    alert delivered to the exec and webhook sinks hold no client secret, access or refresh token."""
    canary = "cs-CANARY-status-alerts-8b2f"
    out = tmp_short / "exec-events.jsonl"
    script = tmp_short / "alert-sink"
    script.write_text(f'#!/bin/sh\ncat >> "{out}"\necho >> "{out}"\n')
    script.chmod(0o755)
    receiver = _Receiver()
    try:
        with AuthServer(lifetime_s=60.0, clients={"conf": canary}) as auth:
            config = _config(
                tmp_short,
                auth.token_url,
                connectors={"demo": {"client_id": "conf", "client_auth": "client_secret_post"}},
            )
            config["alerts"] = {"exec": [str(script)], "webhook": receiver.url}
            proc = DaemonProcess(tmp_short, config).start()
            secrets: set[str] = {canary}
            answers: dict[str, str] = {}

            def look(label: str) -> None:
                for path in ("/v1/connectors", "/v1/connectors/demo", "/v1/health", "/metrics"):
                    status, body = get(proc.socket, path)
                    assert status in (200, 503), (path, body)
                    answers[f"{label} {path}"] = json.dumps(body)

            try:
                done = proc.cli("secret", "demo", stdin=canary + "\n")
                assert done.returncode == 0, why(done)
                grant = auth.issue_grant("conf")
                secrets.update({str(grant["access_token"]), str(grant["refresh_token"])})
                done = proc.cli("import", "demo", stdin=json.dumps(grant))
                assert done.returncode == 0, why(done)
                for _ in range(2):
                    assert proc.cli("refresh", "demo").returncode == 0
                    secrets.add(get(proc.socket, "/v1/connectors/demo/token")[1]["access_token"])
                look("ok")
                auth.fail_next("503")
                proc.cli("refresh", "demo")
                _, status = get(proc.socket, "/v1/connectors/demo")
                assert status["state"] == "retrying" and status["last_error"], status
                look("retrying")
                auth.fail_next("invalid_grant")
                proc.cli("refresh", "demo")
                _, status = get(proc.socket, "/v1/connectors/demo")
                assert status["state"] == "needs_reauth", status
                look("needs_reauth")

                def delivered() -> bool:
                    hooks = [json.loads(b)["event"] for b in receiver.bodies]
                    return "needs_reauth" in hooks and "needs_reauth" in _read(out)

                _until(delivered, "needs_reauth delivered to both sinks")
            finally:
                assert proc.stop() == 0
        secrets.update(
            r.form["refresh_token"] for r in auth.requests if r.form.get("refresh_token")
        )
        secrets.update(
            r.form["client_secret"] for r in auth.requests if r.form.get("client_secret")
        )
    finally:
        receiver.close()
    secrets.discard("")
    assert len(secrets) >= 6
    assert auth.refreshes_ok == 2
    haystacks = {**answers, "exec sink": _read(out)}
    haystacks.update({f"webhook #{i}": b.decode() for i, b in enumerate(receiver.bodies)})
    assert "tokend_" in haystacks["ok /metrics"]
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into {where}"


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# ----------------------------------------------------------------------------- token endpoints


@pytest.mark.parametrize("url", ["http://example.com/token", "http://10.0.0.1:8080/token"])
def test_plain_http_token_url_refused_for_non_loopback_host(tmp_short: Path, url: str):
    """An http:// token endpoint on a non-loopback host is refused at config load: exit 78 with a
    message naming the key."""
    proc = DaemonProcess(tmp_short, _config(tmp_short, url))
    proc.start(wait=False)
    assert proc.proc is not None
    assert proc.proc.wait(30) == CONFIG_EXIT
    log = proc.log()
    assert "connectors.demo.token_url" in log and "https" in log, log
    assert not proc.socket.exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_plain_http_token_url_accepted_for_loopback(tmp_short: Path, host: str):
    """An http:// token endpoint on a loopback host is accepted and refreshes work."""
    with AuthServer(lifetime_s=60.0) as auth:
        url = auth.token_url.replace("127.0.0.1", host)
        proc = DaemonProcess(tmp_short, _config(tmp_short, url)).start()
        try:
            _import(proc, auth, "demo")
            done = proc.cli("refresh", "demo")
            assert done.returncode == 0, why(done)
        finally:
            assert proc.stop() == 0
    assert auth.refreshes_ok == 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed TLS handshakes are what these tests provoke


class _TlsFront:
    """An HTTPS endpoint on 127.0.0.1 that passes each POST on to the loopback AuthServer."""

    def __init__(self, pki: Pki, auth: AuthServer) -> None:
        self.hits = 0
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                front.hits += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream = http.client.HTTPConnection("127.0.0.1", auth.port, timeout=30)
                try:
                    upstream.request("POST", "/token", body=body, headers=headers)
                    answer = upstream.getresponse()
                    status, data, ctype = answer.status, answer.read(), answer.headers
                finally:
                    upstream.close()
                self.send_response(status)
                self.send_header("Content-Type", ctype.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert_file, pki.key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.token_url = f"https://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_https_token_endpoint_with_untrusted_certificate(tmp_short: Path):
    """An https token endpoint whose certificate the system does not trust fails every refresh
    with a TLS error (the connector is not `ok`); with `ca_file` naming its CA, refreshes work."""
    pki = make_pki(tmp_short)
    with AuthServer(lifetime_s=60.0) as auth:
        front = _TlsFront(pki, auth)
        try:
            connectors = {"untrusted": {}, "trusted": {"ca_file": str(pki.ca_file)}}
            config = _config(tmp_short, front.token_url, connectors=connectors)
            proc = DaemonProcess(tmp_short, config).start()
            try:
                _import(proc, auth, "untrusted")
                _import(proc, auth, "trusted")
                done = proc.cli("refresh", "untrusted")
                assert done.returncode == 75, why(done)  # temporary failure: retry later
                assert "CERTIFICATE_VERIFY_FAILED" in done.stderr, why(done)
                _, status = get(proc.socket, "/v1/connectors/untrusted")
                assert status["state"] in ("retrying", "expired"), status
                assert "CERTIFICATE_VERIFY_FAILED" in str(status["last_error"]), status
                assert auth.refreshes_ok == 0
                for _ in range(2):
                    done = proc.cli("refresh", "trusted")
                    assert done.returncode == 0, why(done)
                _, status = get(proc.socket, "/v1/connectors/trusted")
                assert status["state"] == "ok", status
                code, body = get(proc.socket, "/v1/connectors/trusted/token")
                assert code == 200 and auth.is_valid_access_token(body["access_token"])
            finally:
                assert proc.stop() == 0
        finally:
            front.close()
    assert auth.refreshes_ok == 2
    assert front.hits == 2  # the untrusted handshake never reached a request
