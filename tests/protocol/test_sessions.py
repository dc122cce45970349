"""Sessions: deterministic ids, duplicate detection, ttl with attach/detach, bounds."""

from __future__ import annotations

import math
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from stag_relay.protocol.events import Anchor, AnchorPose, Event, MeshUpdate
from stag_relay.protocol.packets import MeshData, Packet, Pose, parse_packet
from stag_relay.protocol.sessions import (
    MAX_MESH_ANCHORS_PER_SESSION,
    NAMESPACE,
    SessionLimitError,
    Sessions,
    event_id,
    pose_anchor_id,
)

IDENTITY = (0.0, 0.0, 0.0, 1.0)


def pose(
    frame: int,
    session_id: str = "s",
    rotation: tuple[float, float, float, float] = IDENTITY,
    timestamp: int = 1_700_000_000_000,
) -> Packet:
    return Packet(session_id, frame, timestamp, "pose", Pose(1.0, 2.0, 3.0, rotation), None)


def mesh(frame: int, anchor_id: str = "a", session_id: str = "s") -> Packet:
    return Packet(
        session_id,
        frame,
        1_700_000_000_000,
        "mesh",
        None,
        MeshData(anchor_id, "QUJD", "REVG"),
    )


def attached(*session_ids: str, ttl: float = 300.0, max_sessions: int = 100) -> Sessions:
    sessions = Sessions(ttl=ttl, max_sessions=max_sessions)
    for sid in session_ids:
        sessions.attach(sid, 0.0)
    return sessions


def accepted(sessions: Sessions, packet: Packet) -> bool:
    return sessions.accept(packet, received_at_ms=1, now=0.0) is not None


# --- deterministic ids ------------------------------------------------------------


def test_ids_are_pinned() -> None:
    # These exact values are what every relay, of every version, must produce:
    # changing NAMESPACE or the name layout would break deduplication in STAG.
    assert str(NAMESPACE) == "6f1c3b1e-5a0d-4c8e-9a57-2f4d0b8e1c73"
    assert event_id("session-123", "pose", 1) == "ff070668-fd91-582a-befc-18322e69f358"
    assert pose_anchor_id("session-123") == "anchor_c6c6c0fe5966522e95ff1a9c5e3fd624"


@given(
    st.text(min_size=1, max_size=128),
    st.sampled_from(["pose", "mesh"]),
    st.integers(0, 2**63 - 1),
)
def test_event_id_is_uuid5(session_id: str, kind: str, frame: int) -> None:
    expected = uuid.uuid5(NAMESPACE, f"{session_id}\x00{kind}\x00{frame}")
    assert event_id(session_id, kind, frame) == str(expected)
    assert uuid.UUID(event_id(session_id, kind, frame)).version == 5


@given(
    st.text(min_size=1, max_size=64),
    st.lists(st.tuples(st.sampled_from(["pose", "mesh"]), st.integers(0, 2**63 - 1)), max_size=12),
)
def test_accepted_events_carry_the_uuid5_of_their_packet(
    session_id: str, packets: list[tuple[str, int]]
) -> None:
    sessions = attached(session_id)
    for kind, frame in packets:
        packet = pose(frame, session_id) if kind == "pose" else mesh(frame, session_id=session_id)
        event = sessions.accept(packet, received_at_ms=1, now=0.0)
        if event is not None:
            expected = uuid.uuid5(NAMESPACE, f"{session_id}\x00{kind}\x00{frame}")
            assert event.event_id == str(expected)


def test_event_ids_differ_by_session_type_and_frame() -> None:
    ids = {event_id(s, t, f) for s in ("a", "b") for t in ("pose", "mesh") for f in (1, 2)}
    assert len(ids) == 8


def test_same_packet_gives_same_event_on_another_relay() -> None:
    first, second = attached("s"), attached("s")
    for packet in (pose(7), mesh(8)):
        a = first.accept(packet, received_at_ms=5, now=0.0)
        b = second.accept(packet, received_at_ms=5, now=100.0)
        assert a is not None
        assert a == b


def test_pose_anchor_id_per_session() -> None:
    sessions = attached("s", "t")
    [anchor_s] = _event(sessions, pose(1, "s")).anchors
    [anchor_s2] = _event(sessions, pose(2, "s")).anchors
    [anchor_t] = _event(sessions, pose(1, "t")).anchors
    assert anchor_s.id == anchor_s2.id == pose_anchor_id("s")
    assert anchor_t.id == pose_anchor_id("t") != anchor_s.id
    assert anchor_s.id.startswith("anchor_")
    assert len(anchor_s.id) == len("anchor_") + 32


def _event(sessions: Sessions, packet: Packet, received_at_ms: int = 1) -> Event:
    event = sessions.accept(packet, received_at_ms=received_at_ms, now=0.0)
    assert event is not None
    return event


# --- event shapes -----------------------------------------------------------------


def test_pose_event() -> None:
    sessions = attached("session-123")
    event = _event(sessions, pose(1, "session-123", timestamp=1634567890123), 1634567890125)
    assert event == Event(
        event_id("session-123", "pose", 1),
        "session-123",
        1,
        1634567890123,
        1634567890125,
        "pose",
        (
            Anchor(
                pose_anchor_id("session-123"), AnchorPose(1.0, 2.0, 3.0, IDENTITY), 1634567890123
            ),
        ),
        (),
    )


def test_mesh_event() -> None:
    sessions = attached("s")
    event = _event(sessions, mesh(2, "anchor-456"), 99)
    assert event == Event(
        event_id("s", "mesh", 2),
        "s",
        2,
        1_700_000_000_000,
        99,
        "mesh",
        (),
        (MeshUpdate("anchor-456", False, "QUJD", "REVG"),),
    )


def test_readme_example_end_to_end() -> None:
    """The README's inbound pose example, parsed and transformed, gives its outbound shape."""
    sessions = attached("session-123")
    raw = orjson.dumps(
        {
            "session_id": "session-123",
            "frame_number": 1,
            "timestamp": 1634567890123,
            "type": "pose",
            "data": {"pose": {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]}},
        }
    )
    event = _event(sessions, parse_packet(raw), 1634567890125)
    assert event.to_json() == {
        "event_id": event_id("session-123", "pose", 1),
        "session_id": "session-123",
        "frame_number": 1,
        "timestamp": 1634567890123,
        "received_at": 1634567890125,
        "type": "pose",
        "anchors": [
            {
                "id": pose_anchor_id("session-123"),
                "pose": {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
                "timestamp": 1634567890123,
            }
        ],
        "meshes": [],
    }


@st.composite
def valid_rotations(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """Quaternions as parse_packet lets them through: squared norm in [0.9, 1.1]."""
    raw = draw(st.tuples(*[st.floats(-1, 1, allow_nan=False)] * 4))
    norm = math.sqrt(sum(v * v for v in raw))
    assume(norm > 1e-3)
    scale = math.sqrt(draw(st.floats(0.9, 1.1))) / norm
    a, b, c, d = (v * scale for v in raw)
    assume(0.9 <= a * a + b * b + c * c + d * d <= 1.1)
    return (a, b, c, d)


@given(valid_rotations())
def test_rotation_is_normalised(rotation: tuple[float, float, float, float]) -> None:
    sessions = attached("s")
    [anchor] = _event(sessions, pose(1, rotation=rotation)).anchors
    assert math.isclose(sum(v * v for v in anchor.rotation), 1.0, rel_tol=1e-12)
    # Same direction: each component scaled by one positive factor.
    norm = math.sqrt(sum(v * v for v in rotation))
    for got, sent in zip(anchor.rotation, rotation, strict=True):
        assert math.isclose(got * norm, sent, rel_tol=1e-12, abs_tol=1e-300)


# --- duplicates and stale frames --------------------------------------------------


def test_duplicates_and_stale_frames_per_type() -> None:
    sessions = attached("s")
    assert accepted(sessions, pose(5))
    assert not accepted(sessions, pose(5))
    assert not accepted(sessions, pose(4))
    assert not accepted(sessions, pose(0))
    # Types are independent: a mesh frame below the last pose frame is new.
    assert accepted(sessions, mesh(3))
    assert accepted(sessions, pose(6))
    assert not accepted(sessions, mesh(3))


def test_first_frame_may_be_zero() -> None:
    sessions = attached("s")
    assert accepted(sessions, pose(0))
    assert accepted(sessions, mesh(0))
    assert not accepted(sessions, pose(0))


def test_mesh_frames_per_anchor() -> None:
    sessions = attached("s")
    assert accepted(sessions, mesh(10, "a"))
    # Another anchor has its own sequence.
    assert accepted(sessions, mesh(2, "b"))
    assert not accepted(sessions, mesh(10, "a"))
    assert not accepted(sessions, mesh(2, "b"))
    assert accepted(sessions, mesh(3, "b"))
    assert accepted(sessions, mesh(11, "a"))


def test_sessions_are_independent() -> None:
    sessions = attached("s", "t")
    assert accepted(sessions, pose(5, "s"))
    assert accepted(sessions, pose(5, "t"))


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["pose", "mesh"]),
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 20),
        ),
        max_size=60,
    )
)
def test_accepted_iff_newer_than_last_accepted(frames: list[tuple[str, str, int]]) -> None:
    sessions = attached("s")
    last: dict[tuple[str, str], int] = {}
    for kind, anchor, frame in frames:
        key = ("pose", "") if kind == "pose" else ("mesh", anchor)
        packet = pose(frame) if kind == "pose" else mesh(frame, anchor)
        expected = frame > last.get(key, -1)
        assert accepted(sessions, packet) is expected
        if expected:
            last[key] = frame


def test_mesh_anchors_per_session_are_bounded_oldest_forgotten() -> None:
    sessions = attached("s")
    for i in range(MAX_MESH_ANCHORS_PER_SESSION):
        assert accepted(sessions, mesh(5, f"anchor-{i}"))
    # Updating anchor-0 makes anchor-1 the least recently updated.
    assert accepted(sessions, mesh(6, "anchor-0"))
    assert accepted(sessions, mesh(5, "one-too-many"))
    # Still remembered (a rejection changes nothing)...
    assert not accepted(sessions, mesh(6, "anchor-0"))
    assert not accepted(sessions, mesh(5, "anchor-2"))
    assert not accepted(sessions, mesh(5, "one-too-many"))
    assert not accepted(sessions, mesh(5, f"anchor-{MAX_MESH_ANCHORS_PER_SESSION - 1}"))
    # ...but anchor-1 was forgotten: its old frame is new again. It is forwarded
    # with the same deterministic event_id, so STAG can still deduplicate it.
    assert accepted(sessions, mesh(5, "anchor-1"))


def test_accept_needs_a_known_session() -> None:
    with pytest.raises(KeyError):
        attached().accept(pose(1), received_at_ms=1, now=0.0)


# --- ttl, attach/detach -----------------------------------------------------------


def test_session_outlives_its_connection_for_ttl() -> None:
    sessions = attached("s", ttl=300.0)
    assert accepted(sessions, pose(5))
    sessions.detach("s", 10.0)
    assert sessions.evict_expired(310.0) == 0  # exactly ttl: not longer than it
    assert "s" in sessions
    # The client reconnects within the ttl and continues: its resends are duplicates.
    sessions.attach("s", 310.0)
    assert not accepted(sessions, pose(5))
    assert accepted(sessions, pose(6))
    # While attached it never expires.
    assert sessions.evict_expired(10_000.0) == 0
    sessions.detach("s", 10_000.0)
    assert sessions.evict_expired(10_300.001) == 1
    assert "s" not in sessions
    assert len(sessions) == 0
    # A session that comes back after eviction starts afresh.
    sessions.attach("s", 20_000.0)
    assert accepted(sessions, pose(5))


def test_ttl_starts_when_the_last_connection_detaches() -> None:
    sessions = attached("s", "s", ttl=60.0)
    sessions.detach("s", 0.0)
    assert sessions.evict_expired(1000.0) == 0
    sessions.detach("s", 1000.0)
    assert sessions.evict_expired(1060.0) == 0
    assert sessions.evict_expired(1060.5) == 1


def test_evict_expired_drops_only_the_expired() -> None:
    sessions = attached("a", "b", "c", ttl=10.0)
    sessions.detach("a", 1.0)
    sessions.detach("b", 2.0)
    sessions.detach("c", 3.0)
    assert sessions.evict_expired(12.5) == 2
    assert "a" not in sessions
    assert "b" not in sessions
    assert "c" in sessions
    assert sessions.evict_expired(12.5) == 0


def test_zero_ttl() -> None:
    sessions = attached("s", ttl=0.0)
    sessions.detach("s", 5.0)
    assert sessions.evict_expired(5.0) == 0
    assert sessions.evict_expired(5.001) == 1


def test_detach_errors() -> None:
    sessions = attached("s")
    with pytest.raises(KeyError):
        sessions.detach("unknown", 0.0)
    sessions.detach("s", 0.0)
    with pytest.raises(ValueError, match="not attached"):
        sessions.detach("s", 0.0)


@pytest.mark.parametrize(
    "kwargs", [{"ttl": -1.0, "max_sessions": 1}, {"ttl": 1.0, "max_sessions": 0}]
)
def test_bad_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Sessions(**kwargs)


# --- the session bound ------------------------------------------------------------


def test_session_bound_all_attached() -> None:
    sessions = attached("a", "b", max_sessions=2)
    with pytest.raises(SessionLimitError):
        sessions.attach("c", 1.0)
    assert len(sessions) == 2
    assert "c" not in sessions
    # Another connection for a held session is not a new session.
    sessions.attach("a", 1.0)
    assert len(sessions) == 2


def test_session_bound_evicts_the_longest_detached_even_within_ttl() -> None:
    sessions = attached("a", "b", "c", ttl=300.0, max_sessions=3)
    sessions.detach("b", 1.0)
    sessions.detach("a", 2.0)
    sessions.attach("d", 3.0)
    assert "b" not in sessions
    assert {"a", "c", "d"} <= {s for s in ("a", "b", "c", "d") if s in sessions}
    assert len(sessions) == 3
    # A session re-attached is no longer a candidate.
    sessions.attach("a", 4.0)
    with pytest.raises(SessionLimitError):
        sessions.attach("e", 5.0)


class SessionsMachine(RuleBasedStateMachine):
    """Sessions against a plain model of refcounts, release order, ttl and the bound."""

    TTL = 10.0
    MAX = 3

    connections = Bundle("connections")

    def __init__(self) -> None:
        super().__init__()
        self.sessions = Sessions(ttl=self.TTL, max_sessions=self.MAX)
        self.now = 0.0
        # session_id -> [attached count, release sequence number, released at]
        self.model: dict[str, list[Any]] = {}
        self.sequence = 0

    def _idle(self) -> list[str]:
        idle = [sid for sid, (count, _, _) in self.model.items() if count == 0]
        return sorted(idle, key=lambda sid: self.model[sid][1])

    @rule(target=connections, session_id=st.sampled_from("abcde"))
    def attach(self, session_id: str) -> Any:
        entry = self.model.get(session_id)
        if entry is None and len(self.model) >= self.MAX and not self._idle():
            with pytest.raises(SessionLimitError):
                self.sessions.attach(session_id, self.now)
            return multiple()  # no connection to detach later
        self.sessions.attach(session_id, self.now)
        if entry is None:
            if len(self.model) >= self.MAX:
                del self.model[self._idle()[0]]
            self.model[session_id] = [1, None, None]
        else:
            entry[0] += 1
        return session_id

    @rule(session_id=consumes(connections))
    def detach(self, session_id: str) -> None:
        self.sessions.detach(session_id, self.now)
        entry = self.model[session_id]
        entry[0] -= 1
        if entry[0] == 0:
            self.sequence += 1
            entry[1], entry[2] = self.sequence, self.now

    @rule(seconds=st.sampled_from([0.0, 0.5, 5.0, 10.0, 20.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def evict(self) -> None:
        expired = [sid for sid in self._idle() if self.now - self.model[sid][2] > self.TTL]
        assert self.sessions.evict_expired(self.now) == len(expired)
        for sid in expired:
            del self.model[sid]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def stream(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.model)))
        frame = data.draw(st.integers(0, 5))
        self.sessions.accept(pose(frame, sid), received_at_ms=1, now=self.now)

    @invariant()
    def same_sessions(self) -> None:
        assert len(self.sessions) == len(self.model)
        for sid in "abcde":
            assert (sid in self.sessions) == (sid in self.model)


SessionsMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30)
TestSessions = SessionsMachine.TestCase
