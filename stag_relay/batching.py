"""Cutting the event stream into batches for STAG: the policy, and the Trio task that runs it.

``BatchPolicy`` is the rule, plain code driven with explicit times (it uses no trio): a
batch is cut when it reaches ``max_size`` (a hard cap) or when ``timeout`` has passed
since its first event, and it is never empty. ``Batcher`` is the thin Trio shell that
feeds it from the event channel and hands the batches to the sender.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Protocol

import trio

from stag_relay.events import Batch, Event
from stag_relay.metrics import RelayMetrics


class _Depth(Protocol):
    @property
    def current_buffer_used(self) -> int: ...


class EventSource(Protocol):
    """Where the batcher takes events from: the gate's event queue
    (``stag_relay.eventqueue``), or a ``trio.MemoryReceiveChannel[Event]``."""

    def receive_nowait(self) -> Event: ...

    async def receive(self) -> Event: ...

    def statistics(self) -> _Depth: ...


def new_batch_id() -> str:
    """A fresh batch id: random, so two relays (or two boots) never collide."""
    return uuid.uuid4().hex


class BatchPolicy:
    """The open batch, and when it must be cut.

    Times are whatever clock the caller uses, as long as it is the same one for every
    call (the Trio task uses ``trio.current_time``).
    """

    def __init__(
        self, *, max_size: int, timeout: float, new_batch_id: Callable[[], str] = new_batch_id
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        self._max_size = max_size
        self._timeout = timeout
        self._new_batch_id = new_batch_id
        self._events: list[Event] = []
        self._deadline: float | None = None

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def pending(self) -> int:
        """Events in the open batch (lost if the relay stops without flushing)."""
        return len(self._events)

    @property
    def deadline(self) -> float | None:
        """When the open batch must be cut; ``None`` while there is none."""
        return self._deadline

    def add(self, event: Event, now: float) -> Batch | None:
        """Add ``event`` received at ``now``; the full batch when this one filled it."""
        if not self._events:
            self._deadline = now + self._timeout
        self._events.append(event)
        if len(self._events) >= self._max_size:
            return self._cut()
        return None

    def due(self, now: float) -> Batch | None:
        """The open batch if its deadline has passed at ``now``."""
        if self._deadline is not None and now >= self._deadline:
            return self._cut()
        return None

    def flush(self) -> Batch | None:
        """The open batch whatever its age (shutdown); ``None`` when there is none."""
        if not self._events:
            return None
        return self._cut()

    def _cut(self) -> Batch:
        batch = Batch(self._new_batch_id(), tuple(self._events))
        self._events.clear()
        self._deadline = None
        return batch


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

        The open batch plus a cut batch waiting for the sender; the app counts these
        as dropped if it must cancel ``run`` before they get out.
        """
        return self._policy.pending + self._outgoing

    async def run(
        self,
        events: EventSource,
        batches: trio.MemorySendChannel[Batch],
    ) -> None:
        """Batch ``events`` into ``batches`` until ``events`` is closed, then flush and
        close ``batches``."""
        policy = self._policy
        async with batches:
            while True:
                # Drain what is already waiting without a checkpoint or a cancel scope per
                # event: under load the batch fills from the buffer in one go.
                try:
                    event = events.receive_nowait()
                except trio.WouldBlock:
                    # The one moment the depth is known without asking the channel.
                    self._metrics.channel_events.set(0)
                    try:
                        waited = await self._wait_for_event(events)
                    except trio.EndOfChannel:
                        break
                    if waited is None:
                        # The scope fired at the policy's deadline: the open batch is due.
                        await self._send(events, batches, policy.flush())
                        continue
                    event = waited
                except trio.EndOfChannel:
                    break
                batch = policy.add(event, self._clock())
                if batch is not None:
                    await self._send(events, batches, batch)
            await self._send(events, batches, policy.flush())

    async def _wait_for_event(self, events: EventSource) -> Event | None:
        """The next event, or ``None`` if the open batch's deadline comes first."""
        deadline = self._policy.deadline
        if deadline is None:
            return await events.receive()
        with trio.move_on_at(deadline):
            return await events.receive()
        return None

    async def _send(
        self,
        events: EventSource,
        batches: trio.MemorySendChannel[Batch],
        batch: Batch | None,
    ) -> None:
        if batch is None:
            return
        # Once per batch, not per event: cheap enough to keep the gauge near the truth.
        self._metrics.channel_events.set(events.statistics().current_buffer_used)
        self._outgoing = len(batch)
        # If this is cancelled the batch was not sent (trio guarantees it), so it stays
        # counted in held_events().
        await batches.send(batch)
        self._outgoing = 0


async def run_batcher(
    events: EventSource,
    batches: trio.MemorySendChannel[Batch],
    policy: BatchPolicy,
    metrics: RelayMetrics,
    clock: Callable[[], float] = trio.current_time,
) -> None:
    """Run a ``Batcher`` over ``policy``; use ``Batcher`` directly to see what it holds."""
    await Batcher(policy, metrics, clock=clock).run(events, batches)
