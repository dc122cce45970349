"""sd_notify: datagrams on a real AF_UNIX socket the test owns; the watchdog under a mock clock."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from stag_relay.service.systemd import (
    Notifier,
    StatusSnapshot,
    format_status,
    monotonic_usec,
    run_watchdog,
)


class Receiver:
    """The systemd side: a datagram socket bound where $NOTIFY_SOCKET points."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.notify_socket, **extra}

    def datagrams(self) -> list[bytes]:
        """Everything sent so far (a local datagram is queued before sendto returns)."""
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return received


def fields(datagram: bytes) -> dict[str, str]:
    text = datagram.decode()
    assert text.endswith("\n")
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.fixture
def short_dir() -> Iterator[str]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    directory = tempfile.mkdtemp(prefix="sdn-")
    yield directory
    shutil.rmtree(directory)


def bind_path(directory: str) -> Receiver:
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return Receiver(sock, path)


def bind_abstract() -> Receiver:
    name = f"stag-relay-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    return Receiver(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, short_dir: str) -> Iterator[Receiver]:
    rx = bind_path(short_dir) if request.param == "path" else bind_abstract()
    with rx.sock:
        yield rx


# -- Notifier -----------------------------------------------------------------------------


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert not notifier.stopping("bye")


def test_each_message_is_one_datagram_of_fields(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    assert notifier.enabled
    assert notifier.ready("listening on port 8081")
    assert notifier.status("3 connections")
    assert notifier.watchdog()
    assert notifier.stopping()
    notifier.close()
    assert receiver.datagrams() == [
        b"READY=1\nSTATUS=listening on port 8081\n",
        b"STATUS=3 connections\n",
        b"WATCHDOG=1\n",
        b"STOPPING=1\n",
    ]


def test_reloading_carries_the_monotonic_clock(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    before = monotonic_usec()
    assert notifier.reloading("reloading configuration")
    after = monotonic_usec()
    [datagram] = receiver.datagrams()
    got = fields(datagram)
    assert got["RELOADING"] == "1"
    assert got["STATUS"] == "reloading configuration"
    # The same clock as ours, read while the message was built.
    assert before <= int(got["MONOTONIC_USEC"]) <= after


def test_a_newline_in_a_value_cannot_forge_a_field(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    assert notifier.status("bad\nREADY=1\r\n")
    assert receiver.datagrams() == [b"STATUS=bad READY=1  \n"]


@pytest.mark.parametrize("name", ["ready", "Status", "1X", "WATCH-DOG", ""])
def test_field_names_are_checked(receiver: Receiver, name: str) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    with pytest.raises(ValueError, match="sd_notify field name"):
        notifier.notify(**{name: 1})


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify", "@", "/with\0nul"])
def test_an_unsupported_socket_disables_notifying_and_says_so(value: str) -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert not notifier.ready()
    assert [entry["event"] for entry in logs] == [
        "NOTIFY_SOCKET not supported, not notifying systemd"
    ]


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        # Meant for another process (a parent that exec'd us without clearing it).
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_honours_watchdog_pid(
    receiver: Receiver, extra: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environ(receiver.environ(**extra), pid=4242)
    assert notifier.watchdog_interval == interval


def test_watchdog_pid_defaults_to_this_process(receiver: Receiver) -> None:
    env = receiver.environ(WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid()))
    assert Notifier.from_environ(env).watchdog_interval == 1.0


def test_a_missing_receiver_is_logged_once_until_it_returns(short_dir: str) -> None:
    path = os.path.join(short_dir, "notify")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    with capture_logs() as logs:
        # Nobody bound the path yet: every send fails, without raising, one log line.
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        with bind_path(short_dir).sock as sock:
            assert notifier.watchdog()
            assert notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1\n"
    assert [(entry["log_level"], entry["event"]) for entry in logs] == [
        ("warning", "cannot notify systemd"),
        ("info", "notifying systemd again"),
    ]
    assert logs[0]["socket"] == path
    assert "FileNotFoundError" in logs[0]["error"]


def test_a_full_receive_queue_does_not_block_the_sender(receiver: Receiver) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    # Nobody reads: the queue fills (net.unix.max_dgram_qlen, a few hundred at most)
    # and a blocking socket would hang here; ours reports the failure and goes on.
    with capture_logs() as logs:
        results = [notifier.watchdog() for _ in range(5000)]
    assert results[0]
    assert not results[-1]
    assert [entry["event"] for entry in logs] == ["cannot notify systemd"]
    assert "BlockingIOError" in logs[0]["error"]
    receiver.datagrams()
    assert notifier.watchdog()


# -- STATUS lines ---------------------------------------------------------------------------


def test_format_status_gives_rates_over_the_interval() -> None:
    before = StatusSnapshot(connections=0, events_received=100, events_sent=40)
    after = StatusSnapshot(connections=12, events_received=3500, events_sent=3425)
    assert format_status(after, before, 10.0) == (
        "12 connections, 340.0 events/s in, 338.5 events/s to STAG"
    )


def test_format_status_singular_draining_and_no_elapsed_time() -> None:
    snap = StatusSnapshot(connections=1, events_received=7, events_sent=7, draining=True)
    assert format_status(snap, snap, 0.0) == (
        "draining: 1 connection, 0.0 events/s in, 0.0 events/s to STAG"
    )


# -- run_watchdog ---------------------------------------------------------------------------


async def collect(receiver: Receiver, count: int) -> list[tuple[float, dict[str, str]]]:
    """The next ``count`` datagrams, each with the (mock) time it arrived."""
    sock = trio.socket.from_stdlib_socket(receiver.sock)
    received = []
    for _ in range(count):
        datagram = await sock.recv(4096)
        received.append((trio.current_time(), fields(datagram)))
    return received


def steady_traffic() -> StatusSnapshot:
    # 100 events/s in, 50 to STAG, as a function of the mock clock.
    now = trio.current_time()
    return StatusSnapshot(
        connections=3, events_received=round(100 * now), events_sent=round(50 * now)
    )


async def test_watchdog_pings_at_half_the_interval_with_status_lines(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier.from_environ(receiver.environ(WATCHDOG_USEC="4000000"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_watchdog, notifier, steady_traffic)
        received = await collect(receiver, 12)
        nursery.cancel_scope.cancel()
    status = "3 connections, 100.0 events/s in, 50.0 events/s to STAG"
    ping = {"WATCHDOG": "1"}
    # WatchdogSec=4s: a ping every 2s from the start, a STATUS line every 10s; when
    # both are due they share a datagram.
    assert received == [
        (0.0, ping),
        (2.0, ping),
        (4.0, ping),
        (6.0, ping),
        (8.0, ping),
        (10.0, {**ping, "STATUS": status}),
        (12.0, ping),
        (14.0, ping),
        (16.0, ping),
        (18.0, ping),
        (20.0, {**ping, "STATUS": status}),
        (22.0, ping),
    ]


async def test_without_a_watchdog_only_status_lines_are_sent(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier.from_environ(receiver.environ())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_watchdog(notifier, steady_traffic, status_interval=30.0))
        received = await collect(receiver, 2)
        nursery.cancel_scope.cancel()
    assert [at for at, _ in received] == [30.0, 60.0]
    assert all(set(got) == {"STATUS"} for _, got in received)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"},
    ],
)
async def test_with_nothing_to_send_the_task_returns_at_once(
    receiver: Receiver, autojump_clock: trio.testing.MockClock, environ: dict[str, str]
) -> None:
    notifier = Notifier.from_environ(receiver.environ(**environ))
    started = trio.current_time()
    await run_watchdog(notifier)
    await run_watchdog(Notifier(), steady_traffic)
    assert trio.current_time() == started
    assert receiver.datagrams() == []


async def test_the_watchdog_survives_a_receiver_that_went_away(
    short_dir: str, autojump_clock: trio.testing.MockClock
) -> None:
    rx = bind_path(short_dir)
    notifier = Notifier.from_environ(rx.environ(WATCHDOG_USEC="1000000"))
    rx.sock.close()
    os.unlink(rx.notify_socket)
    with capture_logs() as logs, trio.move_on_after(10):
        await run_watchdog(notifier)
    # 20 failed pings over 10s, one log line, and the task was still running when cancelled.
    assert trio.current_time() == 10
    assert [entry["event"] for entry in logs] == ["cannot notify systemd"]
