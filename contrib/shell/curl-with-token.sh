#!/bin/sh
# curl-with-token.sh CONNECTOR URL [CURL-OPTION...]
#
# curl URL with tokend's access token for CONNECTOR, without the token ever being a command-line
# argument of any process: printf is a shell builtin (no new process, no argv), and curl reads
# the header line from its stdin (-H @-). A command line is readable by every user of the
# machine (ps, /proc/PID/cmdline); a pipe is not. The one-liner this script wraps:
#     printf 'Authorization: Bearer %s\n' "$(tokend token gh)" | curl -H @- "$URL"
# The script first takes the token into a variable, so that a failed lookup stops it with
# tokend's exit code (10 re-authorize, 69 daemon not running, 75 temporary, 77 forbidden,
# 78 unknown connector) instead of sending the request without a token.
#
# Extra options go to curl, before the URL; stdin is taken by the header, so do not use @- for
# anything else (use --data @FILE instead of --data @-). Exit codes: 64 usage, tokend's code as
# above, else curl's (22: the server answered with a status of 400 or more).
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 CONNECTOR URL [CURL-OPTION...]" >&2
    exit 64
fi
connector=$1
url=$2
shift 2

token=$(tokend token "$connector")
printf 'Authorization: Bearer %s\n' "$token" |
    curl --silent --show-error --fail --header @- "$@" "$url"
