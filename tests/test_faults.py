"""Fault matrix against the real in-process daemon: each token-endpoint fault, shorter and longer
than a token's life, loses nothing, shows the right state and lookup answers while it lasts, and
ends back at `ok` on a live rotation chain; plus a locked keyring and an unwritable state directory
while the daemon runs.

The fourteen matrix cells run concurrently (one loopback authorization server and one daemon
each) in a module fixture, so the file takes about one cell's time; each cell is then judged by
its own parametrized test. Tokens live 4 s: the due refresh falls 2.27-2.67 s in (2/3 of the
life, less up to 10 % jitter), leaving room for a Retry-After of 1 s before expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import (
    MemoryKeyring,
    aget,
    make_config,
    memory_store,
    require,
    short_tmp,
)
from tokend.authserver import AuthServer
from tokend.client import request_json
from tokend.config import AlertSettings, Config
from tokend.daemon import Daemon
from tokend.errors import ApiError, ExitCode
from tokend.model import State
from tokend.oauth.client import make_http_client
from tokend.refresher.connector import Connector
from tokend.store import KeyringStore

LIFETIME_S = 4.0
BACKOFF_SCALE = 0.02  # backoff base 0.1 s, cap 6 s
CLIENT_TIMEOUT_S = 0.5  # the token-endpoint client of the "timeout" cells
HANG_S = 1.0  # a hung request outlasts that timeout
SLOW_SHORT_S = 0.5  # answers well before expiry
SLOW_LONG_S = 2.5  # a refresh sent at 2.27-2.67 s is answered after the 4 s expiry
RETRY_AFTER_S = 1
LONGER_BY_S = 1.5  # a "longer" fault lasts until this long after the old token's expiry
EPS_S = 0.1  # slack around the expiry instant when classifying an observation
RECOVERY_TIMEOUT_S = 30.0

KINDS = ("500", "429", "timeout", "reset", "garbage", "slow", "down")
SPANS = ("shorter", "longer")
# Faults answered (or not) through AuthServer.fail_next; "down" closes the listener instead.
_FAULT: dict[str, tuple[str, dict[str, Any]]] = {
    "500": ("500", {}),
    "429": ("429", {"retry_after": RETRY_AFTER_S}),
    "timeout": ("hang", {"delay_s": HANG_S}),
    "reset": ("reset", {}),
    "garbage": ("garbage", {}),
}
# How many failed attempts a "shorter" fault is: it covers the due refresh and ends before expiry.
_SHORT_COUNT = {"500": 3, "429": 1, "timeout": 1, "reset": 3, "garbage": 3}

# Lookup clients get their own threads (see tests.harness: the daemon's default executor runs
# its keyring calls, and must not be starved by blocked clients).
_CLIENTS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="fault-client")


@dataclasses.dataclass(frozen=True)
class Lookup:
    """One `tokend token`-equivalent lookup: when it was sent and answered, and what came back."""

    sent: datetime
    answered: datetime
    status: int
    token: str | None = None
    expires_at: datetime | None = None
    error: str | None = None
    retry_after: int | None = None
    exit_code: int | None = None


_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclasses.dataclass
class Cell:
    """What one matrix cell saw."""

    kind: str
    span: str
    old_token: str = ""
    old_expires_at: datetime = _NEVER
    fault_end: datetime | None = None
    lookups: list[Lookup] = dataclasses.field(default_factory=list)
    states: list[tuple[datetime, State]] = dataclasses.field(default_factory=list)
    token_calls: list[tuple[datetime, str]] = dataclasses.field(default_factory=list)
    final_state: State | None = None
    final_token_valid: bool = False
    final_token_new: bool = False
    forced_refresh_ok: bool = False
    recovered_after_s: float | None = None
    reuse_detected: int = -1
    error: str | None = None


def _lookup(socket: str) -> Lookup:
    sent = datetime.now(UTC)
    try:
        body = request_json(socket, "GET", "/v1/connectors/demo/token", connector="demo")
    except ApiError as exc:
        return Lookup(
            sent,
            datetime.now(UTC),
            exc.http_status,
            error=exc.code,
            retry_after=exc.retry_after,
            exit_code=int(exc.exit_code),
        )
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    return Lookup(sent, datetime.now(UTC), 200, token=body["access_token"], expires_at=expires)


async def _alookup(socket: str) -> Lookup:
    return await asyncio.get_running_loop().run_in_executor(_CLIENTS, _lookup, socket)


async def _keep_failing(auth: AuthServer, kind: str, params: dict[str, Any], until: float) -> None:
    """Keep one scripted fault queued until `until` (monotonic); at most one is left over."""
    base, queued = auth.token_calls, 0
    while time.monotonic() < until:
        if auth.token_calls - base >= queued:
            auth.fail_next(kind, **params)
            queued += 1
        await asyncio.sleep(0.005)


async def _run_cell(cell: Cell) -> None:
    root = short_tmp("tkf")
    try:
        with AuthServer(lifetime_s=LIFETIME_S) as auth:
            await _drive(cell, auth, root)
    except Exception as exc:  # judged by the cell's test, not raised into the other cells
        cell.error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def _daemon(
    config: Config, *, http: httpx.AsyncClient | None = None, store: KeyringStore | None = None
) -> AsyncIterator[Daemon]:
    """Like `running_daemon`, but with the token-endpoint client given (Daemon's `http`)."""
    daemon = Daemon(
        config,
        store=store or memory_store(),
        http=http,
        backoff_scale=BACKOFF_SCALE,
        recheck_s=0.5,
    )
    runner = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready_event.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED, timeout=10)
    if runner.done():
        ready.cancel()
        runner.result()
    assert daemon.ready_event.is_set(), "daemon not ready within 10 s"
    try:
        yield daemon
    finally:
        daemon.stop_event.set()
        await asyncio.wait_for(runner, 30)


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _drive(cell: Cell, auth: AuthServer, root: Path) -> None:
    config = make_config(root, auth.token_url)
    socket = str(config.daemon.socket)
    http = make_http_client(timeout_s=CLIENT_TIMEOUT_S) if cell.kind == "timeout" else None
    try:
        async with _daemon(config, http=http) as daemon:
            connector = daemon.connectors["demo"]
            status, body = await aget(
                socket, "/v1/connectors/demo/grant", "PUT", auth.issue_grant()
            )
            assert status == 200, body
            old = connector.token
            assert old is not None
            cell.old_token, cell.old_expires_at = old.access_token.reveal(), old.expires_at
            stop = asyncio.Event()
            watchers = [
                asyncio.create_task(_watch_states(connector, cell, stop)),
                asyncio.create_task(_keep_looking(socket, cell, stop)),
            ]
            try:
                await _inject(cell, auth, connector)
                cell.fault_end = datetime.now(UTC)
                await _recover(cell, auth, connector, socket)
            finally:
                stop.set()
                await asyncio.gather(*watchers)
            status, _ = await aget(socket, "/v1/connectors/demo/refresh", "POST")
            cell.forced_refresh_ok = status == 200
        cell.reuse_detected = auth.reuse_detected
        cell.token_calls = [
            (r.at, r.outcome) for r in auth.requests if r.method == "POST" and r.path == "/token"
        ]
    finally:
        if http is not None:
            await http.aclose()


async def _watch_states(connector: Connector, cell: Cell, stop: asyncio.Event) -> None:
    """Record each state change of the connector (polled every 10 ms, in-process)."""
    last: State | None = None
    while not stop.is_set():
        state = connector.state
        if state is not last:
            cell.states.append((datetime.now(UTC), state))
            last = state
        await asyncio.sleep(0.01)


async def _keep_looking(socket: str, cell: Cell, stop: asyncio.Event) -> None:
    """A job script asking for the token every 100 ms (each lookup may wait for a refresh)."""
    while not stop.is_set():
        cell.lookups.append(await _alookup(socket))
        await asyncio.sleep(0.1)


async def _inject(cell: Cell, auth: AuthServer, connector: Connector) -> None:
    """Start the fault before the due refresh; return when it is over."""
    shorter = cell.span == "shorter"
    to_expiry = (cell.old_expires_at - datetime.now(UTC)).total_seconds()
    longer_until = time.monotonic() + to_expiry + LONGER_BY_S
    if cell.kind == "slow":
        auth.fail_next("slow", delay_s=SLOW_SHORT_S if shorter else SLOW_LONG_S)
        await _until(lambda: connector.record.refreshes >= 1)
    elif cell.kind == "down":
        auth.go_down()
        if shorter:
            await _until(lambda: connector.record.consecutive_failures >= 3)
        else:
            await asyncio.sleep(longer_until - time.monotonic())
        auth.come_back()
    else:
        kind, params = _FAULT[cell.kind]
        if shorter:
            count = _SHORT_COUNT[cell.kind]
            auth.fail_next(kind, count, **params)
            await _until(lambda: connector.record.consecutive_failures >= count)
        else:
            await _keep_failing(auth, kind, params, longer_until)


async def _recover(cell: Cell, auth: AuthServer, connector: Connector, socket: str) -> None:
    """Wait until a lookup answers a new token the server accepts, with the connector `ok`."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        look = await _alookup(socket)
        if (
            look.status == 200
            and look.token is not None
            and look.token != cell.old_token
            and auth.is_valid_access_token(look.token)
            and connector.state is State.OK
        ):
            cell.final_state, cell.final_token_valid, cell.final_token_new = State.OK, True, True
            if cell.fault_end is not None:
                cell.recovered_after_s = (look.answered - cell.fault_end).total_seconds()
            return
        if time.monotonic() > deadline:
            cell.final_state = connector.state
            return
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def matrix() -> dict[tuple[str, str], Cell]:
    """Every cell of the matrix, run concurrently once for the module."""
    cells = {(kind, span): Cell(kind, span) for kind in KINDS for span in SPANS}

    async def run_all() -> None:
        await asyncio.gather(*(_run_cell(cell) for cell in cells.values()))

    asyncio.run(run_all())
    return cells


def _gaps_after_429(cell: Cell) -> list[float]:
    calls = cell.token_calls
    return [
        (nxt[0] - cur[0]).total_seconds()
        for cur, nxt in itertools.pairwise(calls)
        if cur[1] == "fault:429"
    ]


def _summary(cell: Cell) -> str:
    """One table row: lookups ok/503, states seen, token calls, fault end to `ok`, reuse."""
    ok = sum(look.status == 200 for look in cell.lookups)
    states = "->".join(dict.fromkeys(state.value for _, state in cell.states))
    back = "?" if cell.recovered_after_s is None else f"{cell.recovered_after_s:.1f}s"
    return (
        f"| {cell.kind} | {cell.span} | {ok}/{len(cell.lookups) - ok} | {states} | "
        f"{len(cell.token_calls)} | {back} | {cell.reuse_detected} |"
    )


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("kind", KINDS)
def test_fault_cell(matrix: dict[tuple[str, str], Cell], kind: str, span: str) -> None:
    """A token-endpoint fault shorter or longer than a token's life: nothing lost, the right
    state and lookup answers while it lasts, and back to `ok` on the same rotation chain."""
    cell = matrix[(kind, span)]
    print(_summary(cell))  # with -s: the matrix as a table
    assert cell.error is None, cell.error
    expiry = cell.old_expires_at
    eps = timedelta(seconds=EPS_S)
    # Nothing lost: a new token the server accepts, the chain still live, no reuse.
    assert cell.final_state is State.OK
    assert cell.final_token_valid and cell.final_token_new
    assert cell.forced_refresh_ok
    assert cell.reuse_detected == 0
    # The fault covered the due refresh.
    states = [state for _, state in cell.states]
    if kind in _FAULT:
        assert cell.token_calls[0][1].startswith("fault:"), cell.token_calls[:3]
    if kind == "slow":
        assert "(slow)" in cell.token_calls[0][1], cell.token_calls[:3]
        assert State.REFRESHING in states and State.RETRYING not in states
    else:
        retrying = [at for at, state in cell.states if state is State.RETRYING]
        assert retrying and retrying[0] < expiry, cell.states
    # Lookups: never an expired token; 200 while the old token is valid.
    for look in cell.lookups:
        if look.status == 200:
            # The API gives expires_at in whole seconds (rounded down).
            assert look.expires_at is not None, look
            assert look.expires_at + timedelta(seconds=1) > look.sent, look
        else:
            assert (look.status, look.error) == (503, "temporarily_unavailable"), look
            assert look.retry_after is not None and look.retry_after >= 1, look
            assert look.exit_code == ExitCode.TEMPORARY  # 75
    assert all(look.status == 200 for look in cell.lookups if look.answered < expiry - eps)
    assert not any(at < expiry - eps for at, state in cell.states if state is State.EXPIRED)
    if span == "shorter":
        assert State.EXPIRED not in states, cell.states
        assert all(look.status == 200 for look in cell.lookups), cell.lookups
    elif kind == "slow":
        # Lookups after expiry join the refresh in flight and get its token: nothing fails.
        assert cell.fault_end is not None
        late = [look for look in cell.lookups if expiry < look.sent < cell.fault_end]
        assert late, cell.lookups
        assert all(look.status == 200 and look.token != cell.old_token for look in late), late
    else:
        assert State.EXPIRED in states, cell.states
        assert cell.fault_end is not None
        during = [look for look in cell.lookups if expiry + eps < look.sent < cell.fault_end]
        assert during and any(look.status == 503 for look in during), cell.lookups
        before = [look for look in cell.lookups if look.answered < expiry - eps]
        retry_start = min(at for at, state in cell.states if state is State.RETRYING)
        assert any(look.token == cell.old_token for look in before if look.sent > retry_start), (
            "no lookup got the old token while retrying"
        )
    if kind == "429":
        gaps = _gaps_after_429(cell)
        assert gaps and min(gaps) >= RETRY_AFTER_S - 0.02, gaps


# ----------------------------------------------------------------------------- local faults


def _exec_sink(root: Path) -> tuple[tuple[str, ...], Path]:
    """An exec alert sink appending each alert's JSON as a line to a file."""
    out = root / "alerts.jsonl"
    script = root / "page-me"
    script.write_text(f'#!/bin/sh\ncat >> "{out}"\necho >> "{out}"\n')
    script.chmod(0o755)
    return (str(script),), out


def _alert_events(out: Path) -> list[str]:
    if not out.exists():
        return []
    return [json.loads(line)["event"] for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.anyio
async def test_keyring_locked_while_running(tmp_short: Path) -> None:
    """A keyring refusing writes for a while: the refreshed set is served from memory, alerts
    persist_failed then recovered, and the store ends up with the live refresh token."""
    argv, out = _exec_sink(tmp_short)
    backend = MemoryKeyring()
    store = memory_store(backend)
    with AuthServer(lifetime_s=3.0) as auth:
        base = make_config(tmp_short, auth.token_url)
        config = dataclasses.replace(
            base, alerts=AlertSettings(exec=argv, repeat=timedelta(hours=1))
        )
        socket = str(config.daemon.socket)
        async with _daemon(config, store=store) as daemon:
            connector = daemon.connectors["demo"]
            status, body = await aget(
                socket, "/v1/connectors/demo/grant", "PUT", auth.issue_grant()
            )
            assert status == 200, body
            old = connector.token
            assert old is not None and old.refresh_token is not None
            backend.fail_writes = True
            await _until(lambda: connector.unpersisted)  # the due refresh, ~2 s in
            held = connector.token
            assert held is not None and held.access_token != old.access_token
            status, body = await aget(socket, "/v1/connectors/demo/token")
            assert status == 200 and auth.is_valid_access_token(body["access_token"])
            assert body["access_token"] != old.access_token.reveal()
            await _until(lambda: "persist_failed" in _alert_events(out))
            stored = await asyncio.to_thread(store.load, "demo")
            assert stored is not None and stored.refresh_token is not None
            assert stored.refresh_token.reveal() == old.refresh_token.reveal()  # not yet written
            backend.fail_writes = False
            await _until(lambda: not connector.unpersisted)
            await _until(lambda: _alert_events(out)[-1:] == ["recovered"])
            stored = await asyncio.to_thread(store.load, "demo")
            live = connector.token
            assert stored is not None and stored.refresh_token is not None
            assert live is not None and live.refresh_token is not None
            assert stored.refresh_token.reveal() == live.refresh_token.reveal()
            status, body = await aget(socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 200, body
    assert _alert_events(out) == ["persist_failed", "recovered"]
    assert auth.reuse_detected == 0


def _mount_read_only(path: Path) -> bool:
    """Mount an empty read-only tmpfs over `path`; False where mounting is not allowed."""
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tokend-test", str(path)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _unmount(path: Path) -> None:
    done = subprocess.run(["umount", str(path)], capture_output=True, timeout=10, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10, check=False)


@pytest.mark.anyio
async def test_state_dir_unwritable_while_running(
    tmp_short: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A state directory turned read-only under the running daemon (a read-only mount over it):
    tokens keep being refreshed and served, state.json failures are WARNINGs, nothing crashes."""
    caplog.set_level(logging.WARNING, logger="tokend.daemon")
    with AuthServer(lifetime_s=2.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        socket = str(config.daemon.socket)
        state_dir = config.daemon.state_dir
        async with _daemon(config) as daemon:
            connector = daemon.connectors["demo"]
            status, body = await aget(
                socket, "/v1/connectors/demo/grant", "PUT", auth.issue_grant()
            )
            assert status == 200, body
            require(
                _mount_read_only(state_dir),
                "cannot mount a read-only tmpfs here (needs root / CAP_SYS_ADMIN)",
            )
            try:
                assert not (state_dir / "state.json").exists()  # the mount hides it
                before = connector.record.refreshes
                await _until(lambda: connector.record.refreshes >= before + 2)
                status, body = await aget(socket, "/v1/connectors/demo/token")
                assert status == 200 and auth.is_valid_access_token(body["access_token"])
                await _until(lambda: "state not saved" in caplog.text)
            finally:
                _unmount(state_dir)
            refreshes = connector.record.refreshes
            await _until(lambda: connector.record.refreshes > refreshes)
            status, body = await aget(socket, "/v1/connectors/demo/token")
            assert status == 200 and auth.is_valid_access_token(body["access_token"])
    saved = json.loads((state_dir / "state.json").read_text())
    assert saved["connectors"]["demo"]["refreshes"] >= refreshes
    assert auth.reuse_detected == 0
    warnings = [r for r in caplog.records if "state not saved" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
