"""Shared fixtures: the anyio backend, the loopback authorization server, short temp dirs."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import short_tmp
from tests.sites import Site
from tokend.authserver import AuthServer
from tokend.oauth.client import make_http_client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temp dir for sockets (AF_UNIX paths are limited to ~107 bytes)."""
    root = short_tmp()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    """The loopback authorization server: rotating refresh tokens with reuse detection."""
    with AuthServer(lifetime_s=30.0) as server:
        yield server


@pytest.fixture
def site() -> Iterator[Site]:
    """A fresh loopback server per test; unknown paths answer 404."""
    server = Site()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client as tokend makes them (no redirects, bounded)."""
    async with make_http_client(timeout_s=10.0) as client:
        yield client
