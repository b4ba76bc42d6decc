"""The module layering of STYLE.md: imports point down, and client commands import nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokend"

# Who may import whom (tokend modules only). A module not listed here fails the test, so a new
# module has to be placed in the layering on purpose.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "clock": set(),
    "paths": set(),
    "model": set(),
    "config": {"errors", "model", "paths"},
    "policy": {"config", "model"},
    "oauth": {"clock", "config", "errors", "model"},
    "store": {"config", "encrypted_file", "errors", "model"},
    "encrypted_file": set(),
    "keyring_file": {"encrypted_file"},
    "notify": set(),
    "alerts": {"clock", "config", "errors", "model"},
    "metrics": {"model"},
    "logs": set(),
    "client": {"errors"},
    "server": {"clock", "config", "errors", "model"},
    "refresher": {"clock", "config", "errors", "model", "oauth", "policy", "store"},
    "scheduler": {"clock"},
    "health": {"clock", "model", "refresher", "scheduler"},
    "reload": {"alerts", "config", "errors", "metrics", "notify", "refresher", "scheduler"},
    "source": {"clients", "config", "errors", "metrics", "model", "refresher", "server"},
    "authserver": set(),
    "clients": {"config", "errors", "store"},
    "login": {"clients", "clock", "config", "errors", "model", "oauth", "store"},
    "daemon": {
        "alerts",
        "clients",
        "clock",
        "config",
        "errors",
        "health",
        "metrics",
        "model",
        "notify",
        "oauth",
        "refresher",
        "reload",
        "scheduler",
        "server",
        "source",
        "store",
    },
    "offline": {
        "client",
        "clients",
        "clock",
        "config",
        "errors",
        "model",
        "oauth",
        "refresher",
        "store",
    },
    "demo": {"authserver", "client", "config", "daemon", "errors", "store"},
    "admin": {
        "alerts",
        "client",
        "config",
        "daemon",
        "demo",
        "errors",
        "login",
        "logs",
        "offline",
        "paths",
        "store",
    },
    "cli": {"admin", "client", "clock", "errors", "paths"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _top(module: str) -> str:
    """tokend.oauth.client -> oauth; the layer of a module is its top-level name in tokend."""
    return module.split(".")[1] if module.startswith("tokend.") else module


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tokend"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokend"):
            if node.module == "tokend":
                # `from tokend import __version__` reads the package itself, the bottom layer.
                found.update(
                    f"tokend.{alias.name}" for alias in node.names if alias.name != "__version__"
                )
            else:
                found.add(node.module)
    return {_top(name) for name in found if name != "tokend"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    """Each tokend module imports only the tokend modules below it in the layering."""
    relative = path.relative_to(PACKAGE)
    layer = relative.parts[0].removesuffix(".py")
    assert layer in LAYERS, f"{relative}: not placed in the layering (tests/test_layers.py)"
    upward = _imports(path) - LAYERS[layer] - {layer}
    assert not upward, f"{relative} imports {sorted(upward)}, above it in the layering"


def test_client_commands_import_nothing_heavy() -> None:
    """`tokend token NAME` loads neither httpx, APScheduler, keyring nor cryptography."""
    code = (
        "import sys\n"
        "from tokend import cli\n"
        "cli.main(['--socket', '/nonexistent/tokend.sock', 'token', 'x'])\n"
        "heavy = [m for m in ('httpx', 'apscheduler', 'keyring', 'cryptography', 'h11',"
        " 'httptools',"
        " 'tokend.daemon', 'tokend.config') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == ""
    assert "daemon is not running at /nonexistent/tokend.sock" in done.stderr
