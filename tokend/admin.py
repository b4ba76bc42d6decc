"""The `tokend` admin commands: login, logout, import, secret, refresh, check, alert, run, demo.

`tokend.cli` parses the command line and imports this module only when one of these commands runs,
so the client commands stay light. `login`, `logout`, `import`, `secret` and `refresh` go through
the daemon when it runs, else act on the store directly while holding the state directory's lock.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from tokend import paths
from tokend.client import request_json
from tokend.errors import ApiError, DaemonUnavailableError, SocketPermissionError, StateLockedError

if TYPE_CHECKING:
    from tokend.config import Config


def _socket_path(args: argparse.Namespace) -> str:
    return paths.socket_path(args.socket, args.config)


def _load_config(args: argparse.Namespace, *, missing_ok: bool = False) -> Config:
    from tokend.config import load_config

    return load_config(paths.config_path(args.config), missing_ok=missing_ok)


def _quote(name: str) -> str:
    return quote(name, safe="")


T = TypeVar("T")


def _daemon_or_direct(
    args: argparse.Namespace,
    via_socket: Callable[[str], T],
    direct: Callable[[Config], T],
) -> T:
    """Through the daemon when it runs (its keyring is used), else on the store directly while
    holding the state directory's lock (so a daemon starting meanwhile cannot race us)."""
    socket_path = _socket_path(args)
    try:
        return via_socket(socket_path)
    except SocketPermissionError:
        raise  # the daemon runs: acting on the store behind its back would race it
    except DaemonUnavailableError:
        config = _load_config(args)
        from tokend.store import StateDirLock

        lock = StateDirLock(config.daemon.state_dir)
        try:
            lock.acquire()
        except StateLockedError as exc:
            raise DaemonUnavailableError(
                f"tokend runs (state directory locked by PID {exc.pid}) but its socket "
                f"{socket_path} does not answer"
            ) from None
        try:
            return direct(config)
        finally:
            lock.release()


def _read_stdin(what: str) -> str:
    if sys.stdin is None or sys.stdin.isatty():
        print(f"reading {what} from stdin (end with Ctrl-D)", file=sys.stderr)
    text = sys.stdin.read() if sys.stdin is not None else ""
    return text


def cmd_import(args: argparse.Namespace) -> int:
    text = _read_stdin("an RFC 6749 token response (JSON)")
    try:
        fields = json.loads(text)
    except ValueError:
        raise ApiError(
            "bad_request", "stdin is not JSON (expected a token response)", connector=args.name
        ) from None
    if not isinstance(fields, dict):
        raise ApiError("bad_request", "expected a JSON object", connector=args.name)
    name = args.name

    def direct(config: Config) -> dict[str, object]:
        from tokend import offline  # loads httpx and keyring: only when the daemon is down

        return offline.install_grant(config, name, fields)

    status = _daemon_or_direct(
        args,
        lambda path: request_json(
            path, "PUT", f"/v1/connectors/{_quote(name)}/grant", fields, connector=name
        ),
        direct,
    )
    _say_installed(status)
    return 0


def _say_installed(status: dict[str, Any]) -> None:
    print(
        f"tokend: {status['connector']}: grant installed; state {status['state']}, "
        f"expires in {status.get('expires_in')}s",
        file=sys.stderr,
    )


def cmd_secret(args: argparse.Namespace) -> int:
    secret = _read_stdin("the client secret").strip("\r\n")
    if not secret:
        raise ApiError("bad_request", "empty client secret on stdin", connector=args.name)
    name = args.name

    def direct(config: Config) -> None:
        from tokend import offline

        offline.store_secret(config, name, secret)

    _daemon_or_direct(
        args,
        lambda path: request_json(
            path,
            "PUT",
            f"/v1/connectors/{_quote(name)}/secret",
            {"client_secret": secret},
            connector=name,
        ),
        direct,
    )
    print(f"tokend: {name}: client secret stored", file=sys.stderr)
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    name = args.name

    def direct(config: Config) -> dict[str, object]:
        from tokend import offline

        return offline.refresh(config, name)

    status = _daemon_or_direct(
        args,
        lambda path: request_json(
            path, "POST", f"/v1/connectors/{_quote(name)}/refresh", connector=name
        ),
        direct,
    )
    _say_refreshed(status)
    return 0


def _say_refreshed(status: dict[str, Any]) -> None:
    print(
        f"tokend: {status['connector']}: state {status['state']}, "
        f"expires in {status.get('expires_in')}s",
        file=sys.stderr,
    )


def cmd_login(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    from tokend.login.command import grant_body, run_login
    from tokend.paths import parse_seconds

    config = _load_config(args)
    name = args.name
    try:
        timeout = timedelta(seconds=parse_seconds(args.timeout))
    except ValueError as exc:
        raise ApiError("bad_request", f"--timeout: {exc}", connector=name) from None
    result = run_login(
        config, name, flow=args.flow, timeout=timeout, open_browser=not args.no_browser
    )
    body = grant_body(result)
    secret = result.client_secret

    def via_socket(path: str) -> dict[str, Any]:
        if secret is not None:
            request_json(
                path,
                "PUT",
                f"/v1/connectors/{_quote(name)}/secret",
                {"client_secret": secret.reveal()},  # reveal: to the daemon, over its socket
                connector=name,
            )
        status: dict[str, Any] = request_json(
            path, "PUT", f"/v1/connectors/{_quote(name)}/grant", body, connector=name
        )
        return status

    def direct(config: Config) -> dict[str, Any]:
        from tokend import offline

        fields = {key: value for key, value in body.items() if key != "client_record"}
        return offline.install_login(config, name, fields, result.record, secret)

    status = _daemon_or_direct(args, via_socket, direct)
    record = result.record
    print(
        f"tokend: {name}: logged in ({result.flow} flow, {record.client_kind} client "
        f"{record.client_id}); state {status['state']}, expires in {status.get('expires_in')}s",
        file=sys.stderr,
    )
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    name = args.name
    revoke = not args.no_revoke

    def direct(config: Config) -> dict[str, object]:
        from tokend import offline

        return offline.logout(config, name, revoke=revoke)

    query = "true" if revoke else "false"
    status = _daemon_or_direct(
        args,
        lambda path: request_json(
            path, "DELETE", f"/v1/connectors/{_quote(name)}/grant?revoke={query}", connector=name
        ),
        direct,
    )
    revoked = status.get("revoked") or []
    if revoked:
        how = " and ".join(str(kind).replace("_", " ") for kind in revoked) + " revoked"
    elif revoke:
        how = "the server offers no revocation endpoint; deleted here only"
    else:
        how = "not revoked"
    print(f"tokend: {name}: logged out ({how}); state {status['state']}", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tokend import offline

    config = _load_config(args)
    code = offline.check(config, socket_path=_socket_path(args))
    if args.alerts:
        from tokend.alerts.command import run_alert_test

        alerts_code = run_alert_test(config)
        code = code or alerts_code
    return code


def cmd_alert(args: argparse.Namespace) -> int:
    """`tokend alert --unit NAME`: the OnFailure= unit's way to say the daemon itself died."""
    configure_logging(args.verbose)
    from tokend.alerts.command import run_alert_command

    return run_alert_command(_load_config(args), args.unit, args.result)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    configure_logging(args.verbose)
    import asyncio

    from tokend.daemon import Daemon

    asyncio.run(Daemon(config).run())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    from tokend.demo import run_demo

    return run_demo(lifetime_s=args.lifetime, duration_s=args.duration)


def configure_logging(verbose: int) -> None:
    from tokend import logs

    logs.configure(verbose)
