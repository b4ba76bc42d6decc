#!/bin/sh
# run-mcp-remote.sh CONNECTOR URL [MCP-REMOTE-OPTION...]
#
# Start mcp-remote (a stdio-to-HTTP bridge for MCP clients that only run local servers) with
# tokend's access token for CONNECTOR. Use it as the MCP client's command, for example:
#     "example": {"command": "/usr/local/bin/run-mcp-remote.sh",
#                 "args": ["example", "https://mcp.example.com/mcp"]}
#
# The token travels in the environment, not in the command line: the header argument is the
# literal text Authorization:${AUTH_HEADER}, which mcp-remote itself expands from its
# environment (it replaces ${VAR} in --header values). The environment of a process is readable
# only by its user and root; its command line is readable by every user of the machine. The
# literal form also keeps mcp-remote's own log ("Using custom headers: ...") and its per-server
# cache key free of the token, so each new token does not start a new OAuth cache directory.
#
# The token is read once, when the MCP client starts this script: mcp-remote keeps it for its
# whole life. Restart the MCP server (or the client) when requests start to fail with 401 after
# the token's lifetime; for Claude Code prefer contrib/claude-code/mcp.json (headersHelper),
# which asks tokend afresh for every connection.
#
# Exit codes: 64 usage; tokend's code when no token can be had (10 re-authorize, 69 daemon not
# running, 75 temporary, 77 forbidden, 78 unknown connector), with its reason on stderr, which
# MCP clients show in their server log; otherwise whatever mcp-remote exits with.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 CONNECTOR URL [MCP-REMOTE-OPTION...]" >&2
    exit 64
fi
connector=$1
url=$2
shift 2

# A failed lookup stops the script here (set -e), with tokend's exit code and reason.
header=$(tokend header "$connector")
# "Authorization: Bearer TOKEN" -> "Bearer TOKEN"
AUTH_HEADER=${header#Authorization: }
export AUTH_HEADER

# Single quotes on purpose: the shell must not expand ${AUTH_HEADER}, mcp-remote does.
# -y: never stop at npx's install prompt (stdin belongs to the MCP protocol).
exec npx -y mcp-remote "$url" --header 'Authorization:${AUTH_HEADER}' "$@"
