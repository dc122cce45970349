"""The gate over in-memory streams, under trio's mock clock: heartbeat and backpressure.

The client side is wsproto driven by hand, so the test decides exactly when (and
whether) pings are answered.
"""

from __future__ import annotations

import json

import trio
import trio.testing

from stag_relay.config import Config
from stag_relay.events import Event as SpatialEvent
from stag_relay.gate import Gate
from stag_relay.metrics import RelayMetrics
from stag_relay.transform import Sessions
from tests.support.clients import pose_packet
from tests.support.memory_ws import connect
from tests.support.relays import make_config

INTERVAL = 30.0


def build_gate(capacity: int) -> tuple[Gate, trio.MemoryReceiveChannel[SpatialEvent]]:
    config: Config = make_config("http://127.0.0.1:9", websocket={"heartbeat_interval": INTERVAL})
    send, receive = trio.open_memory_channel[SpatialEvent](capacity)
    gate = Gate(
        config=config,
        sessions=Sessions(ttl=300.0, max_sessions=100),
        events=send,
        metrics=RelayMetrics(),
    )
    return gate, receive


def heartbeat_timeouts(gate: Gate) -> float | None:
    return gate.metrics.registry.get_sample_value("relay_heartbeat_timeouts_total")


async def test_a_peer_that_never_answers_pings_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        await client.run()
    assert client.closed_with == 1011
    assert heartbeat_timeouts(gate) == 1
    assert not gate.connections


async def test_a_peer_that_answers_stays_open(autojump_clock: trio.testing.MockClock) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        client.answer_pings = True
        nursery.start_soon(client.run)
        await trio.sleep(INTERVAL * 20)
        assert client.pings_seen >= 10
        assert client.closed_with is None
        assert len(gate.connections) == 1
        nursery.cancel_scope.cancel()
    assert heartbeat_timeouts(gate) == 0


async def test_backpressure_is_not_mistaken_for_a_dead_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, events = build_gate(capacity=1)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        # One event fills the channel; the second leaves the connection waiting on it.
        for frame in (1, 2, 3):
            await client.send(pose_packet("held", frame))
        nursery.start_soon(client.run)
        # Pings go unanswered for many intervals, but the relay is the one not reading.
        await trio.sleep(INTERVAL * 20)
        (connection,) = gate.connections
        assert connection.blocked
        assert client.closed_with is None
        assert heartbeat_timeouts(gate) == 0
        # The pipeline moves again: every packet read comes through, in order.
        received = [await events.receive() for _ in range(3)]
        assert [e.frame_number for e in received] == [1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_drain_closes_with_1001_after_what_was_read_is_in_the_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate, events = build_gate(capacity=1)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        client.answer_pings = True
        await client.send(pose_packet("drain", 1))
        await client.send(pose_packet("drain", 2))
        nursery.start_soon(client.run)
        await trio.testing.wait_all_tasks_blocked()
        gate.drain()
        # Frame 2 is read and waiting for room: draining must not drop it.
        received = [await events.receive() for _ in range(2)]
        assert [e.frame_number for e in received] == [1, 2]
        await gate.wait_idle()
    assert client.closed_with == 1001
    assert gate.events_in == 2


async def test_error_reply_names_the_field(autojump_clock: trio.testing.MockClock) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate)
        await client.send('{"session_id": "s", "frame_number": -1}')
        while not client.texts:
            await client.receive()
        reply = json.loads(client.texts[0])
        assert reply["type"] == "error"
        assert reply["code"] == "invalid_packet"
        assert reply["message"].startswith("$.frame_number")
        nursery.cancel_scope.cancel()
