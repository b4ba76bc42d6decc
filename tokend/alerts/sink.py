"""Alert sinks: `exec` (argv, event JSON on stdin), `webhook` (POST JSON) and Apprise URLs.

Each sink delivers one event at a time and raises `DeliveryError` (one line, no secrets) when it
cannot; nothing here retries forever or waits unbounded: exec is killed at its timeout, the webhook
gives up after a few attempts, an Apprise call is bounded. Sinks are named without their URLs: a
webhook path or an Apprise URL may hold a service token. Apprise is imported only when configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from tokend import __version__
from tokend.alerts.event import one_line
from tokend.config import AlertSettings
from tokend.errors import ConfigError

logger = logging.getLogger(__name__)

EXEC_TIMEOUT_S = 30.0
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_CONNECT_RETRIES = 2  # httpx's transport retries refused or failed connections itself
APPRISE_TIMEOUT_S = 60.0  # a bound on one notify() call, whose plugins have their own timeouts


class DeliveryError(Exception):
    """A sink could not deliver an event; the message says why, in one line without secrets."""


class Sink(Protocol):
    """One alert destination; `name` shows in logs and `check --alerts`, never holding a secret."""

    name: str

    async def prepare(self) -> None:
        """Get ready to deliver (idempotent); raises ConfigError when the sink cannot work."""
        ...

    async def deliver(self, event: Mapping[str, object], body: bytes) -> None:
        """Deliver one event (`body` is its JSON); raises DeliveryError."""
        ...

    async def aclose(self) -> None:
        """Release what `prepare` made."""
        ...


class ExecSink:
    """Runs `argv` with the event JSON on stdin, in its own process group, killed at the timeout.

    Its stderr is the daemon's (the journal, under systemd), so what it says is kept there.
    """

    name = "exec"

    def __init__(self, argv: tuple[str, ...], *, timeout_s: float) -> None:
        self.argv = argv
        self.timeout_s = timeout_s

    async def prepare(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def deliver(self, event: Mapping[str, object], body: bytes) -> None:
        program = self.argv[0]
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own group, so a timeout kills its children too
            )
        except OSError as exc:
            raise DeliveryError(f"cannot run {program}: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                await _feed_and_wait(proc, body)
        except TimeoutError:
            raise DeliveryError(
                f"{program} did not finish within {self.timeout_s:g}s and was killed"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled (shutdown)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        code = proc.returncode
        if code:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            raise DeliveryError(f"{program} {how}")


async def _feed_and_wait(proc: asyncio.subprocess.Process, body: bytes) -> None:
    """Write `body` to the process's stdin, close it, and wait for the process to exit.

    Only the process itself is awaited: a child it leaves running in the background is its own.
    """
    stdin = proc.stdin
    if stdin is None:  # pragma: no cover  # a pipe by construction
        raise RuntimeError("exec sink without a stdin pipe")
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read stdin
        stdin.write(body)
        await stdin.drain()
    stdin.close()
    await proc.wait()


class WebhookSink:
    """POSTs the event JSON; retries 5xx, 429 and timeouts a few times with growing pauses."""

    name = "webhook"

    def __init__(self, url: str, *, timeout_s: float, attempts: int, backoff_s: float) -> None:
        self.url = url
        self.host = urlsplit(url).hostname or "?"  # the path may be a secret: never shown
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._client: httpx.AsyncClient | None = None

    async def prepare(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(retries=WEBHOOK_CONNECT_RETRIES),
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                headers={"User-Agent": f"tokend/{__version__}", "Content-Type": "application/json"},
            )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver(self, event: Mapping[str, object], body: bytes) -> None:
        await self.prepare()
        client = self._client
        if client is None:  # pragma: no cover  # prepare() just made it
            raise RuntimeError("webhook sink without a client")
        failure = ""
        for tried in range(self.attempts):
            if tried:
                await asyncio.sleep(self.backoff_s * 4 ** (tried - 1))  # 1 s, 4 s, 16 s...
            try:
                # Streamed, so an answer's body is never read: only its status matters.
                async with client.stream("POST", self.url, content=body) as response:
                    status = response.status_code
            except httpx.TimeoutException:
                failure = f"no answer within {self.timeout_s:g}s"
                continue
            except httpx.ConnectError as exc:  # the transport has retried the connection already
                raise DeliveryError(f"{self.host}: {one_line(str(exc), 200)}") from None
            except httpx.TransportError as exc:  # the connection broke mid-request
                failure = one_line(f"{type(exc).__name__}: {exc}", 200)
                continue
            if 200 <= status < 300:
                return
            if status != 429 and status < 500:
                raise DeliveryError(f"{self.host} answered HTTP {status}")
            failure = f"HTTP {status}"
        raise DeliveryError(f"{self.host}: {failure} (gave up after {self.attempts} attempts)")


class _Notifier(Protocol):
    """The part of `apprise.Apprise` tokend uses."""

    def add(self, url: str, /) -> bool: ...

    def notify(self, body: str, title: str = ..., notify_type: str = ...) -> object: ...


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _apprise_target(number: int, url: str) -> _Notifier:
    """An `apprise.Apprise` holding `url`; raises ConfigError naming the entry, never the URL."""
    scheme = url.partition("://")[0].lower()
    try:
        module = importlib.import_module("apprise")
    except ImportError as exc:
        raise ConfigError(
            f"alerts.apprise: apprise cannot be imported ({exc}): pip install tokend[apprise]"
        ) from None
    target: _Notifier = module.Apprise()
    # Apprise logs a URL it cannot parse in full, token included; tokend's own error replaces it.
    quiet = _DropAll()
    apprise_logger = logging.getLogger("apprise")
    apprise_logger.addFilter(quiet)
    try:
        accepted = target.add(url)
    finally:
        apprise_logger.removeFilter(quiet)
    if not accepted:
        raise ConfigError(
            f"alerts.apprise: entry {number} ({scheme}://…) is not a URL apprise can use; "
            f"see apprise's documentation of {scheme}://"
        )
    return target


class AppriseSink:
    """One Apprise URL, notified in a thread of its own (notify() blocks)."""

    def __init__(self, number: int, url: str, *, timeout_s: float) -> None:
        self.number = number
        self.url = url
        self.name = f"apprise #{number} ({url.partition('://')[0].lower()})"
        self.timeout_s = timeout_s
        self._target: _Notifier | None = None
        # Not the default executor: a stuck notification must not hold the threads that the
        # daemon's keyring calls run in.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokend-apprise")

    async def prepare(self) -> None:
        if self._target is None:
            self._target = await asyncio.get_running_loop().run_in_executor(
                self._executor, _apprise_target, self.number, self.url
            )

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def deliver(self, event: Mapping[str, object], body: bytes) -> None:
        await self.prepare()
        target = self._target
        if target is None:  # pragma: no cover  # prepare() just made it
            raise RuntimeError("apprise sink without a target")
        title, text, kind = _apprise_message(event)
        call = functools.partial(target.notify, body=text, title=title, notify_type=kind)
        try:
            async with asyncio.timeout(self.timeout_s):
                loop = asyncio.get_running_loop()
                delivered = bool(await loop.run_in_executor(self._executor, call))
        except TimeoutError:
            raise DeliveryError(f"apprise did not finish within {self.timeout_s:g}s") from None
        if not delivered:
            raise DeliveryError("apprise could not deliver it (its log lines say why)")


def _apprise_message(event: Mapping[str, object]) -> tuple[str, str, str]:
    """Title ("tokend: needs_reauth github"), body (message, action, host) and apprise type."""
    name = str(event.get("event"))
    connector = event.get("connector")
    title = f"tokend: {name}" + (f" {connector}" if connector else "")
    if event.get("reminder"):
        title += " (reminder)"
    lines = [str(event.get("message"))]
    if event.get("action"):
        lines.append(f"run: {event['action']}")
    lines.append(f"host: {event.get('host')}")
    kind = "success" if name == "recovered" else "info" if name == "test" else "failure"
    return title, "\n".join(lines), kind


def build_sinks(
    settings: AlertSettings,
    *,
    exec_timeout_s: float,
    webhook_timeout_s: float,
    webhook_attempts: int,
    webhook_backoff_s: float,
) -> list[Sink]:
    """The sinks `settings` configures: exec, webhook, then each Apprise URL in order."""
    sinks: list[Sink] = []
    if settings.exec:
        sinks.append(ExecSink(settings.exec, timeout_s=exec_timeout_s))
    if settings.webhook:
        sinks.append(
            WebhookSink(
                settings.webhook,
                timeout_s=webhook_timeout_s,
                attempts=webhook_attempts,
                backoff_s=webhook_backoff_s,
            )
        )
    for number, url in enumerate(settings.apprise, 1):
        sinks.append(AppriseSink(number, url, timeout_s=APPRISE_TIMEOUT_S))
    return sinks


async def attempt(sink: Sink, event: Mapping[str, object], body: bytes) -> str | None:
    """Deliver `event` to `sink`: None when delivered, else why not. Raises only on cancellation."""
    try:
        await sink.deliver(event, body)
    except DeliveryError as exc:
        return str(exc)
    except Exception as exc:  # a bug in one sink must not end alerting: logged, reported, go on
        logger.exception("alert sink %s failed unexpectedly", sink.name)
        return f"internal error ({type(exc).__name__})"
    return None
