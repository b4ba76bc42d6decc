"""The socket API's error codes: one table (`API_ERRORS`) maps each to its HTTP status and CLI
exit code, every code raised anywhere is in it, and an unknown code is a bug, not a silent 500."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tokend.client import _api_error
from tokend.errors import API_ERRORS, ApiError, ExitCode

ROOT = Path(__file__).resolve().parents[1]


def _raised_codes() -> dict[str, list[str]]:
    """Every `ApiError(<code>, ...)` in tokend/ and tests/: code -> where; a code that is not a
    string literal is listed as "<expr>" (only the client's checked decoding may do that)."""
    found: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("tokend/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        if path == Path(__file__).resolve():
            continue  # this file raises an unknown code on purpose
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name != "ApiError":
                continue
            first = node.args[0]
            code = first.value if isinstance(first, ast.Constant) else "<expr>"
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            found.setdefault(str(code), []).append(where)
    return found


def test_every_code_raised_anywhere_is_in_the_table() -> None:
    """A grep-like walk over every ApiError(...) call finds only codes of API_ERRORS."""
    found = _raised_codes()
    assert {"unknown_connector", "forbidden", "needs_reauth", "bad_request"} <= found.keys()
    unknown = {code: where for code, where in found.items() if code not in API_ERRORS}
    computed = unknown.pop("<expr>", [])
    assert unknown == {}
    assert [where.split(":")[0] for where in computed] == ["tokend/client.py"]  # checked there


def test_the_table_is_design_section_5() -> None:
    """Each code's HTTP status and CLI exit code are those of DESIGN §5 and §6."""
    assert {code: (s, int(e)) for code, (s, e) in API_ERRORS.items()} == {
        "unknown_connector": (404, 78),
        "forbidden": (403, 77),
        "needs_reauth": (503, 10),
        "temporarily_unavailable": (503, 75),
        "bad_request": (400, 64),
        "internal_error": (500, 1),
    }
    for code, (status, exit_code) in API_ERRORS.items():
        error = ApiError(code, "x")
        assert (error.http_status, error.exit_code) == (status, exit_code)


def test_unknown_code_is_refused_where_it_is_raised() -> None:
    """ApiError with a code outside the table raises at once (a bug a test catches), instead
    of answering a silent 500."""
    with pytest.raises(ValueError, match="no_such_code"):
        ApiError("no_such_code", "x")


def test_cli_reads_an_unknown_code_as_an_answer_not_understood() -> None:
    """A code this CLI does not know (a newer daemon's) is an internal error, exit 1, that
    still shows the daemon's code and description."""
    error = _api_error(418, b'{"error": "teapot", "error_description": "short"}', "gh")
    assert (error.code, error.exit_code, error.connector) == (
        "internal_error",
        ExitCode.INTERNAL,
        "gh",
    )
    assert "teapot" in error.description and "short" in error.description
    known = _api_error(503, b'{"error": "needs_reauth", "error_description": "d"}', None)
    assert (known.code, known.exit_code) == ("needs_reauth", ExitCode.NEEDS_REAUTH)


def test_socket_permission_error_is_never_taken_for_a_stopped_daemon() -> None:
    """A socket this user may not connect to stops the admin command (exit 69) by its type:
    it never goes on to act on the store behind the running daemon's back."""
    import argparse

    from tokend.admin import _daemon_or_direct
    from tokend.errors import SocketPermissionError

    def refused(path: str) -> None:
        raise SocketPermissionError(f"cannot connect to {path}")  # wording is irrelevant

    def direct(config: object) -> None:
        raise AssertionError("acted on the store while the daemon runs")

    args = argparse.Namespace(socket="/nonexistent/tokend.sock", config="/nonexistent/c.toml")
    with pytest.raises(SocketPermissionError) as info:
        _daemon_or_direct(args, refused, direct)
    assert info.value.exit_code == ExitCode.UNAVAILABLE
