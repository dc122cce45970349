"""Waiting for state that changes outside the test's control (another thread, a socket)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

# Far beyond anything a passing test needs; short enough that a failing one reports.
DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


async def wait_until(
    predicate: Callable[[], object], *, limit: float = DEFAULT_TIMEOUT, what: str | None = None
) -> None:
    """Return once ``predicate()`` is true; fail the test after ``limit`` seconds,
    saying it waited for ``what`` (the predicate by default).

    A poll, not a sleep that hopes: it returns the moment the condition holds and
    fails loudly if it never does. For state owned by other threads or processes, or
    that a task keeps without an event to wait on (the checkpoints let it progress).
    """
    with trio.move_on_after(limit) as scope:
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {limit} s waiting for {what or predicate}")


def poll_until(predicate: Callable[[], T], *, limit: float = DEFAULT_TIMEOUT) -> T:
    """``wait_until`` for plain (thread) code: state owned by another process.

    Returns what ``predicate`` returned the time it was true, for a test that goes on
    with the very figures that satisfied it (a second read could differ).
    """
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit} s: {predicate}")
        time.sleep(0.01)
    return value
