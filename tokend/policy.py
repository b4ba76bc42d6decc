"""Pure refresh decisions: when to refresh, how long to back off, whether a token may be served.

Everything here is a function of its arguments: time (`now`) and randomness (`jitter`, `draw`)
come from the caller, so the scheduler stays thin and tests need no clocks. No I/O, no logging;
imports only `model`, `config` and the standard library.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from tokend.config import RefreshSettings
from tokend.model import State, TokenSet

# The share of the lifetime after which a token is refreshed, before jitter (DESIGN §2).
REFRESH_FRACTION = 2 / 3
# Jitter moves a refresh earlier by up to this share of the lifetime (DESIGN §2).
JITTER_FRACTION = 0.10
# Backoff after transient failures: full jitter between these bounds (DESIGN §2).
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0
# A `Retry-After` is honoured up to one hour. The header comes from the network; without a clamp a
# hostile or broken server could park a connector for a year. An hour is longer than any sane
# maintenance window's retry hint and short enough that a human notices nothing got stuck.
MAX_RETRY_AFTER_S = 3600.0
# 2**60 times the base exceeds any cap anyone would configure; larger exponents only risk overflow.
_MAX_EXPONENT = 60


def _check_unit(name: str, value: float) -> None:
    # `not (0 <= x <= 1)` also rejects NaN, which every comparison answers with False.
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value!r}")


def next_refresh_at(token: TokenSet, settings: RefreshSettings, *, jitter: float) -> datetime:
    """When to refresh `token` next (DESIGN §2); `jitter` is a uniform draw in [0, 1).

    target = min(expires_at - skew, obtained_at + 2/3 lifetime) - jitter * 10 % of lifetime, with
    skew clipped to a third of the lifetime (see below),
    capped at obtained_at + max_interval (long-lived tokens, and refresh tokens that expire when
    idle, still get exercised), then floored at obtained_at + min(min_interval, lifetime/2): the
    floor guards against hot loops yet never pushes a refresh past half a short-lived token's life.
    The floor wins over the cap should a configuration make max_interval shorter than the floor.

    For any positive lifetime the answer lies in [obtained_at + min(min_interval, lifetime/2),
    expires_at). A token whose lifetime is zero or negative (already expired when issued, or issued
    by a server whose clock is far behind) is due at once: the answer is `obtained_at`, so the
    caller's backoff, not this function, limits how fast such a grant is retried.

    Raises ValueError when `jitter` is outside [0, 1].
    """
    _check_unit("jitter", jitter)
    lifetime = token.lifetime
    if lifetime <= timedelta(0):
        return token.obtained_at
    start = token.obtained_at
    # A skew longer than a third of the lifetime is clipped to that third: the 2/3 rule already
    # leaves a third of the lifetime as margin, and an unclipped skew would push every refresh of
    # a short-lived token (5 min, with the default 5 min skew) down to the min_interval floor --
    # thirty refreshes per token lifetime for no gain. (A departure from DESIGN §2; README says.)
    skew = min(settings.skew, lifetime * (1 - REFRESH_FRACTION))
    target = min(token.expires_at - skew, start + lifetime * REFRESH_FRACTION)
    target -= lifetime * (jitter * JITTER_FRACTION)
    target = min(target, start + settings.max_interval)
    return max(target, start + min(settings.min_interval, lifetime / 2))


def backoff_delay(
    attempt: int,
    *,
    draw: float,
    retry_after: float | None = None,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
) -> float:
    """Seconds to wait before retry after `attempt` consecutive transient failures (attempt ≥ 1).

    Exponential backoff with full jitter that never goes below `base` (no hot loops):
    ceiling = min(cap, base*2^(attempt-1)); delay = base + draw*(ceiling - base), `draw` being a
    uniform draw in [0, 1). A server's `Retry-After` (seconds) lengthens the delay, never shortens
    it, and counts only up to `MAX_RETRY_AFTER_S`; a negative or NaN one is ignored. Huge attempt
    counts are safe: the exponent stops growing once the cap is reached.

    Raises ValueError when `attempt` < 1, `draw` is outside [0, 1], or `base` is not positive.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts failures and starts at 1, got {attempt}")
    _check_unit("draw", draw)
    if not base > 0:
        raise ValueError(f"base must be positive, got {base!r}")
    ceiling = max(base, min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT)))
    delay = base + draw * (ceiling - base)
    if retry_after is not None and not math.isnan(retry_after):
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def may_serve(token: TokenSet, *, now: datetime, min_ttl: timedelta = timedelta(0)) -> bool:
    """Whether `token` still has more than `min_ttl` to live at `now`.

    Strictly more: a token at its expiry instant is not served.
    """
    return token.expires_at - now > min_ttl


def retry_after_seconds(until: datetime, now: datetime) -> int:
    """Whole seconds from `now` until `until`, rounded up and at least 1, for a `Retry-After`."""
    # Floor division of the negated span rounds up exactly, with no float in between.
    return max(1, -((now - until) // timedelta(seconds=1)))


def state_after_failure(token: TokenSet | None, *, now: datetime) -> State:
    """The state after a transient failure: `retrying` while the token is servable, else `expired`.

    Terminal failures (`invalid_grant`, a refused client) do not come here: their states follow
    from the error alone.
    """
    if token is not None and may_serve(token, now=now):
        return State.RETRYING
    return State.EXPIRED
