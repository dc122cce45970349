"""Graceful shutdown: in-process (the sequence) and as a real process (signals, exit codes)."""

from __future__ import annotations

import signal
import threading

import pytest
import trio
from websockets.exceptions import ConnectionClosed

from stag_relay.service.relay import Relay
from tests.support.clients import connect_relay, pose_packet
from tests.support.relays import RelayProcess, make_config
from tests.support.stag_server import StagServer


def stream_until_closed(port: int, session_id: str, codes: list[int | None]) -> int:
    """Send pose packets until the relay closes the connection; return how many were sent."""
    sent = 0
    with connect_relay(port) as ws:
        try:
            while True:
                sent += 1
                ws.send(pose_packet(session_id, sent))
        except ConnectionClosed as closed:
            codes.append(closed.rcvd.code if closed.rcvd else None)
    return sent


async def test_shutdown_mid_stream_delivers_everything_read_and_closes_1001(
    stag: StagServer,
) -> None:
    relay = Relay(make_config(stag.url, batch={"max_size": 50}))
    codes: list[int | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        async with trio.open_nursery() as clients:
            for n in range(5):
                clients.start_soon(
                    trio.to_thread.run_sync, stream_until_closed, relay.ports[0], f"s{n}", codes
                )
            await trio.to_thread.run_sync(stag.wait_for_events, 2000)
            relay.shut_down()
    # relay.run has returned: the sequence ran to its end.
    assert codes == [1001] * 5
    read = relay.gate.events_in
    assert read >= 2000
    assert len(stag.events()) == read
    assert len(set(stag.event_ids())) == read
    dropped = relay.metrics.registry.get_sample_value(
        "relay_events_dropped_total", {"reason": "shutdown"}
    )
    assert dropped == 0


async def test_what_stag_never_takes_is_counted_when_the_timeout_runs_out(
    stag: StagServer,
) -> None:
    relay = Relay(make_config(stag.url, batch={"max_size": 1}, server={"shutdown_timeout": 0.5}))
    stag.reject_all(503)

    def send() -> None:
        with connect_relay(relay.ports[0]) as ws:
            for frame in range(1, 4):
                ws.send(pose_packet("stuck", frame))

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        await trio.to_thread.run_sync(send)
        await trio.to_thread.run_sync(stag.wait_for_requests, 3)
        relay.shut_down()
    assert relay.gate.events_in == 3
    assert stag.events() == []
    dropped = relay.metrics.registry.get_sample_value(
        "relay_events_dropped_total", {"reason": "shutdown"}
    )
    assert dropped == 3


@pytest.mark.slow
def test_sigterm_mid_stream_exits_0_with_everything_read_delivered(stag: StagServer) -> None:
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            "RELAY_BATCH_MAX_SIZE": "100",
        }
    )
    try:
        port = relay.port()
        codes: list[int | None] = []
        threads = [
            threading.Thread(target=stream_until_closed, args=(port, f"p{n}", codes))
            for n in range(4)
        ]
        for thread in threads:
            thread.start()
        stag.wait_for_events(2000, timeout=60)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=60) == 0
        for thread in threads:
            thread.join(timeout=60)
        assert codes == [1001] * 4
        summary = relay.wait_for_log("shutdown complete")
        assert summary["events_undelivered"] == 0
        assert summary["events_read"] == len(stag.events()) == len(set(stag.event_ids()))
        assert "Traceback" not in "".join(relay.raw)
    finally:
        relay.kill()


def test_a_second_sigint_exits_at_once(stag: StagServer) -> None:
    stag.pause()  # STAG holds the request, so draining would wait out the timeout
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            "RELAY_BATCH_MAX_SIZE": "1",
            "RELAY_SERVER_SHUTDOWN_TIMEOUT": "10m",
        }
    )
    try:
        port = relay.port()
        with connect_relay(port) as ws:
            ws.send(pose_packet("interrupted", 1))
        stag.wait_for_in_flight(1)
        relay.proc.send_signal(signal.SIGINT)
        relay.wait_for_log("signal received, draining")
        relay.proc.send_signal(signal.SIGINT)
        assert relay.wait(timeout=60) == 130
    finally:
        stag.resume()
        relay.kill()
