"""Spatial events, the batches that carry them to STAG, and their wire encoding.

Pure: no I/O, no trio. An event is built once on its connection task and never
changes; a batch is an immutable tuple of events with an id that stays the same
across every retry of it, so STAG can deduplicate on ``Idempotency-Key``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import orjson

EventType = Literal["pose", "mesh"]


@attrs.frozen(slots=True)
class Anchor:
    """A pose anchor: where the device was, in the client's world frame."""

    id: str
    x: float
    y: float
    z: float
    rotation: tuple[float, float, float, float]
    timestamp: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pose": {"x": self.x, "y": self.y, "z": self.z, "rotation": list(self.rotation)},
            "timestamp": self.timestamp,
        }


@attrs.frozen(slots=True)
class MeshUpdate:
    """One anchor's mesh as sent to STAG: a full mesh (``is_delta`` false) for now.

    ``vertices_delta`` and ``faces_delta`` are the client's base64 buffers, untouched.
    """

    anchor_id: str
    is_delta: bool
    vertices_delta: str
    faces_delta: str

    def to_json(self) -> dict[str, Any]:
        return {
            "anchor_id": self.anchor_id,
            "is_delta": self.is_delta,
            "vertices_delta": self.vertices_delta,
            "faces_delta": self.faces_delta,
        }


@attrs.frozen(slots=True)
class Event:
    """One spatial event: what one accepted packet becomes.

    ``event_id`` is deterministic in (session_id, type, frame_number), so a resent
    packet, or the same packet through another relay, yields the same id.
    """

    event_id: str
    session_id: str
    frame_number: int
    timestamp: int
    received_at: int
    type: EventType
    anchors: tuple[Anchor, ...] = ()
    meshes: tuple[MeshUpdate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "session_id": self.session_id,
            "frame_number": self.frame_number,
            "timestamp": self.timestamp,
            "received_at": self.received_at,
            "type": self.type,
            "anchors": [a.to_json() for a in self.anchors],
            "meshes": [m.to_json() for m in self.meshes],
        }


@attrs.frozen(slots=True)
class Batch:
    """Events delivered to STAG in one request. Never empty."""

    batch_id: str
    events: tuple[Event, ...]

    def __len__(self) -> int:
        return len(self.events)

    def split(self) -> tuple[Batch, Batch]:
        """Halve a batch STAG found too large (413).

        The halves get ids derived from the parent's, so retrying a split batch
        after a restart still produces the same idempotency keys.
        """
        if len(self.events) < 2:
            raise ValueError("a batch of one event cannot be split")
        middle = len(self.events) // 2
        return (
            Batch(f"{self.batch_id}.0", self.events[:middle]),
            Batch(f"{self.batch_id}.1", self.events[middle:]),
        )


def encode_batch(batch: Batch, relay_id: str, now_ms: int) -> bytes:
    """The JSON body of ``POST {stag.url}{stag.ingest_path}`` for ``batch``."""
    return orjson.dumps(
        {
            "batch_id": batch.batch_id,
            "relay_id": relay_id,
            "timestamp": now_ms,
            "count": len(batch.events),
            "events": [e.to_json() for e in batch.events],
        }
    )
