"""The relay under a stand-in for systemd: sd_notify messages over a socket the test owns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support.relays import RelayProcess
from tests.support.stag_server import DEFAULT_WAIT, StagServer
from tests.support.waiting import poll_until


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
    directory = tempfile.mkdtemp(prefix="sdn-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, "notify"))
    # A bound on each wait for a message, not a pause: messages arrive as they are sent.
    sock.settimeout(DEFAULT_WAIT)
    with sock:
        yield sock
    shutil.rmtree(directory)


def next_with(sock: socket.socket, field: str, seen: list[dict[str, str]]) -> dict[str, str]:
    """Read datagrams until one carries ``field``; every one read is kept in ``seen``.

    Within DEFAULT_WAIT in all: the watchdog's datagrams keep coming, so the socket's
    timeout alone would never end the wait for a field that does not come.
    """
    deadline = time.monotonic() + DEFAULT_WAIT
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {field} within {DEFAULT_WAIT} s; received: {seen}")
        text = sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in text.splitlines())
        seen.append(message)
        if field in message:
            return message


def under_systemd(stag: StagServer, notify_socket: socket.socket, **env: str) -> RelayProcess:
    """``python -m stag_relay`` as systemd would start it, notifying ``notify_socket``."""
    return RelayProcess(
        {
            "NOTIFY_SOCKET": notify_socket.getsockname(),
            # 200ms: a keep-alive every 100ms, so the test need not wait long for one.
            "WATCHDOG_USEC": "200000",
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            **env,
        }
    )


def test_ready_watchdog_reload_and_stopping_in_order(
    stag: StagServer, notify_socket: socket.socket
) -> None:
    relay = under_systemd(stag, notify_socket)
    seen: list[dict[str, str]] = []
    try:
        ready = next_with(notify_socket, "READY", seen)
        assert ready["STATUS"] == f"listening on port {relay.port()}"
        next_with(notify_socket, "WATCHDOG", seen)

        relay.proc.send_signal(signal.SIGHUP)
        reloading = next_with(notify_socket, "RELOADING", seen)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert next_with(notify_socket, "READY", seen)["STATUS"] == "configuration reloaded"
        next_with(notify_socket, "WATCHDOG", seen)

        relay.proc.send_signal(signal.SIGTERM)
        next_with(notify_socket, "STOPPING", seen)
        assert relay.wait() == 0
    finally:
        relay.kill()
    # Keep-alives may come before READY (the watchdog task starts with the relay),
    # but nothing else does.
    first_ready = next(i for i, message in enumerate(seen) if "READY" in message)
    assert all(set(message) == {"WATCHDOG"} for message in seen[:first_ready])


def test_with_workers_the_supervisor_alone_notifies_ready_once_all_listen(
    stag: StagServer, notify_socket: socket.socket
) -> None:
    relay = under_systemd(stag, notify_socket, RELAY_SERVER_WORKERS="2")
    seen: list[dict[str, str]] = []
    try:
        ready = next_with(notify_socket, "READY", seen)
        # Both workers were listening before the supervisor said READY: each logs that
        # before it notifies, and the supervisor logs "relay ready" as it notifies.
        before = relay.lines[: relay.lines.index(relay.wait_for_log("relay ready"))]
        listening = [line for line in before if line.get("event") == "relay listening"]
        assert sorted(line["worker"] for line in listening) == [0, 1], "".join(relay.raw)
        assert ready["STATUS"] == f"2 workers listening on port {relay.port()}"
        next_with(notify_socket, "WATCHDOG", seen)

        relay.proc.send_signal(signal.SIGHUP)
        next_with(notify_socket, "RELOADING", seen)
        reloaded = next_with(notify_socket, "READY", seen)
        assert reloaded["STATUS"] == "configuration reloaded in 2 of 2 workers"
        # The workers log it before they notify; this test reads their log in a thread.
        poll_until(
            lambda: (
                sorted(
                    line["worker"]
                    for line in relay.lines
                    if line.get("event") == "configuration reloaded" and "worker" in line
                )
                == [0, 1]
            )
        )

        relay.proc.send_signal(signal.SIGTERM)
        next_with(notify_socket, "STOPPING", seen)
        assert relay.wait() == 0
    finally:
        relay.kill()
    # Only the supervisor's messages reach systemd: one READY at start, one per reload.
    assert sum("READY" in message for message in seen) == 2
