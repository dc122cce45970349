"""When to cut the event stream into a batch for STAG: the policy, as plain code.

``BatchPolicy`` is driven with explicit times (it uses no trio): a batch is cut when it
reaches ``max_size`` (a hard cap) or when ``timeout`` has passed since its first event,
and it is never empty. ``stag_relay.pipeline.batcher`` is the Trio task that runs it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from stag_relay.protocol.events import Batch, Event


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
        return self.extend([event], now)

    def extend(self, events: list[Event], now: float) -> Batch | None:
        """Add ``events``, all received at ``now`` and no more than the open batch has
        room for (``max_size - pending``); the full batch when they filled it."""
        held = self._events
        if len(events) > self._max_size - len(held):
            raise ValueError(
                f"{len(events)} events do not fit in the open batch "
                f"({len(held)} of {self._max_size})"
            )
        if not events:
            return None
        if not held:
            self._deadline = now + self._timeout
        held.extend(events)
        if len(held) >= self._max_size:
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
