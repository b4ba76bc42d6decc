"""tokend against the official MCP Python SDK (written by others): `tokend login` discovers
everything from the MCP URL, registers, authorizes; then the SDK's own MCP client calls a tool
with the access token tokend serves, before and after tokend refreshed it.

Set TOKEND_TRANSCRIPT=PATH to keep the commands and their output as a transcript."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import FILE_BACKEND, DaemonProcess, get, wait_for, why
from tests.mcp_sdk.client import Unauthorized, call_tool
from tests.mcp_sdk.process import REPO, McpSdkServer


def _login(daemon: DaemonProcess, transcript: list[str]) -> None:
    """Run `tokend login sdk` and consent the way a browser would: open the printed URL (the
    SDK's /authorize approves at once) and follow its redirect to tokend's loopback listener."""
    argv = [sys.executable, "-m", "tokend", "login", "sdk", "--no-browser"]
    proc = subprocess.Popen(
        argv, env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    transcript.append("$ tokend login sdk --no-browser")
    url = None
    deadline = time.monotonic() + 30
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        transcript.append(line.rstrip("\n"))
        url = next((word for word in line.split() if "/authorize?" in word), None)
    assert url is not None, f"no authorization URL shown; stderr {proc.stderr.read()!r}"
    consent = httpx.get(url, follow_redirects=False, timeout=10)
    assert consent.status_code == 302, consent.text
    transcript.append(f"[browser] GET /authorize -> {consent.status_code}, redirect to tokend")
    landing = httpx.get(consent.headers["location"], timeout=10)
    assert landing.status_code == 200 and "authorization received" in landing.text
    out, err = proc.communicate(timeout=30)
    transcript.extend(out.splitlines() + err.splitlines())
    assert proc.returncode == 0, f"exit {proc.returncode}; stdout {out!r}; stderr {err!r}"


def test_login_against_the_mcp_sdk_then_tool_calls_with_tokend_tokens(tmp_short: Path) -> None:
    """Discovery, registration and authorization against the SDK's server, then SDK tool calls
    with tokend's token, again after a refresh; `resource` went with every token request."""
    transcript: list[str] = []
    with McpSdkServer(tmp_short, lifetime_s=4.0) as sdk:
        config = {
            "daemon": {
                "socket": str(tmp_short / "run" / "tokend.sock"),
                "state_dir": str(tmp_short / "state"),
                "keyring_backend": FILE_BACKEND,
            },
            "refresh": {"skew": "1s", "min_interval": "1s"},
            "connectors": {"sdk": {"mcp_url": sdk.mcp_url}},
        }
        daemon = DaemonProcess(tmp_short, config, env={"PYTHONPATH": str(REPO)}).start()
        try:
            transcript.append(f"# MCP server (MCP Python SDK) at {sdk.mcp_url}")
            _login(daemon, transcript)
            first = daemon.cli("token", "sdk")
            assert first.returncode == 0, why(first)
            token = first.stdout.strip()
            result = call_tool(sdk.mcp_url, token, "add", {"a": 2, "b": 3})
            assert result == 5
            transcript.append(f"[MCP client] add(2, 3) with tokend's token -> {result}")
            wait_for(lambda: get(daemon.socket, "/v1/connectors/sdk")[1]["refreshes"] >= 1)
            second = daemon.cli("token", "sdk")
            assert second.returncode == 0, why(second)
            assert second.stdout.strip() != token
            wait_for(lambda: _refused(sdk.mcp_url, token), timeout=10)
            job = daemon.cli(
                "exec", "sdk", "--", sys.executable, "-m", "tests.mcp_sdk.client", sdk.mcp_url,
                "whoami",
            )  # fmt: skip
            assert job.returncode == 0, why(job)
            transcript.append(
                "$ tokend exec sdk -- python -m tests.mcp_sdk.client MCP_URL whoami  "
                "# after a refresh"
            )
            transcript.append(job.stdout.strip())
            stats = sdk.stats()
            kinds = [r["grant_type"] for r in stats["token_requests"]]
            assert kinds[0] == "authorization_code" and "refresh_token" in kinds
            assert all(r["resource"] == sdk.mcp_url for r in stats["token_requests"])
            assert (stats["registrations"], stats["reuse_detected"]) == (1, 0)
            status = daemon.cli("status")
            transcript.append("$ tokend status")
            transcript.extend(status.stdout.splitlines())
        finally:
            daemon.stop()
        for secret in (token, second.stdout.strip()):
            assert secret not in daemon.log() and secret not in "\n".join(transcript[:-1])
    target = os.environ.get("TOKEND_TRANSCRIPT")
    if target:
        Path(target).write_text("\n".join(transcript) + "\n")


def _refused(mcp_url: str, token: str) -> bool:
    """Whether the SDK's server now refuses `token` (it expired after the refresh)."""
    try:
        call_tool(mcp_url, token, "whoami", {})
    except Unauthorized:
        return True
    return False
