"""The `tokend` command: argparse, the client commands, exit codes and error lines.

Client commands (`token`, `header`, `headers`, `exec`, `status`) use only the standard library's
`http.client` over AF_UNIX and import nothing heavy (no httpx, no APScheduler, no keyring), so a
job script pays little for them. The admin commands live in `tokend.admin`, imported only when one
runs. Only `main` exits; every error prints one line on stderr that names the connector and the
action.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tokend import __version__
from tokend.client import request_json
from tokend.clock import human_span
from tokend.errors import ApiError, ExitCode, TokendError

# ----------------------------------------------------------------------------- where things are


def _socket_path(args: argparse.Namespace) -> str:
    from tokend import paths

    return paths.socket_path(args.socket, args.config)


# ----------------------------------------------------------------------------- output helpers


# What to do about an error the daemon answered without an action of its own (the socket
# server refuses an unknown name before the daemon could say more).
_DEFAULT_ACTIONS = {"unknown_connector": "check the name with: tokend status"}


def _action(exc: ApiError) -> str | None:
    return exc.action or _DEFAULT_ACTIONS.get(exc.code)


def _print_error(exc: TokendError) -> None:
    if isinstance(exc, ApiError):
        who = f"{exc.connector}: " if exc.connector else ""
        line = f"tokend: {who}{exc.description}"
        action = _action(exc)
        if action:
            line += f"; run: {action}" if action.startswith("tokend ") else f"; {action}"
        if exc.retry_after:
            line += f" (retry after {exc.retry_after}s)"
    else:
        line = f"tokend: {exc}"
    print(" ".join(line.split()), file=sys.stderr)


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="")


def _token(args: argparse.Namespace, name: str, min_ttl: float | None = None) -> dict[str, Any]:
    query = "" if not min_ttl else f"?min_ttl={min_ttl:g}"
    body = request_json(
        _socket_path(args), "GET", f"/v1/connectors/{_quote(name)}/token{query}", connector=name
    )
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise ApiError("internal_error", "daemon answered without a token", connector=name)
    return body


def _min_ttl(text: str | None) -> float | None:
    if text is None:
        return None
    from tokend.paths import parse_seconds

    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise ApiError("bad_request", f"--min-ttl: {exc}") from None


# ----------------------------------------------------------------------------- client commands


def cmd_token(args: argparse.Namespace) -> int:
    body = _token(args, args.name, _min_ttl(args.min_ttl))
    sys.stdout.write(body["access_token"] + "\n")
    return 0


def cmd_header(args: argparse.Namespace) -> int:
    body = _token(args, args.name, _min_ttl(args.min_ttl))
    sys.stdout.write(
        f"Authorization: {body.get('token_type') or 'Bearer'} {body['access_token']}\n"
    )
    return 0


def cmd_headers(args: argparse.Namespace) -> int:
    name = args.name or os.environ.get("CLAUDE_CODE_MCP_SERVER_NAME")
    if not name:
        raise ApiError(
            "bad_request", "no connector named: give NAME or set CLAUDE_CODE_MCP_SERVER_NAME"
        )
    body = _token(args, name, _min_ttl(args.min_ttl))
    value = f"{body.get('token_type') or 'Bearer'} {body['access_token']}"
    sys.stdout.write(json.dumps({"Authorization": value}) + "\n")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ApiError("bad_request", "exec needs a command after --", connector=args.name)
    try:
        body = _token(args, args.name, _min_ttl(args.min_ttl))
    except TokendError as exc:
        _skip_record(args.name, exc)
        return int(exc.exit_code)
    env = dict(os.environ)
    env[args.env] = body["access_token"]
    try:
        os.execvpe(command[0], command, env)  # noqa: S606  # the user's command, by design
    except OSError as exc:
        print(f"tokend: exec {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # pragma: no cover  # execvpe does not return


def _exec_options(args: argparse.Namespace) -> None:
    """Parse the options written after NAME (`exec NAME --env VAR -- CMD`, the documented order):
    argparse's REMAINDER takes everything after the positional NAME, options included.

    Exits 2 (argparse) when they are malformed or no `--` separates them from the command.
    """
    rest = list(args.command)
    if not rest or rest[0] == "--" or not rest[0].startswith("-"):
        return
    parser: argparse.ArgumentParser = args.exec_parser
    if "--" not in rest:
        parser.error("put -- between the options and the command")
    cut = rest.index("--")
    parser.parse_args([*rest[:cut], args.name, *rest[cut:]], namespace=args)


def _skip_record(name: str, exc: TokendError) -> None:
    from datetime import UTC, datetime

    record: dict[str, object] = {
        "event": "skipped",
        "connector": name,
        "error": exc.code if isinstance(exc, ApiError) else "daemon_unavailable",
        "error_description": exc.description if isinstance(exc, ApiError) else str(exc),
        "exit_code": int(exc.exit_code),
        "action": _action(exc) if isinstance(exc, ApiError) else None,
        "at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    }
    if isinstance(exc, ApiError):
        if exc.since:
            record["since"] = exc.since
        if exc.retry_after:
            record["retry_after"] = exc.retry_after
    print(json.dumps(record), file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    socket_path = _socket_path(args)
    if args.name:
        items = [request_json(socket_path, "GET", f"/v1/connectors/{_quote(args.name)}")]
    else:
        items = request_json(socket_path, "GET", "/v1/connectors")["connectors"]
    if args.json:
        sys.stdout.write(json.dumps(items if not args.name else items[0], indent=2) + "\n")
        return 0
    rows = [("CONNECTOR", "STATE", "EXPIRES IN", "NEXT REFRESH", "FAILURES", "LAST ERROR")]
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    for item in items:
        rows.append(
            (
                str(item["connector"]),
                str(item["state"]),
                _until(item.get("expires_at"), now),
                _until(item.get("next_refresh_at"), now),
                str(item.get("consecutive_failures", 0)),
                _last_error(item),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True)]
        sys.stdout.write(("  ".join([*cells, row[5]])).rstrip() + "\n")
    return 0


def _last_error(item: dict[str, Any]) -> str:
    text = str(item.get("last_error") or "")
    if item.get("lifetime_assumed"):
        text = (text + "; " if text else "") + "lifetime assumed (no expires_in)"
    offset = item.get("clock_offset_s")
    if isinstance(offset, int | float) and abs(offset) >= 30:
        text = (text + "; " if text else "") + f"server clock off by {offset:+.0f}s"
    if item.get("action") and item.get("state") not in ("ok", "refreshing", "retrying"):
        text = (text + "; " if text else "") + f"run: {item['action']}"
    return text or "-"


def _until(stamp: object, now: Any) -> str:
    if not isinstance(stamp, str):
        return "-"
    from datetime import datetime

    secs = int((datetime.fromisoformat(stamp.replace("Z", "+00:00")) - now).total_seconds())
    if secs < 0:
        return f"{human_span(-secs)} ago"
    return human_span(secs)


# ----------------------------------------------------------------------------- admin commands


def _admin(name: str) -> Callable[[argparse.Namespace], int]:
    """`tokend.admin.cmd_<name>`, imported only when that command runs (client commands stay
    light)."""

    def command(args: argparse.Namespace) -> int:
        from tokend import admin

        run: Callable[[argparse.Namespace], int] = getattr(admin, f"cmd_{name}")
        return run(args)

    return command


# ----------------------------------------------------------------------------- argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokend", description="Keeps OAuth tokens alive for unattended jobs."
    )
    parser.add_argument(
        "--config", help="config file (default: $TOKEND_CONFIG or the standard path)"
    )
    parser.add_argument("--socket", help="daemon socket (default: $TOKEND_SOCKET or from config)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument("--version", action="version", version=f"tokend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    def admin(name: str, text: str) -> argparse.ArgumentParser:
        return add(name, _admin(name), text)

    admin("run", "run the daemon in the foreground (logs to stderr)")
    p = admin("demo", "run a self-contained demo against a built-in authorization server")
    p.add_argument("--lifetime", type=float, default=30.0, help="token lifetime in seconds")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    for name, func, text in (
        ("token", cmd_token, "print the bare access token"),
        ("header", cmd_header, "print 'Authorization: Bearer …'"),
    ):
        p = add(name, func, text)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--min-ttl", metavar="D", help="refresh first if it expires sooner than D")
    p = add("headers", cmd_headers, 'print {"Authorization": …} for Claude Code headersHelper')
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--min-ttl", metavar="D", help="refresh first if it expires sooner than D")
    p = add("exec", cmd_exec, "run a command with the token in an environment variable")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--env", default="TOKEND_ACCESS_TOKEN", metavar="VAR")
    p.add_argument("--min-ttl", metavar="D", help="refresh first if it expires sooner than D")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD …")
    p.set_defaults(exec_parser=p)
    p = add("status", cmd_status, "show every connector's state")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--json", action="store_true")
    for name, text in (
        ("refresh", "refresh a connector now"),
        ("import", "install a grant: an RFC 6749 token response (JSON) on stdin"),
        ("secret", "store the connector's client secret, read from stdin"),
    ):
        p = admin(name, text)
        p.add_argument("name", metavar="NAME")
    p = admin("login", "first authorization: device flow, loopback redirect or paste-back")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--flow", choices=("device", "loopback", "paste"), help="force a flow")
    p.add_argument("--no-browser", action="store_true", help="never open a browser")
    p.add_argument(
        "--timeout", metavar="D", default="5m", help="how long to wait for the user (5m)"
    )
    p = admin("logout", "revoke the grant where the server offers it, then delete it")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--no-revoke", action="store_true", help="delete without revoking")
    p = admin("check", "validate config, keyring, socket directory and token endpoints")
    p.add_argument("--alerts", action="store_true", help="also send a test alert to every sink")
    p = admin("alert", "send a daemon_failed alert (for an OnFailure= unit)")
    p.add_argument("--unit", required=True, help="the unit that failed (%%i in the unit file)")
    p.add_argument("--result", help="why it failed (default: $MONITOR_SERVICE_RESULT)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.func is cmd_exec:
            _exec_options(args)
    except SystemExit as exc:  # argparse's usage errors exit 2, --help/--version 0
        return int(exc.code or 0) if not isinstance(exc.code, str) else ExitCode.USAGE
    try:
        return int(args.func(args))
    except TokendError as exc:
        _print_error(exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import logging

        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"tokend: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.INTERNAL)
