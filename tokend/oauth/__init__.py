"""OAuth 2.0 for tokend: `protocol` (refresh, pure) and `client` (sends refreshes), plus the
login-time modules `discovery` (RFC 9728 / RFC 8414 / OpenID), `grants` (PKCE, code exchange,
revocation), `device` (RFC 8628 device flow), `registration` (RFC 7591) and `transport` (the
bounded sender and request pieces they share).

Import from the submodules. This file imports nothing, so loading the pure protocol (for tests,
or `tokend import`) never loads the client.
"""
