"""Tests for tokend.policy: refresh timing, backoff, serving and Retry-After decisions."""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend.config import RefreshSettings
from tokend.model import Secret, State, TokenSet
from tokend.policy import (
    BACKOFF_CAP_S,
    MAX_RETRY_AFTER_S,
    backoff_delay,
    may_serve,
    next_refresh_at,
    retry_after_seconds,
    state_after_failure,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DEFAULTS = RefreshSettings()  # skew 5 min, min_interval 10 s, max_interval 7 d
S = timedelta(seconds=1)
US = timedelta(microseconds=1)


def token(lifetime: timedelta, *, obtained_at: datetime = T0, assumed: bool = False) -> TokenSet:
    return TokenSet(
        access_token=Secret("at"),
        refresh_token=Secret("rt"),
        obtained_at=obtained_at,
        expires_at=obtained_at + lifetime,
        lifetime_assumed=assumed,
    )


@pytest.mark.parametrize(
    ("lifetime", "settings", "jitter", "expected"),
    [
        # Short tokens: the skew is clipped to a third of the lifetime, so 2/3 of it decides.
        pytest.param(30 * S, DEFAULTS, 0.0, 20 * S, id="30s-j0"),
        pytest.param(30 * S, DEFAULTS, 0.999, 20 * S - 2.997 * S, id="30s-j999"),
        pytest.param(60 * S, DEFAULTS, 0.0, 40 * S, id="60s-j0"),
        pytest.param(5 * 60 * S, DEFAULTS, 0.0, 200 * S, id="5m-j0"),
        # 10 min: the 5 min skew is clipped to 200 s, which meets 2/3 of the lifetime (400 s).
        pytest.param(600 * S, DEFAULTS, 0.0, 400 * S, id="10m-j0"),
        pytest.param(600 * S, DEFAULTS, 0.999, 400 * S - 59.94 * S, id="10m-j999"),
        # 20 min: 2/3 of the lifetime (800 s) comes before expires_at - skew (900 s).
        pytest.param(1200 * S, DEFAULTS, 0.0, 800 * S, id="20m-j0"),
        # 30 min with a 10 min skew: both rules give 1200 s.
        pytest.param(1800 * S, RefreshSettings(skew=600 * S), 0.0, 1200 * S, id="30m-skew10m"),
        # 1 h with skews of 17-30 min: 2/3 (40 min) decides; skews over 20 min are clipped.
        pytest.param(3600 * S, RefreshSettings(skew=1800 * S), 0.0, 2400 * S, id="1h-skew30m"),
        pytest.param(3600 * S, RefreshSettings(skew=1000 * S), 0.0, 2400 * S, id="1h-skew1000s"),
        pytest.param(3600 * S, RefreshSettings(skew=1500 * S), 0.0, 2400 * S, id="1h-skew25m"),
        # 1 h and 24 h: 2/3 of the lifetime, minus up to 10 % of it.
        pytest.param(3600 * S, DEFAULTS, 0.0, 2400 * S, id="1h-j0"),
        pytest.param(3600 * S, DEFAULTS, 0.999, 2400 * S - 359.64 * S, id="1h-j999"),
        pytest.param(timedelta(hours=24), DEFAULTS, 0.0, timedelta(hours=16), id="24h-j0"),
        pytest.param(
            timedelta(hours=24), DEFAULTS, 0.999, timedelta(hours=16) - 8631.36 * S, id="24h-j999"
        ),
        # 30 d: 2/3 would be 20 d; max_interval caps it at 7 d, whatever the jitter.
        pytest.param(timedelta(days=30), DEFAULTS, 0.0, timedelta(days=7), id="30d-j0"),
        pytest.param(timedelta(days=30), DEFAULTS, 0.999, timedelta(days=7), id="30d-j999"),
        # Skew longer than the lifetime: clipped to a third, so 2/3 of the lifetime decides.
        pytest.param(
            timedelta(hours=1),
            RefreshSettings(skew=timedelta(hours=2)),
            0.5,
            timedelta(minutes=40) - 180 * S,
            id="skew>lifetime",
        ),
        # A 10 s token: 2/3 of it, never below the floor lifetime/2 (5 s), so it never lapses.
        pytest.param(10 * S, DEFAULTS, 0.0, 10 * S * 2 / 3, id="10s-two-thirds"),
        pytest.param(10 * S, DEFAULTS, 0.999, 10 * S * 2 / 3 - 0.999 * S, id="10s-j999"),
        pytest.param(
            10 * S, RefreshSettings(min_interval=10 * S), 1.0, 10 * S * 2 / 3 - S, id="10s-j1"
        ),
        # A large min_interval on a short token: the floor is lifetime/2.
        pytest.param(
            12 * S, RefreshSettings(min_interval=60 * S), 1.0, 6.8 * S, id="12s-floor-not-hit"
        ),
        pytest.param(
            3 * S, RefreshSettings(min_interval=60 * S, skew=0 * S), 0.0, 2 * S, id="3s-2/3"
        ),
        # A max_interval shorter than the floor: the floor (hot-loop guard) wins.
        pytest.param(
            timedelta(hours=1),
            RefreshSettings(min_interval=60 * S, max_interval=20 * S),
            0.0,
            60 * S,
            id="floor-beats-cap",
        ),
        # Already expired when issued: refresh at once.
        pytest.param(timedelta(0), DEFAULTS, 0.3, timedelta(0), id="zero-lifetime"),
        pytest.param(-60 * S, DEFAULTS, 0.3, timedelta(0), id="negative-lifetime"),
    ],
)
def test_next_refresh_at_table(
    lifetime: timedelta, settings: RefreshSettings, jitter: float, expected: timedelta
) -> None:
    """next_refresh_at follows DESIGN §2 for typical lifetimes, skews, floors and caps."""
    got = next_refresh_at(token(lifetime), settings, jitter=jitter)
    assert abs(got - (T0 + expected)) <= US


def test_next_refresh_at_lifetime_assumed_uses_the_assumed_lifetime() -> None:
    """A token without expires_in is scheduled by its assumed (default) lifetime like any other."""
    assumed = token(DEFAULTS.default_lifetime, assumed=True)
    assert next_refresh_at(assumed, DEFAULTS, jitter=0.0) == T0 + timedelta(minutes=40)


def test_next_refresh_at_jitter_one_is_accepted() -> None:
    """jitter == 1.0 (the closed end) is accepted and moves the refresh a full 10 % earlier."""
    got = next_refresh_at(token(timedelta(hours=1)), DEFAULTS, jitter=1.0)
    assert got == T0 + timedelta(minutes=34)


@pytest.mark.parametrize("jitter", [-0.01, 1.01, math.nan, math.inf])
def test_next_refresh_at_rejects_bad_jitter(jitter: float) -> None:
    """A jitter outside [0, 1] (or NaN) is a caller bug and raises ValueError."""
    with pytest.raises(ValueError, match="jitter"):
        next_refresh_at(token(timedelta(hours=1)), DEFAULTS, jitter=jitter)


_durations = st.integers(min_value=0, max_value=40 * 86400 * 10**6).map(
    lambda us: timedelta(microseconds=us)
)


@settings(deadline=None)  # pure and fast; a loaded CI box must not turn a pause into a failure
@given(
    lifetime_us=st.integers(min_value=1000, max_value=400 * 86400 * 10**6),
    skew=_durations,
    min_interval=_durations,
    max_interval=_durations,
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    offset_s=st.integers(min_value=-(10**9), max_value=10**9),
)
def test_next_refresh_at_invariants(
    lifetime_us: int,
    skew: timedelta,
    min_interval: timedelta,
    max_interval: timedelta,
    jitter: float,
    offset_s: int,
) -> None:
    """For any positive lifetime: floor <= result < expires_at, and no later than 2/3 or the cap."""
    lifetime = timedelta(microseconds=lifetime_us)
    start = T0 + timedelta(seconds=offset_s)
    tok = token(lifetime, obtained_at=start)
    settings = RefreshSettings(skew=skew, min_interval=min_interval, max_interval=max_interval)
    got = next_refresh_at(tok, settings, jitter=jitter)
    floor = start + min(min_interval, lifetime / 2)
    assert floor <= got < tok.expires_at
    clipped = min(skew, lifetime / 3)
    assert got <= max(floor, start + min(max_interval, lifetime * 2 / 3, lifetime - clipped) + US)
    # More jitter never makes a refresh later.
    assert next_refresh_at(tok, settings, jitter=min(1.0, jitter + 0.25)) <= got


@pytest.mark.parametrize("attempt", range(1, 21))
def test_backoff_delay_sequence_bounds(attempt: int) -> None:
    """Attempts 1..20: draw 0 gives the 5 s floor; draw 0.999 nearly the exponential ceiling."""
    ceiling = min(300.0, 5.0 * 2 ** (attempt - 1))
    assert backoff_delay(attempt, draw=0.0) == 5.0
    high = backoff_delay(attempt, draw=0.999)
    assert high == pytest.approx(5.0 + 0.999 * (ceiling - 5.0))
    assert 5.0 <= high <= 300.0
    if attempt > 1:
        assert high >= backoff_delay(attempt - 1, draw=0.999)


def test_backoff_delay_reaches_the_cap() -> None:
    """From attempt 7 on (5·2^6 = 320 s) the ceiling is the 5 min cap."""
    assert backoff_delay(6, draw=1.0) == 160.0
    assert backoff_delay(7, draw=1.0) == 300.0


@pytest.mark.parametrize("attempt", [10**6, 2**64, sys.maxsize, 10**400])
def test_backoff_delay_huge_attempts_do_not_overflow(attempt: int) -> None:
    """Huge failure counts stay within [5, 300] without OverflowError."""
    assert backoff_delay(attempt, draw=0.999) == pytest.approx(5.0 + 0.999 * 295.0)
    assert backoff_delay(attempt, draw=0.0) == 5.0


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(120.0, 120.0, id="lengthens"),
        pytest.param(2.0, 5.0, id="never-shortens"),
        pytest.param(3600.0, 3600.0, id="at-clamp"),
        pytest.param(10.0**9, MAX_RETRY_AFTER_S, id="clamped"),
        pytest.param(math.inf, MAX_RETRY_AFTER_S, id="inf-clamped"),
        pytest.param(math.nan, 5.0, id="nan-ignored"),
        pytest.param(-30.0, 5.0, id="negative-ignored"),
    ],
)
def test_backoff_delay_honours_retry_after(retry_after: float, expected: float) -> None:
    """Retry-After lengthens the delay, never shortens it, and counts only up to one hour."""
    assert backoff_delay(1, draw=0.0, retry_after=retry_after) == expected


def test_backoff_delay_retry_after_below_jittered_delay() -> None:
    """A Retry-After shorter than the jittered delay leaves the delay as it is."""
    assert backoff_delay(9, draw=1.0, retry_after=60.0) == 300.0


def test_backoff_delay_cap_below_base_still_waits_base() -> None:
    """A cap below the base never produces a delay under the base (no hot loops)."""
    assert backoff_delay(5, draw=0.7, base=10.0, cap=1.0) == 10.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempt": 0, "draw": 0.5}, "attempt"),
        ({"attempt": -3, "draw": 0.5}, "attempt"),
        ({"attempt": 1, "draw": -0.1}, "draw"),
        ({"attempt": 1, "draw": 1.5}, "draw"),
        ({"attempt": 1, "draw": math.nan}, "draw"),
        ({"attempt": 1, "draw": 0.5, "base": 0.0}, "base"),
        ({"attempt": 1, "draw": 0.5, "base": math.nan}, "base"),
    ],
)
def test_backoff_delay_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    """Attempts below 1, draws outside [0, 1] and non-positive bases raise ValueError."""
    with pytest.raises(ValueError, match=match):
        backoff_delay(**kwargs)  # type: ignore[arg-type]  # the table mixes int and float values


@settings(deadline=None)  # pure and fast; a loaded CI box must not turn a pause into a failure
@given(
    attempt=st.integers(min_value=1, max_value=10**12),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_delay_always_within_bounds(attempt: int, draw: float) -> None:
    """Without Retry-After every delay lies in [5 s, 5 min]."""
    assert 5.0 <= backoff_delay(attempt, draw=draw) <= BACKOFF_CAP_S


@settings(deadline=None)  # pure and fast; a loaded CI box must not turn a pause into a failure
@given(
    attempt=st.integers(min_value=1, max_value=10**12),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    retry_after=st.floats(allow_nan=False),
)
def test_backoff_delay_with_retry_after_bounds(
    attempt: int, draw: float, retry_after: float
) -> None:
    """With Retry-After the delay is at least the (clamped) hint and at most one hour."""
    delay = backoff_delay(attempt, draw=draw, retry_after=retry_after)
    assert delay >= min(retry_after, MAX_RETRY_AFTER_S)
    assert 5.0 <= delay <= MAX_RETRY_AFTER_S


def test_may_serve_boundary() -> None:
    """A token is served strictly before expiry, and only with more than min_ttl left."""
    tok = token(timedelta(hours=1))
    expiry = tok.expires_at
    assert may_serve(tok, now=expiry - US)
    assert not may_serve(tok, now=expiry)
    assert not may_serve(tok, now=expiry + S)
    ttl = timedelta(seconds=30)
    assert not may_serve(tok, now=expiry - ttl, min_ttl=ttl)
    assert may_serve(tok, now=expiry - ttl - US, min_ttl=ttl)


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        pytest.param(timedelta(0), 1, id="now"),
        pytest.param(-timedelta(minutes=5), 1, id="past"),
        pytest.param(timedelta(milliseconds=100), 1, id="tenth"),
        pytest.param(S, 1, id="one"),
        pytest.param(S + US, 2, id="just-over-one"),
        pytest.param(59.5 * S, 60, id="fraction"),
        pytest.param(timedelta(hours=2), 7200, id="whole"),
    ],
)
def test_retry_after_seconds_rounds_up_to_at_least_one(span: timedelta, expected: int) -> None:
    """retry_after_seconds rounds up to whole seconds and never says less than 1."""
    assert retry_after_seconds(T0 + span, T0) == expected


def test_state_after_failure() -> None:
    """A transient failure leaves `retrying` while the token is valid, else `expired`."""
    tok = token(timedelta(minutes=10))
    assert state_after_failure(tok, now=T0 + timedelta(minutes=5)) is State.RETRYING
    assert state_after_failure(tok, now=tok.expires_at) is State.EXPIRED
    assert state_after_failure(None, now=T0) is State.EXPIRED
