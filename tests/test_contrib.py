"""contrib/ run for real: every snippet against a running daemon process and the loopback
authorization server, whose protected resource (`/api/whoami`) proves the token each snippet
sent is the one tokend serves and really works.

The snippets call `tokend` by name, as users do; a shim directory first on PATH holds a `tokend`
that runs this interpreter's `python -m tokend`. Most tests share one module-scoped daemon
(`live`), each on a connector of its own so that their order does not matter; the skip paths
get a daemon of their own with no grant, which they then stop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.error
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.harness import (
    FILE_BACKEND,
    DaemonProcess,
    config_dict,
    get,
    one_line,
    require,
    short_tmp,
    skip_record,
    why,
)
from tokend.authserver import AuthServer

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
CRON_SCRIPT = CONTRIB / "cron" / "nightly-sync.sh"
CURL_SCRIPT = CONTRIB / "shell" / "curl-with-token.sh"
MCP_REMOTE_SCRIPT = CONTRIB / "mcp-remote" / "run-mcp-remote.sh"
# Where the examples install things; the tests point them at the repository's copies.
INSTALLED_JOB = "/usr/local/bin/nightly-sync"
INSTALLED_TOKEND = "/usr/bin/tokend"

UNAUTHORIZED = "unauthorized"  # never gets a grant
CONNECTORS = (
    "nightly",
    "example",
    "gh",
    "py-httpx",
    "py-httpx-retry",
    "py-async-retry",
    "py-stdlib",
    "py-stdlib-retry",
    "py-stdlib-stale",
    UNAUTHORIZED,
)
# Variables that would change what the snippets do if the test runner happened to have them set.
_SCRUBBED = (
    "TOKEND_SOCKET",
    "TOKEND_CONFIG",
    "TOKEND_ACCESS_TOKEN",
    "CLAUDE_CODE_MCP_SERVER_NAME",
    "AUTH_HEADER",
    "NIGHTLY_SYNC_URL",
    "NIGHTLY_SYNC_OUT",
)


# ----------------------------------------------------------------------------- helpers


def _shim_dir(root: Path) -> Path:
    """A directory holding an executable `tokend` that runs this interpreter's tokend."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "tokend"
    shim.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        "export PYTHONPATH\n"
        f'exec "{sys.executable}" -m tokend "$@"\n'
    )
    shim.chmod(0o755)
    return bin_dir


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in _SCRUBBED:
        env.pop(name, None)
    return env


def _daemon(root: Path, token_url: str, connectors: tuple[str, ...]) -> DaemonProcess:
    config = config_dict(
        root,
        token_url,
        connectors={name: {} for name in connectors},
        daemon={"keyring_backend": FILE_BACKEND},
    )
    proc = DaemonProcess(root, config)
    for name in _SCRUBBED:
        if name != "TOKEND_CONFIG":  # the harness points the daemon at its config with it
            proc.env.pop(name, None)
    return proc


def _run(
    argv: list[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Whoami:
    """One request the protected resource answered: its outcome and the header presented."""

    outcome: str
    authorization: str | None


@dataclass
class Live:
    """The module's daemon (every connector but `unauthorized` holds a grant) and its world."""

    auth: AuthServer
    proc: DaemonProcess
    root: Path
    bin_dir: Path
    grants: dict[str, dict[str, Any]]

    @property
    def whoami_url(self) -> str:
        return self.auth.url + "/api/whoami"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a snippet runs in: the shim first on PATH, TOKEND_SOCKET set."""
        env = _base_env()
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        env["TOKEND_SOCKET"] = str(self.proc.socket)
        env.update(extra)
        return env

    def token(self, name: str) -> str:
        """The access token the daemon serves for `name` right now."""
        status, body = get(self.proc.socket, f"/v1/connectors/{name}/token")
        assert status == 200, body
        return str(body["access_token"])

    def mark(self) -> int:
        return len(self.auth.requests)

    def whoami_since(self, mark: int) -> list[Whoami]:
        """The requests to the protected resource since `mark`, oldest first."""
        return [
            Whoami(r.outcome, r.headers.get("authorization"))
            for r in self.auth.requests[mark:]
            if r.path.startswith("/api/whoami")
        ]

    def new_grant(self, name: str) -> dict[str, Any]:
        """Revoke the connector's grant at the provider, then install a new one in the daemon:
        the token a client kept is refused from now on, and the daemon serves another."""
        self.auth.revoke_family_of(str(self.grants[name]["refresh_token"]))
        grant = _import(self.proc, self.auth, name)
        self.grants[name] = grant
        return grant


def _import(proc: DaemonProcess, auth: AuthServer, name: str) -> dict[str, Any]:
    grant = auth.issue_grant()
    result = proc.cli("import", name, stdin=json.dumps(grant))
    assert result.returncode == 0, why(result)
    return grant


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """One daemon for the module; tokens live 10 minutes, so no refresh runs meanwhile."""
    root = short_tmp("tkc")
    try:
        with AuthServer(lifetime_s=600.0) as auth:
            proc = _daemon(root, auth.token_url, CONNECTORS)
            proc.start()
            try:
                grants = {n: _import(proc, auth, n) for n in CONNECTORS if n != UNAUTHORIZED}
                yield Live(auth, proc, root, _shim_dir(root), grants)
                assert proc.stop() == 0, proc.log()[-2000:]
            finally:
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Bare:
    """A daemon of its own whose `nightly` connector never got a grant."""

    proc: DaemonProcess
    root: Path
    bin_dir: Path


@pytest.fixture
def bare(live: Live) -> Iterator[Bare]:
    """A running daemon with an unauthorized `nightly`; tests may stop it."""
    root = short_tmp("tkb")
    proc = _daemon(root, live.auth.token_url, ("nightly",))
    try:
        proc.start()
        yield Bare(proc, root, _shim_dir(root))
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- cron


def _crontab() -> tuple[dict[str, str], str]:
    """The example crontab's variable assignments and its one job's command."""
    assignments: dict[str, str] = {}
    commands: list[str] = []
    for line in (CONTRIB / "cron" / "crontab.example").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, eq, value = text.partition("=")
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            assignments[name.strip()] = value.strip()
            continue
        fields = text.split(None, 5)
        assert len(fields) == 6, f"not a crontab job line: {text!r}"
        commands.append(fields[5])
    assert len(commands) == 1, commands
    return assignments, commands[0]


def _run_cron_job(
    bin_dir: Path, socket_path: Path | str, url: str, out: Path
) -> subprocess.CompletedProcess[str]:
    """Run the example crontab's command as cron does: its SHELL, its variables, little else."""
    assignments, command = _crontab()
    assert INSTALLED_JOB in command
    command = command.replace(INSTALLED_JOB, str(CRON_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k.startswith("COVERAGE")}
    env.update(HOME=str(out.parent), LOGNAME="root", **assignments)
    env.update(
        PATH=f"{bin_dir}:{assignments['PATH']}",
        TOKEND_SOCKET=str(socket_path),
        NIGHTLY_SYNC_URL=url,
        NIGHTLY_SYNC_OUT=str(out),
    )
    return _run([assignments["SHELL"], "-c", command], env)


def test_cron_job_fetches_with_the_daemons_token(live: Live, tmp_path: Path) -> None:
    """The crontab's job runs through `tokend exec`, sends the daemon's token as a Bearer header
    and keeps the protected resource's answer; nothing on stderr, exit 0."""
    out = tmp_path / "latest.json"
    mark = live.mark()
    result = _run_cron_job(live.bin_dir, live.proc.socket, live.whoami_url, out)
    assert (result.returncode, result.stderr) == (0, ""), why(result)
    assert json.loads(out.read_text())["sub"] == "demo-user"
    assert live.whoami_since(mark) == [Whoami("ok", f"Bearer {live.token('nightly')}")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json"]


def test_cron_job_keeps_curls_exit_code_and_no_partial_answer(live: Live, tmp_path: Path) -> None:
    """When the request fails, the job exits with curl's code (22 for an HTTP error) and leaves
    neither an answer nor a temporary file behind."""
    result = _run_cron_job(
        live.bin_dir, live.proc.socket, live.auth.url + "/missing", tmp_path / "o"
    )
    assert result.returncode == 22, why(result)
    assert "404" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_cron_job_skips_loudly_without_a_grant(bare: Bare, live: Live, tmp_path: Path) -> None:
    """With the connector unauthorized, the job's command never runs: exit 10 and exactly one
    JSON skip record on stderr, for cron to mail."""
    out = tmp_path / "latest.json"
    result = _run_cron_job(bare.bin_dir, bare.proc.socket, live.whoami_url, out)
    assert result.returncode == 10, why(result)
    record = skip_record(result)
    assert (record["connector"], record["error"], record["exit_code"]) == (
        "nightly",
        "needs_reauth",
        10,
    )
    assert not out.exists()


def test_cron_job_skips_loudly_with_the_daemon_stopped(
    bare: Bare, live: Live, tmp_path: Path
) -> None:
    """With the daemon stopped, the job's command never runs: exit 69 and one JSON skip record."""
    assert bare.proc.stop() == 0
    out = tmp_path / "latest.json"
    result = _run_cron_job(bare.bin_dir, bare.proc.socket, live.whoami_url, out)
    assert result.returncode == 69, why(result)
    record = skip_record(result)
    assert (record["error"], record["exit_code"]) == ("daemon_unavailable", 69)
    assert not out.exists()


def test_cron_script_refuses_to_run_outside_tokend_exec(live: Live, tmp_path: Path) -> None:
    """Started by hand without a token, the job says how to run it and fetches nothing."""
    env = live.env(NIGHTLY_SYNC_URL=live.whoami_url, NIGHTLY_SYNC_OUT=str(tmp_path / "o"))
    result = _run([str(CRON_SCRIPT)], env)
    assert result.returncode != 0
    assert "tokend exec" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- systemd


def _unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for each setting of a unit file, in order."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        if text.startswith("["):
            section = text.strip("[]")
            continue
        key, _, value = text.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _service_exec(name: str, bin_dir: Path) -> list[str]:
    """The service's `name=` command line, pointed at the shim and the repository's job."""
    entries = _unit_entries(CONTRIB / "systemd" / "nightly-sync.service")
    values = [value for section, key, value in entries if (section, key) == ("Service", name)]
    assert len(values) == 1, values
    # systemd would expand $VAR itself, before any shell sees the line.
    assert "$" not in values[0]
    shim = str(bin_dir / "tokend")
    return [
        arg.replace(INSTALLED_TOKEND, shim).replace(INSTALLED_JOB, str(CRON_SCRIPT))
        for arg in shlex.split(values[0])
    ]


def _service_env(socket_path: Path | str, url: str, out: Path) -> dict[str, str]:
    """The service's Environment= settings, with the socket, URL and output of this test."""
    env = _base_env()
    for section, key, value in _unit_entries(CONTRIB / "systemd" / "nightly-sync.service"):
        if (section, key) == ("Service", "Environment"):
            name, _, setting = value.partition("=")
            env[name] = setting
    assert {"TOKEND_SOCKET", "NIGHTLY_SYNC_URL", "NIGHTLY_SYNC_OUT"} <= env.keys()
    env.update(TOKEND_SOCKET=str(socket_path), NIGHTLY_SYNC_URL=url, NIGHTLY_SYNC_OUT=str(out))
    return env


def test_systemd_units_verify_clean(live: Live, tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the service and the timer (with the
    binaries they name pointed at ones that exist here)."""
    require(shutil.which("systemd-analyze") is not None, "no systemd-analyze here")
    for name in ("nightly-sync.service", "nightly-sync.timer"):
        text = (CONTRIB / "systemd" / name).read_text()
        text = text.replace(INSTALLED_TOKEND, str(live.bin_dir / "tokend"))
        (tmp_path / name).write_text(text.replace(INSTALLED_JOB, str(CRON_SCRIPT)))
    units = [str(tmp_path / "nightly-sync.service"), str(tmp_path / "nightly-sync.timer")]
    result = _run(["systemd-analyze", "verify", *units], _base_env())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), why(result)


def test_systemd_condition_passes_silently_and_job_runs(live: Live, tmp_path: Path) -> None:
    """With a token, ExecCondition= exits 0 and prints nothing (the token never reaches the
    journal), and ExecStart= runs the job with the token."""
    out = tmp_path / "latest.json"
    env = _service_env(live.proc.socket, live.whoami_url, out)
    condition = _run(_service_exec("ExecCondition", live.bin_dir), env)
    assert (condition.returncode, condition.stdout, condition.stderr) == (0, "", "")
    mark = live.mark()
    start = _run(_service_exec("ExecStart", live.bin_dir), env)
    assert start.returncode == 0, why(start)
    assert json.loads(out.read_text())["sub"] == "demo-user"
    assert live.whoami_since(mark) == [Whoami("ok", f"Bearer {live.token('nightly')}")]


def test_systemd_condition_skips_the_run_when_no_token(
    bare: Bare, live: Live, tmp_path: Path
) -> None:
    """Without a grant and with the daemon stopped, ExecCondition= exits within 1-254 (systemd
    skips the run instead of failing it), prints nothing on stdout and one reason on stderr."""
    env = _service_env(bare.proc.socket, live.whoami_url, tmp_path / "o")
    condition = _service_exec("ExecCondition", bare.bin_dir)
    unauthorized = _run(condition, env)
    assert unauthorized.returncode == 10, why(unauthorized)
    assert unauthorized.stdout == ""
    assert "nightly" in one_line(unauthorized.stderr)
    assert bare.proc.stop() == 0
    stopped = _run(condition, env)
    assert stopped.returncode == 69, why(stopped)
    assert stopped.stdout == ""
    assert "not running" in one_line(stopped.stderr)


# ----------------------------------------------------------------------------- Claude Code


def test_headers_helper_prints_one_json_object_of_strings(live: Live) -> None:
    """The .mcp.json headersHelper, run as Claude Code runs it (a shell, the server's name in
    CLAUDE_CODE_MCP_SERVER_NAME, 10 s), prints one JSON object of strings whose Authorization
    the protected resource accepts."""
    servers = json.loads((CONTRIB / "claude-code" / "mcp.json").read_text())["mcpServers"]
    assert servers, "no server in mcp.json"
    for name, server in servers.items():
        assert server["type"] == "http"
        env = live.env(CLAUDE_CODE_MCP_SERVER_NAME=name, CLAUDE_CODE_MCP_SERVER_URL=server["url"])
        result = _run(["/bin/sh", "-c", server["headersHelper"]], env, timeout=10)
        assert (result.returncode, result.stderr) == (0, ""), why(result)
        headers = json.loads(result.stdout)
        assert isinstance(headers, dict)
        assert all(isinstance(v, str) for v in headers.values())
        assert headers == {"Authorization": f"Bearer {live.token(name)}"}
        answer = httpx.get(live.whoami_url, headers=headers)
        assert answer.status_code == 200


def test_headers_helper_fails_with_nothing_on_stdout(live: Live, tmp_path: Path) -> None:
    """With the daemon unreachable the helper exits non-zero with nothing on stdout, so Claude
    Code never mistakes a partial answer for headers, and says why on stderr."""
    servers = json.loads((CONTRIB / "claude-code" / "mcp.json").read_text())["mcpServers"]
    for name, server in servers.items():
        env = live.env(CLAUDE_CODE_MCP_SERVER_NAME=name, TOKEND_SOCKET=str(tmp_path / "no.sock"))
        result = _run(["/bin/sh", "-c", server["headersHelper"]], env, timeout=10)
        assert result.returncode == 69, why(result)
        assert result.stdout == ""
        assert "not running" in one_line(result.stderr)


# ----------------------------------------------------------------------------- mcp-remote

# Stands in for `npx -y mcp-remote URL --header NAME:VALUE` (no npm registry here): records its
# argv and environment, then does what mcp-remote does with a header argument -- split it at the
# first colon, replace each ${VAR} in the value from its own environment -- and sends one GET.
_NPX_STUB = r"""#!{python}
import json, os, re, sys, urllib.error, urllib.request

args = sys.argv[1:]
headers, rest, i = {{}}, [], 0
while i < len(args):
    if args[i] == "--header" and i + 1 < len(args):
        name, _, value = args[i + 1].partition(":")
        expand = lambda m: os.environ.get(m[1], "")
        headers[name] = re.sub(r"\$\{{([^}}]+)\}}", expand, value.lstrip())
        i += 2
        continue
    rest.append(args[i])
    i += 1
url = next(a for a in rest if a.startswith("http"))
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        status = r.status
except urllib.error.HTTPError as exc:
    status = exc.code
    exc.close()
with open(os.environ["STUB_RECORD"], "w") as f:
    json.dump({{"argv": args, "AUTH_HEADER": os.environ.get("AUTH_HEADER"),
               "sent": headers, "status": status}}, f)
"""


def _npx_env(live: Live, root: Path) -> tuple[dict[str, str], Path]:
    stub_dir = root / "stub"
    stub_dir.mkdir()
    stub = stub_dir / "npx"
    stub.write_text(_NPX_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    record = root / "npx.json"
    env = live.env(STUB_RECORD=str(record))
    env["PATH"] = f"{stub_dir}:{env['PATH']}"
    return env, record


def test_mcp_remote_gets_the_token_through_its_environment(live: Live, tmp_path: Path) -> None:
    """run-mcp-remote.sh passes the literal `Authorization:${AUTH_HEADER}` (no token in argv)
    and AUTH_HEADER="Bearer TOKEN" in the environment; expanded as mcp-remote does, the header
    is accepted by the protected resource."""
    env, record_path = _npx_env(live, tmp_path)
    result = _run([str(MCP_REMOTE_SCRIPT), "example", live.whoami_url], env)
    assert (result.returncode, result.stderr) == (0, ""), why(result)
    record = json.loads(record_path.read_text())
    token = live.token("example")
    assert record["argv"] == [
        "-y",
        "mcp-remote",
        live.whoami_url,
        "--header",
        "Authorization:${AUTH_HEADER}",
    ]
    assert not any(token in arg for arg in record["argv"])
    assert record["AUTH_HEADER"] == f"Bearer {token}"
    assert record["sent"] == {"Authorization": f"Bearer {token}"}
    assert record["status"] == 200


def test_mcp_remote_is_not_started_without_a_token(live: Live, tmp_path: Path) -> None:
    """With the connector unauthorized the script exits 10 with tokend's reason and never starts
    mcp-remote; without its arguments it exits 64 with a usage line."""
    env, record_path = _npx_env(live, tmp_path)
    result = _run([str(MCP_REMOTE_SCRIPT), UNAUTHORIZED, live.whoami_url], env)
    assert result.returncode == 10, why(result)
    assert UNAUTHORIZED in one_line(result.stderr)
    assert not record_path.exists()
    usage = _run([str(MCP_REMOTE_SCRIPT)], env)
    assert usage.returncode == 64
    assert "usage:" in usage.stderr


# ----------------------------------------------------------------------------- curl


class _ArgvWatcher(ThreadingHTTPServer):
    """Records each request's Authorization header and, while the client waits for the answer,
    every process whose command line holds `secret` (and whether curl's own was readable)."""

    daemon_threads = True

    def __init__(self, secret: str) -> None:
        super().__init__(("127.0.0.1", 0), _WatcherHandler)
        self.secret = secret.encode()
        self.authorizations: list[str | None] = []
        self.leaks: list[str] = []
        self.saw_curl = False


class _WatcherHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _ArgvWatcher)
        server.authorizations.append(self.headers.get("Authorization"))
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes()
            except OSError:  # the process ended meanwhile
                continue
            if server.secret in argv:
                server.leaks.append(argv.replace(b"\0", b" ").decode(errors="replace"))
            if argv.startswith(b"curl\0") and self.path.encode() in argv:
                server.saw_curl = True
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def watcher(live: Live) -> Iterator[_ArgvWatcher]:
    server = _ArgvWatcher(live.token("gh"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_curl_script_sends_the_token_in_no_command_line(live: Live, watcher: _ArgvWatcher) -> None:
    """curl-with-token.sh sends the daemon's token as a Bearer header, and while curl is
    waiting for the answer no process's command line holds the token."""
    url = f"http://127.0.0.1:{watcher.server_address[1]}/watched"
    result = _run([str(CURL_SCRIPT), "gh", url], live.env())
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", ""), why(result)
    assert watcher.authorizations == [f"Bearer {live.token('gh')}"]
    assert watcher.saw_curl, "curl's command line was not seen: the scan proved nothing"
    assert watcher.leaks == []


def test_curl_script_does_not_call_without_a_token(live: Live, watcher: _ArgvWatcher) -> None:
    """With the connector unauthorized the script exits 10 with tokend's reason and curl never
    sends the request; without its arguments it exits 64."""
    url = f"http://127.0.0.1:{watcher.server_address[1]}/watched"
    result = _run([str(CURL_SCRIPT), UNAUTHORIZED, url], live.env())
    assert result.returncode == 10, why(result)
    assert UNAUTHORIZED in one_line(result.stderr)
    assert watcher.authorizations == []
    assert _run([str(CURL_SCRIPT)], live.env()).returncode == 64


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"], check=False)
    return probe.returncode == 0


@pytest.mark.parametrize("snippet", ["cron", "curl", "mcp-remote"])
def test_no_snippet_execs_a_process_with_the_token_in_argv(
    live: Live, tmp_path: Path, snippet: str
) -> None:
    """Traced with strace, no program any shell snippet starts (printf included, were it not
    a builtin) gets the token among its arguments."""
    require(_strace_works(), "strace missing or ptrace not permitted")
    trace = tmp_path / "trace.txt"
    strace = ["strace", "-f", "-qq", "-e", "trace=execve,execveat", "-e", "signal=none"]
    strace += ["-s", "1000000", "-o", str(trace)]
    if snippet == "cron":
        _, command = _crontab()
        env = live.env(NIGHTLY_SYNC_URL=live.whoami_url, NIGHTLY_SYNC_OUT=str(tmp_path / "o"))
        argv = ["/bin/sh", "-c", command.replace(INSTALLED_JOB, str(CRON_SCRIPT))]
        connector, program = "nightly", "curl"
    elif snippet == "curl":
        env, argv = live.env(), [str(CURL_SCRIPT), "gh", live.whoami_url]
        connector, program = "gh", "curl"
    else:
        env, _ = _npx_env(live, tmp_path)
        argv = [str(MCP_REMOTE_SCRIPT), "example", live.whoami_url]
        connector, program = "example", "npx"
    result = _run([*strace, *argv], env)
    assert result.returncode == 0, why(result)
    execs = [line for line in trace.read_text().splitlines() if "execve" in line]
    assert any(f'/{program}", ["{program}"' in line for line in execs), execs
    token = live.token(connector)
    assert not [line for line in execs if token in line]


# ----------------------------------------------------------------------------- Python


@pytest.fixture(scope="module")
def tokend_auth() -> Iterator[ModuleType]:
    """contrib/python/tokend_auth.py, imported from its file as a job would import its copy."""
    name = "tokend_auth"
    spec = importlib.util.spec_from_file_location(name, CONTRIB / "python" / "tokend_auth.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def test_httpx_auth_sends_the_daemons_token(live: Live, tokend_auth: ModuleType) -> None:
    """TokendAuth sets the token the daemon serves; accepted, the request is sent once."""
    auth = tokend_auth.TokendAuth("py-httpx", socket_path=str(live.proc.socket))
    mark = live.mark()
    with httpx.Client(auth=auth) as client:
        for _ in range(2):
            answer = client.get(live.whoami_url)
            assert answer.status_code == 200
            assert answer.json()["sub"] == "demo-user"
    expected = Whoami("ok", f"Bearer {live.token('py-httpx')}")
    assert live.whoami_since(mark) == [expected, expected]


def test_httpx_auth_rereads_and_retries_once_after_a_401(
    live: Live, tokend_auth: ModuleType
) -> None:
    """When the kept token is refused (its grant was revoked and a new one installed), TokendAuth
    reads the daemon's new token and sends the request once more, which succeeds."""
    auth = tokend_auth.TokendAuth("py-httpx-retry", socket_path=str(live.proc.socket))
    old = live.token("py-httpx-retry")
    with httpx.Client(auth=auth) as client:
        assert client.get(live.whoami_url).status_code == 200
        live.new_grant("py-httpx-retry")
        mark = live.mark()
        answer = client.get(live.whoami_url)
    assert answer.status_code == 200
    new = live.token("py-httpx-retry")
    assert new != old
    assert live.whoami_since(mark) == [
        Whoami("invalid_token", f"Bearer {old}"),
        Whoami("ok", f"Bearer {new}"),
    ]


@pytest.mark.anyio
async def test_async_httpx_auth_rereads_and_retries_once_after_a_401(
    live: Live, tokend_auth: ModuleType
) -> None:
    """With httpx.AsyncClient the same: a refused kept token is replaced by the daemon's new one
    and the request is sent once more."""
    auth = tokend_auth.TokendAuth("py-async-retry", socket_path=str(live.proc.socket))
    old = live.token("py-async-retry")
    async with httpx.AsyncClient(auth=auth) as client:
        assert (await client.get(live.whoami_url)).status_code == 200
        live.new_grant("py-async-retry")
        mark = live.mark()
        answer = await client.get(live.whoami_url)
    assert answer.status_code == 200
    new = live.token("py-async-retry")
    assert live.whoami_since(mark) == [
        Whoami("invalid_token", f"Bearer {old}"),
        Whoami("ok", f"Bearer {new}"),
    ]


def test_httpx_auth_raises_when_no_token(live: Live, tokend_auth: ModuleType) -> None:
    """Without a grant, a request raises TokenUnavailableError carrying tokend's error and the
    exit code `tokend exec` would use, and nothing is sent."""
    auth = tokend_auth.TokendAuth(UNAUTHORIZED, socket_path=str(live.proc.socket))
    mark = live.mark()
    with httpx.Client(auth=auth) as client, pytest.raises(tokend_auth.TokenUnavailableError) as e:
        client.get(live.whoami_url)
    assert (e.value.error, e.value.exit_code, e.value.connector) == (
        "needs_reauth",
        10,
        UNAUTHORIZED,
    )
    assert live.whoami_since(mark) == []


def test_tokend_token_reads_the_socket_and_maps_errors(
    live: Live, tokend_auth: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tokend_token returns the daemon's token (socket from the argument or $TOKEND_SOCKET) and
    raises TokenUnavailableError with the CLI's exit codes: 10, 78, 69."""
    socket_path = str(live.proc.socket)
    assert tokend_auth.tokend_token("py-stdlib", socket_path) == live.token("py-stdlib")
    monkeypatch.setenv("TOKEND_SOCKET", socket_path)
    assert tokend_auth.tokend_token("py-stdlib", min_ttl=60) == live.token("py-stdlib")
    for connector, socket_arg, error, code in (
        (UNAUTHORIZED, None, "needs_reauth", 10),
        ("no-such-connector", None, "unknown_connector", 78),
        ("py-stdlib", str(tmp_path / "none.sock"), "daemon_unavailable", 69),
    ):
        with pytest.raises(tokend_auth.TokenUnavailableError) as e:
            tokend_auth.tokend_token(connector, socket_arg)
        assert (e.value.error, e.value.exit_code) == (error, code)


def test_urlopen_with_token_sends_the_daemons_token(live: Live, tokend_auth: ModuleType) -> None:
    """urlopen_with_token opens the URL with the daemon's token; accepted, it is sent once."""
    mark = live.mark()
    with tokend_auth.urlopen_with_token(
        live.whoami_url, "py-stdlib", socket_path=str(live.proc.socket)
    ) as response:
        assert json.loads(response.read())["sub"] == "demo-user"
    assert live.whoami_since(mark) == [Whoami("ok", f"Bearer {live.token('py-stdlib')}")]


def test_urlopen_with_token_rereads_and_retries_once_after_a_401(
    live: Live, tokend_auth: ModuleType
) -> None:
    """When the kept token is refused, urlopen_with_token reads the daemon's new token and
    opens the URL once more, which succeeds."""
    socket_path = str(live.proc.socket)
    name = "py-stdlib-retry"
    old = live.token(name)
    with tokend_auth.urlopen_with_token(live.whoami_url, name, socket_path=socket_path) as first:
        assert first.status == 200
    live.new_grant(name)
    mark = live.mark()
    with tokend_auth.urlopen_with_token(live.whoami_url, name, socket_path=socket_path) as again:
        assert again.status == 200
    assert live.whoami_since(mark) == [
        Whoami("invalid_token", f"Bearer {old}"),
        Whoami("ok", f"Bearer {live.token(name)}"),
    ]


def test_urlopen_with_token_returns_the_401_when_the_daemon_has_no_other_token(
    live: Live, tokend_auth: ModuleType
) -> None:
    """When the resource refuses the very token the daemon still serves (revoked at the
    provider), urlopen_with_token does not send it again: the 401 is raised after one request."""
    name = "py-stdlib-stale"
    live.auth.revoke_family_of(str(live.grants[name]["refresh_token"]))
    mark = live.mark()
    with pytest.raises(urllib.error.HTTPError) as e:
        tokend_auth.urlopen_with_token(live.whoami_url, name, socket_path=str(live.proc.socket))
    e.value.close()
    assert e.value.code == 401
    assert live.whoami_since(mark) == [Whoami("invalid_token", f"Bearer {live.token(name)}")]


def test_urlopen_with_token_refuses_other_schemes(tokend_auth: ModuleType) -> None:
    """Only http(s) URLs are opened: a file: URL is refused before tokend is even asked."""
    with pytest.raises(ValueError, match="http"):
        tokend_auth.urlopen_with_token("file:///etc/passwd", "py-stdlib", socket_path="/nowhere")


# ----------------------------------------------------------------------------- the whole folder


def test_every_snippet_is_documented_and_shell_ones_are_posix(live: Live) -> None:
    """contrib/README.md names every snippet; each shell snippet is executable, parses with
    /bin/sh -n and runs with `set -eu`."""
    readme = (CONTRIB / "README.md").read_text()
    for path in sorted(p for p in CONTRIB.rglob("*") if p.is_file()):
        relative = path.relative_to(CONTRIB)
        if relative.name == "README.md" or "__pycache__" in relative.parts:
            continue
        assert str(relative) in readme, f"contrib/README.md does not mention {relative}"
        if path.suffix == ".sh":
            assert os.access(path, os.X_OK), f"{relative} is not executable"
            assert path.read_text().startswith("#!/bin/sh\n")
            assert "\nset -eu\n" in path.read_text()
            check = _run(["/bin/sh", "-n", str(path)], live.env())
            assert check.returncode == 0, why(check)
