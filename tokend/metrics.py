"""The daemon's Prometheus metrics (DESIGN §5 `GET /metrics`): counters and histograms the daemon
feeds, and the text exposition format (version 0.0.4) rendered from them at scrape time.

Only names, states and numbers: no secret, no error text, nothing a provider sent. Renders the
format itself (stdlib only) rather than importing prometheus_client, whose import adds ~2 MB RSS
and ~10 ms to the daemon (http.server, wsgiref and friends come with it). Not thread-safe: the
daemon calls it from its event loop only. Never does I/O and never logs.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from tokend.model import State

REFRESH_OUTCOMES = ("ok", "transient", "invalid_grant", "rejected", "persist_failed")
LOOKUP_OUTCOMES = (
    "ok",
    "needs_reauth",
    "temporarily_unavailable",
    "forbidden",
    "bad_request",
    "unknown_connector",
    "internal_error",
)
STATES = tuple(state.value for state in State)

# Upper bounds of the refresh-duration buckets: a token call takes tens of milliseconds on a LAN
# and a few seconds over a slow link; the OAuth client gives up at 30 s.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

UNKNOWN_CONNECTOR = ""  # the connector label of lookups that named no configured connector


class _Histogram:
    """Observation counts per bucket (not cumulative; the last slot is above every bound)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds


class Metrics:
    """Counters and histograms the daemon feeds; rendered at scrape time."""

    def __init__(self, clock_monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = clock_monotonic
        self._refreshes: dict[str, dict[str, int]] = {}
        self._durations: dict[str, _Histogram] = {}
        self._lookups: dict[str, dict[str, int]] = {}

    def refresh_done(self, connector: str, outcome: str, seconds: float) -> None:
        """Count one refresh attempt and observe how long it took (token call, keyring write).

        Raises ValueError for an outcome outside REFRESH_OUTCOMES or a non-finite duration.
        """
        if outcome not in REFRESH_OUTCOMES:
            raise ValueError(f"unknown refresh outcome {outcome!r}")
        if not math.isfinite(seconds):
            raise ValueError("refresh duration must be a finite number of seconds")
        counts = self._refreshes.setdefault(connector, dict.fromkeys(REFRESH_OUTCOMES, 0))
        counts[outcome] += 1
        self._durations.setdefault(connector, _Histogram()).observe(max(0.0, seconds))

    def lookup_done(self, connector: str, outcome: str) -> None:
        """Count one token lookup; `connector` is UNKNOWN_CONNECTOR ("") when the request named
        no configured connector (its name is the client's choice, so it is no label value).

        Raises ValueError for an outcome outside LOOKUP_OUTCOMES.
        """
        if outcome not in LOOKUP_OUTCOMES:
            raise ValueError(f"unknown lookup outcome {outcome!r}")
        counts = self._lookups.setdefault(connector, dict.fromkeys(LOOKUP_OUTCOMES, 0))
        counts[outcome] += 1

    def forget(self, connector: str) -> None:
        """Drop a removed connector's series, so one added later by that name starts at zero."""
        self._refreshes.pop(connector, None)
        self._durations.pop(connector, None)
        self._lookups.pop(connector, None)

    def render(
        self,
        statuses: Sequence[Mapping[str, object]],
        *,
        version: str,
        started_at_monotonic: float,
        notify_dropped: int = 0,
    ) -> str:
        """The text exposition of every metric, for the connectors in `statuses` (the daemon's
        status dicts: connector, state, expires_at, next_refresh_at, consecutive_failures)."""
        by_name = {str(s["connector"]): s for s in statuses}
        names = sorted(by_name)
        out: list[str] = []

        _family(out, "tokend_build_info", "gauge", "The running tokend's version; always 1.")
        out.append(f"tokend_build_info{{version={_quote(version)}}} 1")
        uptime = max(0.0, self._monotonic() - started_at_monotonic)
        _family(out, "tokend_uptime_seconds", "gauge", "Seconds since the daemon started.")
        out.append(f"tokend_uptime_seconds {_number(uptime)}")
        _family(
            out,
            "tokend_notify_dropped_total",
            "counter",
            "sd_notify datagrams dropped because NOTIFY_SOCKET could not take them at once.",
        )
        out.append(f"tokend_notify_dropped_total {notify_dropped}")

        _family(
            out,
            "tokend_connector_state",
            "gauge",
            "1 for the connector's current state, 0 for the others.",
        )
        for name in names:
            label = _quote(name)
            current = by_name[name].get("state")
            out.extend(
                f'tokend_connector_state{{connector={label},state="{state}"}} '
                f"{1 if state == current else 0}"
                for state in STATES
            )

        gauges = (
            (
                "tokend_token_expiry_timestamp_seconds",
                "expires_at",
                "When the access token expires (unix time); absent without a token.",
            ),
            (
                "tokend_next_refresh_timestamp_seconds",
                "next_refresh_at",
                "When the next refresh is due (unix time); absent when none is planned.",
            ),
        )
        for metric, key, help_text in gauges:
            _family(out, metric, "gauge", help_text)
            for name in names:
                moment = _timestamp(by_name[name].get(key))
                if moment is not None:
                    out.append(f"{metric}{{connector={_quote(name)}}} {_number(moment)}")
        metric = "tokend_consecutive_failures"
        _family(out, metric, "gauge", "Refresh attempts failed in a row since the last success.")
        for name in names:
            failures = by_name[name].get("consecutive_failures")
            if isinstance(failures, int | float) and not isinstance(failures, bool):
                out.append(f"{metric}{{connector={_quote(name)}}} {_number(failures)}")

        metric = "tokend_refreshes_total"
        _family(out, metric, "counter", "Refresh attempts since the daemon started, by outcome.")
        zero_refreshes = dict.fromkeys(REFRESH_OUTCOMES, 0)
        for name in names:
            counts = self._refreshes.get(name, zero_refreshes)
            _counter_lines(out, metric, name, counts)

        self._render_durations(out, names)

        metric = "tokend_lookups_total"
        _family(out, metric, "counter", "Token lookups over the socket since start, by outcome.")
        zero_lookups = dict.fromkeys(LOOKUP_OUTCOMES, 0)
        for name in names:
            _counter_lines(out, metric, name, self._lookups.get(name, zero_lookups))
        unknown = self._lookups.get(UNKNOWN_CONNECTOR)
        if unknown is not None:
            _counter_lines(out, metric, UNKNOWN_CONNECTOR, unknown)
        out.append("")
        return "\n".join(out)

    def _render_durations(self, out: list[str], names: Iterable[str]) -> None:
        metric = "tokend_refresh_duration_seconds"
        _family(
            out, metric, "histogram", "Seconds per refresh attempt (token call and keyring write)."
        )
        bounds = [*(_number(b) for b in DURATION_BUCKETS), "+Inf"]
        empty = _Histogram()
        for name in names:
            label = _quote(name)
            histogram = self._durations.get(name, empty)
            cumulative = 0
            for bound, count in zip(bounds, histogram.counts, strict=True):
                cumulative += count
                out.append(f'{metric}_bucket{{connector={label},le="{bound}"}} {cumulative}')
            out.append(f"{metric}_sum{{connector={label}}} {_number(histogram.total)}")
            out.append(f"{metric}_count{{connector={label}}} {cumulative}")


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    # Help texts are our own constants: no backslash or newline to escape.
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _counter_lines(out: list[str], metric: str, name: str, counts: Mapping[str, int]) -> None:
    label = _quote(name)
    out.extend(
        f'{metric}{{connector={label},outcome="{outcome}"}} {count}'
        for outcome, count in counts.items()
    )


def _quote(value: str) -> str:
    """A label value in double quotes, with backslash, quote and newline escaped (0.0.4)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _number(value: float) -> str:
    """A sample value as the text format spells it (Go's ParseFloat reads every one of these)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _timestamp(value: object) -> float | None:
    """Unix time of an RFC 3339 string from a status dict; None when there is none."""
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value).timestamp()
