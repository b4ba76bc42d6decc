"""A loopback OAuth 2.0 authorization server: `tokend demo`'s provider and every test's fixture.

Serves the refresh grant (RFC 6749 §6) at `/token` with rotation and reuse detection, RFC 8414
metadata, and a protected resource `/api/whoami` that proves a served token really works. Faults
are scripted with `fail_next`; every request is recorded in `requests`. Stdlib only, so it ships
in the package; it never prints and never logs a token. `provider` decides the answers, `http`
serves them; `python -m tokend.authserver` runs one in the foreground.
"""

from tokend.authserver.http import AuthServer

__all__ = ["AuthServer"]
