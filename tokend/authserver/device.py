"""The device authorization grant (RFC 8628): `/device_authorization` and polling at `/token`.

`DeviceFlow` adds to `Authorizer` device and user codes, the polling answers
(`authorization_pending`, `slow_down`, `access_denied`, `expired_token`), and the test hooks
that stand in for the user: `approve_device`, `deny_device`, `device_auto`. Stdlib only; it
never logs a token.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from tokend.authserver.authorize import Authorizer, valid_resource
from tokend.authserver.clients import DEVICE_GRANT
from tokend.authserver.provider import Reply, error_reply, new_token, omit_for_fault

_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 §6.1: no vowels, no look-alikes
_TOO_FAST = 0.75  # a poll sooner than this share of the interval gets slow_down (timer slack)
_KEEP_EXPIRED_S = 60.0  # expired codes still answer expired_token this long


@dataclass(slots=True)
class _Device:
    client_id: str
    user_code: str
    scope: str | None
    resource: str | None
    expires_mono: float
    interval_s: float
    status: str = "pending"  # approved | denied | done
    last_poll: float | None = None
    pending_answers: int = 0


def _normalize(user_code: str) -> str:
    return "".join(ch for ch in user_code.upper() if ch.isalnum())


def _number(value: float) -> int | float:
    """A JSON number: whole values as int, fractions (tests' sub-second settings) as float."""
    return int(value) if float(value).is_integer() else float(value)


class DeviceFlow(Authorizer):
    """Device codes and their polling.

    Settable at run time: `device_flow` (serve the endpoint and advertise it),
    `device_expires_s` (600), `device_interval_s` (5; fractions allowed for tests and answered
    as given), `device_slow_down` (the next N polls answer slow_down), `device_slow_down_step_s`
    (how much each slow_down adds to the interval the server enforces; RFC 8628 says 5),
    `device_auto` (None, "approve" or "deny") and `device_pending_polls` (pending answers before
    `device_auto` decides, default 1).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.device_flow = True
        self.device_expires_s = 600.0
        self.device_interval_s = 5.0
        self.device_slow_down = 0
        self.device_slow_down_step_s = 5.0
        self.device_auto: str | None = None
        self.device_pending_polls = 1
        self._devices: dict[str, _Device] = {}  # device_code -> state
        self._user_codes: dict[str, str] = {}  # normalized user code -> device_code

    # -- the user's side (tests) -------------------------------------------------------------

    def approve_device(self, user_code: str) -> None:
        """The user approves the request showing `user_code`; KeyError if unknown."""
        self._decide(user_code, "approved")

    def deny_device(self, user_code: str) -> None:
        """The user denies the request showing `user_code`; KeyError if unknown."""
        self._decide(user_code, "denied")

    def pending_device_codes(self) -> list[str]:
        """User codes of unexpired requests nobody has approved or denied yet."""
        now = time.monotonic()
        with self._lock:
            return [
                d.user_code
                for d in self._devices.values()
                if d.status == "pending" and d.expires_mono > now
            ]

    def _decide(self, user_code: str, status: str) -> None:
        with self._lock:
            device = self._devices.get(self._user_codes.get(_normalize(user_code), ""))
            if device is None:
                raise KeyError("unknown user code")
            if device.status == "pending":
                device.status = status

    # -- the client's side -------------------------------------------------------------------

    def _device_authorization(self, form: dict[str, str], client: str) -> Reply:
        """POST /device_authorization (RFC 8628 §3.1-3.2) for an authenticated client."""
        info = self._client_info(client)
        if info is None or DEVICE_GRANT not in info.grant_types:
            return error_reply(400, "unauthorized_client", "the device grant is not registered")
        scope = form.get("scope") or None
        if scope is not None and not set(scope.split()) <= set(self._scopes_supported()):
            return error_reply(400, "invalid_scope", "unknown scope requested")
        resource = form.get("resource") or None
        if resource is not None and not valid_resource(resource):
            return error_reply(400, "invalid_target", "resource must be an absolute URI")
        expires_s, interval_s = float(self.device_expires_s), float(self.device_interval_s)
        device_code = new_token("dc_")
        now = time.monotonic()
        with self._lock:
            horizon = now - _KEEP_EXPIRED_S
            self._devices = {k: v for k, v in self._devices.items() if v.expires_mono > horizon}
            live = set(self._devices)
            self._user_codes = {k: v for k, v in self._user_codes.items() if v in live}
            while True:
                raw = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
                if raw not in self._user_codes:
                    break
            user_code = f"{raw[:4]}-{raw[4:]}"
            self._devices[device_code] = _Device(
                client, user_code, scope, resource, now + expires_s, interval_s
            )
            self._user_codes[raw] = device_code
        verification = self.url + "/device"
        return Reply(
            200,
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification,
                "verification_uri_complete": f"{verification}?user_code={user_code}",
                "expires_in": _number(expires_s),
                "interval": _number(interval_s),
            },
        )

    def _grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        if form.get("grant_type") == DEVICE_GRANT:
            return self._device_grant(form, client, kind)
        return super()._grant(form, client, kind)

    def _device_grant(self, form: dict[str, str], client: str, kind: str) -> Reply:
        """RFC 8628 §3.4-3.5: one poll with a device code."""
        if not self.device_flow:
            return error_reply(400, "unsupported_grant_type", "the device grant is disabled")
        code = form.get("device_code")
        if not code:
            return error_reply(400, "invalid_request", "device_code is missing")
        now = time.monotonic()
        with self._lock:
            device = self._devices.get(code)
            if device is None or device.client_id != client or device.status == "done":
                return error_reply(400, "invalid_grant", "device code unknown or used")
            if now >= device.expires_mono:
                return error_reply(400, "expired_token", "the device code expired")
            last, device.last_poll = device.last_poll, now
            too_fast = last is not None and now - last < device.interval_s * _TOO_FAST
            if too_fast or self.device_slow_down > 0:
                self.device_slow_down = max(0, self.device_slow_down - 1)
                device.interval_s += float(self.device_slow_down_step_s)
                return error_reply(400, "slow_down", "polling too fast; add to the interval")
            auto = self.device_auto
            if device.status == "pending" and device.pending_answers >= self.device_pending_polls:
                if auto == "approve":
                    device.status = "approved"
                elif auto == "deny":
                    device.status = "denied"
            if device.status == "pending":
                device.pending_answers += 1
                return error_reply(400, "authorization_pending", "waiting for the user")
            if device.status == "denied":
                return error_reply(400, "access_denied", "the user denied the request")
            device.status = "done"
            body = self._new_family(client, device.scope, device.resource)
        return Reply(200, omit_for_fault(body, kind))
