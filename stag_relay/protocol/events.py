"""Spatial events, the batches that carry them to STAG, and their wire encoding.

Pure: no I/O, no trio. An event is built once on its connection task and never
changes; a batch is an immutable tuple of events with an id that stays the same
across every retry of it, so STAG can deduplicate on ``Idempotency-Key``.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import attrs
import msgspec
import orjson

EventType = Literal["pose", "mesh"]


# msgspec structs laid out as an anchor is on the wire: to_wire hands them to the
# encoder as they are, one per pose event, instead of building a copy of each.
# gc=False: what they hold (numbers, strings, the client's JSON metadata) cannot refer
# back to them, so no cycle can pass through one and the collector need not track
# the two objects every pose adds.
class AnchorPose(msgspec.Struct, gc=False):
    """Where the device was: a position, and its orientation as a unit quaternion."""

    x: float
    y: float
    z: float
    rotation: tuple[float, float, float, float]


class Anchor(msgspec.Struct, omit_defaults=True, gc=False):
    """A pose anchor: where the device was, in the client's world frame."""

    id: str
    pose: AnchorPose
    timestamp: int
    # What the client attached to the pose (the SDK's AnchorUpdate.metadata); seed
    # poses have none, and then the wire has no such member.
    metadata: dict[str, Any] | None = None

    @property
    def x(self) -> float:
        return self.pose.x

    @property
    def y(self) -> float:
        return self.pose.y

    @property
    def z(self) -> float:
        return self.pose.z

    @property
    def rotation(self) -> tuple[float, float, float, float]:
        return self.pose.rotation

    def to_json(self) -> dict[str, Any]:
        pose = self.pose
        doc: dict[str, Any] = {
            "id": self.id,
            "pose": {"x": pose.x, "y": pose.y, "z": pose.z, "rotation": list(pose.rotation)},
            "timestamp": self.timestamp,
        }
        if self.metadata is not None:
            doc["metadata"] = self.metadata
        return doc


@attrs.frozen(slots=True)
class MeshUpdate:
    """One anchor's mesh as sent to STAG: full (``is_delta`` false) or a delta.

    Full: ``vertices_delta`` and ``faces_delta`` are the client's base64 buffers,
    untouched; after it STAG's mesh is the decoded client mesh. Delta: STAG's
    mesh for the event ``base_event_id``, without the triangles at the indices in
    ``removed_faces`` (base64 little-endian uint32, ascending), followed by the
    triangles of ``added`` (base64 lossless Draco); see
    ``stag_relay.protocol.geometry.apply_mesh_diff``. ``vertex_count`` and ``face_count``
    describe the client's new mesh (0 until the mesh pipeline has decoded it).

    The StreamKit SDK's meshes carry more, all passed on untouched and absent from
    the JSON while unset (so a seed mesh's JSON is what it always was):
    ``mesh_id`` (the SDK's mesh id, repeated by every update of one ARKit mesh
    anchor), ``normals`` (base64), ``compression_level`` (0-9) and, for the
    SDK's own deltas, ``delta_data`` (base64 of the SDK's compressed diff, which
    the relay never decodes) with ``base_mesh_id``. Such a delta is not a relay
    delta: ``is_delta`` stays false and ``vertices_delta`` empty.
    """

    anchor_id: str
    is_delta: bool
    vertices_delta: str = ""
    faces_delta: str = ""
    vertex_count: int = 0
    face_count: int = 0
    base_event_id: str | None = None
    removed_faces: str = ""
    added: str = ""
    mesh_id: str | None = None
    normals: str = ""
    compression_level: int | None = None
    base_mesh_id: str | None = None
    delta_data: str = ""

    @property
    def payload_chars(self) -> int:
        """Characters of mesh data this update sends (for relay_mesh_bytes_out_total)."""
        extra = len(self.normals) + len(self.delta_data)
        if self.is_delta:
            return len(self.removed_faces) + len(self.added) + extra
        return len(self.vertices_delta) + len(self.faces_delta) + extra

    def to_json(self) -> dict[str, Any]:
        if self.is_delta:
            doc: dict[str, Any] = {
                "anchor_id": self.anchor_id,
                "is_delta": True,
                "base_event_id": self.base_event_id,
                "removed_faces": self.removed_faces,
                "added": self.added,
                "vertex_count": self.vertex_count,
                "face_count": self.face_count,
            }
        else:
            doc = {
                "anchor_id": self.anchor_id,
                "is_delta": False,
                "vertices_delta": self.vertices_delta,
                "faces_delta": self.faces_delta,
                "vertex_count": self.vertex_count,
                "face_count": self.face_count,
            }
        if self.mesh_id is not None:
            doc["mesh_id"] = self.mesh_id
        if self.normals:
            doc["normals"] = self.normals
        if self.compression_level is not None:
            doc["compression_level"] = self.compression_level
        if self.base_mesh_id is not None:
            doc["base_mesh_id"] = self.base_mesh_id
        if self.delta_data:
            doc["delta_data"] = self.delta_data
        return doc


# A msgspec struct in the wire's layout, so that to_wire hands most events to the
# encoder as they are, and one is built in C on a path taken for every packet.
# omit_defaults: ``origin`` is left out of the JSON when it is None; an event with an
# origin, or with meshes (whose wire form is MeshUpdate.to_json), is copied into a
# _WireEvent first. anchors and meshes have no default, so that the wire always has
# them, as [] when empty. Unlike the attrs class it replaces, == and repr take
# ``origin`` in too (nothing but tests compares events), and it has no weakref slot.
class Event(msgspec.Struct, omit_defaults=True):
    """One spatial event: what one accepted packet becomes.

    ``event_id`` is deterministic in (session_id, type, frame_number), so a resent
    packet, or the same packet through another relay, yields the same id. The
    StreamKit SDK numbers no frames: its events have ``frame_number`` 0 and ids
    deterministic in (session_id, type, anchor or mesh id, timestamp) instead.
    Nothing changes an event once built (``msgspec.structs.replace`` makes another).
    """

    event_id: str
    session_id: str
    frame_number: int
    timestamp: int
    received_at: int
    type: EventType
    anchors: tuple[Anchor, ...]
    meshes: tuple[MeshUpdate, ...]
    # The connection to acknowledge once the event is durable; None when it did not
    # ask for acknowledgements. Not part of the event's JSON (to_json, to_wire).
    origin: Origin | None = None

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


class Origin(Protocol):
    """Where events came from: told when they are durable, or that they never will be."""

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None: ...

    def forget(self, count: int) -> None: ...


@attrs.frozen(slots=True)
class WireBatch:
    """A batch as it travels to STAG and rests in the spool: its events already JSON.

    Encoded once when the batch is cut; every retry, and a resend after a restart,
    sends the same bytes (with the same ``batch_id``) and only the envelope's
    ``timestamp`` changes.
    """

    batch_id: str
    count: int
    # The events as one JSON array.
    events: bytes

    def body(self, relay_id: str, now_ms: int) -> bytes:
        """The JSON body of ``POST {stag.url}{stag.ingest_path}``."""
        head = orjson.dumps(
            {
                "batch_id": self.batch_id,
                "relay_id": relay_id,
                "timestamp": now_ms,
                "count": self.count,
            }
        )
        return head[:-1] + b',"events":' + self.events + b"}"

    def split(self) -> tuple[WireBatch, WireBatch]:
        """Halve a batch STAG found too large (413).

        The halves get ids derived from the parent's, so retrying a split batch
        after a restart still produces the same idempotency keys.
        """
        if self.count < 2:
            raise ValueError("a batch of one event cannot be split")
        events = orjson.loads(self.events)
        middle = len(events) // 2
        return (
            WireBatch(f"{self.batch_id}.0", middle, orjson.dumps(events[:middle])),
            WireBatch(f"{self.batch_id}.1", len(events) - middle, orjson.dumps(events[middle:])),
        )


# An event the encoder cannot take as it is (see Event): its wire layout, with its
# meshes as their JSON.
class _WireEvent(msgspec.Struct):
    event_id: str
    session_id: str
    frame_number: int
    timestamp: int
    received_at: int
    type: str
    anchors: tuple[Anchor, ...]
    meshes: list[dict[str, Any]]


_encode_events = msgspec.json.Encoder().encode


def _wire_event(e: Event) -> _WireEvent:
    return _WireEvent(
        e.event_id,
        e.session_id,
        e.frame_number,
        e.timestamp,
        e.received_at,
        e.type,
        e.anchors,
        [m.to_json() for m in e.meshes],
    )


def to_wire(batch: Batch) -> WireBatch:
    """``batch`` as STAG gets it: the JSON array of its events' :meth:`Event.to_json`.

    msgspec would also write what orjson refuses (integers beyond 64 bits, say), but
    an event holds none: its integers are checked to int64 when parsed, and metadata
    is what orjson read (``WireBatch.split`` reads the JSON back with orjson)."""
    events = batch.events
    wire = [e if e.origin is None and not e.meshes else _wire_event(e) for e in events]
    return WireBatch(batch.batch_id, len(events), _encode_events(wire))
