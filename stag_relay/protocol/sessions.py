"""Per-session state, and the turning of accepted packets into spatial events.

Pure: no I/O, no trio; times are plain floats supplied by the caller (the trio
clock in the relay, any number in tests).

A session is what a client streams under one ``session_id``. It remembers the
last frame accepted per packet type (and, for meshes, per anchor) so that frames
resent after a reconnect are recognised as duplicates and not forwarded twice.
A session outlives the connections that use it by ``ttl`` seconds so that a
reconnecting client continues where it left off; the number of sessions, and of
mesh anchors per session, is bounded so that no client can grow memory without
limit.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from typing import Final, Protocol

import attrs
import uuid_utils

from stag_relay.protocol.events import Anchor, AnchorPose, Event, MeshUpdate, Origin
from stag_relay.protocol.packets import Packet

# Fixed, never to be regenerated: event ids and pose anchor ids are uuid5 names
# in this namespace, and every relay (and every restart of one) must compute the
# same ids for the same packets so that STAG can deduplicate resends and the
# same stream relayed twice.
NAMESPACE: Final = uuid.UUID("6f1c3b1e-5a0d-4c8e-9a57-2f4d0b8e1c73")

# A session tracks the last frame of each mesh anchor it has sent. ARKit/ARCore
# scene reconstruction produces tens to a few thousand anchors even for a large
# building; 10,000 keeps every real session whole while capping one session's
# state at a few MiB. Forgetting an anchor only means an old resent frame of it
# is forwarded again, with the same deterministic event_id, which STAG dedupes.
MAX_MESH_ANCHORS_PER_SESSION: Final = 10_000

# uuid_utils computes a uuid5, and its string, in Rust: with the name built here per
# event, an id costs 0.5 us less than a copy of a per-session hashlib SHA-1 and the
# formatting around it, and about 1 us less when that state is cold in the cache.
_NAMESPACE: Final = uuid_utils.UUID(bytes=NAMESPACE.bytes)
_uuid5: Final = uuid_utils.uuid5


class SessionLimitError(Exception):
    """Every one of the ``max_sessions`` sessions held has a connection: none can be evicted."""


def event_id(session_id: str, type: str, frame_number: int) -> str:
    """The deterministic id of the event for one packet.

    Equal to ``str(uuid.uuid5(NAMESPACE, f"{session_id}\\x00{type}\\x00{frame_number}"))``.
    The NUL separators keep ("a", "b\\x00c") and ("a\\x00b", "c") apart; a session id
    cannot hold a NUL.
    """
    return str(_uuid5(_NAMESPACE, f"{session_id}\x00{type}\x00{frame_number}"))


class KeyedUpdate(Protocol):
    """A packet of a dialect without frame numbers (the StreamKit SDK's): what makes
    it unique within its session is ``key``, (kind, anchor or mesh id, timestamp)."""

    @property
    def session_id(self) -> str: ...

    @property
    def key(self) -> tuple[str, str, int]: ...

    def to_event(self, received_at_ms: int, origin: Origin | None = None) -> Event: ...


def pose_anchor_id(session_id: str) -> str:
    """The id of a session's pose anchor: one per session, the same on every relay."""
    return "anchor_" + uuid.uuid5(NAMESPACE, session_id).hex


@attrs.define(slots=True, eq=False)
class _Session:
    pose_anchor_id: str
    # Connections currently streaming this session; the ttl only runs at zero.
    attached: int = 0
    detached_at: float = 0.0
    # frame_number is >= 0, so -1 accepts any first frame.
    last_pose: int = -1
    # anchor_id -> last accepted frame, least recently updated first. Created on
    # the first mesh packet: most sessions only send poses.
    last_mesh: OrderedDict[str, int] | None = None
    # (kind, id) -> the timestamp last accepted, for packets without frame numbers;
    # least recently updated first, created on the first such packet.
    last_keyed: OrderedDict[tuple[str, str], int] | None = None


class Sessions:
    """Every session the relay holds, connected or waiting out its ttl."""

    def __init__(self, *, ttl: float, max_sessions: int) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0, got {ttl}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self._ttl = ttl
        self._max_sessions = max_sessions
        self._sessions: dict[str, _Session] = {}
        # Sessions no connection holds, in the order they were released, so the
        # first is both the next to expire and the first to give way to a new
        # session. OrderedDict pops from the front in O(1); a plain dict's
        # iteration would rescan deleted slots each time.
        self._idle: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def attach(self, session_id: str, now: float) -> None:
        """A connection starts streaming ``session_id``, new or held.

        At ``max_sessions``, a new session takes the place of the session
        released longest ago, even within its ttl; when every held session has a
        connection, :class:`SessionLimitError` is raised and nothing changes.
        ``now`` is not used: a held session's ttl stops whatever the time.
        """
        session = self._sessions.get(session_id)
        if session is None:
            if len(self._sessions) >= self._max_sessions:
                if not self._idle:
                    raise SessionLimitError(
                        f"{self._max_sessions} sessions held, all of them connected"
                    )
                # The session released longest ago is the least likely to return.
                oldest, _ = self._idle.popitem(last=False)
                del self._sessions[oldest]
            session = _Session(pose_anchor_id(session_id))
            self._sessions[session_id] = session
        elif session.attached == 0:
            del self._idle[session_id]
        session.attached += 1

    def detach(self, session_id: str, now: float) -> None:
        """A connection streaming ``session_id`` ended; at zero the ttl starts at ``now``."""
        session = self._sessions[session_id]
        if session.attached == 0:
            raise ValueError(f"session {session_id!r} is not attached")
        session.attached -= 1
        if session.attached == 0:
            session.detached_at = now
            self._idle[session_id] = now

    def evict_expired(self, now: float) -> int:
        """Drop sessions no connection has held for longer than ttl; return how many."""
        evicted = 0
        deadline = now - self._ttl
        idle = self._idle
        # Released in order, so the expired ones form a prefix.
        while idle:
            session_id, detached_at = next(iter(idle.items()))
            if detached_at >= deadline:
                break
            idle.popitem(last=False)
            del self._sessions[session_id]
            evicted += 1
        return evicted

    def accept(
        self, packet: Packet, *, received_at_ms: int, now: float, origin: Origin | None = None
    ) -> Event | None:
        """Record ``packet`` and return its event, or None for a duplicate or stale frame.

        A frame is stale when its number is not greater than the last accepted
        one of the same type (for meshes, of the same anchor). The session must
        have been attached (KeyError otherwise). ``now`` is not used: the ttl
        only runs while no connection holds the session. ``origin`` is carried on
        the event, to be acknowledged once the event is durable.
        """
        session = self._sessions[packet.session_id]
        frame_number = packet.frame_number
        if packet.type == "pose":
            pose = packet.pose
            if pose is None:  # parse_packet never builds such a Packet
                raise ValueError("pose packet without a pose")
            if frame_number <= session.last_pose:
                return None
            session.last_pose = frame_number
            a, b, c, d = pose.rotation
            # Validated to a squared norm in [0.9, 1.1], so never a division by zero.
            norm = math.sqrt(a * a + b * b + c * c + d * d)
            anchor = Anchor(
                session.pose_anchor_id,
                AnchorPose(pose.x, pose.y, pose.z, (a / norm, b / norm, c / norm, d / norm)),
                packet.timestamp,
            )
            return Event(
                event_id(packet.session_id, "pose", frame_number),
                packet.session_id,
                frame_number,
                packet.timestamp,
                received_at_ms,
                "pose",
                (anchor,),
                (),
                origin,
            )
        mesh = packet.mesh
        if mesh is None:
            raise ValueError("mesh packet without a mesh")
        last_mesh = session.last_mesh
        if last_mesh is None:
            last_mesh = session.last_mesh = OrderedDict()
        last = last_mesh.get(mesh.anchor_id)
        if last is not None:
            if frame_number <= last:
                return None
            last_mesh.move_to_end(mesh.anchor_id)
        elif len(last_mesh) >= MAX_MESH_ANCHORS_PER_SESSION:
            last_mesh.popitem(last=False)
        last_mesh[mesh.anchor_id] = frame_number
        return Event(
            event_id(packet.session_id, "mesh", frame_number),
            packet.session_id,
            frame_number,
            packet.timestamp,
            received_at_ms,
            "mesh",
            (),
            (MeshUpdate(mesh.anchor_id, False, mesh.vertices, mesh.faces),),
            origin,
        )

    def accept_update(
        self, update: KeyedUpdate, *, received_at_ms: int, origin: Origin | None = None
    ) -> Event | None:
        """:meth:`accept` for a packet without a frame number: stale when its timestamp
        is not later than the last accepted one of the same kind and id (a resend
        after a reconnect, or an update overtaken by a newer one)."""
        session = self._sessions[update.session_id]
        kind, item, timestamp = update.key
        key = (kind, item)
        seen = session.last_keyed
        if seen is None:
            seen = session.last_keyed = OrderedDict()
        last = seen.get(key)
        if last is not None:
            if timestamp <= last:
                return None
            seen.move_to_end(key)
        elif len(seen) >= MAX_MESH_ANCHORS_PER_SESSION:
            seen.popitem(last=False)
        seen[key] = timestamp
        return update.to_event(received_at_ms, origin)
