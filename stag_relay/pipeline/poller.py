"""One task that reads the sockets of every connection with nothing to wait for.

A connection whose client streams poses that fit in the queue needs nothing of its
own task between reads, yet a task per connection costs, on every read, a wake-up,
a re-arm of trio's one-shot epoll registration (a syscall), and the connection
logic run with caches cold from the other connections' turns. So a connection
with nothing to wait for *follows* the poller: its task parks, and the poller reads
every ready socket of a scheduler pass in a row and hands each read to the
connection's ``on_read`` at once. ``on_read`` returns None to go on following, or
what the connection's task must deal with itself (a mesh for its lane, events that
wait for room, the read throttle, an ending), which wakes the task with it; the
task follows again when it is done.

Sockets are in the poller's own epoll instance, edge-triggered, from a
connection's first ``follow`` to its ``forget``: no syscall per read but the read,
and none when a connection leaves and follows again. Edge-triggered means an edge
is reported once, so the poller remembers what it did not read: an edge while the
connection's task had the socket (read by ``follow`` before parking), and a read
that filled its buffer (read again in the next turn).

The order of one connection's reads is the order of its socket, and a connection
that waits is not read, so backpressure still reaches the client over TCP. Linux
only (epoll); elsewhere, and for TLS streams, each connection reads its own socket.
The poller knows fds and callbacks, not connections.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable
from typing import Final, Generic, TypeVar

import attrs
import outcome
import trio

T = TypeVar("T")

# Ready sockets taken from epoll per turn of the poller before it lets the other
# tasks run: at tens of microseconds a read, a turn stays within a few milliseconds.
READS_PER_TURN: Final = 64

AVAILABLE: Final = hasattr(select, "epoll")

# The peer hung up (or the socket failed): reads never block from then on, and the
# end of the stream comes with no edge of its own, so such a socket is read until
# it says so.
_HANGUP: Final = (
    getattr(select, "EPOLLRDHUP", 0)
    | getattr(select, "EPOLLHUP", 0)
    | getattr(select, "EPOLLERR", 0)
)


@attrs.define(slots=True)
class _Follower(Generic[T]):
    task: trio.lowlevel.Task
    on_read: Callable[[bytes], T | None]


class Poller(Generic[T]):
    """Reads followed sockets, ``read_size()`` bytes at a time, while ``run`` runs; a
    context manager (its epoll instance is closed on exit)."""

    def __init__(
        self, read_size: Callable[[], int], end_of_turn: Callable[[], None] | None = None
    ) -> None:
        self._epoll = select.epoll()
        self._read_size = read_size
        # Called when a turn's reads are all handed out, before any other task runs:
        # what the followers deferred to it is done before anyone can look.
        self._end_of_turn = end_of_turn if end_of_turn is not None else _nothing
        # The parked connections, by fd.
        self._followers: dict[int, _Follower[T]] = {}
        # Sockets in the epoll set (from a first follow to forget).
        self._registered: set[int] = set()
        # Sockets that may hold unread bytes no edge will announce again.
        self._unread: set[int] = set()
        # Followed sockets whose last read filled its buffer: read in the next turn.
        self._again: list[int] = []
        # Sockets whose peer hung up: read until the end of the stream.
        self._hung_up: set[int] = set()
        self._running = True

    def __enter__(self) -> Poller[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._epoll.close()

    def __len__(self) -> int:
        """Sockets followed now."""
        return len(self._followers)

    async def follow(self, fd: int, on_read: Callable[[bytes], T | None]) -> T | None:
        """Park until ``on_read`` (called with each read of ``fd``, ``b""`` at its end or
        on an error) returns something, and return that; None if the poller stopped
        (read the socket yourself). Cancelling this stops following at once: nothing
        read is lost, since every read went to ``on_read`` as it came. Call ``forget``
        before the socket is closed."""
        if not self._running:
            await trio.lowlevel.checkpoint()
            return None
        # A follower that always finds bytes waiting never parks below, so this is
        # where a cancel (a drain) reaches it; nothing is read yet.
        await trio.lowlevel.checkpoint_if_cancelled()
        if fd not in self._registered:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
            self._registered.add(fd)
            self._unread.add(fd)
        unread = self._unread
        while fd in unread:
            # Bytes that came while the connection's task had the socket: no edge
            # will say so again, so read them here, in the task that follows.
            unread.discard(fd)
            size = self._read_size()
            data = _read(fd, size)
            if data is None:
                break
            if data and (len(data) == size or fd in self._hung_up):
                unread.add(fd)
            try:
                result = on_read(data)
            finally:
                # A turn of one read: on_read counts on the turn's end as well.
                self._end_of_turn()
            if result is not None:
                # A checkpoint (others get their turn) that a cancel cannot interrupt:
                # the caller must get what on_read returned, or a read is lost.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return result
        self._followers[fd] = _Follower(trio.lowlevel.current_task(), on_read)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._leave(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        result = await trio.lowlevel.wait_task_rescheduled(abort)
        return result  # type: ignore[no-any-return]

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: out of the epoll set (a new socket may get its
        number)."""
        self._followers.pop(fd, None)
        self._unread.discard(fd)
        self._hung_up.discard(fd)
        if fd in self._registered:
            self._registered.discard(fd)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    async def run(self) -> None:
        """Read what the followed sockets bring until cancelled; then every follower is
        woken with None."""
        epoll = self._epoll
        followers = self._followers
        try:
            while True:
                if self._again:
                    # Full reads last turn: their sockets likely hold more, and no edge
                    # will say so; the other tasks get their turn first.
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                fds = []
                for fd, mask in epoll.poll(0, READS_PER_TURN):
                    fds.append(fd)
                    if mask & _HANGUP:
                        self._hung_up.add(fd)
                if self._again:
                    fds += self._again
                    self._again = []
                try:
                    self._turn(fds)
                finally:
                    self._end_of_turn()
        finally:
            self._running = False
            for fd in list(followers):
                self._wake(fd, outcome.Value(None))

    def _turn(self, fds: list[int]) -> None:
        """Read each of ``fds`` once and hand the read to its follower; no checkpoint."""
        followers = self._followers
        size = self._read_size()
        for fd in fds:
            follower = followers.get(fd)
            if follower is None:
                if fd in self._registered:
                    self._unread.add(fd)
                continue
            data = _read(fd, size)
            if data is None:
                continue
            # More to read that no edge will announce: a full buffer's worth,
            # or (after a hang-up) at least the end of the stream.
            full = bool(data) and (len(data) == size or fd in self._hung_up)
            try:
                result = follower.on_read(data)
            except Exception as exc:
                # A bug in one connection's handling ends that connection (its
                # task raises it), not the poller and every other connection.
                self._wake(fd, outcome.Error(exc))
                continue
            if result is not None:
                if full:
                    self._unread.add(fd)
                self._wake(fd, outcome.Value(result))
            elif full:
                self._again.append(fd)

    def _wake(self, fd: int, result: outcome.Outcome[T | None]) -> None:
        trio.lowlevel.reschedule(self._leave(fd).task, result)

    def _leave(self, fd: int) -> _Follower[T]:
        """The connection's task has the socket again; it stays in the epoll set, and
        an edge meanwhile is remembered (``_unread``)."""
        return self._followers.pop(fd)


def _nothing() -> None:
    pass


def _read(fd: int, size: int) -> bytes | None:
    """One read: None if there is nothing to read, ``b""`` at the end or on an error
    (a reset ends the stream, as the connection's own read says)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""
