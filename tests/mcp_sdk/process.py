"""`python -m tests.mcp_sdk.server` as a child process: start, read its URLs, stats, logs, stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


class McpSdkServer:
    """The SDK-based MCP server + authorization server in a subprocess; stdout/stderr in files.

    Usage: `with McpSdkServer(tmp_path, lifetime_s=4) as srv: srv.mcp_url, srv.issuer`.
    """

    def __init__(self, root: Path, *, lifetime_s: float = 4.0, port: int = 0) -> None:
        self.root = root
        self.lifetime_s = lifetime_s
        self.port = port
        self.out_path = root / "mcp-sdk-server.out"
        self.log_path = root / "mcp-sdk-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mcp_url = ""
        self.issuer = ""
        self.pid = 0

    def start(self, timeout: float = 30.0) -> McpSdkServer:
        """Start the server and wait for its announcement line and a first answer."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        argv = [sys.executable, "-m", "tests.mcp_sdk.server", "--port", str(self.port)]
        argv += ["--lifetime", str(self.lifetime_s)]
        with self.out_path.open("wb") as out, self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()[-2000:]}")
            text = self.out_path.read_text()
            if text.endswith("\n"):
                info = json.loads(text.splitlines()[0])
                self.mcp_url, self.issuer, self.pid = info["mcp_url"], info["issuer"], info["pid"]
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"server not ready in {timeout}s: {self.log()[-2000:]}")
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.issuer + "/test/stats", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not answering in {timeout}s: {self.log()[-2000:]}")

    def stats(self) -> dict[str, Any]:
        """The server's counters: refreshes, reuse_detected, registrations, revocations,
        token_requests (a list of {"grant_type", "resource"} in arrival order)."""
        response = httpx.get(self.issuer + "/test/stats", timeout=10)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def log(self) -> str:
        """The server's stderr so far (never holds a token)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> McpSdkServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
