"""`tokend login` and `tokend logout` as the CLI runs them.

The login itself (`tokend.login.session`) runs in this process; its result goes to the daemon
over the socket when it runs (so the daemon's keyring holds it), else straight into the keyring
under the state directory's lock. The pieces are handed over in the order that loses nothing:
a registered client's secret, then the client record with the grant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tokend.clients import ClientRecord, ClientRecords
from tokend.clock import SystemClock
from tokend.config import Config, ConnectorConfig
from tokend.errors import SecretMissingError, StoreError, TokendError, unknown_connector
from tokend.login.flows import Prompt, console_prompt
from tokend.login.session import Flow, LoginResult, as_token_response, login
from tokend.model import Secret
from tokend.oauth.client import make_http_client


def connector_of(config: Config, name: str) -> ConnectorConfig:
    conn = config.connectors.get(name)
    if conn is None:
        raise unknown_connector(name, config.path)
    return conn


def _secret_reader(config: Config, name: str) -> Callable[[], Secret | None]:
    def read() -> Secret | None:
        from tokend.store import KeyringStore

        try:
            secret = KeyringStore.from_settings(config.daemon).load_client_secret(name)
        except TokendError as exc:
            raise StoreError(
                f"{name}: the client secret is in the daemon's keyring, which this process "
                f"cannot read ({exc}); run the login as the daemon's user, or use a public "
                'client (client_auth = "none")'
            ) from None
        if secret is None:
            raise SecretMissingError(
                f"{name}: client_auth {config.connectors[name].client_auth} needs a client "
                f"secret and none is stored; run: tokend secret {name}"
            )
        return secret

    return read


def _previous(config: Config, name: str) -> ClientRecord | None:
    try:
        return ClientRecords(config.daemon.state_dir).load().get(name)
    except (TokendError, OSError):
        return None  # not readable by this user: only the "server changed" note is lost


def run_login(
    config: Config,
    name: str,
    *,
    flow: Flow | None,
    timeout: timedelta,
    open_browser: bool,
    prompt: Prompt | None = None,
) -> LoginResult:
    """Discover, identify the client and run a flow; nothing is stored yet."""
    conn = connector_of(config, name)

    async def go() -> LoginResult:
        async with make_http_client(ca_file=conn.ca_file) as http:
            return await login(
                conn,
                http=http,
                prompt=prompt or console_prompt(),
                clock=SystemClock(),
                read_secret=_secret_reader(config, name),
                previous=_previous(config, name),
                flow=flow,
                timeout_s=timeout.total_seconds(),
                open_browser=open_browser,
            )

    return asyncio.run(go())


def grant_body(result: LoginResult) -> dict[str, object]:
    """The `PUT .../grant` body: the token response and the client record it belongs to."""
    body = as_token_response(result.token, now=datetime.now(UTC))
    body["client_record"] = result.record.to_dict()
    return body
