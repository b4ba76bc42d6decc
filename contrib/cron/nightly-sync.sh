#!/bin/sh
# nightly-sync: fetch one resource with a connector's access token and keep the answer.
#
# Run it through tokend, so that it never starts without a token (see crontab.example):
#     tokend exec nightly -- /usr/local/bin/nightly-sync
# `tokend exec` hands the token over in $TOKEND_ACCESS_TOKEN. When no token can be had it does
# not run this script at all: it prints one JSON skip record on stderr (cron mails or logs it)
# and exits with the reason's code (10 re-authorize, 75 temporary, 69 daemon not running,
# 77 forbidden, 78 unknown connector).
#
# Settings, from the environment (the crontab or the systemd unit sets them):
#   NIGHTLY_SYNC_URL   the URL to fetch (required)
#   NIGHTLY_SYNC_OUT   where to keep the answer (default /var/lib/nightly-sync/latest.json)
#
# The token never appears in a command line: printf is a shell builtin (no new process, no argv)
# and curl reads the header from stdin (-H @-), so neither ps nor /proc/PID/cmdline shows it.
# Exit codes: 0 done; curl's own code when the request fails (22: the server answered >= 400).
set -eu

: "${TOKEND_ACCESS_TOKEN:?is not set: run me through tokend exec CONNECTOR -- $0}"
url=${NIGHTLY_SYNC_URL:?is not set: the URL to fetch}
out=${NIGHTLY_SYNC_OUT:-/var/lib/nightly-sync/latest.json}

# Keep the token in a shell variable only: the processes started below (curl, mv) do not
# inherit it in their environment.
token=$TOKEND_ACCESS_TOKEN
unset TOKEND_ACCESS_TOKEN

# Write beside the target and rename, so a failed run never leaves a half-written answer.
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
printf 'Authorization: Bearer %s\n' "$token" |
    curl --silent --show-error --fail --max-time 120 --header @- --output "$tmp" "$url"
mv "$tmp" "$out"
trap - EXIT
