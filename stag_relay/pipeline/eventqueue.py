"""The bounded queue from the connections to the batcher, counted in events.

A connection hands over every event of one socket read at once (``put``), so the
queue costs one operation per read instead of one per event. Its receive side
mirrors a trio memory channel's (``receive``, ``receive_nowait``, ``statistics``,
``EndOfChannel`` once the send side is closed and the queue is empty), with two
more for the batcher: ``wait_for``, to sleep until a batch's worth has arrived
rather than wake per event, and ``receive_some_nowait``, to take that batch's worth
in one step.

The bound is in events, not in reads: ``websocket.buffer_size`` is the most the
queue ever holds, and a put that does not fit takes what fits and waits for room
for the rest, so backpressure starts exactly where the configuration says.
Waiting senders are served first come, first served, and the queue itself moves
their events in as room appears (as trio's channels hand a waiting sender's value
over on receive), so a sender that waited never has to be woken just to find the
room taken, and the line never stalls behind wake-ups.
"""

from __future__ import annotations

from collections import deque

import attrs
import outcome
import trio

from stag_relay.protocol.events import Event


@attrs.frozen
class QueueStatistics:
    current_buffer_used: int
    max_buffer_size: int
    tasks_waiting_send: int
    tasks_waiting_receive: int


class _Queue:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.events: deque[Event] = deque()
        # Senders waiting for room, first come first served, each with the events it
        # still has to put (they leave its list as they go in).
        self.waiting: deque[tuple[trio.lowlevel.Task, list[Event]]] = deque()
        # How many events the waiting senders hold, all together.
        self.held = 0
        self.receivers = trio.lowlevel.ParkingLot()
        # A parked receiver is woken once the queue holds this many events: the
        # batcher with an open batch asks for what fills it, not for each event.
        self.wanted = 1
        self.send_closed = False

    def move(self, events: list[Event]) -> None:
        """Move what fits from the front of ``events`` into the queue."""
        room = self.capacity - len(self.events)
        if room <= 0:
            return
        if len(events) <= room:
            self.events.extend(events)
            events.clear()
        else:
            self.events.extend(events[:room])
            del events[:room]
        if self.receivers and len(self.events) >= self.wanted:
            self.receivers.unpark()

    def serve_waiting(self) -> None:
        """Move waiting senders' events in while there is room; a sender whose
        events are all in may go on."""
        waiting = self.waiting
        while waiting and len(self.events) < self.capacity:
            task, events = waiting[0]
            before = len(events)
            self.move(events)
            self.held -= before - len(events)
            if events:
                return
            waiting.popleft()
            trio.lowlevel.reschedule(task)


class EventSender:
    """The connections' end. One object shared by every connection."""

    def __init__(self, queue: _Queue) -> None:
        self._queue = queue

    def put_nowait(self, events: list[Event]) -> None:
        """Move as many of ``events`` as there is room for, from the front of the list
        (they leave it); none while other senders wait for their turn."""
        queue = self._queue
        if queue.send_closed:
            raise trio.ClosedResourceError
        if queue.waiting:
            return
        queue.move(events)

    async def put(self, events: list[Event]) -> None:
        """Move all of ``events`` into the queue, waiting for room as needed.

        Events leave the list as they go in: if this is cancelled, what is still
        in ``events`` never entered the queue.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.put_nowait(events)
        if not events:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        queue = self._queue
        task = trio.lowlevel.current_task()
        entry = (task, events)
        queue.waiting.append(entry)
        queue.held += len(events)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            queue.waiting.remove(entry)
            queue.held -= len(events)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def put_shielded(self, events: list[Event]) -> None:
        """``put``, but cancellation does not interrupt it (as inside a shielded cancel
        scope, without the cost of one per put): only ``abort_put`` or ``close`` end
        the wait early, with ``trio.ClosedResourceError``; what is then still in
        ``events`` never entered the queue."""
        self.put_nowait(events)
        if not events:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._queue.waiting.append((trio.lowlevel.current_task(), events))
        self._queue.held += len(events)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def abort_put(self, task: trio.lowlevel.Task) -> bool:
        """End ``task``'s waiting put with ``trio.ClosedResourceError`` (the shutdown
        deadline); False if it is not waiting."""
        queue = self._queue
        for entry in queue.waiting:
            if entry[0] is task:
                queue.waiting.remove(entry)
                queue.held -= len(entry[1])
                trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
                return True
        return False

    def pressed(self) -> bool:
        """Waiting senders hold a queue's worth of events already: connections should
        read little at a time, since what they read and cannot put is held too.

        Below that, a connection reads as much as it can: under a flood the queue is
        full nearly all the time, and reading little while a few senders wait costs a
        read, a task switch and a wait per few dozen packets instead of per few
        hundred. Held events stay bounded either way: a queue's worth plus one large
        read, then a small read's worth per waiting connection.
        """
        queue = self._queue
        return queue.held >= queue.capacity

    def waiting_events(self) -> int:
        """Events senders hold while they wait for room."""
        return self._queue.held

    def send_nowait(self, event: Event) -> None:
        """Put one event or raise ``trio.WouldBlock``."""
        events = [event]
        self.put_nowait(events)
        if events:
            raise trio.WouldBlock

    async def send(self, event: Event) -> None:
        await self.put([event])

    def close(self) -> None:
        """No more events: the batcher gets ``EndOfChannel`` once it has taken the rest."""
        queue = self._queue
        if queue.send_closed:
            return
        queue.send_closed = True
        for task, _events in queue.waiting:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))
        queue.waiting.clear()
        queue.held = 0
        queue.receivers.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> QueueStatistics:
        return _statistics(self._queue)


class EventReceiver:
    """The batcher's end: what it needs of a ``trio.MemoryReceiveChannel``."""

    def __init__(self, queue: _Queue) -> None:
        self._queue = queue

    def receive_nowait(self) -> Event:
        queue = self._queue
        if queue.events:
            event = queue.events.popleft()
            if queue.waiting:
                queue.serve_waiting()
            return event
        if queue.send_closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    def receive_some_nowait(self, limit: int) -> list[Event]:
        """Up to ``limit`` (at least 1) of the queued events, oldest first, in one step;
        raises as ``receive_nowait`` does when there are none."""
        queue = self._queue
        events = queue.events
        if not events:
            if queue.send_closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        popleft = events.popleft
        taken = [popleft() for _ in range(min(limit, len(events)))]
        if queue.waiting:
            queue.serve_waiting()
        return taken

    async def receive(self) -> Event:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            event = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return event
        while True:
            await self._queue.receivers.park()
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue

    async def wait_for(self, count: int) -> None:
        """Return once the queue holds ``count`` events (or is full), or the send side
        is closed; take them with ``receive_nowait``. Puts of fewer do not wake us."""
        queue = self._queue
        count = max(1, min(count, queue.capacity))
        if len(queue.events) >= count or queue.send_closed:
            await trio.lowlevel.checkpoint()
            return
        queue.wanted = count
        try:
            while len(queue.events) < count and not queue.send_closed:
                await queue.receivers.park()
        finally:
            queue.wanted = 1

    def statistics(self) -> QueueStatistics:
        return _statistics(self._queue)


def _statistics(queue: _Queue) -> QueueStatistics:
    return QueueStatistics(
        current_buffer_used=len(queue.events),
        max_buffer_size=queue.capacity,
        tasks_waiting_send=len(queue.waiting),
        tasks_waiting_receive=len(queue.receivers),
    )


def open_event_queue(capacity: int) -> tuple[EventSender, EventReceiver]:
    """A queue that holds at most ``capacity`` events, and its two ends."""
    queue = _Queue(capacity)
    return EventSender(queue), EventReceiver(queue)
