"""`python -m tokend.authserver`: run the loopback authorization server in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from collections.abc import Sequence

from tokend.authserver.http import AuthServer


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server in the foreground until interrupted; prints only its URL."""
    parser = argparse.ArgumentParser(prog="python -m tokend.authserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=30.0, help="access token lifetime (s)")
    parser.add_argument("--no-rotate", action="store_true", help="keep refresh tokens")
    parser.add_argument(
        "--device-auto",
        choices=["approve", "deny"],
        help="decide device requests after one pending poll (there is no verification UI)",
    )
    parser.add_argument("--cimd", action="store_true", help="accept URL client ids (CIMD)")
    args = parser.parse_args(argv)
    server = AuthServer(
        host=args.host, port=args.port, lifetime_s=args.lifetime, rotate=not args.no_rotate
    )
    server.device_auto = args.device_auto
    server.cimd = args.cimd
    with server:
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
