"""What the admin commands do when no daemon is running: the same connector logic, run once on
the store directly (the CLI holds the state directory's lock meanwhile), and `tokend check`.

Imported lazily by `cli`, so client commands never pay for httpx or keyring.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tokend.clients import ClientRecord, ClientRecords, resolve
from tokend.clock import SystemClock
from tokend.config import Config, ConnectorConfig
from tokend.errors import DiscoveryError, ExitCode, TokendError, unknown_connector
from tokend.model import Secret
from tokend.oauth.client import OAuthClient, make_http_client
from tokend.refresher.connector import Connector
from tokend.store import KeyringStore, StateFile

if TYPE_CHECKING:
    import httpx


async def _once(
    config: Config, name: str, operation: Callable[[Connector], Awaitable[object]]
) -> dict[str, object]:
    configured = config.connectors.get(name)
    if configured is None:
        raise unknown_connector(name, config.path)
    records = await asyncio.to_thread(ClientRecords(config.daemon.state_dir).load)
    conn_config = resolve(configured, records.get(name))
    store = KeyringStore.from_settings(config.daemon)
    state_file = StateFile(config.daemon.state_dir / "state.json")
    saved = await asyncio.to_thread(state_file.load)
    async with make_http_client() as http:
        oauth = OAuthClient(http, SystemClock())
        connector = Connector(
            conn_config,
            store=store,
            oauth=oauth,
            clock=SystemClock(),
            schedule=lambda _name, _when: None,
            listener=lambda _connector, _old: None,
        )
        try:
            await connector.start(saved.get(name))
            await operation(connector)
        finally:
            saved[name] = connector.record
            await asyncio.to_thread(state_file.save, saved)
            await oauth.aclose()
    return connector.status()


def install_grant(config: Config, name: str, fields: Mapping[str, object]) -> dict[str, object]:
    """Install a grant into the keyring directly; returns the connector's status."""
    return asyncio.run(_once(config, name, lambda c: c.install(fields)))


def install_login(
    config: Config,
    name: str,
    fields: Mapping[str, object],
    record: ClientRecord,
    client_secret: Secret | None,
) -> dict[str, object]:
    """Store what `tokend login` obtained: the client record, then a registered client's secret
    and the grant; returns the connector's status."""
    ClientRecords(config.daemon.state_dir).put(name, record)

    async def operation(connector: Connector) -> None:
        if client_secret is not None:
            await asyncio.to_thread(connector.store.save_client_secret, name, client_secret)
        await connector.install(fields)

    return asyncio.run(_once(config, name, operation))


def logout(config: Config, name: str, *, revoke: bool) -> dict[str, object]:
    """Revoke (when asked and offered) and delete the stored grant."""
    revoked: list[str] = []

    async def operation(connector: Connector) -> None:
        revoked.extend(await connector.forget(revoke=revoke))

    status = asyncio.run(_once(config, name, operation))
    return {**status, "revoked": revoked}


def refresh(config: Config, name: str) -> dict[str, object]:
    """Refresh once and persist; raises ApiError when the grant is dead or the refresh failed."""

    async def operation(connector: Connector) -> None:
        await connector.force_refresh()

    return asyncio.run(_once(config, name, operation))


def store_secret(config: Config, name: str, secret: str) -> None:
    """Store the client secret in the keyring directly."""
    if name not in config.connectors:
        raise unknown_connector(name, config.path)
    KeyringStore.from_settings(config.daemon).save_client_secret(name, Secret(secret))


# ----------------------------------------------------------------------------- check


def _line(ok: bool, what: str, detail: str) -> None:
    sys.stdout.write(f"{'ok  ' if ok else 'FAIL'}  {what:<10} {detail}\n")


def check(config: Config, *, socket_path: str) -> int:
    """Validate config, keyring, socket and state directories and token endpoints, consuming no
    refresh token. Prints one line per check; returns the first failure's exit code (else 0)."""
    failures: list[ExitCode] = []
    _line(True, "config", f"{config.path or '(defaults)'}: {len(config.connectors)} connectors")

    store: KeyringStore | None = None
    try:
        store = KeyringStore.from_settings(config.daemon)
        store.probe()
        _line(True, "keyring", f"{store.backend_name}: write, read back, delete")
    except TokendError as exc:
        _line(False, "keyring", str(exc))
        failures.append(exc.exit_code)

    from tokend.client import request_json
    from tokend.errors import DaemonUnavailableError

    try:
        health = request_json(socket_path, "GET", "/v1/health")
        _line(True, "daemon", f"{socket_path}: {health.get('status')}: {health.get('summary')}")
    except DaemonUnavailableError as exc:
        directory = Path(socket_path).parent
        usable = _dir_usable(directory)
        _line(
            usable,
            "socket",
            f"daemon not running ({exc}); {directory}: "
            + ("usable" if usable else "cannot be created or written"),
        )
        if not usable:
            failures.append(ExitCode.CONFIG)

    state_dir = config.daemon.state_dir
    usable = _dir_usable(state_dir)
    _line(usable, "state", f"{state_dir}: {'usable' if usable else 'cannot be created or written'}")
    if not usable:
        failures.append(ExitCode.CONFIG)

    results = asyncio.run(_probe_endpoints(config))
    for name, (ok, detail, code) in results.items():
        if store is not None and ok:
            try:
                grant = store.load(name)
                detail += "; grant stored" if grant is not None else "; no grant stored"
            except TokendError as exc:
                ok, detail, code = False, f"{detail}; {exc}", exc.exit_code
        _line(ok, name, detail)
        if not ok:
            failures.append(code)
    return int(failures[0]) if failures else 0


def _dir_usable(directory: Path) -> bool:
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


async def _probe_endpoints(config: Config) -> dict[str, tuple[bool, str, ExitCode]]:
    """Per connector: reachable?, what was found, and the exit code a failure stands for."""
    results: dict[str, tuple[bool, str, ExitCode]] = {}
    try:
        records = ClientRecords(config.daemon.state_dir).load()
    except (TokendError, OSError):
        records = {}  # not readable by this user: discovery is still checked
    async with make_http_client(timeout_s=10.0) as http:
        oauth = OAuthClient(http, SystemClock(), total_timeout_s=10.0)

        async def one(name: str) -> None:
            conn = config.connectors[name]
            try:
                found = ""
                if conn.issuer is not None or conn.mcp_url is not None:
                    conn, found = await _discovered(conn, http, records.get(name))
                status = await oauth.probe(conn)
                detail = f"{found}token endpoint {conn.token_url} reachable (HTTP {status})"
                results[name] = (True, detail, ExitCode.OK)
            except TokendError as exc:
                results[name] = (False, str(exc), exc.exit_code)

        await asyncio.gather(*(one(name) for name in config.connectors))
        await oauth.aclose()
    return dict(sorted(results.items()))


async def _discovered(
    conn: ConnectorConfig, http: httpx.AsyncClient, record: ClientRecord | None
) -> tuple[ConnectorConfig, str]:
    """Discover `conn`'s server as `tokend login` would (nothing is registered or consumed) and
    compare with what the last login recorded. Raises DiscoveryError when it cannot be used."""
    from tokend.oauth.discovery import discover

    found = await discover(connector=conn.name, http=http, issuer=conn.issuer, mcp_url=conn.mcp_url)
    meta = found.metadata
    if "S256" not in meta.code_challenge_methods_supported:
        raise DiscoveryError(conn.name, f"issuer {meta.issuer} does not offer PKCE S256")
    if record is not None and record.issuer is not None and record.issuer != meta.issuer:
        raise DiscoveryError(
            conn.name,
            f"the authorization server is now {meta.issuer}, not {record.issuer} as at the last "
            f"login; stored credentials are not used; run: tokend login {conn.name}",
        )
    offers = [
        what
        for what, url in (
            ("device flow", meta.device_authorization_endpoint),
            ("registration", meta.registration_endpoint),
            ("revocation", meta.revocation_endpoint),
        )
        if url is not None
    ]
    detail = f"issuer {meta.issuer} (S256{''.join(', ' + o for o in offers)}); "
    return replace(conn, token_url=meta.token_endpoint), detail
