"""Batching: the policy with explicit times, and the Trio task under a mock clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stag_relay.pipeline.batcher import Batcher
from stag_relay.protocol.batching import BatchPolicy
from stag_relay.protocol.events import Batch, Event
from stag_relay.service.metrics import RelayMetrics
from tests.support.batches import event, ids, make_policy

# -- the Trio task -------------------------------------------------------------------------


async def test_batcher_cuts_on_size(autojump_clock: trio.testing.MockClock) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Batcher(make_policy(3, 0.1), metrics).run, events_recv, batches_send)
        for n in range(7):
            events_send.send_nowait(event(n))
        start = trio.current_time()
        assert ids(await batches_recv.receive()) == ["e0", "e1", "e2"]
        assert ids(await batches_recv.receive()) == ["e3", "e4", "e5"]
        # Full batches go out at once; the remainder waits for its deadline.
        assert trio.current_time() == start
        assert ids(await batches_recv.receive()) == ["e6"]
        assert trio.current_time() == pytest.approx(start + 0.1)
        await events_send.aclose()
        with pytest.raises(trio.EndOfChannel):
            await batches_recv.receive()


async def test_batcher_deadline_counts_from_first_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    cuts: list[tuple[float, list[str]]] = []

    async def collect() -> None:
        async for batch in batches_recv:
            cuts.append((trio.current_time(), ids(batch)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(Batcher(make_policy(10, 0.1), metrics).run, events_recv, batches_send)
        nursery.start_soon(collect)
        start = trio.current_time()
        # An event every 60 ms: a batch cannot keep itself open by receiving more.
        for n in range(4):
            await events_send.send(event(n))
            await trio.sleep(0.06)
        await events_send.aclose()
    assert [batch for _, batch in cuts] == [["e0", "e1"], ["e2", "e3"]]
    assert [at - start for at, _ in cuts] == pytest.approx([0.1, 0.22])


async def test_batcher_flushes_on_close_then_closes_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Batcher(make_policy(5, 10.0), metrics).run, events_recv, batches_send)
        start = trio.current_time()
        for n in range(2):
            events_send.send_nowait(event(n))
        await events_send.aclose()
        assert ids(await batches_recv.receive()) == ["e0", "e1"]
        # At once, not at the 10 s deadline.
        assert trio.current_time() == start
        with pytest.raises(trio.EndOfChannel):
            await batches_recv.receive()


async def test_batcher_never_sends_an_empty_batch(autojump_clock: trio.testing.MockClock) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Batcher(make_policy(3, 0.1), metrics).run, events_recv, batches_send)
        # Idle well past many timeouts, then close with nothing open.
        await trio.sleep(5)
        for n in range(3):
            events_send.send_nowait(event(n))
        assert ids(await batches_recv.receive()) == ["e0", "e1", "e2"]
        await trio.sleep(5)
        await events_send.aclose()
        with pytest.raises(trio.EndOfChannel):
            await batches_recv.receive()


async def test_batcher_holds_what_the_sender_has_not_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    batcher = Batcher(make_policy(3, 0.1), metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.run, events_recv, batches_send)
        for n in range(5):
            events_send.send_nowait(event(n))
        await trio.testing.wait_all_tasks_blocked()
        # Nobody takes batches: the cut batch waits, and the rest stays in the channel
        # (backpressure) rather than piling up in the batcher.
        assert batcher.held_events() == 3
        assert events_recv.statistics().current_buffer_used == 2
        assert ids(await batches_recv.receive()) == ["e0", "e1", "e2"]
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.held_events() == 2
        # The deadline cut is also held until taken.
        await trio.sleep(1)
        assert batcher.held_events() == 2
        assert ids(await batches_recv.receive()) == ["e3", "e4"]
        await trio.testing.wait_all_tasks_blocked()
        assert batcher.held_events() == 0
        await events_send.aclose()


async def test_batcher_reports_channel_depth_when_cutting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    events_send, events_recv = trio.open_memory_channel[Event](100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Batcher(make_policy(2, 0.1), metrics).run, events_recv, batches_send)
        for n in range(6):
            events_send.send_nowait(event(n))
        await trio.testing.wait_all_tasks_blocked()
        # The first batch was cut with 4 events still in the channel.
        assert metrics.registry.get_sample_value("relay_channel_events") == 4
        for _ in range(3):
            await batches_recv.receive()
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.registry.get_sample_value("relay_channel_events") == 0
        await events_send.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_size=st.integers(min_value=1, max_value=8),
    timeout=st.sampled_from([0.0, 0.05, 0.1, 1.0]),
    # (pause before the burst, burst size)
    bursts=st.lists(
        st.tuples(st.sampled_from([0.0, 0.01, 0.04, 0.1, 0.5]), st.integers(0, 12)), max_size=15
    ),
)
def test_batcher_properties(max_size: int, timeout: float, bursts: list[tuple[float, int]]) -> None:
    """Whatever the traffic: order kept, nothing lost, batches 1..max_size, and a batch
    short of full goes out exactly at its first event's deadline (or at close)."""
    sent_at: dict[str, float] = {}
    cuts: list[tuple[float, list[str]]] = []
    closed_at: list[float] = []

    async def scenario() -> None:
        events_send, events_recv = trio.open_memory_channel[Event](1000)
        batches_send, batches_recv = trio.open_memory_channel[Batch](0)
        policy = BatchPolicy(max_size=max_size, timeout=timeout)

        async def collect() -> None:
            async for batch in batches_recv:
                cuts.append((trio.current_time(), ids(batch)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(Batcher(policy, RelayMetrics()).run, events_recv, batches_send)
            nursery.start_soon(collect)
            n = 0
            for pause, size in bursts:
                await trio.sleep(pause)
                for _ in range(size):
                    sent_at[f"e{n}"] = trio.current_time()
                    await events_send.send(event(n))
                    n += 1
            closed_at.append(trio.current_time())
            await events_send.aclose()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))

    assert [e for _, batch in cuts for e in batch] == list(sent_at)
    for at, batch in cuts:
        assert 1 <= len(batch) <= max_size
        deadline = sent_at[batch[0]] + timeout
        assert at <= deadline + 1e-9
        if len(batch) < max_size and not math.isclose(at, closed_at[0]):
            assert math.isclose(at, deadline)
