"""delivery's pure parts (how often drop_oldest says what it dropped), the memory
only hand-over from the batcher to the sender's slots, and what a spool's delivery
holds while it waits."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.pipeline.batcher import Batcher
from stag_relay.pipeline.delivery import Delivery, DropLog, ToSender
from stag_relay.pipeline.eventqueue import open_event_queue
from stag_relay.pipeline.sender import Shipment
from stag_relay.protocol.events import Batch
from stag_relay.service.config import DeliveryConfig
from stag_relay.service.metrics import RelayMetrics
from tests.support.batches import event, make_policy
from tests.support.waiting import wait_until


def test_the_first_drop_is_said_at_once_then_at_most_one_line_per_interval() -> None:
    drops = DropLog(interval=10.0)
    assert drops.dropped(1, 5, now=100.0) == (1, 5)
    assert drops.dropped(1, 5, now=101.0) is None
    assert drops.dropped(2, 9, now=109.9) is None
    # The next line has everything dropped since the last one.
    assert drops.dropped(1, 5, now=110.0) == (4, 19)
    assert drops.dropped(1, 1, now=125.0) == (1, 1)


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 500), st.floats(0, 30)), max_size=60))
def test_the_lines_add_up_to_every_drop_but_the_unsaid_rest(
    drops: list[tuple[int, int, float]],
) -> None:
    log = DropLog(interval=10.0)
    now, said, times = 0.0, [0, 0], []
    for batches, events, gap in drops:
        now += gap
        due = log.dropped(batches, events, now)
        if due is not None:
            said[0] += due[0]
            said[1] += due[1]
            times.append(now)
    assert said[0] + log.batches == sum(b for b, _, _ in drops)
    assert said[1] + log.events == sum(e for _, e, _ in drops)
    assert all(later - earlier >= 10.0 for earlier, later in itertools.pairwise(times))


# -- memory only: from the batcher to a sender slot ------------------------------------


class LoopTurns(trio.abc.Instrument):
    """Counts turns of trio's run loop (one wait for I/O each)."""

    def __init__(self) -> None:
        self.turns = 0

    def before_io_wait(self, timeout: float) -> None:
        self.turns += 1


async def test_a_full_batch_reaches_a_waiting_slot_one_turn_after_the_batcher_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under load every turn of the loop holds many socket reads, so each task a batch
    passed on its way to STAG made it a turn later: the batcher cuts it, turns it into
    a shipment and hands it to the slot that waits, in one step of its own."""
    delivery = Delivery(DeliveryConfig(), RelayMetrics())
    events_send, events_recv = open_event_queue(100)
    shipments_send, shipments_recv = trio.open_memory_channel[Shipment](0)
    loop = LoopTurns()
    taken: list[tuple[int, Shipment]] = []

    async def slot() -> None:
        async for shipment in shipments_recv:
            taken.append((loop.turns, shipment))

    async with trio.open_nursery() as nursery:
        batcher = Batcher(make_policy(3, 10.0), RelayMetrics())
        nursery.start_soon(batcher.run, events_recv, delivery.outlet(shipments_send))
        nursery.start_soon(slot)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(loop)
        events_send.put_nowait([event(0), event(1), event(2)])
        put_at = loop.turns
        while not taken:
            await trio.lowlevel.checkpoint()
        trio.lowlevel.remove_instrument(loop)
        events_send.close()
    ((turns, shipment),) = taken
    assert shipment.wire.batch_id == "b0" and shipment.wire.count == 3
    # A turn for the batcher to wake, one for the slot: no task between them.
    assert turns - put_at <= 2


async def test_to_sender_hands_nothing_over_while_every_slot_is_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shipped: list[Batch] = []

    def ship(batch: Batch) -> Shipment:
        shipped.append(batch)
        return Delivery(DeliveryConfig(), RelayMetrics()).ship(batch)

    shipments_send, shipments_recv = trio.open_memory_channel[Shipment](0)
    outlet = ToSender(shipments_send, ship)
    batch = Batch("b0", (event(0),))
    with pytest.raises(trio.WouldBlock):
        outlet.send_nowait(batch)
    # Not even encoded: the batcher keeps it (and counts it) until a slot is free.
    assert shipped == []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outlet.send, batch)
        await trio.testing.wait_all_tasks_blocked()
        shipment = await shipments_recv.receive()
    assert shipment.wire.batch_id == "b0" and shipped == [batch]
    outlet.close()
    with pytest.raises(trio.EndOfChannel):
        await shipments_recv.receive()


async def test_a_spools_delivery_counts_every_batch_it_was_handed(tmp_path: Path) -> None:
    # A spool smaller than a batch: the first is committed (an empty spool takes any
    # batch), the next waits for room that only a delivery could make, and behind it
    # the queue fills to its bound. Every batch the batcher handed over is counted
    # the whole time: from the hand-over, before delivery's task has run, and while it
    # waits. Then the batcher must keep its batch (and count it).
    delivery = Delivery(
        DeliveryConfig(spool_path=str(tmp_path / "s.sqlite3"), spool_max_bytes=1),
        RelayMetrics(),
    )
    await delivery.open()
    numbers = itertools.count()
    batches_send, batches_recv = trio.open_memory_channel[Batch](0)
    outlet = delivery.spool_outlet(batches_send)
    shipments_send, _shipments_recv = trio.open_memory_channel[Shipment](0)

    def counted() -> int:
        return delivery.held_events() + delivery.spooled_events()

    handed = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(delivery.run, batches_recv, shipments_send)
        await trio.testing.wait_all_tasks_blocked()
        first = Batch("b0", (event(next(numbers)), event(next(numbers))))
        await outlet.send(first)
        handed += len(first)
        # The commit runs in a thread; once it is in, nothing else does.
        await wait_until(lambda: delivery.spooled_events() == len(first))
        await trio.testing.wait_all_tasks_blocked()
        assert counted() == handed
        for n in range(1, 100):
            batch = Batch(f"b{n}", (event(next(numbers)), event(next(numbers))))
            try:
                outlet.send_nowait(batch)
            except trio.WouldBlock:
                break
            handed += len(batch)
            assert counted() == handed  # delivery's task has not run yet
            await trio.testing.wait_all_tasks_blocked()
            assert counted() == handed
        else:
            raise AssertionError("delivery took every batch: nothing bounds it")
        nursery.cancel_scope.cancel()
    await delivery.close()
