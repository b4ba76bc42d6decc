"""Shared fixtures: the anyio backend, the loopback authorization server, short temp dirs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import short_tmp
from tokend.authserver import AuthServer


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
