"""The poller over real sockets (Unix socket pairs in this process), under trio's mock
clock: what a follower gets, in what order, and what it is not given."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.pipeline.poller import AVAILABLE, Poller

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="the poller needs epoll (Linux)")

END = b"<end>"


class Reader:
    """A follower's on_read: keeps what it is given, and returns ``"stop"`` once the
    bytes end with ``stop_at`` and ``"gone"`` at the end of the stream."""

    def __init__(self, stop_at: bytes | None = None) -> None:
        self.data = b""
        self.reads: list[bytes] = []
        self.stop_at = stop_at

    def __call__(self, data: bytes) -> str | None:
        if not data:
            return "gone"
        self.reads.append(data)
        self.data += data
        if self.stop_at is not None and self.data.endswith(self.stop_at):
            return "stop"
        return None


def pair() -> tuple[socket.socket, socket.socket]:
    """(the relay's end, non-blocking; the client's end)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, theirs


async def follow(
    nursery: trio.Nursery,
    poller: Poller[str],
    sock: socket.socket,
    on_read: Callable[[bytes], str | None],
) -> list[str | None]:
    """Follow ``sock`` in a task of its own; the list gets what follow returned."""
    results: list[str | None] = []

    async def run() -> None:
        results.append(await poller.follow(sock.fileno(), on_read))

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return results


async def test_each_follower_gets_its_own_bytes_in_order_until_it_says_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            socks = [pair() for _ in range(3)]
            readers = [Reader(stop_at=END) for _ in socks]
            results = [
                await follow(nursery, poller, ours, reader)
                for (ours, _), reader in zip(socks, readers, strict=True)
            ]
            assert len(poller) == 3
            for n in range(5):
                for i, (_, theirs) in enumerate(socks):
                    theirs.send(f"{i}:{n};".encode())
                await trio.testing.wait_all_tasks_blocked()
            for _, theirs in socks:
                theirs.send(END)
            await trio.testing.wait_all_tasks_blocked()
            assert results == [["stop"], ["stop"], ["stop"]]
            assert len(poller) == 0
            for i, reader in enumerate(readers):
                assert reader.data == b"".join(f"{i}:{n};".encode() for n in range(5)) + END
            nursery.cancel_scope.cancel()


class TurnCounts:
    """What on_read defers to the end of the poller's turn: bytes read, written there."""

    def __init__(self) -> None:
        self.pending = 0
        self.written = 0

    def counting(self, reader: Reader) -> Callable[[bytes], str | None]:
        def on_read(data: bytes) -> str | None:
            self.pending += len(data)
            return reader(data)

        return on_read

    def end_of_turn(self) -> None:
        self.written += self.pending
        self.pending = 0


async def test_what_a_turn_defers_is_done_before_any_other_task_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counts = TurnCounts()
    # What every other task finds pending, each time it runs.
    seen: list[int] = []
    sent = 0
    with Poller[str](lambda: 65536, counts.end_of_turn) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            socks = [pair() for _ in range(3)]
            # Bytes waiting before the follow are read in the follower's own task.
            socks[0][1].send(b"early")
            sent += 5

            async def follower(sock: socket.socket) -> None:
                await poller.follow(sock.fileno(), counts.counting(Reader(stop_at=END)))
                seen.append(counts.pending)

            for ours, _ in socks:
                nursery.start_soon(follower, ours)
                await trio.testing.wait_all_tasks_blocked()
                seen.append(counts.pending)
            for n in range(5):
                for _, theirs in socks:
                    sent += theirs.send(b"pose %d;" % n)
                await trio.testing.wait_all_tasks_blocked()
                seen.append(counts.pending)
            for _, theirs in socks:
                sent += theirs.send(END)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    # Three followers stopped, and the test looked after every step.
    assert len(seen) == 3 + 3 + 5
    assert set(seen) == {0}
    assert counts.written == sent


async def test_a_socket_whose_task_has_it_is_not_read_and_nothing_is_missed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Bytes that come while the connection's own task has the socket stay in it (that
    is backpressure) and are read when it follows again, though their edge is past."""
    ours, theirs = pair()
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            reader = Reader(stop_at=b"!")
            results = await follow(nursery, poller, ours, reader)
            theirs.send(b"first!")
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["stop"]
            theirs.send(b"second")
            await trio.testing.wait_all_tasks_blocked()
            assert reader.data == b"first!"
            assert ours.recv(6, socket.MSG_PEEK) == b"second"
            reader.stop_at = b"third"
            results = await follow(nursery, poller, ours, reader)
            assert reader.data == b"first!second"
            theirs.send(b"third")
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["stop"]
            assert reader.data == b"first!secondthird"
            nursery.cancel_scope.cancel()


async def test_a_read_that_fills_its_buffer_is_followed_by_another_without_a_new_edge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = pair()
    with Poller[str](lambda: 4) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            reader = Reader()
            await follow(nursery, poller, ours, reader)
            theirs.send(b"0123456789")
            await trio.testing.wait_all_tasks_blocked()
            assert reader.reads == [b"0123", b"4567", b"89"]
            nursery.cancel_scope.cancel()


async def test_the_end_of_the_stream_and_a_reset_are_empty_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            closed, reset, last_words = pair(), pair(), pair()
            readers = [Reader() for _ in range(3)]
            results = [
                await follow(nursery, poller, ours, reader)
                for (ours, _), reader in zip((closed, reset, last_words), readers, strict=True)
            ]
            closed[1].close()
            # SO_LINGER 0: the close is a reset (ECONNRESET on a TCP read; on a Unix
            # socket, the end), either way the end of the stream for the follower.
            reset[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            reset[1].close()
            # Bytes and the end in one go: one edge for both, and the end is still seen.
            last_words[1].send(b"last words")
            last_words[1].shutdown(socket.SHUT_WR)
            await trio.testing.wait_all_tasks_blocked()
            assert results == [["gone"], ["gone"], ["gone"]]
            assert readers[2].data == b"last words"
            nursery.cancel_scope.cancel()


async def test_a_cancelled_follower_leaves_its_bytes_in_its_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = pair()
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            reader = Reader()
            with trio.CancelScope() as scope:
                scope.cancel()
                assert await poller.follow(ours.fileno(), reader) is None
            assert len(poller) == 0
            theirs.send(b"kept")
            await trio.testing.wait_all_tasks_blocked()
            assert reader.data == b""
            assert ours.recv(4) == b"kept"
            nursery.cancel_scope.cancel()


async def test_a_cancel_reaches_a_follower_whose_socket_always_has_bytes_waiting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection whose every follow finds bytes waiting (a client that floods while
    its reads must wait for room) never parks; a drain must still stop its reading."""
    ours, theirs = pair()
    theirs.send(b"x" * 100)
    reads: list[bytes] = []

    def must_wait(data: bytes) -> str:
        reads.append(data)
        return "wait for room"

    with Poller[str](lambda: 4) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            with trio.CancelScope() as draining:
                assert await poller.follow(ours.fileno(), must_wait) == "wait for room"
                draining.cancel()
                while True:
                    await poller.follow(ours.fileno(), must_wait)
            assert reads == [b"xxxx"]
            nursery.cancel_scope.cancel()


async def test_an_error_in_one_followers_on_read_is_raised_in_its_task_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    (bad, bad_client), (good, good_client) = pair(), pair()

    def broken(data: bytes) -> str | None:
        raise RuntimeError("a bug in one connection's handling")

    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            raised: list[BaseException] = []

            async def follow_broken() -> None:
                try:
                    await poller.follow(bad.fileno(), broken)
                except RuntimeError as exc:
                    raised.append(exc)

            nursery.start_soon(follow_broken)
            reader = Reader(stop_at=b".")
            results = await follow(nursery, poller, good, reader)
            bad_client.send(b"x")
            good_client.send(b"a")
            await trio.testing.wait_all_tasks_blocked()
            assert [str(exc) for exc in raised] == ["a bug in one connection's handling"]
            good_client.send(b".")
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["stop"]
            assert reader.data == b"a."
            nursery.cancel_scope.cancel()


async def test_followers_are_woken_with_none_when_the_poller_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, _theirs = pair()
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            polling = trio.CancelScope()

            async def run_poller() -> None:
                with polling:
                    await poller.run()

            nursery.start_soon(run_poller)
            results = await follow(nursery, poller, ours, Reader())
            polling.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert results == [None]
            # A poller that stopped is not followed: read the socket yourself.
            assert await poller.follow(ours.fileno(), Reader()) is None


async def test_a_forgotten_fd_number_serves_the_next_socket_that_gets_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The poller keeps a socket in its epoll set from the first follow to forget; the
    number of a closed socket comes back for the next one, which must be read."""
    with Poller[str](lambda: 65536) as poller:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            old, old_client = pair()
            results = await follow(nursery, poller, old, Reader(stop_at=b"."))
            old_client.send(b".")
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["stop"]
            number = old.fileno()
            poller.forget(number)
            old.close()
            old_client.close()
            # The next socket takes the old number (either end of a pair is as good).
            one, other = socket.socketpair()
            new, new_client = (other, one) if other.fileno() == number else (one, other)
            if new.fileno() != number:
                new = socket.socket(fileno=_move_fd(new.detach(), number))
            new.setblocking(False)
            assert new.fileno() == number
            reader = Reader(stop_at=b".")
            results = await follow(nursery, poller, new, reader)
            new_client.send(b"new.")
            await trio.testing.wait_all_tasks_blocked()
            assert results == ["stop"]
            assert reader.data == b"new."
            nursery.cancel_scope.cancel()


def _move_fd(fd: int, number: int) -> int:
    os.dup2(fd, number)
    os.close(fd)
    return number


@settings(max_examples=50, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
    read_size=st.integers(min_value=1, max_value=512),
    away_after=st.integers(min_value=0, max_value=20),
    wait_before_closing=st.booleans(),
)
def test_whatever_the_chunks_and_read_size_the_bytes_arrive_whole_and_in_order(
    chunks: list[bytes], read_size: int, away_after: int, wait_before_closing: bool
) -> None:
    """Sent in any pieces, read any size at a time, with the connection's task taking
    the socket for a while in between, closed at once or later: every byte reaches
    on_read once, in order, and then the end of the stream."""

    async def main() -> None:
        ours, theirs = pair()
        reads: list[bytes] = []
        seen = 0

        def on_read(data: bytes) -> str | None:
            nonlocal seen
            reads.append(data)
            seen += 1
            if not data:
                return "gone"
            return "away" if seen == away_after else None

        with Poller[str](lambda: read_size) as poller:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run)
                results = await follow(nursery, poller, ours, on_read)
                for chunk in chunks[:-1]:
                    theirs.send(chunk)
                    await trio.testing.wait_all_tasks_blocked()
                theirs.send(chunks[-1])
                if wait_before_closing:
                    await trio.testing.wait_all_tasks_blocked()
                theirs.close()
                await trio.testing.wait_all_tasks_blocked()
                if results == ["away"]:
                    # The connection's task had the socket meanwhile, and follows again.
                    results = await follow(nursery, poller, ours, on_read)
                assert results == ["gone"]
                nursery.cancel_scope.cancel()
        ours.close()
        assert reads[-1] == b""
        assert b"".join(reads) == b"".join(chunks)
        assert all(len(read) <= read_size for read in reads)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
