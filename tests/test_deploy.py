"""deploy/: the systemd units pass systemd's own checks, and both headless keyring recipes of
deploy/README.md work when followed for real.

How the units are checked: `systemd-analyze verify` also insists that every ExecStart= binary
exists, and /usr/bin/tokend does not on a test machine. `--root=` would need a whole unit tree
(sysinit.target and friends) inside the alternate root, so instead each unit is copied into a
temp directory with the tokend paths (/usr/bin/tokend, /usr/libexec/tokend-secret-service,
%h/.local/bin/tokend) pointed at a stub executable; nothing else in the unit changes. verify
exits 0 even for unknown keys and bad values, so the test asserts its output is empty. The
template is checked through an instance (tokend-alert@test.service), which systemd loads from
the template file in the same directory; the user unit is checked with `--user`.

The recipes: (a) `systemd-creds encrypt` a generated key, `systemd-creds decrypt` it into a
directory standing in for $CREDENTIALS_DIRECTORY (what systemd does for
LoadCredentialEncrypted=), and run the daemon with the encrypted-file keyring on it;
$SYSTEMD_CREDENTIAL_SECRET keeps systemd-creds' host key in the temp directory, so the test
never creates /var/lib/systemd/credential.secret. (b) run deploy/tokend-secret-service with a
password file in a stand-in $CREDENTIALS_DIRECTORY and the SecretService backend.

Everything needs root (systemd-creds, and the units are system units) and systemd's tools: the
tests skip without them, except under CI=true, where they fail (CI must not skip them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get
from tokend.authserver import AuthServer
from tokend.keyring_file import EncryptedFileKeyring, KeyMismatchError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
WRAPPER = DEPLOY / "tokend-secret-service"
SECRET_SERVICE = "keyring.backends.SecretService.Keyring"
# The paths the units run tokend from; staged copies point them at a stub.
EXEC_PATHS = ("/usr/bin/tokend", "/usr/libexec/tokend-secret-service", "%h/.local/bin/tokend")
# Environment that would steer the keyring or the bus away from what a test sets up.
_FOREIGN_ENV = re.compile(
    r"KEYRING_PROPERTY_.*|TOKEND_KEYRING_.*|PYTHON_KEYRING_BACKEND|XDG_.*|DBUS_.*|"
    r"CREDENTIALS_DIRECTORY|STATE_DIRECTORY|RUNTIME_DIRECTORY|NOTIFY_SOCKET|WATCHDOG_.*|LISTEN_.*"
)
# Runs argv[1:] with the kernel's MDWE (Linux >= 6.3) set, which is what systemd's
# MemoryDenyWriteExecute=yes amounts to: no memory that is (or was) writable may be executable.
_NO_WRITE_EXECUTE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _require(ok: bool, message: str) -> None:
    """Skip the test unless `ok`; under CI=true fail instead (CI must not skip these tests)."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI must not skip the deploy tests)")
    pytest.skip(message)


def _require_root() -> None:
    _require(os.geteuid() == 0, "needs root (systemd-creds and system units)")


def _require_program(program: str, package: str) -> str:
    path = shutil.which(program)
    _require(path is not None, f"{program} not found: install the Debian package {package!r}")
    assert path is not None
    return path


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.fullmatch(k)}
    return {**env, **extra}


def _stage(target: Path, names: tuple[str, ...]) -> Path:
    """Copy deploy/ files into `target` with the tokend paths pointed at a stub; returns it."""
    stub = target / "stub-tokend"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in names:
        text = (DEPLOY / name).read_text()
        for path in EXEC_PATHS:
            text = text.replace(path, str(stub))
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    return target


@pytest.fixture
def analyze() -> str:
    """systemd-analyze, as root; skipped (failed under CI=true) otherwise."""
    _require_root()
    return _require_program("systemd-analyze", "systemd")


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("files", "unit", "user"),
    [
        (("tokend.service", "tokend-alert@.service"), "tokend.service", False),
        (
            ("tokend.service", "tokend-alert@.service", "tokend.service.d/secret-service.conf"),
            "tokend.service",
            False,
        ),
        (("tokend.socket", "tokend.service", "tokend-alert@.service"), "tokend.socket", False),
        (("tokend-alert@.service",), "tokend-alert@test.service", False),
        (("tokend-user.service",), "tokend-user.service", True),
    ],
    ids=["service", "service+secret-service", "socket", "alert-template", "user"],
)
def test_unit_verifies_without_a_word(analyze, tmp_path, files, unit, user):
    """`systemd-analyze verify` loads the unit (with its drop-in, template or socket partner)
    and prints nothing: no unknown key, bad value, missing unit or missing binary."""
    staged = _stage(tmp_path, files)
    argv = [analyze, "--man=no", "--generators=no"]
    env = _clean_env()
    if user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        argv.append("--user")
    done = _run(*argv, "verify", str(staged / unit), env=env)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize(
    ("files", "unit"),
    [
        (("tokend.service",), "tokend.service"),
        (("tokend.service", "tokend.service.d/secret-service.conf"), "tokend.service"),
        (("tokend-alert@.service",), "tokend-alert@test.service"),
    ],
    ids=["service", "service+secret-service", "alert"],
)
def test_security_exposure_is_ok(analyze, tmp_path, files, unit):
    """`systemd-analyze security --offline=yes --threshold=20` passes (exposure at most 2.0,
    "OK"); the score is printed (`pytest -rP` shows it; 1.2 for all three with systemd 252)."""
    staged = _stage(tmp_path, files)
    done = _run(
        analyze,
        "security",
        "--offline=yes",
        "--threshold=20",
        str(staged / unit),
        env=_clean_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout
    print(f"{unit} ({', '.join(files)}): exposure {found.group(1)}")


def test_units_agree_on_names_and_paths():
    """The socket, service, sysusers and tmpfiles files name the same user, group, directory
    and socket path, and the service's group is the socket's client group."""
    service = (DEPLOY / "tokend.service").read_text()
    socket_unit = (DEPLOY / "tokend.socket").read_text()
    sysusers = (DEPLOY / "sysusers.d" / "tokend.conf").read_text()
    tmpfiles = (DEPLOY / "tmpfiles.d" / "tokend.conf").read_text()
    assert "\nUser=tokend\n" in service and "\nGroup=tokend-clients\n" in service
    assert "\nRuntimeDirectory=tokend\n" in service
    assert "\nRuntimeDirectoryMode=0750\n" in service
    assert "\nRuntimeDirectoryPreserve=yes\n" in service
    assert "\nListenStream=/run/tokend/tokend.sock\n" in socket_unit
    assert (
        "\nSocketUser=tokend\n" in socket_unit and "\nSocketGroup=tokend-clients\n" in socket_unit
    )
    assert "\nSocketMode=0660\n" in socket_unit
    assert re.search(r"^g tokend-clients -$", sysusers, re.M)
    assert re.search(r'^u tokend - "tokend daemon" /var/lib/tokend$', sysusers, re.M)
    assert re.search(r"^d /run/tokend 0750 tokend tokend-clients -$", tmpfiles, re.M)


# ----------------------------------------------------------------------------- recipe (a)


def _creds(*args: str, secret: Path, stdin: str | None = None) -> None:
    done = _run(
        "systemd-creds", *args, input=stdin, env=_clean_env(SYSTEMD_CREDENTIAL_SECRET=str(secret))
    )
    assert done.returncode == 0, done.stderr


def _file_keyring_daemon(root: Path, auth: AuthServer, credentials: Path) -> DaemonProcess:
    """A DaemonProcess with the encrypted-file keyring, environment as systemd would give it."""
    config = config_dict(root, auth.token_url, daemon={"keyring_backend": FILE_BACKEND})
    proc = DaemonProcess(root, config)
    proc.env = _clean_env(
        TOKEND_CONFIG=str(proc.config_path),
        CREDENTIALS_DIRECTORY=str(credentials),
        STATE_DIRECTORY=config["daemon"]["state_dir"],
    )
    return proc


def _import_and_fetch(proc: DaemonProcess, auth: AuthServer) -> None:
    done = proc.cli("import", "demo", stdin=json.dumps(auth.issue_grant("tokend-demo")))
    assert done.returncode == 0, done.stderr
    _fetch(proc, auth)


def _fetch(proc: DaemonProcess, auth: AuthServer) -> None:
    status, body = get(proc.socket, "/v1/connectors/demo/token")
    assert status == 200, body
    assert auth.is_valid_access_token(body["access_token"])


@contextlib.contextmanager
def _spawned(proc: DaemonProcess, argv: list[str]) -> Iterator[DaemonProcess]:
    """Start `argv` as `proc`'s daemon in its own process group; at the end SIGTERM the main
    process, expect exit 0, and take down whatever else is left in the group."""
    proc.log_path = proc.root / f"daemon-{time.monotonic_ns()}.log"
    proc.logs.append(proc.log_path)
    with proc.log_path.open("wb") as log:
        proc.proc = subprocess.Popen(
            argv,
            env=proc.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        proc.wait_ready(timeout=60)
        yield proc
        assert proc.stop() == 0, proc.log()[-2000:]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(10)


def test_recipe_a_key_from_encrypted_credential(tmp_short):
    """README recipe (a): a key sealed with `systemd-creds encrypt` and decrypted as
    LoadCredentialEncrypted= would, keys the daemon's keyring file: a grant is stored and
    served, no key is generated beside keyring.enc, and another key opens nothing."""
    _require_root()
    _require_program("systemd-creds", "systemd")
    host_secret = tmp_short / "credential.secret"
    credstore = tmp_short / "credstore.encrypted"
    credstore.mkdir(mode=0o700)
    sealed = credstore / "tokend-keyring-key"
    # As in README: head -c 32 /dev/urandom | base64 | systemd-creds encrypt --name=... - FILE
    key_text = base64.b64encode(os.urandom(32)).decode() + "\n"
    _creds(
        "encrypt", "--name=tokend-keyring-key", "-", str(sealed), secret=host_secret, stdin=key_text
    )
    assert key_text.strip() not in sealed.read_text()
    credentials = tmp_short / "credentials"
    credentials.mkdir(mode=0o700)
    _creds(
        "decrypt",
        "--name=tokend-keyring-key",
        str(sealed),
        str(credentials / "tokend-keyring-key"),
        secret=host_secret,
    )
    (credentials / "tokend-keyring-key").chmod(0o400)
    credentials.chmod(0o500)

    with AuthServer(lifetime_s=60.0) as auth:
        proc = _file_keyring_daemon(tmp_short, auth, credentials)
        proc.start()
        try:
            _import_and_fetch(proc, auth)
        finally:
            assert proc.stop() == 0
    state = Path(proc.env["STATE_DIRECTORY"])
    keyring_file = state / "keyring.enc"
    assert keyring_file.exists()
    assert not (state / "keyring.enc.key").exists()
    opened = EncryptedFileKeyring(keyring_file, str(credentials / "tokend-keyring-key"))
    assert opened.get_password("tokend", "demo") is not None
    other = tmp_short / "other.key"
    other.write_bytes(base64.b64encode(os.urandom(32)))
    other.chmod(0o600)
    with pytest.raises(KeyMismatchError):
        EncryptedFileKeyring(keyring_file, str(other)).get_password("tokend", "demo")


def test_recipe_a_daemon_refuses_a_different_credential(tmp_short):
    """With a keyring file sealed under one credential, a daemon given another exits 78 and
    names the key, instead of generating a fresh key and starting empty."""
    credentials = tmp_short / "credentials"
    credentials.mkdir(mode=0o700)
    key = credentials / "tokend-keyring-key"
    key.write_bytes(base64.b64encode(os.urandom(32)))
    with AuthServer(lifetime_s=60.0) as auth:
        proc = _file_keyring_daemon(tmp_short, auth, credentials)
        proc.start()
        try:
            _import_and_fetch(proc, auth)
        finally:
            assert proc.stop() == 0
        key.write_bytes(base64.b64encode(os.urandom(32)))
        proc.start(wait=False)
        assert proc.proc is not None
        assert proc.proc.wait(30) == 78
    assert "tokend-keyring-key" in proc.log()
    assert not (Path(proc.env["STATE_DIRECTORY"]) / "keyring.enc.key").exists()


def test_daemon_serves_with_no_write_execute_memory(tmp_short):
    """Under the kernel's MDWE (what MemoryDenyWriteExecute=yes sets), the daemon still starts,
    stores a grant in the encrypted file (cryptography), refreshes it (httpx, ssl) and serves
    it (h11)."""
    probe = _run(sys.executable, "-c", _NO_WRITE_EXECUTE, "/bin/true")
    if probe.returncode != 0:
        pytest.skip(f"kernel without PR_SET_MDWE (Linux >= 6.3): {probe.stderr.strip()}")
    credentials = tmp_short / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "tokend-keyring-key").write_bytes(base64.b64encode(os.urandom(32)))
    with AuthServer(lifetime_s=60.0) as auth:
        proc = _file_keyring_daemon(tmp_short, auth, credentials)
        argv = [sys.executable, "-c", _NO_WRITE_EXECUTE, sys.executable, "-m", "tokend", "run"]
        with _spawned(proc, argv):
            _import_and_fetch(proc, auth)
            done = proc.cli("refresh", "demo")
            assert done.returncode == 0, done.stderr
            assert auth.refreshes_ok == 1
            _fetch(proc, auth)


# ----------------------------------------------------------------------------- recipe (b)


def _group_members(pgid: int) -> list[int]:
    """The processes in process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                members.append(int(stat.parent.name))
    return members


def _secret_service_env(root: Path, credentials: Path) -> dict[str, str]:
    home = root / "home"
    runtime = root / "xdg"
    for directory in (home, runtime):
        directory.mkdir(mode=0o700)
    return {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "STATE_DIRECTORY": str(root / "state"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
    }


@pytest.fixture
def secret_service_tools() -> None:
    """dbus-daemon, dbus-send and gnome-keyring-daemon; skipped (failed under CI=true) if not."""
    _require_program("dbus-daemon", "dbus")
    _require_program("dbus-send", "dbus-bin")
    _require_program("gnome-keyring-daemon", "gnome-keyring")


def test_recipe_b_private_secret_service(tmp_short, secret_service_tools):
    """README recipe (b): the wrapper starts a private bus and an unlocked gnome-keyring, then
    execs tokend, which keeps the wrapper's PID (NotifyAccess=main); a grant is stored in that
    keyring and served, the password shows in no process's argv or environment, and a restart
    unlocks the same keyring and serves the grant without a new import."""
    credentials = tmp_short / "credentials"
    credentials.mkdir(mode=0o700)
    password = "pw-" + base64.b32encode(os.urandom(15)).decode()
    (credentials / "tokend-keyring-password").write_text(password)
    (credentials / "tokend-keyring-password").chmod(0o400)
    argv = ["sh", str(WRAPPER), sys.executable, "-m", "tokend", "run"]
    with AuthServer(lifetime_s=60.0) as auth:
        config = config_dict(tmp_short, auth.token_url, daemon={"keyring_backend": SECRET_SERVICE})
        proc = DaemonProcess(tmp_short, config)
        proc.env = _clean_env(
            TOKEND_CONFIG=str(proc.config_path), **_secret_service_env(tmp_short, credentials)
        )
        with _spawned(proc, argv):
            assert proc.proc is not None
            main = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes().split(b"\0")
            assert main[1:4] == [b"-m", b"tokend", b"run"]
            _import_and_fetch(proc, auth)
            members = _group_members(proc.proc.pid)
            assert len(members) >= 3  # tokend, dbus-daemon, gnome-keyring-daemon
            for pid in members:
                with contextlib.suppress(OSError):
                    for name in ("cmdline", "environ"):
                        assert password.encode() not in Path(f"/proc/{pid}/{name}").read_bytes()
            stored = _stored_in_secret_service(tmp_short / "xdg")
            assert stored is True
        keyrings = tmp_short / "state" / "secret-service" / "keyrings"
        assert (keyrings / "login.keyring").exists()
        calls = auth.token_calls
        with _spawned(proc, argv):
            _fetch(proc, auth)
        assert auth.token_calls == calls


def _stored_in_secret_service(runtime: Path) -> bool:
    """Whether the private bus's Secret Service holds the grant (asked as another client)."""
    (bus,) = runtime.glob("tokend-ss.*/bus")
    code = (
        "import keyring.backends.SecretService as s; "
        "print(s.Keyring().get_password('tokend', 'demo') is not None)"
    )
    done = _run(
        sys.executable,
        "-c",
        code,
        env=_clean_env(DBUS_SESSION_BUS_ADDRESS=f"unix:path={bus}"),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda creds: None, "cannot read the keyring password file"),
        (
            lambda creds: (creds / "tokend-keyring-password").write_text("not the password"),
            "stayed locked",
        ),
    ],
    ids=["missing", "wrong"],
)
def test_recipe_b_wrapper_refuses_without_the_password(
    tmp_short, secret_service_tools, setup: Callable[[Path], None], message: str
):
    """A missing password credential, or one that does not open the existing keyring, makes
    the wrapper exit 78 with the reason, without running the command and without leaving its
    helpers behind."""
    credentials = tmp_short / "credentials"
    credentials.mkdir(mode=0o700)
    env = _clean_env(**_secret_service_env(tmp_short, credentials))
    (credentials / "tokend-keyring-password").write_text("the password")
    created, _ = _run_wrapper(["true"], env, tmp_short / "create.log")  # the login keyring
    assert created == 0
    (credentials / "tokend-keyring-password").unlink()
    setup(credentials)
    marker = tmp_short / "ran"
    status, err = _run_wrapper(["touch", str(marker)], env, tmp_short / "refuse.log")
    assert status == 78, err
    assert message in err
    assert not marker.exists()


def _run_wrapper(command: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run the wrapper with `command` in its own process group; return its exit status and
    stderr once no live process is left in the group (its helpers must not outlive it).
    stderr goes to a file: the helpers inherit it, so a pipe would not see EOF."""
    with log.open("wb") as err:
        wrapper = subprocess.Popen(
            ["sh", str(WRAPPER), *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    status = wrapper.wait(60)
    if status == 0:
        # `command` exited at once and orphaned the helpers: take them down (not a failure).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(wrapper.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while [pid for pid in _group_members(wrapper.pid) if _alive(pid)]:
        assert time.monotonic() < deadline, "the wrapper's helpers outlived it"
        time.sleep(0.05)
    return status, log.read_text(errors="replace")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (or an init that never reaps) to collect it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
