"""The socket API (DESIGN §5): routing, handlers and JSON/error shaping over a `TokenSource`.

Owns the `TokenSource` protocol the daemon implements, the `Peer` a request comes from, the routes
and who may call them, and turning every `ApiError` into its JSON error response. Reports the
outcome of every token lookup to the source (for metrics), since some outcomes (forbidden, unknown
connector, a bad query) are decided here. Knows nothing of sockets or HTTP framing (that is
`tokend.server.http` and `tokend.server.connection`); never refreshes, stores or decides anything
about tokens, and never logs.
"""

from __future__ import annotations

import json
import math
import pwd
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from tokend.clock import Clock, isoformat
from tokend.errors import ApiError
from tokend.model import NAME_PATTERN, Secret, TokenSet

_NAME_RE = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process's credentials, from SO_PEERCRED and SO_PEERGROUPS."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # primary + supplementary


class TokenSource(Protocol):
    """What the server needs from the daemon; every async method may raise `ApiError`."""

    def has_connector(self, name: str) -> bool: ...
    def is_allowed(self, name: str, peer: Peer) -> bool: ...
    def is_admin(self, peer: Peer) -> bool: ...
    async def token(self, name: str, *, min_ttl_s: float) -> TokenSet: ...
    def status(self, name: str) -> dict[str, object]: ...
    def statuses(self) -> list[dict[str, object]]: ...
    async def refresh(self, name: str) -> dict[str, object]: ...
    async def install_grant(self, name: str, body: Mapping[str, object]) -> dict[str, object]: ...
    async def forget_grant(self, name: str, *, revoke: bool) -> dict[str, object]: ...
    async def store_secret(self, name: str, secret: Secret) -> None: ...
    def health(self) -> dict[str, object]: ...
    def metrics_text(self) -> str: ...
    def lookup_done(self, name: str, outcome: str) -> None:
        """Count one token lookup: `outcome` is "ok" or the ApiError code it answered; `name` is
        "" when the request named no configured connector."""
        ...


# --- routes: plain functions over a TokenSource ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One answer to a request: status, body, content type and any extra headers."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class _Call:
    source: TokenSource
    peer: Peer
    name: str  # "" on routes without a connector
    query: Mapping[str, str]
    body: bytes
    clock: Clock


def _json(status: int, obj: object, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    return Response(
        status, json.dumps(obj, separators=(",", ":")).encode() + b"\n", headers=headers
    )


def error_response(status: int, code: str, description: str, **extra: object) -> Response:
    """A JSON error answer: `{"error": code, "error_description": description, **extra}`."""
    return _json(status, {"error": code, "error_description": description, **extra})


def _api_error(exc: ApiError) -> Response:
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if exc.retry_after is not None:
        headers = ((b"retry-after", str(max(0, math.ceil(exc.retry_after))).encode()),)
    return _json(exc.http_status, exc.to_json(), headers)


def _bad_request(description: str, name: str = "") -> ApiError:
    return ApiError("bad_request", description, connector=name or None)


def _user_text(uid: int) -> str:
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid:{uid}"


def _json_object(call: _Call) -> dict[str, object]:
    def no_constants(text: str) -> object:
        raise ValueError(text)

    try:
        data = json.loads(call.body, parse_constant=no_constants) if call.body else None
    except (ValueError, RecursionError):
        raise _bad_request("request body is not valid JSON", call.name) from None
    if not isinstance(data, dict):
        raise _bad_request("request body must be a JSON object", call.name)
    return data


async def _list_connectors(call: _Call) -> Response:
    return _json(200, {"connectors": call.source.statuses()})


async def _connector_status(call: _Call) -> Response:
    return _json(200, call.source.status(call.name))


async def _health(call: _Call) -> Response:
    return _json(200, call.source.health())


async def _metrics(call: _Call) -> Response:
    return Response(200, call.source.metrics_text().encode(), METRICS_CONTENT_TYPE)


async def _token(call: _Call) -> Response:
    fmt = call.query.get("format", "json")
    if fmt not in ("json", "raw"):
        raise _bad_request("format must be json or raw", call.name)
    min_ttl = 0.0
    if "min_ttl" in call.query:
        try:
            min_ttl = float(call.query["min_ttl"])
        except ValueError:
            min_ttl = -1.0
        if not (math.isfinite(min_ttl) and min_ttl >= 0):
            raise _bad_request("min_ttl must be a non-negative number of seconds", call.name)
    if not call.source.is_allowed(call.name, call.peer):
        raise ApiError(
            "forbidden",
            f"uid {call.peer.uid} may not read the token of connector {call.name}",
            connector=call.name,
            action=f"add {_user_text(call.peer.uid)} to connectors.{call.name}.allow",
        )
    tokens = await call.source.token(call.name, min_ttl_s=min_ttl)
    if fmt == "raw":  # the socket reply is a boundary where the token leaves on purpose
        return Response(200, tokens.access_token.reveal().encode(), b"text/plain; charset=utf-8")
    remaining = (tokens.expires_at - call.clock.now()).total_seconds()
    return Response(200, _token_json(call.name, tokens, max(0, math.floor(remaining))))


# Per connector, the JSON token answer split around expires_in (the one field that changes
# between lookups of the same token), kept while the daemon serves the same TokenSet object:
# most lookups then skip json.dumps and isoformat. One entry per connector name looked up.
_token_answers: dict[str, tuple[TokenSet, bytes, bytes]] = {}


def _token_json(name: str, tokens: TokenSet, expires_in: int) -> bytes:
    """`_json`'s bytes for the token answer, with its fields in the documented order."""
    cached = _token_answers.get(name)
    if cached is None or cached[0] is not tokens:
        fields = {
            "connector": name,
            "access_token": tokens.access_token.reveal(),
            "token_type": tokens.token_type,
            "expires_at": isoformat(tokens.expires_at),
        }
        head = json.dumps(fields, separators=(",", ":"))[:-1] + ',"expires_in":'
        tail = ',"scope":' + json.dumps(tokens.scope) + "}\n"
        cached = _token_answers[name] = (tokens, head.encode(), tail.encode())
    return cached[1] + str(expires_in).encode() + cached[2]


async def _refresh(call: _Call) -> Response:
    return _json(200, await call.source.refresh(call.name))


async def _install_grant(call: _Call) -> Response:
    return _json(200, await call.source.install_grant(call.name, _json_object(call)))


async def _forget_grant(call: _Call) -> Response:
    revoke = call.query.get("revoke", "false")
    if revoke not in ("true", "false"):
        raise _bad_request("revoke must be true or false", call.name)
    return _json(200, await call.source.forget_grant(call.name, revoke=revoke == "true"))


async def _store_secret(call: _Call) -> Response:
    data = _json_object(call)
    value = data.get("client_secret")
    if set(data) != {"client_secret"} or not isinstance(value, str) or not value:
        raise _bad_request(
            'body must be {"client_secret": "..."} with a non-empty string', call.name
        )
    await call.source.store_secret(call.name, Secret(value))
    return _json(200, call.source.status(call.name))


_Handler = Callable[[_Call], Awaitable[Response]]

# The Prometheus text exposition format, version 0.0.4 (what tokend.metrics renders).
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class _Route:
    parts: tuple[str | None, ...]  # None is the connector NAME
    methods: Mapping[str, _Handler]
    params: frozenset[str] = frozenset()
    admin: bool = False
    lookup: bool = False  # every outcome is reported with TokenSource.lookup_done


_ROUTES = (
    _Route(("v1", "connectors"), {"GET": _list_connectors}),
    _Route(("v1", "connectors", None), {"GET": _connector_status}),
    _Route(
        ("v1", "connectors", None, "token"),
        {"GET": _token},
        frozenset({"format", "min_ttl"}),
        lookup=True,
    ),
    _Route(("v1", "connectors", None, "refresh"), {"POST": _refresh}, admin=True),
    _Route(
        ("v1", "connectors", None, "grant"),
        {"PUT": _install_grant, "DELETE": _forget_grant},
        frozenset({"revoke"}),
        admin=True,
    ),
    _Route(("v1", "connectors", None, "secret"), {"PUT": _store_secret}, admin=True),
    _Route(("v1", "health"), {"GET": _health}),
    _Route(("metrics",), {"GET": _metrics}),
)


def _split_target(target: str) -> tuple[list[str], dict[str, str]]:
    """Decoded path segments and query parameters; raises ApiError(bad_request)."""
    if target.startswith("/"):  # origin form; urlsplit would read "//x/..." as a host
        path, _, raw_query = target.partition("?")
    else:  # absolute form (RFC 9112 §3.2.2): the host part is ignored
        parts = urlsplit(target)
        path, raw_query = parts.path, parts.query
    if re.search("%2f", path, re.IGNORECASE):
        raise _bad_request("percent-encoded slashes are not allowed in the path")
    try:
        segments = [unquote(s, errors="strict") for s in path.split("/")]
        pairs = parse_qsl(raw_query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except ValueError:  # also UnicodeDecodeError
        raise _bad_request("malformed path or query string") from None
    if any(s in (".", "..") for s in segments):
        raise _bad_request("'.' and '..' are not allowed in the path")
    query = dict(pairs)
    if len(query) != len(pairs):
        raise _bad_request("repeated query parameter")
    return segments, query


async def dispatch(
    source: TokenSource, peer: Peer, method: str, target: str, body: bytes, clock: Clock
) -> Response:
    """Route one request; every ApiError becomes its error response."""
    try:
        segments, query = _split_target(target)
        if not segments or segments[0] != "":
            return error_response(404, "not_found", "no such path")
        for route in _ROUTES:
            if len(route.parts) != len(segments) - 1:
                continue
            pairs = zip(route.parts, segments[1:], strict=True)
            if all(want == got or (want is None and got) for want, got in pairs):
                break
        else:
            return error_response(404, "not_found", "no such path")
        handler = route.methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(route.methods)).encode()
            return _json(
                405,
                {"error": "method_not_allowed", "error_description": f"{method} not allowed"},
                ((b"allow", allow),),
            )
        name = segments[1 + route.parts.index(None)] if None in route.parts else ""
        known = bool(_NAME_RE.fullmatch(name)) and source.has_connector(name)
        call = _Call(source, peer, name, query, body, clock)
        if not route.lookup:
            return await _checked(route, handler, call, known=known)
        # A name that is no configured connector is the client's choice: not a label value.
        label = name if known else ""
        try:
            response = await _checked(route, handler, call, known=known)
        except ApiError as exc:
            source.lookup_done(label, exc.code)
            raise
        source.lookup_done(label, "ok")
        return response
    except ApiError as exc:
        return _api_error(exc)


async def _checked(route: _Route, handler: _Handler, call: _Call, *, known: bool) -> Response:
    """Check the query, the connector and admin rights, then run the handler; raises ApiError."""
    if unknown := set(call.query) - route.params:
        raise _bad_request(f"unknown query parameter {sorted(unknown)[0]!r}")
    name = call.name
    if None in route.parts and not known:
        shown = name if _NAME_RE.fullmatch(name) else None
        raise ApiError("unknown_connector", "no such connector", connector=shown)
    if route.admin and not call.source.is_admin(call.peer):
        raise ApiError(
            "forbidden",
            f"only the daemon's user or root may change connectors (peer uid {call.peer.uid})",
            connector=name or None,
            action="run this as the daemon's user or root",
        )
    return await handler(call)
