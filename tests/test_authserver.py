"""Tests for the loopback authorization server, over real HTTP with httpx."""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest

from tokend.authserver import AuthServer

CONFIDENTIAL = {"tokend-demo": None, "conf": "s3cret pass:word"}


@pytest.fixture
def server() -> Iterator[AuthServer]:
    with AuthServer(clients=CONFIDENTIAL) as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def refresh(
    client: httpx.Client,
    server: AuthServer,
    rt: Any,
    *,
    client_id: str = "tokend-demo",
    **extra: str,
) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": rt, "client_id": client_id, **extra}
    return client.post(server.token_url, data=form)


def whoami(client: httpx.Client, server: AuthServer, at: Any) -> httpx.Response:
    return client.get(server.url + "/api/whoami", headers={"Authorization": f"Bearer {at}"})


def basic(client_id: str, secret: str) -> str:
    """An RFC 6749 §2.3.1 Basic header: id and secret form-urlencoded before base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def test_issue_grant_returns_a_token_response_whose_access_token_works(
    server: AuthServer, client: httpx.Client
) -> None:
    """issue_grant gives an RFC 6749 response with at_/rt_ tokens that the resource accepts."""
    grant = server.issue_grant()
    assert grant["token_type"] == "Bearer"
    assert grant["expires_in"] == 30
    assert grant["scope"] == "demo offline_access"
    assert str(grant["access_token"]).startswith("at_")
    assert str(grant["refresh_token"]).startswith("rt_")
    assert server.is_valid_access_token(str(grant["access_token"]))
    response = whoami(client, server, grant["access_token"])
    assert response.status_code == 200
    assert response.json() == {
        "sub": "demo-user",
        "client_id": "tokend-demo",
        "scope": "demo offline_access",
    }


def test_whoami_rejects_unknown_and_missing_tokens_with_a_bearer_challenge(
    server: AuthServer, client: httpx.Client
) -> None:
    """A bad or absent bearer token gets 401 with WWW-Authenticate: Bearer error=invalid_token."""
    for headers in ({"Authorization": "Bearer at_nope"}, {}):
        response = client.get(server.url + "/api/whoami", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_rotation_chain_issues_a_new_refresh_token_each_time(
    server: AuthServer, client: httpx.Client
) -> None:
    """With rotate=True every refresh returns a new refresh token and the chain keeps working."""
    rt = server.issue_grant()["refresh_token"]
    seen = {rt}
    for _ in range(3):
        response = refresh(client, server, rt)
        assert response.status_code == 200
        body = response.json()
        assert body["refresh_token"] not in seen
        assert whoami(client, server, body["access_token"]).status_code == 200
        rt = body["refresh_token"]
        seen.add(rt)
    assert server.refreshes_ok == 3
    assert server.token_calls == 3


def test_token_responses_carry_no_store_headers(server: AuthServer, client: httpx.Client) -> None:
    """Token endpoint answers, success and error, carry Cache-Control: no-store and Pragma."""
    rt = server.issue_grant()["refresh_token"]
    for response in (refresh(client, server, rt), refresh(client, server, "rt_unknown")):
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["pragma"] == "no-cache"
        assert response.headers["content-type"] == "application/json"


def test_reusing_a_retired_refresh_token_revokes_the_whole_family(
    server: AuthServer, client: httpx.Client
) -> None:
    """Presenting a rotated-away refresh token kills the current refresh and access tokens too."""
    grant = server.issue_grant()
    first = refresh(client, server, grant["refresh_token"]).json()
    reuse = refresh(client, server, grant["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert server.reuse_detected == 1
    assert refresh(client, server, first["refresh_token"]).json()["error"] == "invalid_grant"
    assert not server.is_valid_access_token(first["access_token"])
    assert not server.is_valid_access_token(str(grant["access_token"]))
    assert whoami(client, server, first["access_token"]).status_code == 401
    other = server.issue_grant()
    assert server.is_valid_access_token(str(other["access_token"]))


def test_without_reuse_detection_a_retired_token_fails_alone(client: httpx.Client) -> None:
    """With reuse_detection=False a retired refresh token is refused but the family survives."""
    with AuthServer(reuse_detection=False) as server:
        grant = server.issue_grant()
        current = refresh(client, server, grant["refresh_token"]).json()
        assert refresh(client, server, grant["refresh_token"]).json()["error"] == "invalid_grant"
        assert server.reuse_detected == 0
        assert server.is_valid_access_token(current["access_token"])
        assert refresh(client, server, current["refresh_token"]).status_code == 200


def test_refresh_race_loser_takes_the_family_down(server: AuthServer, client: httpx.Client) -> None:
    """Two clients refreshing with the same token: one wins, the reuse then revokes everyone."""
    rt = server.issue_grant()["refresh_token"]
    results: list[httpx.Response] = []

    def worker() -> None:
        with httpx.Client(timeout=5.0) as own:
            results.append(refresh(own, server, rt))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r.json() for r in results if r.status_code == 200]
    assert len(winners) == 1
    assert server.reuse_detected == 1  # later losers find the family already revoked
    assert not server.is_valid_access_token(winners[0]["access_token"])
    assert refresh(client, server, winners[0]["refresh_token"]).json()["error"] == "invalid_grant"


def test_rotate_false_keeps_the_refresh_token(client: httpx.Client) -> None:
    """With rotate=False the same refresh token is returned and stays valid."""
    with AuthServer(rotate=False) as server:
        rt = server.issue_grant()["refresh_token"]
        for _ in range(3):
            response = refresh(client, server, rt)
            assert response.status_code == 200
            assert response.json()["refresh_token"] == rt
        assert server.refreshes_ok == 3


def test_settings_change_at_run_time(server: AuthServer, client: httpx.Client) -> None:
    """rotate and lifetime_s can be changed while the server runs."""
    rt = server.issue_grant()["refresh_token"]
    server.rotate = False
    server.lifetime_s = 7.9
    body = refresh(client, server, rt).json()
    assert body["refresh_token"] == rt
    assert body["expires_in"] == 7


def test_expires_in_is_whole_seconds_at_least_one(client: httpx.Client) -> None:
    """expires_in is the lifetime rounded down, but never below 1."""
    with AuthServer(lifetime_s=0.4) as server:
        assert server.issue_grant()["expires_in"] == 1


def test_client_secret_basic_authenticates_a_confidential_client(
    server: AuthServer, client: httpx.Client
) -> None:
    """client_secret_basic with form-urlencoded id and secret (RFC 6749 §2.3.1) is accepted."""
    rt = server.issue_grant("conf")["refresh_token"]
    response = client.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        headers={"Authorization": basic("conf", "s3cret pass:word")},
    )
    assert response.status_code == 200
    assert server.requests[-1].client_id == "conf"


def test_client_secret_post_authenticates_a_confidential_client(
    server: AuthServer, client: httpx.Client
) -> None:
    """client_secret_post (id and secret in the body) is accepted."""
    rt = server.issue_grant("conf")["refresh_token"]
    response = refresh(client, server, rt, client_id="conf", client_secret="s3cret pass:word")
    assert response.status_code == 200


def test_wrong_secret_over_basic_is_401_with_a_basic_challenge(
    server: AuthServer, client: httpx.Client
) -> None:
    """A wrong Basic secret gets 401 invalid_client with WWW-Authenticate: Basic."""
    rt = server.issue_grant("conf")["refresh_token"]
    response = client.post(
        server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": rt},
        headers={"Authorization": basic("conf", "wrong")},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    assert refresh(
        client, server, rt, client_id="conf", client_secret="s3cret pass:word"
    ).is_success


@pytest.mark.parametrize(
    ("client_id", "extra"),
    [
        ("conf", {"client_secret": "wrong"}),
        ("conf", {}),
        ("stranger", {}),
        ("tokend-demo", {"client_secret": "public clients have none"}),
    ],
)
def test_bad_client_in_body_is_401_without_a_challenge(
    server: AuthServer, client: httpx.Client, client_id: str, extra: dict[str, str]
) -> None:
    """Wrong, missing or unknown client credentials in the body get 401 invalid_client."""
    rt = server.issue_grant("conf")["refresh_token"]
    response = refresh(client, server, rt, client_id=client_id, **extra)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert "www-authenticate" not in response.headers


def test_missing_client_is_401(server: AuthServer, client: httpx.Client) -> None:
    """A request naming no client at all gets 401 invalid_client."""
    rt = server.issue_grant()["refresh_token"]
    response = client.post(
        server.token_url, data={"grant_type": "refresh_token", "refresh_token": rt}
    )
    assert response.status_code == 401


def test_refresh_token_is_bound_to_its_client(server: AuthServer, client: httpx.Client) -> None:
    """Another registered client cannot use a grant's refresh token."""
    rt = server.issue_grant("conf")["refresh_token"]
    assert refresh(client, server, rt).json()["error"] == "invalid_grant"


def test_other_grant_types_and_malformed_requests_are_refused(
    server: AuthServer, client: httpx.Client
) -> None:
    """Only refresh_token is supported; missing token, repeats and non-form bodies are invalid."""
    rt = server.issue_grant()["refresh_token"]
    cc = client.post(
        server.token_url, data={"grant_type": "client_credentials", "client_id": "tokend-demo"}
    )
    assert (cc.status_code, cc.json()["error"]) == (400, "unsupported_grant_type")
    missing = client.post(
        server.token_url, data={"grant_type": "refresh_token", "client_id": "tokend-demo"}
    )
    assert missing.json()["error"] == "invalid_request"
    repeated = client.post(
        server.token_url,
        content=f"grant_type=refresh_token&client_id=tokend-demo&refresh_token={rt}&refresh_token={rt}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert repeated.json()["error"] == "invalid_request"
    as_json = client.post(
        server.token_url, json={"grant_type": "refresh_token", "refresh_token": rt}
    )
    assert as_json.json()["error"] == "invalid_request"
    assert refresh(client, server, rt).status_code == 200


def test_unknown_refresh_token_is_invalid_grant(server: AuthServer, client: httpx.Client) -> None:
    """A refresh token the server never issued gets 400 invalid_grant."""
    response = refresh(client, server, "rt_made_up")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


def test_scope_may_narrow_but_not_widen(server: AuthServer, client: httpx.Client) -> None:
    """A requested scope must be a subset of the grant's; a narrower one is echoed."""
    rt = server.issue_grant()["refresh_token"]
    wide = refresh(client, server, rt, scope="demo admin")
    assert (wide.status_code, wide.json()["error"]) == (400, "invalid_scope")
    narrow = refresh(client, server, rt, scope="demo", resource="https://mcp.example/mcp")
    assert narrow.json()["scope"] == "demo"
    assert whoami(client, server, narrow.json()["access_token"]).json()["scope"] == "demo"
    assert server.requests[-2].form["resource"] == "https://mcp.example/mcp"
    again = refresh(client, server, narrow.json()["refresh_token"]).json()
    assert again["scope"] == "demo offline_access"


FAILING_FAULTS = [
    ("500", {}, 500, "server_error"),
    ("500", {"body": "html"}, 500, None),
    ("503", {}, 503, "temporarily_unavailable"),
    ("429", {"retry_after": 7}, 429, None),
    ("invalid_grant", {}, 400, "invalid_grant"),
    ("invalid_client", {}, 401, "invalid_client"),
    ("unauthorized_client", {}, 400, "unauthorized_client"),
    ("unsupported_grant_type", {}, 400, "unsupported_grant_type"),
    ("garbage", {}, 200, None),
    ("html", {}, 200, None),
    ("missing_access_token", {}, 200, None),
    ("bad_expires_in", {"value": -5}, 200, None),
]


@pytest.mark.parametrize(("kind", "params", "status", "error"), FAILING_FAULTS)
def test_failing_fault_answers_as_scripted_and_keeps_the_refresh_token(
    server: AuthServer,
    client: httpx.Client,
    kind: str,
    params: dict[str, Any],
    status: int,
    error: str | None,
) -> None:
    """A failing fault gives its scripted answer and neither consumes nor rotates the token."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next(kind, **params)
    response = refresh(client, server, rt)
    assert response.status_code == status
    assert response.headers["cache-control"] == "no-store"
    if error is not None:
        assert response.json()["error"] == error
    if kind == "429":
        assert response.headers["retry-after"] == "7"
    if kind in ("garbage", "html") or params.get("body") == "html":
        with pytest.raises(json.JSONDecodeError):
            response.json()
    if kind == "html" or params.get("body") == "html":
        assert response.headers["content-type"].startswith("text/html")
    if kind == "missing_access_token":
        assert "access_token" not in response.json()
    if kind == "bad_expires_in":
        assert response.json()["expires_in"] == -5
        assert not server.is_valid_access_token(response.json()["access_token"])
    assert server.requests[-1].outcome == f"fault:{kind}"
    assert server.refreshes_ok == 0
    after = refresh(client, server, rt)
    assert after.status_code == 200
    assert server.reuse_detected == 0


def test_hang_closes_without_answering_and_keeps_the_refresh_token(
    server: AuthServer, client: httpx.Client
) -> None:
    """'hang' holds the request for delay_s, then closes with no response; nothing is consumed."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("hang", delay_s=0.3)
    with pytest.raises(httpx.RemoteProtocolError):
        refresh(client, server, rt)
    server.fail_next("hang", delay_s=5.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            server.token_url,
            data={"grant_type": "refresh_token", "refresh_token": rt, "client_id": "tokend-demo"},
            timeout=0.3,
        )
    assert refresh(client, server, rt).status_code == 200


def test_reset_aborts_the_connection_with_rst(server: AuthServer, client: httpx.Client) -> None:
    """'reset' sends a TCP RST (connection reset by peer) and keeps the refresh token."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("reset")
    with pytest.raises(httpx.ReadError):
        refresh(client, server, rt)
    assert server.requests[-1].outcome == "fault:reset"
    assert refresh(client, server, rt).status_code == 200


def test_slow_delays_then_refreshes_normally(server: AuthServer, client: httpx.Client) -> None:
    """'slow' sleeps delay_s before answering, and the refresh does happen."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("slow", delay_s=0.3)
    started = time.monotonic()
    response = refresh(client, server, rt)
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert response.json()["refresh_token"] != rt
    assert server.refreshes_ok == 1


def test_omit_refresh_token_keeps_the_old_one_valid(
    server: AuthServer, client: httpx.Client
) -> None:
    """'omit_refresh_token' refreshes without rotating; the old refresh token keeps working."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("omit_refresh_token")
    body = refresh(client, server, rt).json()
    assert "refresh_token" not in body
    assert server.is_valid_access_token(body["access_token"])
    again = refresh(client, server, rt)
    assert again.status_code == 200
    assert server.reuse_detected == 0


@pytest.mark.parametrize(
    ("kind", "field"), [("omit_scope", "scope"), ("omit_expires_in", "expires_in")]
)
def test_omit_fault_drops_one_field_of_a_real_refresh(
    server: AuthServer, client: httpx.Client, kind: str, field: str
) -> None:
    """'omit_scope'/'omit_expires_in' refresh for real but leave that field out."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next(kind)
    body = refresh(client, server, rt).json()
    assert field not in body
    assert server.is_valid_access_token(body["access_token"])
    assert refresh(client, server, body["refresh_token"]).status_code == 200


def test_faults_are_consumed_in_fifo_order_with_counts(
    server: AuthServer, client: httpx.Client
) -> None:
    """Queued faults apply to the next POST /token calls in order, `count` times each."""
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("503", count=2)
    server.fail_next("500")
    statuses = [refresh(client, server, rt).status_code for _ in range(4)]
    assert statuses == [503, 503, 500, 200]
    assert server.token_calls == 4
    assert client.get(server.url + "/.well-known/oauth-authorization-server").status_code == 200


def test_fail_next_rejects_unknown_kinds() -> None:
    """An unknown fault kind or a count below 1 is a ValueError."""
    server = AuthServer()
    with pytest.raises(ValueError, match="unknown fault"):
        server.fail_next("teapot")
    with pytest.raises(ValueError, match="count"):
        server.fail_next("500", count=0)


def test_access_token_expires_after_lifetime(client: httpx.Client) -> None:
    """An access token stops working lifetime_s after issue."""
    with AuthServer(lifetime_s=1.0) as server:
        at = server.issue_grant()["access_token"]
        assert whoami(client, server, at).status_code == 200
        time.sleep(1.2)
        assert not server.is_valid_access_token(str(at))
        assert whoami(client, server, at).status_code == 401


def test_date_header_carries_the_offset(client: httpx.Client) -> None:
    """The Date header is real time plus date_offset_s, settable at run time."""
    with AuthServer(date_offset_s=3600.0) as server:
        date = client.get(server.url + "/.well-known/oauth-authorization-server").headers["date"]
        skew = email.utils.parsedate_to_datetime(date) - datetime.now(UTC)
        assert 3590 < skew.total_seconds() < 3610
        server.date_offset_s = -600.0
        date = client.get(server.url + "/.well-known/oauth-authorization-server").headers["date"]
        skew = email.utils.parsedate_to_datetime(date) - datetime.now(UTC)
        assert -610 < skew.total_seconds() < -590


def test_go_down_refuses_connections_and_come_back_serves_on_the_same_port(
    server: AuthServer, client: httpx.Client
) -> None:
    """go_down closes the listener and idle keep-alive connections; come_back rebinds the port."""
    grant = server.issue_grant()
    port = server.port
    assert whoami(client, server, grant["access_token"]).status_code == 200  # pooled, idle
    server.go_down()
    with pytest.raises(httpx.ConnectError):
        whoami(client, server, grant["access_token"])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.come_back()
    assert server.port == port
    assert whoami(client, server, grant["access_token"]).status_code == 200
    assert refresh(client, server, grant["refresh_token"]).status_code == 200


def test_keep_alive_serves_several_requests_on_one_connection(server: AuthServer) -> None:
    """HTTP/1.1 keep-alive: two requests share one TCP connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(2):
            conn.request("GET", "/.well-known/oauth-authorization-server")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        assert response.getheader("Connection") != "close"
    finally:
        conn.close()
    assert len(server.requests) == 2


def test_metadata_document(server: AuthServer, client: httpx.Client) -> None:
    """The RFC 8414 document names issuer, token endpoint, grants, auth methods and scopes."""
    doc = client.get(server.url + "/.well-known/oauth-authorization-server").json()
    assert doc["issuer"] == server.url
    assert doc["token_endpoint"] == server.token_url
    assert doc["grant_types_supported"] == [
        "authorization_code",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:device_code",
    ]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
        "none",
    }
    assert "offline_access" in doc["scopes_supported"]


def test_requests_are_recorded_with_form_headers_and_outcome(
    server: AuthServer, client: httpx.Client
) -> None:
    """Each request is recorded (form, lower-case headers, client, aware UTC time, outcome)."""
    rt = server.issue_grant()["refresh_token"]
    refresh(client, server, rt, resource="https://r.example")
    client.get(server.url + "/nowhere")
    first, second = server.requests
    assert (first.method, first.path, first.outcome) == ("POST", "/token", "ok")
    assert first.form["grant_type"] == "refresh_token"
    assert first.form["resource"] == "https://r.example"
    assert first.headers["content-type"] == "application/x-www-form-urlencoded"
    assert first.client_id == "tokend-demo"
    assert first.at.tzinfo is not None
    assert (second.method, second.outcome) == ("GET", "not_found")
    server.requests.clear()
    assert len(server.requests) == 2


def test_revoke_family_of_kills_the_grant(server: AuthServer, client: httpx.Client) -> None:
    """revoke_family_of revokes the refresh and access tokens; an unknown token is a KeyError."""
    grant = server.issue_grant()
    server.revoke_family_of(str(grant["refresh_token"]))
    assert not server.is_valid_access_token(str(grant["access_token"]))
    assert refresh(client, server, grant["refresh_token"]).json()["error"] == "invalid_grant"
    with pytest.raises(KeyError):
        server.revoke_family_of("rt_unknown")


def test_server_is_silent_and_stops_quickly(
    capfd: pytest.CaptureFixture[str], client: httpx.Client
) -> None:
    """Nothing is printed, even on resets and hangups, and stop() returns promptly."""
    server = AuthServer().start()
    rt = server.issue_grant()["refresh_token"]
    server.fail_next("reset")
    with pytest.raises(httpx.ReadError):
        refresh(client, server, rt)
    server.fail_next("hang", delay_s=30)
    errors: list[Exception] = []

    def hang() -> None:
        try:
            refresh(client, server, rt)
        except httpx.TransportError as exc:
            errors.append(exc)

    hung = threading.Thread(target=hang)
    hung.start()
    deadline = time.monotonic() + 5
    while server.token_calls < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0  # generous: the target is well under 50 ms
    hung.join(timeout=5)
    assert not hung.is_alive()
    assert len(errors) == 1
    with pytest.raises(httpx.ConnectError):
        refresh(client, server, rt)
    assert capfd.readouterr() == ("", "")


def test_standalone_module_prints_only_its_url() -> None:
    """`python -m tokend.authserver` prints its URL and serves until terminated."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.authserver", "--port", "0", "--lifetime", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        doc = httpx.get(url + "/.well-known/oauth-authorization-server", timeout=5).json()
        assert doc["issuer"] == url
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert out == ""
    assert "rt_" not in err
