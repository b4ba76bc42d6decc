"""Tests for tokend.metrics: the Prometheus text it renders, read back with prometheus_client's own
parser, and (end to end) that a running daemon's `GET /metrics` agrees with its status."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import aget, make_config, running_daemon
from tokend import __version__
from tokend.authserver import AuthServer
from tokend.errors import API_ERRORS
from tokend.metrics import (
    DURATION_BUCKETS,
    LOOKUP_OUTCOMES,
    REFRESH_OUTCOMES,
    STATES,
    Metrics,
)
from tokend.model import State

Labels = frozenset[tuple[str, str]]


def parse(text: str) -> tuple[dict[str, str], dict[tuple[str, Labels], float]]:
    """(family name -> type, (sample name, labels) -> value), as Prometheus would read them."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Mapping[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def status(
    name: str,
    state: str = "ok",
    *,
    expires_at: str | None = "2030-01-02T03:04:05Z",
    next_refresh_at: str | None = "2030-01-02T02:50:00Z",
    failures: int = 0,
    **extra: object,
) -> dict[str, object]:
    """A connector status dict shaped like `Connector.status()`."""
    return {
        "connector": name,
        "state": state,
        "expires_at": expires_at,
        "next_refresh_at": next_refresh_at,
        "consecutive_failures": failures,
        **extra,
    }


def render(metrics: Metrics, *statuses: dict[str, object]) -> str:
    return metrics.render(list(statuses), version="1.2.3", started_at_monotonic=0.0)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# --- rendering --------------------------------------------------------------------------------


def test_every_family_is_declared_with_its_type() -> None:
    """Each documented metric appears once, with HELP and TYPE, and the text parses."""
    text = render(Metrics(), status("a"))
    types, _ = parse(text)
    assert types == {
        "tokend_build_info": "gauge",
        "tokend_uptime_seconds": "gauge",
        "tokend_notify_dropped": "counter",
        "tokend_connector_state": "gauge",
        "tokend_token_expiry_timestamp_seconds": "gauge",
        "tokend_next_refresh_timestamp_seconds": "gauge",
        "tokend_consecutive_failures": "gauge",
        "tokend_refreshes": "counter",  # the parser drops a counter's _total suffix
        "tokend_refresh_duration_seconds": "histogram",
        "tokend_lookups": "counter",
    }
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP|TYPE) tokend_[a-z_]+ \S.*", line), line
    assert text.endswith("\n")
    assert text.count("# TYPE ") == len(types)


def test_timestamps_and_failures_come_from_the_status() -> None:
    """Expiry and next refresh are the status times as unix seconds; absent when the status has
    none; consecutive failures are copied."""
    text = render(
        Metrics(),
        status("a", "retrying", failures=3),
        status("b", "unauthorized", expires_at=None, next_refresh_at=None),
    )
    _, samples = parse(text)
    assert value(samples, "tokend_token_expiry_timestamp_seconds", connector="a") == ts(
        "2030-01-02T03:04:05Z"
    )
    assert value(samples, "tokend_next_refresh_timestamp_seconds", connector="a") == ts(
        "2030-01-02T02:50:00Z"
    )
    assert value(samples, "tokend_token_expiry_timestamp_seconds", connector="b") is None
    assert value(samples, "tokend_next_refresh_timestamp_seconds", connector="b") is None
    assert value(samples, "tokend_consecutive_failures", connector="a") == 3
    assert value(samples, "tokend_consecutive_failures", connector="b") == 0


@pytest.mark.parametrize("state", STATES)
def test_state_is_one_hot_over_all_seven_states(state: str) -> None:
    """tokend_connector_state is 1 for the current state and 0 for each of the six others."""
    _, samples = parse(render(Metrics(), status("a", state)))
    gauges = {s: value(samples, "tokend_connector_state", connector="a", state=s) for s in STATES}
    assert gauges == {s: (1 if s == state else 0) for s in STATES}
    assert set(STATES) == {s.value for s in State}


def test_refresh_counts_and_duration_histogram() -> None:
    """Refresh attempts are counted by outcome (zeros included) and their durations land in
    cumulative buckets with `le` inclusive; sum and count match the observations."""
    metrics = Metrics()
    observed = {"ok": [0.01, 0.05, 0.3], "transient": [45.0], "persist_failed": [2.0]}
    for outcome, durations in observed.items():
        for seconds in durations:
            metrics.refresh_done("a", outcome, seconds)
    _, samples = parse(render(metrics, status("a"), status("b")))
    counts = {
        o: value(samples, "tokend_refreshes_total", connector="a", outcome=o)
        for o in REFRESH_OUTCOMES
    }
    assert counts == {
        "ok": 3,
        "transient": 1,
        "invalid_grant": 0,
        "rejected": 0,
        "persist_failed": 1,
    }
    name = "tokend_refresh_duration_seconds"
    buckets = {
        b: value(samples, f"{name}_bucket", connector="a", le=repr(b)) for b in DURATION_BUCKETS
    }
    assert buckets == {0.05: 2, 0.1: 2, 0.25: 2, 0.5: 3, 1.0: 3, 2.5: 4, 5.0: 4, 10.0: 4, 30.0: 4}
    assert value(samples, f"{name}_bucket", connector="a", le="+Inf") == 5
    assert value(samples, f"{name}_count", connector="a") == 5
    assert value(samples, f"{name}_sum", connector="a") == pytest.approx(47.36)
    # A connector without attempts still has its series, all zero, so rate() works from the start.
    assert value(samples, f"{name}_count", connector="b") == 0
    assert value(samples, f"{name}_bucket", connector="b", le="+Inf") == 0
    assert value(samples, "tokend_refreshes_total", connector="b", outcome="ok") == 0


def test_lookup_counts_and_the_unknown_connector_series() -> None:
    """Lookups are counted by connector and outcome; lookups that named no configured connector
    share the connector="" series, which appears only once there is one."""
    metrics = Metrics()
    _, before = parse(render(metrics, status("a")))
    assert value(before, "tokend_lookups_total", connector="", outcome="unknown_connector") is None
    for outcome in ["ok", "ok", "needs_reauth", "forbidden"]:
        metrics.lookup_done("a", outcome)
    metrics.lookup_done("", "unknown_connector")
    metrics.lookup_done("", "bad_request")
    _, samples = parse(render(metrics, status("a")))
    counts = {
        o: value(samples, "tokend_lookups_total", connector="a", outcome=o) for o in LOOKUP_OUTCOMES
    }
    assert counts == {
        "ok": 2,
        "needs_reauth": 1,
        "temporarily_unavailable": 0,
        "forbidden": 1,
        "bad_request": 0,
        "unknown_connector": 0,
        "internal_error": 0,
    }
    assert value(samples, "tokend_lookups_total", connector="", outcome="unknown_connector") == 1
    assert value(samples, "tokend_lookups_total", connector="", outcome="bad_request") == 1


def test_only_connectors_in_the_statuses_are_rendered() -> None:
    """Counts kept for a connector that is no longer configured are not rendered."""
    metrics = Metrics()
    metrics.refresh_done("gone", "ok", 0.1)
    metrics.lookup_done("gone", "ok")
    text = render(metrics, status("a"))
    assert 'connector="gone"' not in text
    assert 'connector="a"' in text


def test_forget_drops_a_connectors_counts() -> None:
    """After forget, a connector of the same name starts again from zero."""
    metrics = Metrics()
    metrics.refresh_done("a", "ok", 0.2)
    metrics.lookup_done("a", "ok")
    metrics.forget("a")
    metrics.forget("never-seen")
    _, samples = parse(render(metrics, status("a")))
    assert value(samples, "tokend_refreshes_total", connector="a", outcome="ok") == 0
    assert value(samples, "tokend_refresh_duration_seconds_count", connector="a") == 0
    assert value(samples, "tokend_lookups_total", connector="a", outcome="ok") == 0


def test_uptime_and_build_info() -> None:
    """Uptime is the monotonic clock minus the start, never negative; build_info carries the
    version (escaped) with value 1."""
    now = [1000.5]
    metrics = Metrics(clock_monotonic=lambda: now[0])
    odd_version = '1.0+"x"\\y\nz'
    text = metrics.render([], version=odd_version, started_at_monotonic=900.0)
    _, samples = parse(text)
    assert value(samples, "tokend_uptime_seconds") == 100.5
    assert value(samples, "tokend_build_info", version=odd_version) == 1
    now[0] = 10.0  # a start time from another clock must not give a negative uptime
    _, samples = parse(metrics.render([], version="v", started_at_monotonic=900.0))
    assert value(samples, "tokend_uptime_seconds") == 0


@pytest.mark.parametrize("name", ["a.b_c-9", 'quote"d', "back\\slash", "new\nline", "ünï"])
def test_label_values_are_escaped(name: str) -> None:
    """Connector names with quotes, backslashes, newlines or non-ASCII survive the round trip."""
    metrics = Metrics()
    metrics.refresh_done(name, "ok", 0.1)
    metrics.lookup_done(name, "ok")
    _, samples = parse(render(metrics, status(name, "ok")))
    assert value(samples, "tokend_connector_state", connector=name, state="ok") == 1
    assert value(samples, "tokend_refreshes_total", connector=name, outcome="ok") == 1
    assert value(samples, "tokend_lookups_total", connector=name, outcome="ok") == 1
    assert value(samples, "tokend_refresh_duration_seconds_count", connector=name) == 1


def test_no_secrets_or_free_text_in_the_output() -> None:
    """Only names, states and numbers: error texts, URLs and anything else in a status stay out."""
    canary = "CANARY-s3cr3t"
    text = render(
        Metrics(),
        status(
            "a",
            last_error=f"provider said {canary}",
            token_url=f"https://x.example/{canary}",
            access_token=canary,
            action=canary,
        ),
    )
    assert canary not in text
    assert "x.example" not in text


def test_bad_outcomes_and_durations_are_refused() -> None:
    """Outcomes outside the documented sets and non-finite durations raise ValueError; a
    negative duration (a clock oddity) counts as zero."""
    metrics = Metrics()
    with pytest.raises(ValueError, match="refresh outcome"):
        metrics.refresh_done("a", "needs_reauth", 0.1)
    with pytest.raises(ValueError, match="lookup outcome"):
        metrics.lookup_done("a", "invalid_grant")
    with pytest.raises(ValueError, match="finite"):
        metrics.refresh_done("a", "ok", float("nan"))
    metrics.refresh_done("a", "ok", -0.5)
    _, samples = parse(render(metrics, status("a")))
    assert value(samples, "tokend_refresh_duration_seconds_bucket", connector="a", le="0.05") == 1
    assert value(samples, "tokend_refresh_duration_seconds_sum", connector="a") == 0


def test_lookup_outcomes_are_ok_and_the_api_error_codes() -> None:
    """Every socket API error code is a lookup outcome, so the server can report any of them."""
    assert set(LOOKUP_OUTCOMES) == {"ok", *API_ERRORS}


# --- end to end -------------------------------------------------------------------------------


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.anyio
async def test_metrics_match_status(tmp_short, auth: AuthServer) -> None:
    """A running daemon's GET /metrics agrees with its status after lookups, a forced refresh and
    a transient failure: times, states, refresh and lookup counts, and one histogram observation
    per token-endpoint call."""
    config = make_config(tmp_short, auth.token_url, connectors={"demo": {}, "idle": {}})
    sock = config.daemon.socket
    async with running_daemon(config) as daemon:
        assert isinstance(daemon.metrics, Metrics)
        grant = auth.issue_grant()
        assert (await aget(sock, "/v1/connectors/demo/grant", "PUT", grant))[0] == 200
        for _ in range(3):
            assert (await aget(sock, "/v1/connectors/demo/token"))[0] == 200
        assert (await aget(sock, "/v1/connectors/idle/token"))[1]["error"] == "needs_reauth"
        assert (await aget(sock, "/v1/connectors/nope/token"))[1]["error"] == "unknown_connector"
        assert (await aget(sock, "/v1/connectors/demo/refresh", "POST"))[0] == 200
        auth.fail_next("500")
        status_code, body = await aget(sock, "/v1/connectors/demo/refresh", "POST")
        assert (status_code, body["error"]) == (503, "temporarily_unavailable")
        demo = daemon.connectors["demo"]
        # The retry after the transient failure runs by itself after a shortened backoff.
        await _wait_for(lambda: demo.state is State.OK and not demo.refresh_in_flight)
        status_code, text = await aget(sock, "/metrics")
        assert status_code == 200
        statuses = {
            s["connector"]: s for s in (await aget(sock, "/v1/connectors"))[1]["connectors"]
        }
        token_calls = auth.token_calls
    _, samples = parse(text)
    assert grant["access_token"] not in text
    assert grant["refresh_token"] not in text

    for name, st in statuses.items():
        states = {
            s: value(samples, "tokend_connector_state", connector=name, state=s) for s in STATES
        }
        assert states == {s: (1 if s == st["state"] else 0) for s in STATES}
        assert (
            value(samples, "tokend_consecutive_failures", connector=name)
            == st["consecutive_failures"]
        )
    st = statuses["demo"]
    assert value(samples, "tokend_token_expiry_timestamp_seconds", connector="demo") == ts(
        st["expires_at"]
    )
    assert value(samples, "tokend_next_refresh_timestamp_seconds", connector="demo") == ts(
        st["next_refresh_at"]
    )
    assert value(samples, "tokend_token_expiry_timestamp_seconds", connector="idle") is None

    refreshes = {
        o: value(samples, "tokend_refreshes_total", connector="demo", outcome=o)
        for o in REFRESH_OUTCOMES
    }
    assert refreshes["ok"] == st["refreshes"] == 2  # the forced one and the retry
    assert refreshes["transient"] == 1
    assert refreshes["invalid_grant"] == refreshes["rejected"] == refreshes["persist_failed"] == 0
    attempts = sum(v or 0 for v in refreshes.values())
    assert value(samples, "tokend_refresh_duration_seconds_count", connector="demo") == attempts
    assert attempts == token_calls
    assert value(samples, "tokend_refresh_duration_seconds_count", connector="idle") == 0

    lookups = {
        (c, o): value(samples, "tokend_lookups_total", connector=c, outcome=o)
        for c in ("demo", "idle")
        for o in LOOKUP_OUTCOMES
    }
    expected = dict.fromkeys(lookups, 0.0)
    expected[("demo", "ok")] = 3
    expected[("idle", "needs_reauth")] = 1
    assert lookups == expected
    assert value(samples, "tokend_lookups_total", connector="", outcome="unknown_connector") == 1
    assert value(samples, "tokend_build_info", version=__version__) == 1
    uptime = value(samples, "tokend_uptime_seconds")
    assert uptime is not None and uptime > 0
