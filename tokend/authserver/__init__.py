"""A loopback OAuth 2.0 authorization server: `tokend demo`'s provider and every test's fixture.

Serves the refresh grant (RFC 6749 §6) at `/token` with rotation and reuse detection, and what
`tokend login` needs: discovery (RFC 8414, OpenID Connect, RFC 9728), the authorization code
grant with PKCE, the device grant (RFC 8628), dynamic registration (RFC 7591), Client ID Metadata
Documents and revocation (RFC 7009), plus protected resources `/api/whoami` and `/mcp` that prove
a served token really works. Faults are scripted with `fail_next`; every request is recorded in
`requests`. Stdlib only, so it ships in the package; it never prints and never logs a token.
Layers, each a subclass of the one before: `provider` (grants, clients, faults), `clients`
(registration, CIMD), `authorize` (code + PKCE), `device`, `site` (discovery, /mcp, revocation,
routing), `http` (`AuthServer`: sockets); `python -m tokend.authserver` runs one in the foreground.
"""

from tokend.authserver.http import AuthServer

__all__ = ["AuthServer"]
