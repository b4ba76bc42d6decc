"""sd_notify on a real AF_UNIX datagram NOTIFY_SOCKET: sending never blocks the caller."""

from __future__ import annotations

import logging
import socket
import time

from tokend.notify import Notifier


def _undrained(root, monkeypatch) -> socket.socket:
    """A bound datagram socket, named by NOTIFY_SOCKET, that nobody reads."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(root / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(root / "notify.sock"))
    return listener


def test_full_notify_queue_drops_and_counts_without_blocking(tmp_short, caplog, monkeypatch):
    """Sends to a NOTIFY_SOCKET nobody drains return at once; past the kernel's queue the
    datagrams are dropped and counted, with one warning for the lot."""
    listener = _undrained(tmp_short, monkeypatch)
    try:
        notifier = Notifier()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="tokend.notify"):
            for _ in range(200):
                notifier.watchdog()
        assert time.monotonic() - started < 5
        assert 0 < notifier.dropped <= 200
        assert len([r for r in caplog.records if r.name == "tokend.notify"]) == 1
        notifier.close()
    finally:
        listener.close()


def test_state_message_waits_for_room_and_goes_in_order(tmp_short, monkeypatch):
    """READY and STATUS lines the full queue refused are sent, in order, at the next watchdog
    tick once the queue has room; a newer STATUS replaces a waiting one."""
    listener = _undrained(tmp_short, monkeypatch)
    try:
        notifier = Notifier()
        while notifier.dropped == 0:
            notifier.watchdog()
        notifier.ready("starting")  # the queue is full: these wait
        notifier.status("1 refreshing")
        notifier.status("1 ok")
        listener.setblocking(False)
        queued = 0
        while True:
            try:
                assert listener.recv(4096) == b"WATCHDOG=1"
            except BlockingIOError:
                break
            queued += 1
        assert queued >= 1
        notifier.watchdog()
        got = [listener.recv(4096) for _ in range(3)]
        assert got == [b"READY=1\nSTATUS=starting", b"STATUS=1 ok", b"WATCHDOG=1"]
        notifier.close()
    finally:
        listener.close()


def test_abstract_and_missing_socket(tmp_short):
    """An abstract-namespace address is used as such; a missing socket costs nothing at all."""
    name = f"tokend-test-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("starting")
        assert listener.recv(4096) == b"READY=1\nSTATUS=starting"
        notifier.close()
    finally:
        listener.close()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_short / "absent.sock")})
    gone.watchdog()
    assert gone.dropped == 1
    gone.close()
    assert not Notifier({}).enabled
