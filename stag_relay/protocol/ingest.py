"""What each POST to STAG carries, per ``stag.format``: a batch as one or more requests.

Pure: no I/O, no trio. The sender delivers a batch as the requests :func:`requests_for`
makes of it, each with its own retries, and judges each like the others: the same
answer classes, a 413 split in halves (:meth:`IngestRequest.split`), and for a 200 what
the body says (:meth:`IngestRequest.judge`).

- ``batch``: the batch is one request, the relay's own envelope; its ``batch_id`` is
  the Idempotency-Key, and a half of it is a batch again (``WireBatch.split``).
- ``spatial-event``: one ``SpatialEvent`` request per session of the batch
  (:mod:`stag_relay.protocol.spatial_event`). A request STAG finds too large is split
  by its events, and each half is a SpatialEvent of its own, its event id derived from
  ``<batch id>.0`` / ``.1`` as a batch's halves are: stable across retries and spool
  replays. A 200 whose body contradicts the request is not a delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import orjson

from stag_relay.protocol.events import WireBatch
from stag_relay.protocol.spatial_event import (
    DELIVERED,
    Contradicted,
    Delivered,
    SpatialEventRequest,
    check_answer,
    encode_events,
)


class IngestRequest(Protocol):
    """One request's worth of a batch, sent (and retried) as it is."""

    @property
    def key(self) -> str:
        """The Idempotency-Key: the same for every attempt and every replay."""
        ...

    @property
    def count(self) -> int:
        """Events it carries."""
        ...

    def body(self, relay_id: str, now_ms: int) -> bytes:
        """The POST body of an attempt made at Unix time ``now_ms``."""
        ...

    def judge(self, answer: bytes) -> Delivered | Contradicted:
        """Whether a 2xx answering ``answer`` delivered it."""
        ...

    def split(self) -> tuple[IngestRequest, IngestRequest]:
        """Its two halves, for a 413; only when ``count`` >= 2."""
        ...

    def log_fields(self) -> dict[str, object]:
        """What names it in a log line."""
        ...


@attrs.frozen(slots=True)
class BatchRequest:
    """``stag.format: batch``: the whole batch in the relay's envelope."""

    wire: WireBatch

    @property
    def key(self) -> str:
        return self.wire.batch_id

    @property
    def count(self) -> int:
        return self.wire.count

    def body(self, relay_id: str, now_ms: int) -> bytes:
        return self.wire.body(relay_id, now_ms)

    def judge(self, answer: bytes) -> Delivered | Contradicted:
        # The batch contract says nothing of a 2xx body.
        return DELIVERED

    def split(self) -> tuple[BatchRequest, BatchRequest]:
        first, second = self.wire.split()
        return BatchRequest(first), BatchRequest(second)

    def log_fields(self) -> dict[str, object]:
        return {"batch_id": self.wire.batch_id}


@attrs.frozen(slots=True)
class SessionRequest:
    """``stag.format: spatial-event``: one session's events of a batch as a SpatialEvent.

    ``part_id`` is what the event id derives from: the batch id, or for a half of a
    request split on 413 the batch id with ``.0`` / ``.1`` appended (as many times
    as it was halved).
    """

    batch_id: str
    part_id: str
    # The session's events, each an Event.to_json() document, in batch order.
    events: tuple[Mapping[str, Any], ...] = attrs.field(repr=lambda e: f"<{len(e)} events>")
    request: SpatialEventRequest

    @property
    def key(self) -> str:
        return self.request.event_id

    @property
    def count(self) -> int:
        return len(self.events)

    def body(self, relay_id: str, now_ms: int) -> bytes:
        # Fixed bytes: a SpatialEvent has no envelope time, so every retry is identical.
        return self.request.body

    def judge(self, answer: bytes) -> Delivered | Contradicted:
        return check_answer(self.request, answer)

    def split(self) -> tuple[SessionRequest, SessionRequest]:
        if len(self.events) < 2:
            raise ValueError("a request of one event cannot be split")
        middle = len(self.events) // 2
        return (
            _session_request(self.batch_id, f"{self.part_id}.0", self.events[:middle]),
            _session_request(self.batch_id, f"{self.part_id}.1", self.events[middle:]),
        )

    def log_fields(self) -> dict[str, object]:
        return {
            "batch_id": self.batch_id,
            "session_id": self.request.session_id,
            "event_id": self.request.event_id,
        }


def requests_for(format: str, wire: WireBatch) -> tuple[IngestRequest, ...]:
    """The requests that deliver ``wire`` in ``format`` (``stag.format``).

    Raises :class:`~stag_relay.protocol.spatial_event.SpatialEventError` for a batch
    the spatial-event format cannot carry.
    """
    if format == "batch":
        return (BatchRequest(wire),)
    if format != "spatial-event":
        raise ValueError(f"unknown stag.format {format!r}")
    sessions: dict[str, list[Mapping[str, Any]]] = {}
    for event in orjson.loads(wire.events):
        sessions.setdefault(event["session_id"], []).append(event)
    return tuple(
        _session_request(wire.batch_id, wire.batch_id, tuple(events))
        for events in sessions.values()
    )


def _session_request(
    batch_id: str, part_id: str, events: tuple[Mapping[str, Any], ...]
) -> SessionRequest:
    [request] = encode_events(part_id, events)
    return SessionRequest(batch_id, part_id, events, request)
