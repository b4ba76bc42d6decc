"""Fakes of tokend's own interfaces for tests: simple in-memory implementations, no I/O.

Each fake lives in its own section, named after the interface it implements.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from tokend.clock import isoformat
from tokend.errors import ApiError
from tokend.metrics import Metrics
from tokend.model import Secret, TokenSet
from tokend.server.api import Peer

# The OAuth tests' token sets. Recognisable values: the canary tests assert they never reach a
# message.
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
OLD_ACCESS = "at-CANARY-old-access-7f3a9e"
OLD_REFRESH = "rt-CANARY-old-refresh-91c2d4"
NEW_ACCESS = "at-CANARY-new-access-55b0e1"
NEW_REFRESH = "rt-CANARY-new-refresh-0d6f38"
CLIENT_SECRET = "cs-CANARY-client-secret-a1b2"
PREVIOUS = TokenSet(
    access_token=Secret(OLD_ACCESS),
    refresh_token=Secret(OLD_REFRESH),
    scope="repo offline_access",
    obtained_at=T0 - HOUR,
    expires_at=T0,
    generation=4,
)

# --- FakeTokenSource: tokend.server.api.TokenSource -------------------------------------------


def make_tokens(
    access: str = "at-0", *, lifetime_s: float = 3600, scope: str | None = "read"
) -> TokenSet:
    """A token set obtained now that expires in `lifetime_s`."""
    now = datetime.now(UTC)
    return TokenSet(
        access_token=Secret(access),
        refresh_token=Secret("rt-" + access),
        scope=scope,
        obtained_at=now,
        expires_at=now + timedelta(seconds=lifetime_s),
    )


class FakeTokenSource:
    """An in-memory `TokenSource`: scripted tokens, allow lists and failures; records every call.

    `tokens` maps connector names to a token set, or None for a connector without a grant.
    Admins are `admin_uids` (default: the test's own uid). `allowed_uids[name]` lists who may read
    that connector's token; a connector missing from it allows everyone.
    `fail[method] = exc` makes that method raise `exc`; `token_delay_s` makes `token` slow, and
    `token_entered` is set once a `token` call has started. `lookups` records every
    `lookup_done(name, outcome)` the server reports, also counted in `metrics` (a real `Metrics`),
    which `metrics_text` renders.
    """

    def __init__(
        self,
        tokens: Mapping[str, TokenSet | None] | None = None,
        *,
        admin_uids: set[int] | None = None,
        allowed_uids: Mapping[str, set[int]] | None = None,
    ) -> None:
        self.tokens: dict[str, TokenSet | None] = dict(
            {"a": make_tokens("at-a"), "b": None} if tokens is None else tokens
        )
        self.admin_uids = {os.getuid()} if admin_uids is None else set(admin_uids)
        self.allowed_uids = dict(allowed_uids or {})
        self.fail: dict[str, BaseException] = {}
        self.token_delay_s = 0.0
        self.token_entered = threading.Event()
        self.peers: list[Peer] = []
        self.calls: list[tuple[str, str]] = []
        self.min_ttls: list[float] = []
        self.grants: dict[str, Mapping[str, object]] = {}
        self.secrets: dict[str, Secret] = {}
        self.degraded = False
        self.metrics = Metrics()
        self.lookups: list[tuple[str, str]] = []

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def has_connector(self, name: str) -> bool:
        return name in self.tokens

    def is_allowed(self, name: str, peer: Peer) -> bool:
        self.peers.append(peer)
        return name not in self.allowed_uids or peer.uid in self.allowed_uids[name]

    def is_admin(self, peer: Peer) -> bool:
        self.peers.append(peer)
        return peer.uid in self.admin_uids

    async def token(self, name: str, *, min_ttl_s: float) -> TokenSet:
        self.calls.append(("token", name))
        self.min_ttls.append(min_ttl_s)
        self.token_entered.set()
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        self._maybe_fail("token")
        tokens = self.tokens[name]
        if tokens is None:
            raise ApiError(
                "needs_reauth", "no grant stored", connector=name, action=f"tokend login {name}"
            )
        return tokens

    def status(self, name: str) -> dict[str, object]:
        self._maybe_fail("status")
        tokens = self.tokens[name]
        return {
            "connector": name,
            "state": "unauthorized" if tokens is None else "ok",
            "expires_at": None if tokens is None else isoformat(tokens.expires_at),
        }

    def statuses(self) -> list[dict[str, object]]:
        return [self.status(name) for name in sorted(self.tokens)]

    async def refresh(self, name: str) -> dict[str, object]:
        self.calls.append(("refresh", name))
        self._maybe_fail("refresh")
        return self.status(name)

    async def install_grant(self, name: str, body: Mapping[str, object]) -> dict[str, object]:
        self.calls.append(("install_grant", name))
        self._maybe_fail("install_grant")
        access = body.get("access_token")
        if not isinstance(access, str):
            raise ApiError("bad_request", "token response lacks access_token", connector=name)
        self.grants[name] = body
        self.tokens[name] = make_tokens(access)
        return self.status(name)

    async def forget_grant(self, name: str, *, revoke: bool) -> dict[str, object]:
        self.calls.append(("forget_grant" + (" revoke" if revoke else ""), name))
        self._maybe_fail("forget_grant")
        self.tokens[name] = None
        return self.status(name)

    async def store_secret(self, name: str, secret: Secret) -> None:
        self.calls.append(("store_secret", name))
        self._maybe_fail("store_secret")
        self.secrets[name] = secret

    def health(self) -> dict[str, object]:
        return {"status": "degraded" if self.degraded else "ok", "connectors": len(self.tokens)}

    def metrics_text(self) -> str:
        self._maybe_fail("metrics_text")
        return self.metrics.render(self.statuses(), version="0.0.0-fake", started_at_monotonic=0.0)

    def lookup_done(self, name: str, outcome: str) -> None:
        self.lookups.append((name, outcome))
        self.metrics.lookup_done(name, outcome)
