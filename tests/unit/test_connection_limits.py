"""The gate's per-connection limits over in-memory streams, under trio's mock clock.

Packet rate, invalid streak, error reply budget, and clients that do not read.
The clock only moves when a test says so, so "one second later" is exact. The
client is wsproto driven by hand; it answers close frames so closes complete.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from stag_relay.eventqueue import EventReceiver, open_event_queue
from stag_relay.events import Event as SpatialEvent
from stag_relay.gate import SEND_TIMEOUT, Gate
from stag_relay.limits import ERROR_REPLY_BURST, FAR_OVER_FACTOR, FAR_OVER_WINDOWS
from stag_relay.metrics import RelayMetrics
from stag_relay.transform import Sessions
from tests.support.clients import pose_packet
from tests.support.memory_ws import MemoryClient, StreamPair
from tests.support.memory_ws import connect as open_client
from tests.support.relays import make_config

INVALID = '{"session_id": "s", "frame_number": -1}'


def build_gate(
    **websocket: Any,
) -> tuple[Gate, EventReceiver]:
    config = make_config("http://127.0.0.1:9", websocket=websocket)
    send, receive = open_event_queue(10_000)
    metrics = RelayMetrics()
    gate = Gate(
        config=config, sessions=Sessions(ttl=300.0, max_sessions=100), events=send, metrics=metrics
    )
    return gate, receive


def sample(gate: Gate, name: str, **labels: str) -> float:
    return gate.metrics.registry.get_sample_value(name, labels) or 0.0


async def connect(
    nursery: trio.Nursery,
    gate: Gate,
    pair: StreamPair = trio.testing.memory_stream_pair,
    *,
    reading: bool = True,
) -> MemoryClient:
    client = await open_client(nursery, gate, pair)
    if reading:
        nursery.start_soon(client.run)
    return client


def drain(events: EventReceiver) -> list[SpatialEvent]:
    received = []
    while True:
        try:
            received.append(events.receive_nowait())
        except trio.WouldBlock:
            return received


async def test_packets_over_the_rate_are_refused_counted_and_answered(
    mock_clock: trio.testing.MockClock,
) -> None:
    gate, events = build_gate(max_packets_per_second=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        burst = int(ERROR_REPLY_BURST)
        await client.send(*(pose_packet("rated", n) for n in range(1, 16 + burst)))
        await trio.testing.wait_all_tasks_blocked()
        # One second's worth passes; the rest is refused, counted and answered.
        assert [e.frame_number for e in drain(events)] == list(range(1, 11))
        refused = 5 + burst
        assert sample(gate, "relay_packets_total", type="unknown", status="rate_limited") == refused
        assert sample(gate, "relay_packets_total", type="pose", status="ok") == 10
        # Error replies are limited too: the five beyond their burst are counted.
        assert [r["code"] for r in client.replies] == ["rate_limited"] * burst
        assert "10 packets per second" in client.replies[0]["message"]
        assert sample(gate, "relay_error_replies_suppressed_total") == 5
        # A second later the connection has its rate again, and the next error
        # reply says how many were suppressed before it.
        mock_clock.jump(1.0)
        await client.send(*(pose_packet("rated", n) for n in range(26, 35)), INVALID)
        await trio.testing.wait_all_tasks_blocked()
        assert [e.frame_number for e in drain(events)] == list(range(26, 35))
        assert client.replies[-1]["code"] == "invalid_packet"
        assert client.replies[-1]["suppressed"] == 5
        assert client.closed_with is None
        nursery.cancel_scope.cancel()


async def test_far_over_the_rate_for_long_is_closed_with_1008(
    mock_clock: trio.testing.MockClock,
) -> None:
    limit = 10
    gate, _events = build_gate(max_packets_per_second=limit)
    per_second = int(limit * FAR_OVER_FACTOR) + 1
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        frame = 0
        for second in range(FAR_OVER_WINDOWS):
            packets = [pose_packet("flood", frame + n) for n in range(1, per_second + 1)]
            frame += per_second
            await client.send(*packets)
            await trio.testing.wait_all_tasks_blocked()
            if second < FAR_OVER_WINDOWS - 1:
                assert client.closed_with is None, second
            mock_clock.jump(1.0)
        assert client.closed_with == 1008
        assert sample(gate, "relay_policy_closes_total", reason="rate_limit") == 1
    assert not gate.connections


async def test_max_invalid_packets_in_a_row_closes_with_1008(
    mock_clock: trio.testing.MockClock,
) -> None:
    gate, events = build_gate(max_invalid_packets=5)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        # Four in a row, then a valid one: the streak starts over.
        await client.send(INVALID, INVALID, INVALID, INVALID, pose_packet("streak", 1))
        await client.send(INVALID, INVALID, INVALID, INVALID)
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_with is None
        assert len(drain(events)) == 1
        await client.send(INVALID)
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_with == 1008
        assert sample(gate, "relay_packets_total", type="unknown", status="invalid") == 9
        assert sample(gate, "relay_policy_closes_total", reason="invalid_packets") == 1
    assert not gate.connections


async def test_invalid_flood_gets_a_bounded_number_of_replies(
    mock_clock: trio.testing.MockClock,
) -> None:
    gate, _events = build_gate(max_invalid_packets=10_000)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        await client.send(*[INVALID] * 500)
        await trio.testing.wait_all_tasks_blocked()
        assert len(client.replies) == ERROR_REPLY_BURST
        assert sample(gate, "relay_error_replies_suppressed_total") == 500 - len(client.replies)
        assert sample(gate, "relay_packets_total", type="unknown", status="invalid") == 500
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_is_dropped_and_blocks_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, events = build_gate()
    async with trio.open_nursery() as nursery:
        # Lockstep: nothing the relay sends gets anywhere until the client reads,
        # and this one never reads again after its handshake.
        stalled = await connect(nursery, gate, trio.testing.lockstep_stream_pair, reading=False)
        good = await connect(nursery, gate)
        await stalled.send(pose_packet("stalled", 1), INVALID)
        await trio.testing.wait_all_tasks_blocked()
        # The relay is stuck sending that error reply; the other client is not.
        await good.send(*(pose_packet("good", n) for n in range(1, 101)))
        await trio.testing.wait_all_tasks_blocked()
        received = drain(events)
        assert [e.session_id for e in received] == ["stalled"] + ["good"] * 100
        assert len(gate.connections) == 2
        # Within SEND_TIMEOUT the stalled client is given up on.
        await trio.sleep(SEND_TIMEOUT + 1)
        assert len(gate.connections) == 1
        assert sample(gate, "relay_policy_closes_total", reason="slow_reader") == 1
        await good.send(pose_packet("good", 101))
        await trio.testing.wait_all_tasks_blocked()
        assert [e.frame_number for e in drain(events)] == [101]
        nursery.cancel_scope.cancel()


async def test_a_full_reply_queue_drops_the_client_at_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    gate, _events = build_gate()
    async with trio.open_nursery() as nursery:
        stalled = await connect(nursery, gate, trio.testing.lockstep_stream_pair, reading=False)
        await stalled.send(pose_packet("acked", 1))
        await trio.testing.wait_all_tasks_blocked()
        (connection,) = gate.connections
        # Acknowledgements come from the delivery stage, whatever the client does;
        # this client reads none of them. No time passes: the queue bound alone acts.
        for n in range(200):
            connection.acknowledge("acked", [n])
            if not gate.connections:
                break
        await trio.testing.wait_all_tasks_blocked()
        assert not gate.connections
        assert sample(gate, "relay_policy_closes_total", reason="slow_reader") == 1
        nursery.cancel_scope.cancel()
