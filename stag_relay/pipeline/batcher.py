"""The batcher: the Trio task that feeds the event queue to a ``BatchPolicy`` and hands
the batches it cuts to delivery."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import trio

from stag_relay.protocol.batching import BatchPolicy
from stag_relay.protocol.events import Batch, Event
from stag_relay.service.metrics import RelayMetrics


class _Depth(Protocol):
    @property
    def current_buffer_used(self) -> int: ...


class EventSource(Protocol):
    """Where the batcher takes events from: the gate's event queue
    (``stag_relay.pipeline.eventqueue``), or a ``trio.MemoryReceiveChannel[Event]``."""

    def receive_nowait(self) -> Event: ...

    async def receive(self) -> Event: ...

    def statistics(self) -> _Depth: ...


def _taker(events: EventSource) -> Callable[[int], list[Event]]:
    """``take(limit)``: up to ``limit`` events already waiting in ``events``, at least
    one (else ``WouldBlock`` or ``EndOfChannel``). The event queue hands them over in
    one step; a memory channel one at a time."""
    some: Callable[[int], list[Event]] | None = getattr(events, "receive_some_nowait", None)
    if some is not None:
        return some

    def one(limit: int) -> list[Event]:
        return [events.receive_nowait()]

    return one


class BatchOutlet(Protocol):
    """Where the batcher puts the batches it cuts: a ``trio.MemorySendChannel[Batch]``,
    or delivery's ``ToSender`` (memory only: straight to a free sender slot)."""

    def send_nowait(self, batch: Batch) -> None: ...

    async def send(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


class Batcher:
    """The Trio task around a ``BatchPolicy``: events in, batches out.

    ``clock`` must agree with trio's clock: the deadline the policy computes from it
    is waited for with ``trio.move_on_at``.
    """

    def __init__(
        self,
        policy: BatchPolicy,
        metrics: RelayMetrics,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        # A cut batch the sender has not taken yet (it is busy: backpressure).
        self._outgoing = 0

    def held_events(self) -> int:
        """Events taken from the channel and not yet handed to the sender.

        The open batch plus a cut batch waiting for the sender; the relay counts these
        as dropped if it must cancel ``run`` before they get out.
        """
        return self._policy.pending + self._outgoing

    async def run(
        self,
        events: EventSource,
        batches: BatchOutlet,
    ) -> None:
        """Batch ``events`` into ``batches`` until ``events`` is closed, then flush and
        close ``batches``."""
        policy = self._policy
        take = _taker(events)
        with contextlib.closing(batches):
            while True:
                # Drain what is already waiting without a checkpoint or a cancel scope per
                # event: under load the batch fills from the buffer in one go.
                try:
                    arrived = take(policy.max_size - policy.pending)
                except trio.WouldBlock:
                    # The one moment the depth is known without asking the channel.
                    self._metrics.channel_events.set(0)
                    try:
                        waited = await self._wait_for_event(events)
                    except trio.EndOfChannel:
                        break
                    if waited is None:
                        # The scope fired at the policy's deadline: the open batch is
                        # due, with what arrived for it while we slept.
                        batch = self._take_arrived(take)
                        await self._send(events, batches, batch or policy.flush())
                        continue
                    arrived = [waited]
                except trio.EndOfChannel:
                    break
                batch = policy.extend(arrived, self._clock())
                if batch is not None:
                    await self._send(events, batches, batch)
            await self._send(events, batches, policy.flush())

    def _take_arrived(self, take: Callable[[int], list[Event]]) -> Batch | None:
        """Events already queued into the open batch, until it is full (that batch)
        or the queue is empty (None)."""
        policy = self._policy
        now = self._clock()
        while True:
            try:
                arrived = take(policy.max_size - policy.pending)
            except (trio.WouldBlock, trio.EndOfChannel):
                return None
            batch = policy.extend(arrived, now)
            if batch is not None:
                return batch

    async def _wait_for_event(self, events: EventSource) -> Event | None:
        """The next event, or ``None`` if the open batch's deadline comes first.

        With a batch open and a source that can wait for several events, sleep until
        what fills the batch has arrived (or the deadline): the batch is cut at the
        same moment as if each event had been taken as it came, for one wake-up per
        batch instead of one per event. Only the open batch's first event needs its
        arrival time, and it is taken as it comes."""
        policy = self._policy
        deadline = policy.deadline
        if deadline is None:
            return await events.receive()
        with trio.move_on_at(deadline):
            wait_for = getattr(events, "wait_for", None)
            if wait_for is not None:
                await wait_for(policy.max_size - policy.pending)
            return await events.receive()
        return None

    async def _send(
        self,
        events: EventSource,
        batches: BatchOutlet,
        batch: Batch | None,
    ) -> None:
        if batch is None:
            return
        # Once per batch, not per event: cheap enough to keep the gauge near the truth.
        self._metrics.channel_events.set(events.statistics().current_buffer_used)
        # Handed straight to a waiting receiver when there is one, without this task
        # giving up its turn: under load each turn of the event loop holds many socket
        # reads, and the next batch may be due already.
        try:
            batches.send_nowait(batch)
            return
        except trio.WouldBlock:
            pass
        self._outgoing = len(batch)
        # If this is cancelled the batch was not sent (trio guarantees it), so it stays
        # counted in held_events().
        await batches.send(batch)
        self._outgoing = 0
