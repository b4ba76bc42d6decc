"""Chaos run: SIGKILL the daemon at random moments, restart it, and count the grants lost.

Not a test (tests/test_chaos.py runs a short version): it prints a table. Each cycle waits a random
time, SIGKILLs `python -m tokend -v run`, classifies the moment of the kill, restarts the daemon
(as `Restart=on-failure` would) and checks that it serves a token the loopback authorization
server accepts. The server rotates refresh tokens with reuse detection and issues 2-5 s tokens, so
the daemon refreshes every few seconds.

Phases of a kill, from the server's recorded requests and the daemon's log of the killed run:
- "response->persist": the server had answered a refresh (and rotated the refresh token) before
  the kill, but the daemon never logged "refreshed demo" (written after the keyring write and the
  read-back);
- "in-flight": a refresh request had been sent and the server answered it only after the kill;
- "after persist": the killed run refreshed at least once and persisted every answer it got;
- "idle": the killed run never refreshed (it served what it loaded from the store).
A loss is the server revoking the grant (reuse detected) or the daemon landing in needs_reauth. A
loss is traced to the kill after which the stale refresh token was stored: the reused token is the
one presented by the request whose answer that kill cut off. Run:
python tests/bench/chaos.py [--cycles 100] [--lifetime-min 2] [--lifetime-max 5] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.harness import FILE_BACKEND, DaemonProcess, config_dict, get, short_tmp
from tokend.authserver import AuthServer

WINDOW = "response->persist"
IN_FLIGHT = "in-flight"
AFTER_PERSIST = "after persist"
IDLE = "idle"
UNATTRIBUTED = "unattributed"
PHASES = (IDLE, IN_FLIGHT, WINDOW, AFTER_PERSIST)
# A loss here is the cost of rotation itself: the server rotated, the answer never arrived.
ACCEPTABLE = frozenset({WINDOW, IN_FLIGHT})
REFRESHED_LINE = "refreshed demo; expires in"
RECOVER_TIMEOUT_S = 30.0
SETTLE_S = 0.3  # after the kill: lets the server finish a request the dead daemon had sent


@dataclass
class Kill:
    """One SIGKILL: when in the refresh cycle it fell, and how the restart went."""

    cycle: int
    phase: str
    stale_token: str | None = None  # the refresh token the store still holds, if rotated away
    recover_s: float | None = None  # time from restart to a valid token; None if never
    lost: bool = False
    after_request_ms: float | None = None  # in the window: kill time minus the request's arrival


@dataclass
class ChaosResult:
    """Everything a chaos run observed."""

    kills: list[Kill] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)  # the phase each loss is traced to
    failures: list[str] = field(default_factory=list)  # restarts with no valid token, etc.
    grants_installed: int = 0
    reuse_detected: int = 0
    # Per refresh of a killed run: the request's arrival at the server to the "refreshed" line.
    persist_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def unacceptable(self) -> list[str]:
        """Losses traced to a phase where the store should have held the current grant."""
        return [phase for phase in self.losses if phase not in ACCEPTABLE]


class _Run:
    """The daemon, the authorization server and the bookkeeping of one chaos run."""

    def __init__(self, root: Path, auth: AuthServer, rng: random.Random, out: Any) -> None:
        self.auth = auth
        self.rng = rng
        self.out = out
        config = config_dict(
            root,
            auth.token_url,
            daemon={"keyring_backend": FILE_BACKEND},
            refresh={"skew": "1s", "min_interval": "1s"},
        )
        self.proc = DaemonProcess(root, config)
        self.result = ChaosResult()
        self.scanned = 0  # /token records already checked for reuse
        self.stale: dict[str, Kill] = {}  # stale refresh token -> the kill that left it stored

    # -- observations ------------------------------------------------------------------------

    def token_records(self) -> list[Any]:
        return [r for r in self.auth.requests if r.method == "POST" and r.path == "/token"]

    def refreshed_times(self) -> list[datetime]:
        """When the current run logged each "refreshed demo" line (local-time log stamps)."""
        text = self.proc.log_path.read_text(errors="replace")
        stamps = re.findall(r"^(\S+ \S+) INFO \S+: " + REFRESHED_LINE, text, re.MULTILINE)
        return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").astimezone(UTC) for s in stamps]

    def state(self) -> str | None:
        try:
            status, body = get(self.proc.socket, "/v1/connectors/demo")
        except OSError:
            return None
        return str(body.get("state")) if status == 200 and isinstance(body, dict) else None

    def valid_token(self) -> bool:
        try:
            status, body = get(self.proc.socket, "/v1/connectors/demo/token")
        except OSError:
            return False
        if status != 200 or not isinstance(body, dict):
            return False
        return self.auth.is_valid_access_token(str(body["access_token"]))

    # -- actions -----------------------------------------------------------------------------

    def install_grant(self) -> None:
        done = self.proc.cli("import", "demo", stdin=json.dumps(self.auth.issue_grant()))
        if done.returncode != 0:
            raise RuntimeError(f"tokend import failed: {done.stderr.strip()}")
        self.result.grants_installed += 1

    def check_losses(self, current: Kill | None) -> bool:
        """Trace new reuse detections (and needs_reauth) to kills; True if a grant was lost."""
        records = self.token_records()
        new, self.scanned = records[self.scanned :], len(records)
        lost = False
        for record in new:
            if record.outcome != "invalid_grant":
                continue
            culprit = self.stale.pop(record.form.get("refresh_token", ""), None)
            if culprit is not None:
                culprit.lost = True
                self.result.losses.append(culprit.phase)
                lost = True
        if not lost and self.state() == "needs_reauth":
            # A loss no kill explains: count it against the current kill's phase (or none).
            phase = current.phase if current is not None else UNATTRIBUTED
            self.result.losses.append(f"{phase} (untraced)")
            self.result.failures.append(f"untraced loss at cycle {current.cycle if current else 0}")
            lost = True
        if lost:
            self.stale.clear()  # the fresh grant makes every older token irrelevant
            self.install_grant()
        return lost

    def kill(self, cycle: int, run_start: int) -> Kill:
        """SIGKILL now and classify the moment."""
        before = self.token_records()[run_start:]
        killed_at = datetime.now(UTC)
        self.proc.kill()
        time.sleep(SETTLE_S)
        after = self.token_records()[run_start:]
        answered = [r for r in before if r.outcome == "ok"]
        refreshed = self.refreshed_times()
        for record, logged in zip(answered, refreshed, strict=False):
            self.result.persist_ms.append((logged - record.at).total_seconds() * 1000)
        late = after[len(before) :]
        if len(answered) > len(refreshed):
            kill = Kill(cycle, WINDOW, stale_token=answered[-1].form.get("refresh_token"))
            kill.after_request_ms = (killed_at - answered[-1].at).total_seconds() * 1000
        elif late:
            ok = [r for r in late if r.outcome == "ok"]
            kill = Kill(
                cycle, IN_FLIGHT, stale_token=ok[-1].form.get("refresh_token") if ok else None
            )
        elif answered:
            kill = Kill(cycle, AFTER_PERSIST)
        else:
            kill = Kill(cycle, IDLE)
        if kill.stale_token:
            self.stale[kill.stale_token] = kill
        return kill

    def recover(self, kill: Kill | None) -> float | None:
        """Wait for a valid token from the restarted daemon, installing a grant after a loss."""
        started = time.monotonic()
        deadline = started + RECOVER_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_losses(kill)
            if self.valid_token():
                return time.monotonic() - started
            time.sleep(0.1)
        return None


def run_chaos(
    cycles: int,
    *,
    lifetime_min: float = 2.0,
    lifetime_max: float = 5.0,
    max_wait_s: float = 3.0,
    seed: int | None = None,
    out: Any = None,
) -> ChaosResult:
    """Run `cycles` kill-and-restart cycles against a fresh daemon and authorization server."""
    rng = random.Random(seed)
    root = short_tmp("tkchaos")
    began = time.monotonic()
    try:
        with AuthServer(lifetime_s=rng.uniform(lifetime_min, lifetime_max)) as auth:
            run = _Run(root, auth, rng, out)
            run.proc.start()
            try:
                run.install_grant()
                if run.recover(None) is None:
                    raise RuntimeError("the daemon never served the first grant")
                for cycle in range(1, cycles + 1):
                    _cycle(run, cycle, lifetime_min, lifetime_max, max_wait_s)
                # Let a stale token left by the last kill meet the server before we count.
                time.sleep(lifetime_max + 1.0)
                run.check_losses(run.result.kills[-1] if run.result.kills else None)
                run.result.reuse_detected = auth.reuse_detected
                traced = sum(1 for k in run.result.kills if k.lost)
                if auth.reuse_detected > traced:
                    run.result.failures.append(
                        f"{auth.reuse_detected - traced} reuse detection(s) traced to no kill"
                    )
            finally:
                if run.proc.proc is not None and run.proc.proc.poll() is None:
                    run.proc.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    run.result.elapsed_s = time.monotonic() - began
    return run.result


def _cycle(run: _Run, cycle: int, lifetime_min: float, lifetime_max: float, wait: float) -> None:
    run.auth.lifetime_s = run.rng.uniform(lifetime_min, lifetime_max)
    run_start = len(run.token_records())
    time.sleep(run.rng.uniform(0.0, wait))
    run.check_losses(run.result.kills[-1] if run.result.kills else None)
    run_start = min(run_start, len(run.token_records()))
    kill = run.kill(cycle, run_start)
    run.result.kills.append(kill)
    restarted = time.monotonic()
    run.proc.start()  # waits for /v1/health, like systemd waiting for READY=1
    if run.recover(kill) is not None:
        kill.recover_s = time.monotonic() - restarted
    if kill.recover_s is None:
        run.result.failures.append(
            f"cycle {cycle}: no valid token {RECOVER_TIMEOUT_S:.0f}s after restart"
        )
    if run.out is not None:
        print(
            f"cycle {cycle:4d}: {kill.phase:18s} recovered in "
            + (f"{kill.recover_s:.2f}s" if kill.recover_s is not None else "never"),
            file=run.out,
            flush=True,
        )


def report(result: ChaosResult, cycles: int) -> str:
    """The table: kills and losses per phase, then totals."""
    kills = Counter(k.phase for k in result.kills)
    losses = Counter(result.losses)
    lines = [f"{'phase':<28}{'kills':>7}{'losses':>8}"]
    for phase in (*PHASES, *sorted(set(losses) - set(PHASES))):
        lines.append(f"{phase:<28}{kills.get(phase, 0):>7}{losses.get(phase, 0):>8}")
    recovered = [k.recover_s for k in result.kills if k.recover_s is not None]
    window = [k for k in result.kills if k.after_request_ms is not None]
    lines += [
        f"{'total':<28}{len(result.kills):>7}{len(result.losses):>8}",
        "",
        f"cycles: {cycles}; grants installed: {result.grants_installed}; "
        f"reuse detected by the server: {result.reuse_detected}; "
        f"unacceptable losses: {len(result.unacceptable())}",
        f"restart to valid token: median {_median(recovered):.2f}s, max "
        f"{max(recovered, default=float('nan')):.2f}s",
        f"failures: {'; '.join(result.failures) or 'none'}",
        f"request arrival to 'refreshed' logged: median {_median(result.persist_ms):.1f} ms, "
        f"max {max(result.persist_ms, default=float('nan')):.1f} ms "
        f"over {len(result.persist_ms)} refreshes",
        "window kills, ms after the request arrived: "
        + (", ".join(f"{k.after_request_ms:.1f}" for k in window) or "none"),
        f"total time: {result.elapsed_s:.1f}s",
    ]
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--lifetime-min", type=float, default=2.0)
    parser.add_argument("--lifetime-max", type=float, default=5.0)
    parser.add_argument("--max-wait", type=float, default=3.0, help="kill within 0..N s")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}", flush=True)
    result = run_chaos(
        args.cycles,
        lifetime_min=args.lifetime_min,
        lifetime_max=args.lifetime_max,
        max_wait_s=args.max_wait,
        seed=seed,
        out=None if args.quiet else sys.stdout,
    )
    print(report(result, args.cycles))
    return 1 if result.unacceptable() or result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
