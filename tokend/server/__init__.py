"""The daemon's unix-socket API: `api` says what a request means, `http` and `connection` carry it.

`tokend.server.http.ApiServer` is what the daemon starts; `tokend.server.api` holds the
`TokenSource` protocol it serves and the `Peer` it authorizes. Import from the submodules: this
file imports nothing.
"""
