"""The gate's per-connection limits over in-memory streams, under trio's mock clock.

Read throttle, invalid streak, error replies, and clients that read slowly or not at all.
The clock only moves when a test says so, so "one second later" is exact. The
client is wsproto driven by hand; it answers close frames so closes complete.
"""

from __future__ import annotations

import trio
import trio.testing

from stag_relay.pipeline.gate import SEND_TIMEOUT, Gate
from stag_relay.protocol.limits import BURST_SECONDS, ERROR_REPLY_BURST
from tests.support.clients import pose_packet
from tests.support.gates import build_gate, drain, sample
from tests.support.memory_ws import MemoryClient, StreamPair
from tests.support.memory_ws import connect as open_client

INVALID = '{"session_id": "s", "frame_number": -1}'


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


async def test_a_client_over_the_rate_is_slowed_down_and_loses_nothing(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    limit = 10
    gate, events = build_gate(max_packets_per_second=limit)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        client.answer_pings = True
        # Five seconds' worth at once: the burst is read, then (once a token is back)
        # the rest in one read; all of it is judged and queued.
        await client.send(*(pose_packet("rated", n) for n in range(1, 51)))
        await trio.testing.wait_all_tasks_blocked()
        read = drain(events)
        assert len(read) >= limit * BURST_SECONDS
        mock_clock.jump(0.2)
        await trio.testing.wait_all_tasks_blocked()
        read += drain(events)
        assert [e.frame_number for e in read] == list(range(1, 51))
        # The debt beyond the burst (30 packets, 3 s) is paid by not reading.
        await client.send(pose_packet("rated", 51))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(2.5)
        await trio.testing.wait_all_tasks_blocked()
        assert drain(events) == []
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert [e.frame_number for e in drain(events)] == [51]
        # Nothing refused, nothing answered, nobody closed; the wait is on record.
        assert client.replies == []
        assert client.closed_with is None
        assert (
            sample(gate, "relay_packets_total", type="pose", status="ok", dialect="streamkit") == 51
        )
        assert sample(gate, "relay_throttled_seconds_total") >= 2.9
        nursery.cancel_scope.cancel()


async def test_a_throttled_client_is_not_taken_for_a_dead_peer(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(max_packets_per_second=1, heartbeat_interval=1.0)
    async with trio.open_nursery() as nursery:
        # The client answers every ping, but its pongs wait behind packets the relay
        # does not read yet: only a heartbeat that knows the throttle keeps it open.
        client = await connect(nursery, gate, pair)
        client.answer_pings = True
        for n in range(1, 6):
            # A minute's worth each time: the reader waits about a minute between reads.
            await client.send(*(pose_packet("slow", 60 * (n - 1) + k) for k in range(1, 61)))
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(60):
                mock_clock.jump(1.0)
                await trio.testing.wait_all_tasks_blocked()
            assert client.closed_with is None, n
        assert len(drain(events)) == 300
        nursery.cancel_scope.cancel()


async def test_max_invalid_packets_in_a_row_closes_with_1008(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate(max_invalid_packets=5)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        # Four in a row, then a valid one: the streak starts over.
        await client.send(INVALID, INVALID, INVALID, INVALID, pose_packet("streak", 1))
        await client.send(INVALID, INVALID, INVALID, INVALID)
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_with is None
        assert len(drain(events)) == 1
        await client.send(INVALID)
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed_with == 1008
        assert (
            sample(
                gate, "relay_packets_total", type="unknown", status="invalid", dialect="streamkit"
            )
            == 9
        )
        assert sample(gate, "relay_policy_closes_total", reason="invalid_packets") == 1
    assert not gate.connections


async def test_an_invalid_flood_gets_bounded_replies_that_account_for_every_packet(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate(max_invalid_packets=10_000)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        await client.send(*[INVALID] * 500)
        await trio.testing.wait_all_tasks_blocked()
        # At once: no more replies than the burst allows.
        answered = sum(r["code"] == "invalid_packet" for r in client.replies)
        assert answered <= ERROR_REPLY_BURST
        # A moment later a summary says how many were not answered.
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        replies = client.replies
        assert replies[-1]["code"] == "replies_suppressed"
        assert answered + sum(r.get("suppressed", 0) for r in replies) == 500
        assert sample(gate, "relay_error_replies_suppressed_total") == 500 - answered
        assert (
            sample(
                gate, "relay_packets_total", type="unknown", status="invalid", dialect="streamkit"
            )
            == 500
        )
        assert client.closed_with is None
        nursery.cancel_scope.cancel()


async def test_suppressed_replies_nothing_followed_are_reported_when_the_rate_allows(
    mock_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate(max_invalid_packets=10_000)
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, pair)
        # The client reads every reply, but sends more bad packets than get answers.
        for _ in range(3):
            await client.send(*[INVALID] * 60)
            await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        replies = client.replies
        assert replies[-1]["code"] == "replies_suppressed"
        answered = sum(r["code"] == "invalid_packet" for r in replies)
        assert answered + sum(r.get("suppressed", 0) for r in replies) == 180
        nursery.cancel_scope.cancel()


async def test_a_client_that_does_not_read_is_dropped_and_blocks_nobody(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, events = build_gate()
    async with trio.open_nursery() as nursery:
        # Lockstep: nothing the relay sends gets anywhere until the client reads,
        # and this one never reads again after its handshake.
        stalled = await connect(nursery, gate, trio.testing.lockstep_stream_pair, reading=False)
        good = await connect(nursery, gate, pair)
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


async def test_acknowledgements_a_client_is_slow_to_read_merge_and_never_close_it(
    autojump_clock: trio.testing.MockClock,
    pair: StreamPair,
) -> None:
    gate, _events = build_gate()
    async with trio.open_nursery() as nursery:
        client = await connect(nursery, gate, trio.testing.lockstep_stream_pair, reading=False)
        client.answer_pings = True
        await client.send(pose_packet("acked", 1))
        await trio.testing.wait_all_tasks_blocked()
        (connection,) = gate.connections
        # Acknowledgements come from the delivery stage, whatever the client does;
        # this client reads none of them for a while, then reads again.
        for n in range(1000):
            connection.acknowledge("acked", [n])
        await trio.sleep(SEND_TIMEOUT / 2)
        nursery.start_soon(client.run)
        await trio.sleep(1.0)
        assert gate.connections == {connection}
        frame_numbers = [n for r in client.replies for n in r["frame_numbers"]]
        assert frame_numbers == list(range(1000))
        # The first one was on its way already; the rest came merged into one more.
        assert len(client.replies) <= 2
        assert sample(gate, "relay_policy_closes_total", reason="slow_reader") == 0
        nursery.cancel_scope.cancel()
