"""``stag.format: spatial-event``: batches as the public STAGs' ``SpatialEvent`` requests.

Pure: no I/O, no trio. tabularxr/stag and tabularxr/Stag serve
``POST /api/v1/ingest`` with one ``SpatialEvent`` per request:
``{"session_id", "event_id", "timestamp", "anchors": [...], "meshes": [...]}``. A
batch becomes one request per session it holds (:func:`encode_batch`, or
:func:`encode_wire` for a batch read back from the spool: both give the same
bytes). ``event_id`` is a uuid5 of the batch id and the session, so every retry
and every replay after a restart sends the same one; it is also the request's
``Idempotency-Key``.

These STAGs know nothing of the relay's exact triangle diffs, so meshes always
go full, with the client's buffers untouched; an SDK delta passes through as the
SDK made it (``is_delta``, ``base_mesh_id``, its bytes in ``delta_data``). A batch
holding a relay delta cannot be sent in this format (:class:`SpatialEventError`).

What comes back in a 200 is checked against what was sent
(:func:`check_answer`): both STAGs echo the event id and count what they stored,
and a 200 that contradicts the request is not a delivery.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import orjson

from stag_relay.protocol.events import Batch, WireBatch
from stag_relay.protocol.sessions import NAMESPACE

# What a mesh says of its compression when the client said nothing (seed meshes
# are Draco, which has no such level); both STAGs accept 0 to 9.
DEFAULT_COMPRESSION_LEVEL: Final = 0


class SpatialEventError(ValueError):
    """A batch this format cannot carry: it holds a relay delta (``batch`` format only)."""


@attrs.frozen(slots=True)
class SpatialEventRequest:
    """One ``POST {stag.url}{stag.ingest_path}``: a session's share of a batch."""

    session_id: str
    # The SpatialEvent's event_id, and the Idempotency-Key header.
    event_id: str
    anchors: int
    meshes: int
    body: bytes = attrs.field(repr=lambda body: f"<{len(body)} bytes>")


def spatial_event_id(batch_id: str, session_id: str) -> str:
    """The deterministic event id of a session's share of a batch."""
    return str(uuid.uuid5(NAMESPACE, f"spatial-event\x00{batch_id}\x00{session_id}"))


def encode_batch(batch: Batch) -> tuple[SpatialEventRequest, ...]:
    """One request per session of ``batch``, in the order the sessions first appear."""
    return encode_events(batch.batch_id, [event.to_json() for event in batch.events])


def encode_wire(wire: WireBatch) -> tuple[SpatialEventRequest, ...]:
    """:func:`encode_batch` for a batch as it rests in the spool."""
    return encode_events(wire.batch_id, orjson.loads(wire.events))


def encode_events(
    batch_id: str, events: Iterable[Mapping[str, Any]]
) -> tuple[SpatialEventRequest, ...]:
    """The requests for a batch's events, each an :meth:`Event.to_json` document."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        groups.setdefault(event["session_id"], []).append(event)
    return tuple(_request(batch_id, session_id, group) for session_id, group in groups.items())


def _request(
    batch_id: str, session_id: str, events: list[Mapping[str, Any]]
) -> SpatialEventRequest:
    anchors: list[dict[str, Any]] = []
    meshes: list[dict[str, Any]] = []
    for event in events:
        for anchor in event["anchors"]:
            anchors.append(_anchor(anchor, session_id))
        for mesh in event["meshes"]:
            meshes.append(_mesh(mesh, event))
    event_id = spatial_event_id(batch_id, session_id)
    body = orjson.dumps(
        {
            "session_id": session_id,
            "event_id": event_id,
            # The newest event's time: fixed for the batch, so retries send the
            # same bytes, and never 0, which Stag v2's binding refuses.
            "timestamp": max(event["timestamp"] for event in events),
            "anchors": anchors,
            "meshes": meshes,
        }
    )
    return SpatialEventRequest(session_id, event_id, len(anchors), len(meshes), body)


def _anchor(anchor: Mapping[str, Any], session_id: str) -> dict[str, Any]:
    doc = {
        "id": anchor["id"],
        "session_id": session_id,
        "pose": anchor["pose"],
        "timestamp": anchor["timestamp"],
    }
    if "metadata" in anchor:
        doc["metadata"] = anchor["metadata"]
    return doc


def _mesh(mesh: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
    if mesh["is_delta"]:
        raise SpatialEventError(
            f"event {event['event_id']} holds a relay mesh delta, which the spatial-event "
            "format cannot carry (meshes go full in it)"
        )
    delta_data = mesh.get("delta_data", "")
    doc: dict[str, Any] = {
        "id": mesh.get("mesh_id") or event["event_id"],
        "anchor_id": mesh["anchor_id"],
        "vertices": mesh["vertices_delta"],
        "faces": mesh["faces_delta"],
    }
    if mesh.get("normals"):
        doc["normals"] = mesh["normals"]
    doc["is_delta"] = bool(delta_data)
    if mesh.get("base_mesh_id") is not None:
        doc["base_mesh_id"] = mesh["base_mesh_id"]
    if delta_data:
        doc["delta_data"] = delta_data
    doc["compression_level"] = mesh.get("compression_level", DEFAULT_COMPRESSION_LEVEL)
    doc["timestamp"] = event["timestamp"]
    return doc


# --- STAG's 200 ---------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Delivered:
    """STAG's 200 agrees with the request, or says nothing the relay can check."""


@attrs.frozen(slots=True)
class Contradicted:
    """STAG answered 200 but contradicts what was sent: not a delivery."""

    reason: str


DELIVERED: Final = Delivered()


def check_answer(sent: SpatialEventRequest, body: bytes) -> Delivered | Contradicted:
    """Judge STAG's 200 body for ``sent``.

    tabularxr/stag answers ``{"success": true, "event_id", "processed": anchors +
    meshes}``, tabularxr/Stag ``{"message", "event_id", "anchors_count",
    "meshes_count"}``. A ``success`` other than true, another ``event_id``, or a
    count smaller than what was sent contradicts the request. A body that is not
    a JSON object, or holds none of these fields, comes from another STAG and is
    a delivery; so is a count that is not a number (nothing to compare).
    """
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return DELIVERED
    if type(answer) is not dict:
        return DELIVERED
    if "success" in answer and answer["success"] is not True:
        return Contradicted(f"STAG answered success {_show(answer['success'])}")
    if "event_id" in answer and answer["event_id"] != sent.event_id:
        return Contradicted(
            f"STAG answered event_id {_show(answer['event_id'])} to event {sent.event_id}"
        )
    sent_items = sent.anchors + sent.meshes
    for field, count, what in (
        ("processed", sent_items, f"items ({_items(sent)})"),
        ("anchors_count", sent.anchors, "anchors"),
        ("meshes_count", sent.meshes, "meshes"),
    ):
        value: Any = answer.get(field)
        if _is_number(value) and value < count:
            return Contradicted(f"STAG answered {field} {_show(value)} for {count} {what} sent")
    return DELIVERED


def _is_number(value: object) -> bool:
    t = type(value)
    return t is int or t is float


def _items(sent: SpatialEventRequest) -> str:
    return f"{sent.anchors} anchors + {sent.meshes} meshes"


def _show(value: object) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:60] + "..."
