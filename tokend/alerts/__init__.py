"""Alerts (DESIGN §7): `event` builds the JSON, `sink` delivers it (exec, webhook, Apprise),
`manager` decides when (one per state change, reminders, `recovered`) without blocking the daemon.

Import from the submodules. This file imports nothing, so the pure event builders never load httpx.
"""
