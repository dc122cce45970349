"""Events on the wire: a batch's JSON is its events' to_json(), whatever they hold."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.events import (
    Anchor,
    AnchorPose,
    Batch,
    Event,
    MeshUpdate,
    WireBatch,
    to_wire,
)

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_TEXT = st.text(max_size=12)

# What a client may attach to a pose (the SDK's metadata): any JSON object orjson reads.
_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | _INT64 | _FLOATS | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)

_ANCHORS = st.builds(
    Anchor,
    _TEXT,
    st.builds(AnchorPose, _FLOATS, _FLOATS, _FLOATS, st.tuples(_FLOATS, _FLOATS, _FLOATS, _FLOATS)),
    _INT64,
    st.none() | st.dictionaries(_TEXT, _JSON, max_size=3),
)

_MESHES = st.builds(
    MeshUpdate,
    anchor_id=_TEXT,
    is_delta=st.booleans(),
    vertices_delta=_TEXT,
    faces_delta=_TEXT,
    vertex_count=st.integers(0, 2**31),
    face_count=st.integers(0, 2**31),
    base_event_id=st.none() | _TEXT,
    removed_faces=_TEXT,
    added=_TEXT,
    mesh_id=st.none() | _TEXT,
    normals=_TEXT,
    compression_level=st.none() | st.integers(0, 9),
    base_mesh_id=st.none() | _TEXT,
    delta_data=_TEXT,
)


class _Connection:
    """An event's origin: what it holds (a connection) has no JSON form."""

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        pass

    def forget(self, count: int) -> None:
        pass


_EVENTS = st.builds(
    Event,
    _TEXT,
    _TEXT,
    st.integers(0, 2**63 - 1),
    _INT64,
    _INT64,
    st.sampled_from(["pose", "mesh"]),
    st.lists(_ANCHORS, max_size=3).map(tuple),
    st.lists(_MESHES, max_size=2).map(tuple),
    st.none() | st.builds(_Connection),
)


def typed(value: Any) -> Any:
    """``value`` with every leaf paired with its type: ``==`` alone takes 1, 1.0 and
    True for one another."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [typed(item) for item in value]
    return (type(value), value)


@given(st.lists(_EVENTS, min_size=1, max_size=5))
def test_a_batch_on_the_wire_is_its_events_as_to_json_says(events: list[Event]) -> None:
    wire = to_wire(Batch("batch-1", tuple(events)))
    assert wire.count == len(events)
    # As orjson writes to_json(): the same members, values and JSON types.
    expected = orjson.loads(orjson.dumps([event.to_json() for event in events]))
    assert typed(orjson.loads(wire.events)) == typed(expected)


def test_a_pose_without_metadata_has_no_metadata_member() -> None:
    # A seed pose's JSON is what it always was: no "metadata": null.
    anchor = Anchor("a", AnchorPose(1.0, 2.0, 3.0, (0.0, 0.0, 0.0, 1.0)), 5)
    event = Event("e", "s", 1, 5, 6, "pose", (anchor,), ())
    assert orjson.loads(to_wire(Batch("b", (event,))).events) == [
        {
            "event_id": "e",
            "session_id": "s",
            "frame_number": 1,
            "timestamp": 5,
            "received_at": 6,
            "type": "pose",
            "anchors": [
                {
                    "id": "a",
                    "pose": {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
                    "timestamp": 5,
                }
            ],
            "meshes": [],
        }
    ]


def test_the_body_wraps_the_events_in_the_envelope() -> None:
    wire = WireBatch("b-1", 2, b'[{"n":1},{"n":2}]')
    assert orjson.loads(wire.body("relay-a", 123)) == {
        "batch_id": "b-1",
        "relay_id": "relay-a",
        "timestamp": 123,
        "count": 2,
        "events": [{"n": 1}, {"n": 2}],
    }
