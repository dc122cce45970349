"""A batch as the requests of its stag.format: one envelope, or one SpatialEvent per session."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.events import Batch, Event, MeshUpdate, to_wire
from stag_relay.protocol.ingest import BatchRequest, SessionRequest, requests_for
from stag_relay.protocol.spatial_event import (
    DELIVERED,
    Contradicted,
    SpatialEventError,
    encode_events,
    encode_wire,
    spatial_event_id,
)
from tests.support.batches import pose_event


def pose(session: str, n: int) -> Event:
    return pose_event(session, n, f"anchor-{session}")


def batch_of(batch_id: str, sessions: list[str]) -> Batch:
    return Batch(batch_id, tuple(pose(s, n) for n, s in enumerate(sessions)))


def test_the_batch_format_is_one_request_the_batch_itself() -> None:
    wire = to_wire(batch_of("b-1", ["s", "t", "s"]))
    [request] = requests_for("batch", wire)
    assert request == BatchRequest(wire)
    assert (request.key, request.count) == ("b-1", 3)
    assert request.body("relay", 5) == wire.body("relay", 5)
    assert request.judge(b'{"success": false}') == DELIVERED
    assert [half.key for half in request.split()] == ["b-1.0", "b-1.1"]
    assert request.log_fields() == {"batch_id": "b-1"}


def test_spatial_event_is_one_request_per_session_as_encode_wire_makes_them() -> None:
    wire = to_wire(batch_of("b-2", ["s", "t", "s", "u", "t"]))
    requests = requests_for("spatial-event", wire)
    assert all(isinstance(r, SessionRequest) for r in requests)
    assert [r.body("relay", 1) for r in requests] == [r.body for r in encode_wire(wire)]
    assert [r.key for r in requests] == [spatial_event_id("b-2", s) for s in "stu"]
    assert [r.count for r in requests] == [2, 2, 1]
    # No envelope time: every attempt sends the same bytes.
    assert requests[0].body("relay", 1) == requests[0].body("other", 2)
    assert requests[1].log_fields() == {
        "batch_id": "b-2",
        "session_id": "t",
        "event_id": spatial_event_id("b-2", "t"),
    }


def test_spatial_event_judges_the_200_body() -> None:
    [request] = requests_for("spatial-event", to_wire(batch_of("b", ["s", "s"])))
    key = request.key.encode()
    assert request.judge(b'{"success":true,"event_id":"' + key + b'","processed":2}') == DELIVERED
    assert isinstance(request.judge(b'{"success":false}'), Contradicted)
    assert isinstance(request.judge(b'{"event_id":"other"}'), Contradicted)
    assert isinstance(request.judge(b'{"anchors_count":1}'), Contradicted)
    assert request.judge(b"<html>ok</html>") == DELIVERED


def test_a_split_request_halves_its_events_under_ids_derived_from_the_batch() -> None:
    wire = to_wire(batch_of("b-3", ["s"] * 5))
    [request] = requests_for("spatial-event", wire)
    assert isinstance(request, SessionRequest)
    first, second = request.split()
    assert (first.count, second.count) == (2, 3)
    assert first.key == spatial_event_id("b-3.0", "s")
    assert second.key == spatial_event_id("b-3.1", "s")
    events = orjson.loads(wire.events)
    [expected] = encode_events("b-3.1", events[2:])
    assert second.request == expected
    # Halved again: ids stay derived, so a replay after a restart splits the same way.
    assert [q.key for q in second.split()] == [
        spatial_event_id("b-3.1.0", "s"),
        spatial_event_id("b-3.1.1", "s"),
    ]
    assert second.split()[0].log_fields()["batch_id"] == "b-3"
    [alone] = requests_for("spatial-event", to_wire(batch_of("b-4", ["s"])))
    with pytest.raises(ValueError):
        alone.split()


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=30))
def test_every_event_is_in_exactly_one_request(sessions: list[str]) -> None:
    wire = to_wire(batch_of("b", sessions))
    requests = requests_for("spatial-event", wire)
    assert sum(r.count for r in requests) == wire.count
    sent = [
        (body["session_id"], anchor["timestamp"])
        for r in requests
        for body in [orjson.loads(r.body("relay", 0))]
        for anchor in body["anchors"]
    ]
    assert sorted(sent) == sorted(
        (e.session_id, e.timestamp) for e in batch_of("b", sessions).events
    )
    for r in requests:
        if r.count >= 2:
            halves = r.split()
            assert sum(h.count for h in halves) == r.count


def test_a_relay_mesh_delta_cannot_be_sent_as_a_spatial_event() -> None:
    delta = MeshUpdate("a", True, base_event_id="e0", removed_faces="", added="")
    event = Event("e1", "s", 1, 1, 1, "mesh", (), (delta,))
    wire = to_wire(Batch("b", (pose("s", 0), event)))
    with pytest.raises(SpatialEventError):
        requests_for("spatial-event", wire)
    assert requests_for("batch", wire) == (BatchRequest(wire),)


def test_an_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"stag\.format"):
        requests_for("csv", to_wire(batch_of("b", ["s"])))
