"""The gate over in-memory streams, under trio's mock clock: the handshake, frames,
the heartbeat, backpressure and the accounting of what one read brings.

The client side is wsproto driven by hand, so the test decides exactly when (and
whether) pings are answered; frames no library would send are built by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import Ping, Pong, TextMessage

from stag_relay.pipeline.eventqueue import EventReceiver
from stag_relay.pipeline.gate import PRESSED_RECEIVE_BYTES, RECEIVE_BYTES, Gate
from stag_relay.protocol.events import Event as SpatialEvent
from tests.support import gates
from tests.support.clients import pose_packet
from tests.support.frames import CLOSE, TEXT, client_frame
from tests.support.gates import drain, sample
from tests.support.memory_ws import MemoryClient, StreamPair, connect, open_front

INTERVAL = 30.0


def build_gate(capacity: int, **websocket: Any) -> tuple[Gate, EventReceiver]:
    return gates.build_gate(capacity, **{"heartbeat_interval": INTERVAL, **websocket})


def heartbeat_timeouts(gate: Gate) -> float | None:
    return gate.metrics.registry.get_sample_value("relay_heartbeat_timeouts_total")


async def test_a_peer_that_never_answers_pings_is_closed(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        await client.run()
    assert client.closed_with == 1011
    assert heartbeat_timeouts(gate) == 1
    assert not gate.connections


async def test_a_peer_that_answers_stays_open(
    autojump_clock: trio.testing.MockClock, pair: StreamPair
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
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
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=1)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
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
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=1)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
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


async def test_error_reply_names_the_field(
    autojump_clock: trio.testing.MockClock, pair: StreamPair
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        await client.send('{"session_id": "s", "frame_number": -1}')
        while not client.texts:
            await client.receive()
        reply = json.loads(client.texts[0])
        assert reply["type"] == "error"
        assert reply["code"] == "invalid_packet"
        assert reply["message"].startswith("$.frame_number")
        nursery.cancel_scope.cancel()


def frames(client: MemoryClient, *texts: str) -> bytes:
    """Text messages as the client sends them, to be written in one go."""
    return b"".join(client.ws.send(TextMessage(data=text)) for text in texts)


async def test_a_read_full_of_packets_is_judged_and_counted_exactly(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=1000)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        packets = [pose_packet("many", n) for n in range(1, 201)]
        # Valid packets around an invalid one and a duplicate, all in one read.
        await client.stream.send_all(
            frames(client, *packets[:100], "{}", pose_packet("many", 50), *packets[100:])
        )
        await trio.testing.wait_all_tasks_blocked()
        assert [e.frame_number for e in drain(events)] == list(range(1, 201))
        assert gate.events_in == 200
        assert (
            sample(gate, "relay_packets_total", type="pose", status="ok", dialect="streamkit")
            == 200
        )
        assert (
            sample(
                gate, "relay_packets_total", type="pose", status="duplicate", dialect="streamkit"
            )
            == 1
        )
        assert (
            sample(
                gate, "relay_packets_total", type="unknown", status="invalid", dialect="streamkit"
            )
            == 1
        )
        # One observation per packet accepted, though they are observed per read.
        assert sample(gate, "relay_processing_duration_seconds_count") == 200
        assert sample(gate, "relay_processing_duration_seconds_sum") > 0
        nursery.cancel_scope.cancel()


async def fifty_poses_in_one_read(
    nursery: trio.Nursery, gate: Gate, pair: StreamPair, session: str
) -> MemoryClient:
    """A client that answers pings sends 50 poses at once; returns when all is still."""
    client = await connect(nursery, gate, pair)
    client.answer_pings = True
    nursery.start_soon(client.run)
    await client.stream.send_all(frames(client, *(pose_packet(session, n) for n in range(50))))
    await trio.testing.wait_all_tasks_blocked()
    return client


async def test_the_bound_is_counted_in_events_not_reads(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=5)
    async with trio.open_nursery() as nursery:
        await fifty_poses_in_one_read(nursery, gate, pair, "bound")
        # One read brought fifty; five fit, and the connection waits for the rest.
        assert events.statistics().current_buffer_used == 5
        (connection,) = gate.connections
        assert connection.blocked
        received: list[SpatialEvent] = []
        while len(received) < 50:
            received.append(await events.receive())
            assert events.statistics().current_buffer_used <= 5
        assert [e.frame_number for e in received] == list(range(50))
        await trio.testing.wait_all_tasks_blocked()
        assert not connection.blocked
        assert gate.events_in == 50
        nursery.cancel_scope.cancel()


async def test_the_shutdown_deadline_counts_exactly_what_a_blocked_read_gives_up(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=5)
    async with trio.open_nursery() as nursery:
        client = await fifty_poses_in_one_read(nursery, gate, pair, "cut")
        gate.drain()
        await trio.testing.wait_all_tasks_blocked()
        # Draining waits for what was read; the deadline gives it up.
        assert len(gate.connections) == 1
        gate.abort()
        await gate.wait_idle()
    assert client.closed_with == 1001
    assert gate.events_in == 5
    assert len(drain(events)) == 5
    assert sample(gate, "relay_events_dropped_total", reason="shutdown") == 45
    assert sample(gate, "relay_packets_total", type="pose", status="ok", dialect="streamkit") == 5


async def test_frames_sent_with_the_upgrade_request_are_read(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        eager = client_frame(TEXT, pose_packet("eager", 1).encode())
        await connect(nursery, gate, pair, pipelined=eager)
        await trio.testing.wait_all_tasks_blocked()
        assert [e.frame_number for e in drain(events)] == [1]
        nursery.cancel_scope.cancel()


async def test_pings_are_answered_with_their_payload(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        await client.stream.send_all(client.ws.send(Ping(b"are you there")))
        pongs: list[Pong] = []
        while not pongs:
            pongs = [e for e in await client.receive() if isinstance(e, Pong)]
        assert pongs[0].payload == b"are you there"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", [1000, 1001, 4321, None])
async def test_a_close_from_the_client_is_answered_with_its_code(
    autojump_clock: trio.testing.MockClock, code: int | None, pair: StreamPair
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        payload = b"" if code is None else code.to_bytes(2, "big") + b"bye"
        # By hand, so the client's wsproto still expects the close it answers.
        await client.stream.send_all(client_frame(CLOSE, payload))
        await client.run()
        await gate.wait_idle()
    assert client.closed_with == (1005 if code is None else code)


async def test_a_protocol_violation_closes_with_1002_after_the_packets_before_it(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        unmasked = client_frame(TEXT, pose_packet("v", 2).encode(), mask=None)
        await client.stream.send_all(frames(client, pose_packet("v", 1)) + unmasked)
        await client.run()
        await gate.wait_idle()
    assert client.closed_with == 1002
    assert [e.frame_number for e in drain(events)] == [1]


async def test_too_large_closes_with_1009_and_is_counted(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate(capacity=10, max_message_size=1024)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        await client.send(pose_packet("big", 1, pad="x" * 2000))
        await client.run()
        await gate.wait_idle()
    assert client.closed_with == 1009
    assert (
        sample(gate, "relay_packets_total", type="unknown", status="too_large", dialect="streamkit")
        == 1
    )


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", 426),
        (b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", 426),
        (b"Sec-WebSocket-Version: 13\r\n", 400),
        (b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n", 400),
    ],
)
async def test_a_bad_websocket_handshake_is_refused_before_the_gate(
    autojump_clock: trio.testing.MockClock, headers: bytes, status: int, pair: StreamPair
) -> None:
    gate, _events = build_gate(capacity=10)
    async with trio.open_nursery() as nursery:
        stream = await open_front(nursery, gate, pair)
        await stream.send_all(
            b"GET /ws/streamkit HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n" + headers + b"\r\n"
        )
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    if status == 426:
        assert b"sec-websocket-version: 13" in answer.lower()
    assert sample(gate, "relay_connections_total") == 0


async def test_what_waiting_connections_hold_outside_the_queue_stays_bounded(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    """While the queue is full, a connection reads 64 KiB only as long as the waiting
    connections hold less than a queue's worth; beyond, PRESSED_RECEIVE_BYTES at a time.
    So what they hold is at most a queue's worth, one large read and a small read
    each, however much the clients have sent."""
    capacity = 4
    gate, events = build_gate(capacity=capacity)
    async with trio.open_nursery() as nursery:
        clients = [await connect(nursery, gate, pair) for _ in range(2)]
        # More than one large read each.
        packets = [
            [pose_packet(f"pressed-{c}", n) for n in range(1, 801)] for c in range(len(clients))
        ]
        size = max(len(p) for p in packets[0])
        assert len(packets[0]) * size > RECEIVE_BYTES
        for client, sent in zip(clients, packets, strict=True):
            # A socket's buffer may not take it all while the relay holds back.
            nursery.start_soon(client.send, *sent)
        await trio.testing.wait_all_tasks_blocked()
        large = RECEIVE_BYTES // size + 1
        small = PRESSED_RECEIVE_BYTES // size + 1
        bound = capacity + large + len(clients) * small
        assert bound < len(packets[0])
        received: list[SpatialEvent] = []
        was_pressed = False
        try:
            while len(received) < 1600:
                assert gate.events.waiting_events() <= bound
                was_pressed = was_pressed or gate.events.pressed()
                received.append(await events.receive())
                await trio.testing.wait_all_tasks_blocked()
        finally:
            # Ends the puts waiting for room (they outlive cancellation), so that a
            # failed check fails the test rather than hanging it.
            gate.events.close()
        assert was_pressed
        for c in range(len(clients)):
            frames = [e.frame_number for e in received if e.session_id == f"pressed-{c}"]
            assert frames == list(range(1, 801))
        nursery.cancel_scope.cancel()
