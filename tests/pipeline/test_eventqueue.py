"""The event queue between the connections and the batcher (stag_relay.pipeline.eventqueue)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.pipeline.batcher import Batcher
from stag_relay.pipeline.eventqueue import EventReceiver, open_event_queue
from stag_relay.protocol.events import Batch, Event
from stag_relay.service.metrics import RelayMetrics
from tests.support.batches import make_policy


def event(sender: int, n: int) -> Event:
    return Event(
        event_id=f"{sender}-{n}",
        session_id=f"s{sender}",
        frame_number=n,
        timestamp=1,
        received_at=1,
        type="pose",
        anchors=(),
        meshes=(),
    )


def drain(receiver: EventReceiver) -> list[Event]:
    out = []
    while True:
        try:
            out.append(receiver.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        open_event_queue(0)


def test_put_nowait_takes_what_fits_from_the_front() -> None:
    send, receive = open_event_queue(3)
    events = [event(0, n) for n in range(5)]
    send.put_nowait(events)
    assert [e.frame_number for e in events] == [3, 4]
    assert receive.statistics().current_buffer_used == 3
    assert [e.frame_number for e in drain(receive)] == [0, 1, 2]


async def test_a_put_waits_for_room_and_the_bound_is_never_exceeded() -> None:
    send, receive = open_event_queue(5)
    events = [event(0, n) for n in range(50)]
    got: list[Event] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send.put, events)
        await trio.testing.wait_all_tasks_blocked()
        while len(got) < 50:
            assert receive.statistics().current_buffer_used <= 5
            got.append(await receive.receive())
            await trio.testing.wait_all_tasks_blocked()
    assert [e.frame_number for e in got] == list(range(50))
    assert events == []


async def test_senders_are_served_in_turn_and_keep_their_place() -> None:
    send, receive = open_event_queue(2)
    send.put_nowait([event(9, 0), event(9, 1)])  # full
    lists = {s: [event(s, n) for n in range(4)] for s in (1, 2, 3)}
    async with trio.open_nursery() as nursery:
        for s in (1, 2, 3):
            nursery.start_soon(send.put, lists[s])
            await trio.testing.wait_all_tasks_blocked()
        assert receive.statistics().tasks_waiting_send == 3
        # A newcomer does not jump the line, even when room appears.
        late = [event(4, 0)]
        order = []
        for _ in range(12):
            order.append(await receive.receive())
            await trio.testing.wait_all_tasks_blocked()
            send.put_nowait(late)
            assert late, "put_nowait took room a waiting sender was owed"
    order.extend(drain(receive))
    send.put_nowait(late)
    order.extend(drain(receive))
    # Each sender in line finishes before the next one starts, and the newcomer
    # comes after all of them.
    assert [e.event_id for e in order] == [
        "9-0",
        "9-1",
        *(f"{s}-{n}" for s in (1, 2, 3) for n in range(4)),
        "4-0",
    ]


async def test_receive_some_takes_up_to_its_limit_in_order_and_lets_waiters_in() -> None:
    send, receive = open_event_queue(4)
    events = [event(0, n) for n in range(10)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send.put, events)
        await trio.testing.wait_all_tasks_blocked()
        assert receive.statistics().tasks_waiting_send == 1
        taken = receive.receive_some_nowait(3)
        # The room it made went to the waiting sender at once, up to the bound.
        assert receive.statistics().current_buffer_used == 4
        taken += receive.receive_some_nowait(100)
        await trio.testing.wait_all_tasks_blocked()
        taken += receive.receive_some_nowait(100)
    assert [e.frame_number for e in taken] == list(range(10))
    with pytest.raises(trio.WouldBlock):
        receive.receive_some_nowait(5)
    await send.aclose()
    with pytest.raises(trio.EndOfChannel):
        receive.receive_some_nowait(5)


async def test_a_cancelled_put_leaves_what_did_not_go_in() -> None:
    send, receive = open_event_queue(3)
    events = [event(0, n) for n in range(10)]
    with trio.move_on_after(1) as scope:
        await send.put(events)
    assert scope.cancelled_caught
    assert [e.frame_number for e in events] == list(range(3, 10))
    assert [e.frame_number for e in drain(receive)] == [0, 1, 2]
    assert receive.statistics().tasks_waiting_send == 0


async def test_close_ends_the_receiver_after_what_is_queued() -> None:
    send, receive = open_event_queue(3)
    send.put_nowait([event(0, 1)])
    async with trio.open_nursery() as nursery:
        result: list[object] = []

        async def waiting_sender() -> None:
            try:
                await send.put([event(0, n) for n in range(2, 10)])
            except trio.ClosedResourceError:
                result.append("closed")

        nursery.start_soon(waiting_sender)
        await trio.testing.wait_all_tasks_blocked()
        await send.aclose()
    assert result == ["closed"]
    assert [e.frame_number for e in drain(receive)] == [1, 2, 3]
    with pytest.raises(trio.EndOfChannel):
        receive.receive_nowait()
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()
    with pytest.raises(trio.ClosedResourceError):
        send.put_nowait([event(0, 99)])


async def test_a_waiting_receiver_wakes_for_a_put_and_for_close() -> None:
    send, receive = open_event_queue(3)
    async with trio.open_nursery() as nursery:
        got: list[object] = []

        async def receiver() -> None:
            got.append((await receive.receive()).frame_number)
            try:
                await receive.receive()
            except trio.EndOfChannel:
                got.append("end")

        nursery.start_soon(receiver)
        await trio.testing.wait_all_tasks_blocked()
        send.send_nowait(event(0, 7))
        await trio.testing.wait_all_tasks_blocked()
        send.close()
    assert got == [7, "end"]


async def test_wait_for_sleeps_through_smaller_puts() -> None:
    """The batcher with an open batch waits for what fills it: puts of fewer events
    do not wake it; the put that makes up the count, a full queue, or close does."""
    send, receive = open_event_queue(5)
    woke: list[int] = []

    async def waiter(count: int) -> None:
        await receive.wait_for(count)
        woke.append(receive.statistics().current_buffer_used)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 3)
        await trio.testing.wait_all_tasks_blocked()
        send.put_nowait([event(0, 0)])
        send.put_nowait([event(0, 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        send.put_nowait([event(0, 2), event(0, 3)])
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [4]
        # More than the queue holds: woken once it is full.
        drain(receive)
        nursery.start_soon(waiter, 50)
        await trio.testing.wait_all_tasks_blocked()
        send.put_nowait([event(1, n) for n in range(4)])
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [4]
        send.put_nowait([event(1, 4)])
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [4, 5]
        drain(receive)
        nursery.start_soon(waiter, 2)
        await trio.testing.wait_all_tasks_blocked()
        send.close()
    assert woke == [4, 5, 0]
    # A later plain receive is woken by a single event again.
    send2, receive2 = open_event_queue(5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive2.receive)
        await trio.testing.wait_all_tasks_blocked()
        send2.put_nowait([event(0, 0)])


async def test_the_batcher_wakes_once_per_batch_not_per_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Events put one at a time: the batcher takes the first as it comes (its time
    starts the deadline), then sleeps until the batch is full; the batches and the
    moments they are cut are those of taking each event as it came."""
    send, receive = open_event_queue(100)
    batches_send, batches_recv = trio.open_memory_channel[Batch](10)
    batcher_task: list[trio.lowlevel.Task] = []

    class Steps(trio.abc.Instrument):
        count = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task in batcher_task:
                self.count += 1

    steps = Steps()

    async def run_batcher() -> None:
        batcher_task.append(trio.lowlevel.current_task())
        await Batcher(make_policy(10, 1.0), RelayMetrics()).run(receive, batches_send)

    cuts: list[tuple[float, list[int]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_batcher)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(steps)
        start = trio.current_time()
        for n in range(25):
            send.put_nowait([event(0, n)])
            await trio.sleep(0.01)
        while len(cuts) < 3:
            batch = await batches_recv.receive()
            cuts.append((trio.current_time() - start, [e.frame_number for e in batch.events]))
        trio.lowlevel.remove_instrument(steps)
        send.close()
    assert [frames for _, frames in cuts] == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 25)),
    ]
    # The last batch is cut at its deadline: 1 s after its first event, put at 0.20.
    assert cuts[2][0] == pytest.approx(1.2)
    # A few steps per batch (its first event, full or due, the hand-over's
    # checkpoints), not one or more per event.
    assert steps.count <= 15


async def test_a_shielded_put_outlives_cancellation_until_aborted() -> None:
    """Draining cancels the reader; its put of what it read waits on regardless, and
    only the shutdown deadline (abort_put) gives up what did not go in."""
    send, receive = open_event_queue(2)
    events = [event(0, n) for n in range(5)]
    outcome: list[str] = []
    task: list[trio.lowlevel.Task] = []

    async def put() -> None:
        task.append(trio.lowlevel.current_task())
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await send.put_shielded(events)
                outcome.append("in")
            except trio.ClosedResourceError:
                outcome.append("aborted")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        # Two taken: two more go in, and the put waits on with the last one.
        assert [receive.receive_nowait().frame_number for _ in range(2)] == [0, 1]
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        assert send.abort_put(task[0])
        assert not send.abort_put(task[0])
    assert outcome == ["aborted"]
    assert [e.frame_number for e in events] == [4]
    assert send.statistics().tasks_waiting_send == 0
    assert [e.frame_number for e in drain(receive)] == [2, 3]


async def test_a_shielded_put_that_fits_returns_at_once() -> None:
    send, receive = open_event_queue(5)
    events = [event(0, n) for n in range(3)]
    with trio.CancelScope() as scope:
        scope.cancel()
        await send.put_shielded(events)
    assert events == []
    assert len(drain(receive)) == 3


def test_send_nowait_would_block_when_full() -> None:
    send, _receive = open_event_queue(1)
    send.send_nowait(event(0, 1))
    with pytest.raises(trio.WouldBlock):
        send.send_nowait(event(0, 2))


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 8),
    st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=5), min_size=1, max_size=5),
    st.integers(1, 7),
)
def test_the_batcher_gets_every_event_in_each_senders_order(
    capacity: int, reads: list[list[int]], batch_size: int
) -> None:
    """Several connections, each putting reads of many events; nothing lost, each
    connection's events in order, the queue never over its bound."""

    async def main() -> None:
        send, receive = open_event_queue(capacity)
        batches_send, batches_recv = trio.open_memory_channel[Batch](0)
        total = sum(sum(sizes) for sizes in reads)
        seen: list[Event] = []

        async def connection(sender: int, sizes: list[int]) -> None:
            n = 0
            for size in sizes:
                events = [event(sender, n + i) for i in range(size)]
                n += size
                send.put_nowait(events)
                if events:
                    await send.put(events)
                assert receive.statistics().current_buffer_used <= capacity

        async with trio.open_nursery() as nursery:
            batcher = Batcher(make_policy(batch_size, 0.01), RelayMetrics())
            nursery.start_soon(batcher.run, receive, batches_send)
            async with trio.open_nursery() as connections:
                for sender, sizes in enumerate(reads):
                    connections.start_soon(connection, sender, sizes)
                while len(seen) < total:
                    seen.extend((await batches_recv.receive()).events)
            send.close()
        for sender, sizes in enumerate(reads):
            frames = [e.frame_number for e in seen if e.session_id == f"s{sender}"]
            assert frames == list(range(sum(sizes)))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_pressed_once_waiting_senders_hold_a_queue_s_worth() -> None:
    """Connections read little only when what waiting senders hold (counted exactly as
    puts wait, move in, are cancelled or aborted) reaches the queue's capacity."""
    send, receive = open_event_queue(4)
    first = [event(0, n) for n in range(6)]
    second = [event(1, n) for n in range(3)]
    started: list[list[Event]] = []

    def held() -> int:
        # The count is what the waiting puts' lists still hold.
        assert send.waiting_events() == sum(len(events) for events in started)
        return send.waiting_events()

    async def put(events: list[Event]) -> None:
        started.append(events)
        await send.put(events)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, first)
        await trio.testing.wait_all_tasks_blocked()
        # The queue is full and 2 wait outside: below the queue's worth.
        assert held() == 2 and not send.pressed()
        nursery.start_soon(put, second)
        await trio.testing.wait_all_tasks_blocked()
        assert held() == 5 and send.pressed()
        # Three taken: the first sender's last two go in, then one of the second's.
        assert [e.event_id for e in (receive.receive_nowait() for _ in range(3))] == [
            "0-0",
            "0-1",
            "0-2",
        ]
        assert held() == 2 and not send.pressed()
        # The second put is cancelled: what it still has is no longer held.
        nursery.cancel_scope.cancel()
    assert send.waiting_events() == 0 and len(second) == 2


async def test_an_aborted_or_closed_put_holds_nothing() -> None:
    send, _receive = open_event_queue(1)
    events = [event(0, n) for n in range(3)]
    more = [event(1, n) for n in range(3)]
    task: list[trio.lowlevel.Task] = []

    async def put(events: list[Event]) -> None:
        task.append(trio.lowlevel.current_task())
        with pytest.raises(trio.ClosedResourceError):
            await send.put_shielded(events)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put, events)
        nursery.start_soon(put, more)
        await trio.testing.wait_all_tasks_blocked()
        assert send.waiting_events() == 5 and send.pressed()
        assert send.abort_put(task[0])
        assert send.waiting_events() == 3
        send.close()
    assert send.waiting_events() == 0 and not send.pressed()
