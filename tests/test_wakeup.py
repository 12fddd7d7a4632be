"""The lanes' wake-up: an Event whose descriptor a lane can poll beside its connection."""

from __future__ import annotations

import select
import threading
import time

from themis_pg.worker.lane import Wakeup


def readable(wake: Wakeup, timeout_s: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(wake.fileno(), select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def test_the_descriptor_is_readable_exactly_while_set():
    wake = Wakeup()
    assert not wake.is_set() and not readable(wake)
    wake.set()
    wake.set()  # a second set adds nothing to clear
    assert wake.is_set() and readable(wake) and wake.wait(0)
    wake.clear()
    assert not wake.is_set() and not readable(wake) and not wake.wait(0.01)


def test_a_set_from_another_thread_ends_a_poll():
    wake = Wakeup()
    timer = threading.Timer(0.05, wake.set)
    started = time.monotonic()
    timer.start()
    assert readable(wake, timeout_s=5)
    assert time.monotonic() - started < 2
    timer.join()


def test_many_sets_without_a_clear_never_block_the_setter():
    wake = Wakeup()
    for _ in range(100_000):  # more than a pipe holds, were each set to write
        wake.set()
        wake._flag.clear()  # as if a racing clear() had drained nothing yet
    assert readable(wake)
    wake.clear()
    assert not readable(wake)
