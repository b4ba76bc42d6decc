"""OAuth 2.0 refresh (RFC 6749 §5-6): `protocol` builds and parses with no I/O, `client` sends.

Import from the submodules. This file imports nothing, so loading the pure protocol (for tests,
or `tokend import`) never loads the client.
"""
