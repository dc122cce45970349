"""The spatial-event encoding: one request per (batch, session), the STAGs' bindings, 200 checks."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.events import Anchor, AnchorPose, Batch, Event, MeshUpdate, to_wire
from stag_relay.protocol.sdk import parse_message
from stag_relay.protocol.spatial_event import (
    DELIVERED,
    Contradicted,
    SpatialEventError,
    SpatialEventRequest,
    check_answer,
    encode_batch,
    encode_wire,
    spatial_event_id,
)
from tests.support.batches import pose_event
from tests.support.meshes import draco_grid
from tests.support.sdk import (
    ANCHOR_ID,
    ANCHOR_UPDATE,
    MESH_DELTA_JSON,
    MESH_ID,
    MESH_UPDATE_DELTA,
    MESH_UPDATE_FULL,
    MESH_V1_NORMALS_GZ,
    MESH_V1_VERTICES_GZ,
    SESSION_ID,
    sdk_compress,
    stag_lower_200,
    stag_v2_200,
)


def _sdk_event(message: bytes) -> Event:
    return parse_message(message, binary=True, session_id=SESSION_ID).to_event(received_at_ms=1)


def _pose(session: str, n: int, anchor: str = "anchor_seed") -> Event:
    return pose_event(session, n, anchor)


def _seed_mesh(session: str, n: int) -> Event:
    mesh = MeshUpdate("anchor-7", False, draco_grid(2, 2), "", 9, 8)
    return Event(f"mesh-{session}-{n}", session, n, 1_700_000_000_000 + n, 1, "mesh", (), (mesh,))


def _bodies(requests: tuple[SpatialEventRequest, ...]) -> list[dict[str, Any]]:
    return [orjson.loads(r.body) for r in requests]


def _is_base64(text: Any) -> bool:
    try:
        return (
            type(text) is str
            and base64.b64encode(binascii.a2b_base64(text, strict_mode=True)).decode() == text
        )
    except ValueError:
        return False


def _check_bindings(body: dict[str, Any]) -> None:
    """What both STAGs' Go types and Stag v2's gin bindings take (peers.md, types.go)."""
    assert type(body["session_id"]) is str and body["session_id"]
    assert type(body["event_id"]) is str and body["event_id"]
    assert type(body["timestamp"]) is int and body["timestamp"] != 0
    for anchor in body["anchors"]:
        assert type(anchor["id"]) is str and anchor["id"]
        assert anchor["session_id"] == body["session_id"]
        assert type(anchor["timestamp"]) is int and anchor["timestamp"] != 0
        pose = anchor["pose"]
        assert all(type(pose[k]) in (int, float) for k in "xyz")
        assert len(pose["rotation"]) == 4
        assert set(anchor) <= {"id", "session_id", "pose", "timestamp", "metadata"}
    for mesh in body["meshes"]:
        assert type(mesh["id"]) is str and mesh["id"]
        assert type(mesh["anchor_id"]) is str and mesh["anchor_id"]
        assert type(mesh["timestamp"]) is int and mesh["timestamp"] != 0
        assert type(mesh["compression_level"]) is int and 0 <= mesh["compression_level"] <= 9
        assert type(mesh["is_delta"]) is bool
        for key in ("vertices", "faces", "normals", "delta_data"):
            assert key not in mesh or _is_base64(mesh[key]), key


# --- the requests -------------------------------------------------------------------------------


def test_the_sdk_s_updates_become_one_spatial_event() -> None:
    events = tuple(_sdk_event(m) for m in (ANCHOR_UPDATE, MESH_UPDATE_FULL, MESH_UPDATE_DELTA))
    (request,) = encode_batch(Batch("b-1", events))
    body = orjson.loads(request.body)
    _check_bindings(body)
    assert list(body) == ["session_id", "event_id", "timestamp", "anchors", "meshes"]
    assert body["session_id"] == SESSION_ID
    assert body["event_id"] == request.event_id == spatial_event_id("b-1", SESSION_ID)
    assert body["timestamp"] == 1733450000335
    (anchor,) = body["anchors"]
    assert anchor["id"] == ANCHOR_ID and anchor["timestamp"] == 1733450000125
    assert (anchor["pose"]["x"], anchor["pose"]["y"], anchor["pose"]["z"]) == (0.25, 1.5, -0.75)
    assert anchor["pose"]["rotation"] == pytest.approx([0, 0.3826834, 0, 0.9238795], abs=1e-6)
    assert "metadata" not in anchor
    full, delta = body["meshes"]
    assert full == {
        "id": MESH_ID,
        "anchor_id": ANCHOR_ID,
        "vertices": base64.b64encode(MESH_V1_VERTICES_GZ).decode(),
        "faces": "",
        "normals": base64.b64encode(MESH_V1_NORMALS_GZ).decode(),
        "is_delta": False,
        "compression_level": 5,
        "timestamp": 1733450000231,
    }
    assert delta == {
        "id": MESH_ID,
        "anchor_id": ANCHOR_ID,
        "vertices": "",
        "faces": "",
        "is_delta": True,
        "base_mesh_id": MESH_ID,
        "delta_data": base64.b64encode(sdk_compress(MESH_DELTA_JSON)).decode(),
        "compression_level": 5,
        "timestamp": 1733450000335,
    }
    assert (request.anchors, request.meshes) == (1, 2)


def test_seed_events_become_anchors_and_full_meshes() -> None:
    (request,) = encode_batch(Batch("b-2", (_pose("s", 1), _seed_mesh("s", 2))))
    body = orjson.loads(request.body)
    _check_bindings(body)
    (anchor,) = body["anchors"]
    assert anchor == {
        "id": "anchor_seed",
        "session_id": "s",
        "pose": {"x": 0.5, "y": 1.0, "z": -2.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
        "timestamp": 1_700_000_000_001,
    }
    (mesh,) = body["meshes"]
    # The client's Draco buffer untouched; the event id names the mesh.
    assert mesh["id"] == "mesh-s-2" and mesh["vertices"] == draco_grid(2, 2)
    assert mesh["faces"] == "" and mesh["is_delta"] is False and mesh["compression_level"] == 0
    assert "normals" not in mesh and "base_mesh_id" not in mesh and "delta_data" not in mesh


def test_one_request_per_session_in_first_seen_order_with_ids_that_survive_the_spool() -> None:
    batch = Batch("b-3", (_pose("b", 1), _pose("a", 1), _seed_mesh("b", 2), _pose("a", 2)))
    requests = encode_batch(batch)
    assert [(r.session_id, r.anchors, r.meshes) for r in requests] == [("b", 1, 1), ("a", 2, 0)]
    assert [r.event_id for r in requests] == [
        spatial_event_id("b-3", "b"),
        spatial_event_id("b-3", "a"),
    ]
    assert len({r.event_id for r in requests}) == 2
    # The spool holds the WireBatch: a replay after a restart sends the same bytes.
    assert encode_wire(to_wire(batch)) == requests
    assert encode_batch(batch) == requests
    assert spatial_event_id("b-4", "a") != spatial_event_id("b-3", "a")
    assert orjson.loads(requests[1].body)["meshes"] == []


def test_metadata_goes_with_its_anchor() -> None:
    event = Event(
        "e",
        "s",
        0,
        5,
        5,
        "pose",
        (Anchor("x", AnchorPose(0, 0, 0, (0, 0, 0, 1)), 5, {"room": "lab"}),),
        (),
    )
    (request,) = encode_batch(Batch("b", (event,)))
    assert orjson.loads(request.body)["anchors"][0]["metadata"] == {"room": "lab"}


def test_a_relay_delta_cannot_be_sent_in_this_format() -> None:
    delta = MeshUpdate("anchor-7", True, base_event_id="e0", removed_faces="", added="AAAA")
    event = Event("e1", "s", 1, 5, 5, "mesh", (), (delta,))
    with pytest.raises(SpatialEventError, match="event e1 holds a relay mesh delta"):
        encode_batch(Batch("b", (event,)))


def test_the_batch_format_of_a_seed_event_is_unchanged() -> None:
    # The SDK fields are absent from the batch JSON while unset.
    assert _pose("s", 1).anchors[0].to_json() == {
        "id": "anchor_seed",
        "pose": {"x": 0.5, "y": 1.0, "z": -2.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
        "timestamp": 1_700_000_000_001,
    }
    assert set(_seed_mesh("s", 1).meshes[0].to_json()) == {
        "anchor_id",
        "is_delta",
        "vertices_delta",
        "faces_delta",
        "vertex_count",
        "face_count",
    }


_events = st.lists(
    st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.booleans()), min_size=1, max_size=20
)


@given(_events)
def test_every_anchor_and_mesh_of_a_batch_is_in_exactly_one_request(
    shape: list[tuple[str, bool]],
) -> None:
    events = tuple(
        _pose(s, n, f"anchor-{n}") if is_pose else _seed_mesh(s, n)
        for n, (s, is_pose) in enumerate(shape, start=1)
    )
    requests = encode_batch(Batch("b", events))
    assert [r.session_id for r in requests] == list(dict.fromkeys(s for s, _ in shape))
    for request, body in zip(requests, _bodies(requests), strict=True):
        _check_bindings(body)
        mine = [e for e in events if e.session_id == request.session_id]
        assert [a["id"] for a in body["anchors"]] == [e.anchors[0].id for e in mine if e.anchors]
        assert [m["id"] for m in body["meshes"]] == [e.event_id for e in mine if e.meshes]
        assert body["timestamp"] == max(e.timestamp for e in mine)
    assert encode_wire(to_wire(Batch("b", events))) == requests


# --- STAG's 200 -----------------------------------------------------------------------------------

_SENT = SpatialEventRequest("s", "E-1", anchors=2, meshes=1, body=b"{}")


@pytest.mark.parametrize(
    ("body", "verdict"),
    [
        # tabularxr/stag
        (stag_lower_200("E-1", 3), DELIVERED),
        (stag_lower_200("E-1", 4), DELIVERED),
        (
            stag_lower_200("E-1", 2),
            Contradicted("STAG answered processed 2 for 3 items (2 anchors + 1 meshes) sent"),
        ),
        (stag_lower_200("E-2", 3), Contradicted('STAG answered event_id "E-2" to event E-1')),
        (
            b'{"success":false,"event_id":"E-1","processed":3}',
            Contradicted("STAG answered success false"),
        ),
        (b'{"success":"yes"}', Contradicted('STAG answered success "yes"')),
        # tabularxr/Stag
        (stag_v2_200("E-1", 2, 1), DELIVERED),
        (
            stag_v2_200("E-1", 1, 1),
            Contradicted("STAG answered anchors_count 1 for 2 anchors sent"),
        ),
        (stag_v2_200("E-1", 2, 0), Contradicted("STAG answered meshes_count 0 for 1 meshes sent")),
        (stag_v2_200("e-1", 2, 1), Contradicted('STAG answered event_id "e-1" to event E-1')),
        # another STAG: nothing to check
        (b"", DELIVERED),
        (b"OK", DELIVERED),
        (b'{"status":"ok"}', DELIVERED),
        (b"[1,2]", DELIVERED),
        (b'{"processed":"3"}', DELIVERED),
        (b'{"processed":null,"event_id":"E-1"}', DELIVERED),
    ],
)
def test_a_200_is_checked_against_what_was_sent(body: bytes, verdict: Any) -> None:
    assert check_answer(_SENT, body) == verdict


@given(st.binary(max_size=100))
def test_any_200_body_gets_a_verdict(body: bytes) -> None:
    verdict = check_answer(_SENT, body)
    assert verdict == DELIVERED or isinstance(verdict, Contradicted)
