"""`tokend demo`, the quick start's main job, and the shipped example configuration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tokend.config import config_from_mapping

ROOT = Path(__file__).resolve().parents[1]


def test_demo_refreshes_serves_and_stops_cleanly():
    """The demo runs the daemon against the built-in server: it prints the socket and a working
    curl line, refreshes rotate without reuse, every lookup succeeds, and it exits 0 by itself."""
    done = subprocess.run(
        [sys.executable, "-m", "tokend", "demo", "--lifetime", "3", "--duration", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"curl --unix-socket /tmp/tokend-demo-\S+/tokend\.sock http://tokend/", out)
    assert "refresh #2:" in out
    summary = out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"stopped: (\d+) refreshes, (\d+) lookups ok, 0 failed; the server saw (\d+) refreshes "
        r"and 0 refresh-token reuses",
        summary,
    )
    assert match, summary
    assert int(match[1]) == int(match[3]) >= 2
    assert int(match[2]) >= 4
    assert "refreshed demo" in done.stderr  # one log line per refresh
    socket_dir = re.search(r"socket\s+(/tmp/tokend-demo-\S+)/tokend\.sock", out)
    assert socket_dir and not Path(socket_dir[1]).exists()  # temp dir removed on exit


def test_example_config_is_valid():
    """deploy/config.example.toml loads (with its example user and group swapped for real ones)."""
    import tomllib

    text = (ROOT / "deploy" / "config.example.toml").read_text()
    text = text.replace('"user:alice"', '"user:root"').replace('"group:jobs"', '"group:root"')
    config = config_from_mapping(tomllib.loads(text), source="config.example.toml")
    github = config.connectors["github"]
    assert github.client_auth == "client_secret_basic"
    assert github.resource == "https://mcp.example.com/mcp"
    assert [rule.text for rule in github.allow] == ["user:root", "group:root"]
