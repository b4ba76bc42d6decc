"""One connector's life: `connector` holds its token and state and runs one refresh at a time,
`cycle` is that refresh (ask, persist, read back, or fail safely), `serving` answers lookups and
status.

Import from the submodules. This file imports nothing.
"""
