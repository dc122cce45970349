"""The relay as a user gets it: default limits slow clients down and lose nothing.

The relay runs as a process with its default ``websocket`` settings (the packet
rate limit included); the clients are ``websockets``, which read everything the
relay sends. Only ``batch.max_size`` is raised where a test moves 100,000 events,
so that STAG's stand-in is not the bottleneck: it limits nothing a client sees.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from tests.support.clients import connect_relay, pose_packet
from tests.support.relays import RelayProcess
from tests.support.stag_server import StagServer
from tests.support.workerprocs import metric

# A client waits this long for what it expects from the relay before the test fails.
REPLY_TIMEOUT = 60.0


@pytest.fixture
def relay_at_defaults(stag: StagServer) -> Iterator[RelayProcess]:
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            "RELAY_BATCH_MAX_SIZE": "100",
        },
        lift_rate=False,
    )
    try:
        yield relay
    finally:
        relay.kill()


def policy_closes(port: int) -> float:
    return sum(
        metric(port, "relay_policy_closes_total", {"reason": reason})
        for reason in ("invalid_packets", "slow_reader")
    ) + metric(port, "relay_heartbeat_timeouts_total")


@pytest.mark.slow
def test_clients_far_over_the_packet_rate_are_slowed_and_lose_nothing(
    stag: StagServer, relay_at_defaults: RelayProcess
) -> None:
    port = relay_at_defaults.port()
    clients, per_client = 20, 5_000

    def stream(n: int) -> int | None:
        with connect_relay(port) as ws:
            for frame in range(1, per_client + 1):
                ws.send(pose_packet(f"fast-{n}", frame))
            ws.close()
            # Closed by us, answered by the relay with our code: never closed by it.
            return ws.close_code

    with ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(stream, range(clients)))
    assert codes == [1000] * clients
    events = stag.wait_for_events(clients * per_client, timeout=300)
    assert len({e["event_id"] for e in events}) == clients * per_client
    assert policy_closes(port) == 0
    assert metric(port, "relay_throttled_seconds_total") > 0
    relay_at_defaults.proc.send_signal(signal.SIGTERM)
    assert relay_at_defaults.wait() == 0


def test_a_burst_then_sigterm_delivers_all_of_it_and_closes_1001(
    stag: StagServer, relay_at_defaults: RelayProcess
) -> None:
    port = relay_at_defaults.port()
    with connect_relay(port) as ws:
        for frame in range(1, 501):
            ws.send(pose_packet("burst", frame))
        relay_at_defaults.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=REPLY_TIMEOUT)
        assert ws.close_code == 1001
    assert relay_at_defaults.wait() == 0
    assert sorted(e["frame_number"] for e in stag.events()) == list(range(1, 501))
    summary = relay_at_defaults.wait_for_log("shutdown complete")
    assert summary["events_undelivered"] == 0


def account_for(ws: ClientConnection, invalid: int) -> list[dict[str, Any]]:
    """Replies until every invalid packet is answered or counted as suppressed."""
    replies: list[dict[str, Any]] = []
    accounted = 0
    while accounted < invalid:
        reply = orjson.loads(ws.recv(timeout=REPLY_TIMEOUT))
        replies.append(reply)
        accounted += (reply["code"] == "invalid_packet") + reply.get("suppressed", 0)
    assert accounted == invalid
    return replies


def test_a_burst_of_garbage_around_valid_packets_is_answered_and_the_connection_lives(
    stag: StagServer, relay_at_defaults: RelayProcess
) -> None:
    port = relay_at_defaults.port()
    with connect_relay(port) as ws:
        # Nine unparsable packets before each valid one: never max_invalid_packets
        # (100) in a row, far more than the replies a client is sent at once.
        for frame in range(1, 101):
            for _ in range(9):
                ws.send("not json {")
            ws.send(pose_packet("garbled", frame))
        replies = account_for(ws, 900)
        assert {reply["type"] for reply in replies} == {"error"}
        assert any(reply.get("suppressed") for reply in replies)
        # Still open, still answering.
        assert ws.ping().wait(REPLY_TIMEOUT)
        ws.close()
        assert ws.close_code == 1000
    events = stag.wait_for_events(100, timeout=REPLY_TIMEOUT)
    assert sorted(e["frame_number"] for e in events) == list(range(1, 101))
    assert policy_closes(port) == 0
    assert (
        metric(
            port,
            "relay_packets_total",
            {"type": "unknown", "status": "invalid", "dialect": "streamkit"},
        )
        == 900
    )
