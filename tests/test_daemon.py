"""The daemon end to end in-process: real loopback authorization server, real unix socket,
in-memory keyring, shortened backoff. Pins the refresh and lookup promises of DESIGN §1-2."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.harness import MemoryKeyring, aget, make_config, memory_store, running_daemon
from tokend.authserver import AuthServer
from tokend.errors import StateLockedError
from tokend.model import State

pytestmark = pytest.mark.anyio


async def _install(daemon, auth: AuthServer, name: str = "demo") -> None:
    status, body = await aget(
        daemon.config.daemon.socket, f"/v1/connectors/{name}/grant", "PUT", auth.issue_grant()
    )
    assert status == 200, body


async def _wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


async def test_served_tokens_never_expired_and_chain_advances(tmp_short):
    """Every lookup over ~6 s of 2 s tokens gets an unexpired token the server accepts; the
    rotation chain advances by refreshing before expiry, with no refresh-token reuse."""
    with AuthServer(lifetime_s=2.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            seen: set[str] = set()
            failures = 0
            deadline = time.monotonic() + 6.0
            async with httpx.AsyncClient() as http:
                while time.monotonic() < deadline:
                    status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
                    if status != 200:
                        failures += 1
                        continue
                    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
                    assert expires > datetime.now(UTC) - timedelta(seconds=1)
                    assert body["expires_in"] >= 0
                    if body["access_token"] not in seen:
                        seen.add(body["access_token"])
                        who = await http.get(
                            f"{auth.url}/api/whoami",
                            headers={"Authorization": f"Bearer {body['access_token']}"},
                        )
                        assert who.status_code == 200
                    await asyncio.sleep(0.05)
        refreshes = daemon.connectors["demo"].record.refreshes  # after shutdown: none in flight
    assert failures == 0
    assert refreshes >= 3
    assert len(seen) >= 3
    assert auth.refreshes_ok == refreshes
    assert auth.reuse_detected == 0


async def test_refresh_happens_before_expiry(tmp_short):
    """The refresh of a 3 s token (skew 1 s) runs while the old token is still valid."""
    with AuthServer(lifetime_s=3.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            first = daemon.connectors["demo"].token
            await _wait_for(lambda: daemon.connectors["demo"].record.refreshes >= 1)
            refreshed_at = daemon.connectors["demo"].record.last_refresh_at
    assert first is not None and refreshed_at is not None
    assert refreshed_at < first.expires_at


async def test_concurrent_lookups_cause_one_token_call(tmp_short):
    """Forty lookups that all need a fresher token (min_ttl) while the endpoint is slow make
    exactly one token-endpoint call, and all of them get the new token."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            await asyncio.sleep(2.0)  # 28 s left: below the min_ttl asked for
            calls_before = auth.token_calls
            auth.fail_next("slow", delay_s=0.5)
            results = await asyncio.gather(
                *(
                    aget(config.daemon.socket, "/v1/connectors/demo/token?min_ttl=29")
                    for _ in range(40)
                )
            )
            calls = auth.token_calls - calls_before
    assert calls == 1
    assert {status for status, _ in results} == {200}
    assert len({body["access_token"] for _, body in results}) == 1
    assert all(body["expires_in"] >= 29 for _, body in results)


async def test_short_outage_zero_failed_lookups(tmp_short):
    """An endpoint outage shorter than the token's life costs no lookup: the old token is served
    while retrying, and the next refresh succeeds once the endpoint is back."""
    with AuthServer(lifetime_s=6.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            auth.go_down()  # the refresh is due 3.4-4 s in; the token expires at 6 s
            failed = 0
            states = set()
            end = time.monotonic() + 4.5
            while time.monotonic() < end:
                status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/token")
                failed += status != 200
                states.add(daemon.connectors["demo"].state)
                await asyncio.sleep(0.05)
            auth.come_back()
            await _wait_for(lambda: daemon.connectors["demo"].record.refreshes >= 1)
            assert daemon.connectors["demo"].state is State.OK
    assert failed == 0
    assert State.RETRYING in states


async def test_long_outage_temporarily_unavailable_then_recovery(tmp_short):
    """An outage longer than the token's life answers 503 temporarily_unavailable with
    Retry-After, never an expired token; service resumes by itself when the endpoint returns."""
    with AuthServer(lifetime_s=2.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config, backoff_scale=0.1) as daemon:
            await _install(daemon, auth)
            auth.go_down()
            await _wait_for(lambda: daemon.connectors["demo"].state is State.EXPIRED, timeout=6)
            status_code, _, raw = await asyncio.to_thread(
                _raw_get, config.daemon.socket, "/v1/connectors/demo/token"
            )
            assert status_code == 503
            assert b"Retry-After:" in raw or b"retry-after:" in raw.lower()
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
            assert status == 503
            assert body["error"] == "temporarily_unavailable"
            assert body["connector"] == "demo"
            assert body["retry_after"] >= 1
            auth.come_back()
            await _wait_for(lambda: daemon.connectors["demo"].state is State.OK, timeout=15)
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
    assert status == 200
    assert auth.reuse_detected == 0


def _raw_get(socket_path, path: str) -> tuple[int, str, bytes]:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: tokend\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), "", data


async def test_invalid_grant_needs_reauth_and_keeps_stored_grant(tmp_short):
    """invalid_grant makes the connector needs_reauth, lookups answer needs_reauth, and the stored
    token set is byte-for-byte what it was."""
    backend = MemoryKeyring()
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config, store=memory_store(backend)) as daemon:
            await _install(daemon, auth)
            stored = dict(backend.items)
            auth.fail_next("invalid_grant")
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 503
            assert body["error"] == "needs_reauth"
            assert daemon.connectors["demo"].state is State.NEEDS_REAUTH
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
            assert (status, body["error"]) == (503, "needs_reauth")
            assert "invalid_grant" in body["error_description"]
            assert body["action"] == "tokend import demo"
            assert backend.items == stored
            calls = auth.token_calls
            status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 503
            assert auth.token_calls == calls  # a dead refresh token is not presented again


async def test_new_grant_recovers_from_needs_reauth(tmp_short):
    """Installing a new grant takes a needs_reauth connector back to ok."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            auth.fail_next("invalid_grant")
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert daemon.connectors["demo"].state is State.NEEDS_REAUTH
            await _install(daemon, auth)
            status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/token")
    assert status == 200


async def test_invalid_client_is_rejected(tmp_short):
    """invalid_client makes the connector rejected; lookups answer needs_reauth with the reason."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            auth.fail_next("invalid_client")
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert daemon.connectors["demo"].state is State.REJECTED
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
    assert (status, body["error"]) == (503, "needs_reauth")
    assert "invalid_client" in body["error_description"]


async def test_retry_after_is_honoured(tmp_short):
    """A 429 with Retry-After: 2 holds the next attempt back at least 2 s; meanwhile the old,
    still valid token is served."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            old = daemon.connectors["demo"].token
            auth.fail_next("429", retry_after=2)
            started = time.monotonic()
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            record = daemon.connectors["demo"].record
            assert record.state is State.RETRYING
            assert record.retry_at is not None
            assert record.retry_at >= datetime.now(UTC) + timedelta(seconds=1.5)
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
            assert status == 200 and old is not None
            assert body["access_token"] == old.access_token.reveal()
            await _wait_for(lambda: daemon.connectors["demo"].record.refreshes >= 1)
            elapsed = time.monotonic() - started
            posts = [r for r in auth.requests if r.method == "POST"]
    assert elapsed >= 2.0
    assert len(posts) == 2  # the 429 and one retry after it: nothing in between


@pytest.mark.parametrize("kind", ["garbage", "html", "missing_access_token", "bad_expires_in"])
async def test_unusable_responses_are_transient_and_keep_old_token(tmp_short, kind):
    """A garbage or incomplete token response is transient: state retrying, old token served,
    and a later refresh succeeds with the same (unconsumed) refresh token."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            old = daemon.connectors["demo"].token
            auth.fail_next(kind)
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert daemon.connectors["demo"].state is State.RETRYING
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
            assert status == 200 and old is not None
            assert body["access_token"] == old.access_token.reveal()
            await _wait_for(lambda: daemon.connectors["demo"].record.refreshes >= 1)
    assert auth.reuse_detected == 0


async def test_rotation_kept_when_refresh_token_omitted(tmp_short):
    """A refresh response without refresh_token keeps the old one (RFC 6749 §6); the next refresh
    still works."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            auth.fail_next("omit_refresh_token")
            status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 200
            status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 200
    assert auth.refreshes_ok == 2
    assert auth.reuse_detected == 0


async def test_missing_expires_in_uses_default_lifetime(tmp_short):
    """Without expires_in the connector's default_lifetime is assumed and status says so."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url, refresh={"default_lifetime": "20s"})
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            auth.fail_next("omit_expires_in")
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo")
    assert status == 200
    assert body["lifetime_assumed"] is True
    assert 15 <= body["expires_in"] <= 20


async def test_persist_failure_keeps_new_tokens_in_memory(tmp_short):
    """When the keyring write fails after a refresh, the new token set is served from memory
    (the rotated refresh token is never dropped) and written once the keyring is back."""
    backend = MemoryKeyring()
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config, store=memory_store(backend)) as daemon:
            await _install(daemon, auth)
            backend.fail_writes = True
            await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            connector = daemon.connectors["demo"]
            assert connector.status()["unpersisted"] is True
            assert "persist_failed" in (connector.record.last_error or "")
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
            assert status == 200
            assert auth.is_valid_access_token(body["access_token"])
            backend.fail_writes = False
            await _wait_for(lambda: not connector.status()["unpersisted"], timeout=10)
            stored = connector.store.load("demo")
            assert stored is not None and connector.token is not None
            assert stored.refresh_token == connector.token.refresh_token
            # The stored refresh token is the live one: refreshing from it works.
            status, _ = await aget(config.daemon.socket, "/v1/connectors/demo/refresh", "POST")
            assert status == 200
    assert auth.reuse_detected == 0


async def test_second_daemon_on_same_state_dir_refused(tmp_short):
    """A second daemon on the same state directory refuses to start, naming the holder's PID."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config):
            other = make_config(tmp_short / "b", auth.token_url)
            other = type(other)(
                path=None,
                daemon=type(config.daemon)(
                    socket=tmp_short / "b.sock", state_dir=config.daemon.state_dir
                ),
                connectors=config.connectors,
            )
            with pytest.raises(StateLockedError) as excinfo:
                async with running_daemon(other):
                    pass
    import os

    assert excinfo.value.pid == os.getpid()
    assert str(os.getpid()) in str(excinfo.value)


async def test_restart_serves_stored_token_without_refresh(tmp_short):
    """A restarted daemon serves the still-valid stored token at once, without a token call."""
    backend = MemoryKeyring()
    with AuthServer(lifetime_s=60.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config, store=memory_store(backend)) as daemon:
            await _install(daemon, auth)
            token = daemon.connectors["demo"].token
        calls = auth.token_calls
        async with running_daemon(config, store=memory_store(backend)):
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
    assert status == 200 and token is not None
    assert body["access_token"] == token.access_token.reveal()
    assert auth.token_calls == calls


async def test_status_and_health(tmp_short):
    """Status lists every connector with state and times; health is degraded while one connector
    has no grant and ok once it has."""
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url, connectors={"demo": {}, "other": {}})
        async with running_daemon(config) as daemon:
            await _install(daemon, auth)
            status, listing = await aget(config.daemon.socket, "/v1/connectors")
            _, health = await aget(config.daemon.socket, "/v1/health")
            await _install(daemon, auth, "other")
            _, health_after = await aget(config.daemon.socket, "/v1/health")
    assert status == 200
    states = {c["connector"]: c["state"] for c in listing["connectors"]}
    assert states == {"demo": "ok", "other": "unauthorized"}
    assert health["status"] == "degraded"
    assert health_after["status"] == "ok"
    for item in listing["connectors"]:
        assert "access_token" not in item and "refresh_token" not in item


async def test_forget_grant_makes_connector_unauthorized(tmp_short):
    """DELETE .../grant removes the stored grant: the keyring item is gone, lookups answer
    needs_reauth, and no refresh is scheduled any more."""
    backend = MemoryKeyring()
    with AuthServer(lifetime_s=30.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        async with running_daemon(config, store=memory_store(backend)) as daemon:
            await _install(daemon, auth)
            assert ("tokend", "demo") in backend.items
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/grant", "DELETE")
            assert status == 200
            assert body["state"] == "unauthorized"
            assert ("tokend", "demo") not in backend.items
            assert daemon.connectors["demo"].record.next_refresh_at is None
            status, body = await aget(config.daemon.socket, "/v1/connectors/demo/token")
    assert (status, body["error"]) == (503, "needs_reauth")


async def test_stop_closes_every_connector_after_its_refresh_in_flight(tmp_short, monkeypatch):
    """SIGTERM's stop calls close() on every connector, after the scheduler stopped; the
    refreshes in flight finish and their rotated sets reach the keyring before run() returns."""
    names = ["a", "b", "c"]
    backend = MemoryKeyring()
    with AuthServer(lifetime_s=60.0) as auth:
        config = make_config(tmp_short, auth.token_url, connectors={n: {} for n in names})
        async with running_daemon(config, store=memory_store(backend)) as daemon:
            for name in names:
                await _install(daemon, auth, name)
            closed: list[str] = []
            for connector in daemon.connectors.values():
                real_close = connector.close

                async def close(real_close=real_close, connector=connector) -> None:
                    # Records the call and runs the real close(): nothing of it is replaced.
                    assert daemon.scheduler is not None and not daemon.scheduler.running
                    closed.append(connector.name)
                    await real_close()

                monkeypatch.setattr(connector, "close", close)
            auth.fail_next("slow", count=len(names), delay_s=1.0)
            refreshes = [asyncio.create_task(c.refresh()) for c in daemon.connectors.values()]
            await _wait_for(lambda: all(c.refresh_in_flight for c in daemon.connectors.values()))
            daemon.stop_event.set()
        await asyncio.gather(*refreshes, return_exceptions=True)
    assert sorted(closed) == names
    assert auth.refreshes_ok == len(names)
    for connector in daemon.connectors.values():
        assert not connector.refresh_in_flight
        assert connector.record.refreshes == 1
        assert connector.token is not None
        stored = memory_store(backend).load(connector.name)
        assert stored is not None
        assert stored.refresh_token == connector.token.refresh_token


async def test_stop_is_bounded_by_the_grace_when_a_refresh_hangs(tmp_short, caplog):
    """A refresh that never answers holds the stop for the shutdown grace only, then the daemon
    exits with an ERROR naming the connector."""
    from tokend.daemon import Daemon

    with AuthServer(lifetime_s=60.0) as auth:
        config = make_config(tmp_short, auth.token_url)
        daemon = Daemon(config, store=memory_store(), backoff_scale=0.02, shutdown_grace_s=1.0)
        runner = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready_event.wait(), 10)
        await _install(daemon, auth)
        auth.fail_next("hang", delay_s=30.0)
        refresh = asyncio.create_task(daemon.connectors["demo"].refresh())
        await _wait_for(lambda: daemon.connectors["demo"].refresh_in_flight)
        started = time.monotonic()
        daemon.stop_event.set()
        await asyncio.wait_for(runner, 15)
        assert time.monotonic() - started < 10
        refresh.cancel()
        await asyncio.gather(refresh, return_exceptions=True)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("not closed after" in m and "demo" in m for m in errors), errors
