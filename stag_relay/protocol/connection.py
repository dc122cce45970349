"""One client connection's logic, sans I/O: bytes in; events, replies and an ending out.

Pure: no I/O, no trio. The gate's task feeds :meth:`ConnectionCore.receive` what a
socket read brought, with the clock (``now``, any monotonic seconds) and the
wall-clock time of the read (``received_at_ms``); it gets back a :class:`Read`: the
events to queue and the meshes for the mesh lane, in the order they came, the
tallies for the metrics, and the ending if the read ended the connection. When the
connection may read again (the read throttle) is :attr:`ConnectionCore.read_again_at`.
What the client is owed (replies, acknowledgements, pongs, the close frame) waits in
:attr:`ConnectionCore.outbox` for the gate's writer; the heartbeat and the close
handshake are :attr:`ConnectionCore.state` (``websocket.WebSocketState``).

A client dialect (:class:`Dialect`) turns each message into a packet and words the
replies; the seed dialect (:class:`SeedDialect`) is JSON text or binary messages
parsed by ``packets.parse_packet``. What follows the packet is the same for every
dialect: session binding, duplicates, acknowledgements, the invalid streak and the
read throttle. A new dialect is a new class, not an edit of the core.
"""

from __future__ import annotations

import math
from typing import Final, Literal, Protocol

import attrs
import msgspec

from stag_relay.protocol import websocket
from stag_relay.protocol.events import Event, Origin
from stag_relay.protocol.limits import InvalidStreak, ReadThrottle
from stag_relay.protocol.outbox import JsonReplies, Outbox, ReplyShapes
from stag_relay.protocol.packets import MeshData, Packet, PacketError, parse_packet
from stag_relay.protocol.sessions import KeyedUpdate, SessionLimitError, Sessions
from stag_relay.protocol.websocket import Beat, Binary, Close, FrameReader, Ping, Pong, Violation

PING_TIMEOUT_REASON: Final = "ping timeout"


@attrs.frozen(slots=True)
class Reply:
    """A dialect's own answer to a message that carries no packet (its pong, say)."""

    frame: bytes


class Update(KeyedUpdate, Protocol):
    """A packet of a dialect without frame numbers, as its dialect decoded it."""

    def lane_mesh(self) -> MeshData | None:
        """The mesh the mesh workers must check first (None: a pose, or a mesh that
        goes on as it came)."""
        ...


class Dialect(ReplyShapes, Protocol):
    """How one kind of client speaks: what its messages mean and how replies look.

    One per connection, made at the upgrade, so it may hold what the upgrade request
    said (a session id in the URL query, say) and put it into every packet.
    """

    @property
    def name(self) -> str:
        """The ``dialect`` label of ``relay_packets_total``."""
        ...

    @property
    def acknowledges(self) -> bool:
        """Whether its clients may ask for acknowledgements (``?ack=1``)."""
        ...

    @property
    def mark_binary(self) -> bool:
        """Binary messages reach :meth:`decode` as ``websocket.Binary`` (else as bytes,
        like text)."""
        ...

    def decode(self, message: bytes | Binary) -> Packet | Update | Reply:
        """One message as a packet (with a frame number, or an :class:`Update` without
        one), or as an answer the client is owed and nothing else; raises
        ``packets.PacketError`` when it is invalid."""
        ...


class SeedDialect(JsonReplies):
    """The seed dialect: each text or binary message is one JSON packet."""

    name = "streamkit"
    mark_binary = False
    acknowledges = True

    def decode(self, message: bytes | Binary) -> Packet | Update | Reply:
        return parse_packet(message.payload if isinstance(message, Binary) else message)


@attrs.frozen
class RelayClose:
    """Why the relay ends a connection, as the close frame will say; ``policy`` is the
    ``relay_policy_closes_total`` reason when the close protects the other clients."""

    code: int
    reason: str
    policy: str | None = None


# The policy close of a client whose packets are invalid, again and again.
INVALID_PACKETS: Final = RelayClose(
    websocket.CLOSE_POLICY_VIOLATION, "too many invalid packets", "invalid_packets"
)
# Every session the relay may hold is connected: this connection's cannot be.
TOO_MANY_SESSIONS: Final = RelayClose(websocket.CLOSE_TRY_AGAIN_LATER, "too many sessions")

Ending = Close | Violation | RelayClose


@attrs.frozen(slots=True)
class MeshHandoff:
    """An accepted mesh packet: its event waits for the mesh to be decoded and diffed."""

    event: Event
    mesh: MeshData


PacketKind = Literal["pose", "mesh", "unknown"]


# A msgspec struct: one is built per socket read, and an attrs class's __init__ is
# Python.
class Read(msgspec.Struct):
    """What one read brought."""

    # Events to queue and meshes for the mesh lane, in the order their packets came:
    # what came before a mesh must not wait behind it.
    steps: list[Event | MeshHandoff]
    # How many of ``steps`` are MeshHandoff (0: every step is an Event), and how many
    # are mesh events that skip the lane (the SDK's own deltas).
    meshes: int = 0
    mesh_events: int = 0
    # Data messages read, packets accepted, duplicates by packet type, invalid
    # messages by packet type (``unknown`` when it could not be told).
    packets: int = 0
    accepted: int = 0
    duplicates: dict[PacketKind, int] = msgspec.field(default_factory=dict)
    invalid: dict[PacketKind, int] = msgspec.field(default_factory=dict)
    # Error replies the outbox suppressed (over the reply rate or bound).
    suppressed: int = 0
    # The outbox has something new for the writer.
    wrote: bool = False
    # The read ended the connection: the peer's close frame, a protocol violation or
    # a close of ours. No close frame is queued yet: the gate first hands over what
    # was read, then closes (ConnectionCore.close).
    ending: Ending | None = None


class ConnectionCore:
    """One WebSocket connection's state and logic, fed bytes and the clock.

    ``origin`` goes on every event, to be told when it is durable; None when the
    client did not ask for acknowledgements.
    """

    def __init__(
        self,
        *,
        sessions: Sessions,
        max_message_size: int,
        max_packets_per_second: int,
        max_invalid_packets: int,
        heartbeat_interval: float,
        dialect: Dialect | None = None,
        origin: Origin | None = None,
    ) -> None:
        self.sessions = sessions
        self.dialect: Dialect = dialect if dialect is not None else SeedDialect()
        self.origin = origin
        self.frames = FrameReader(max_message_size, mark_binary=self.dialect.mark_binary)
        self.outbox = Outbox(shapes=self.dialect)
        self.state = websocket.WebSocketState(heartbeat_interval)
        # The session this connection streams, bound by its first valid packet.
        self.session_id: str | None = None
        # Limits that protect the other clients from this one (limits.py).
        self.throttle = ReadThrottle(max_packets_per_second)
        self.invalid = InvalidStreak(max_invalid_packets)
        # When the connection may read again (the read throttle), and a read's
        # packets not charged to it yet (see handed_over) with the time of that read.
        self.read_again_at = -math.inf
        self._uncharged = 0
        self._read_at = 0.0
        # Acknowledgements owed: events in the pipeline, and duplicates seen meanwhile
        # (acknowledged with the next acknowledgement, as they are already safe).
        self.unacked = 0
        self.duplicates: list[int] = []

    @property
    def acks(self) -> bool:
        return self.origin is not None

    # -- reading ----------------------------------------------------------------------

    def receive(self, data: bytes | bytearray, now: float, received_at_ms: int) -> Read:
        """Judge everything ``data`` completes. Every packet of a read arrived at once,
        as far as anyone can tell: they share ``received_at_ms``."""
        if self._uncharged:
            self.handed_over()
        items = self.frames.receive(data)
        if not items:
            return Read([])
        dialect = self.dialect
        sessions = self.sessions
        outbox = self.outbox
        origin = self.origin
        steps: list[Event | MeshHandoff] = []
        duplicates: dict[PacketKind, int] = {}
        invalid: dict[PacketKind, int] = {}
        ending: Ending | None = None
        packets = accepted = meshes = mesh_events = suppressed = 0
        wrote = False
        for item in items:
            if type(item) is bytes or type(item) is Binary:
                packets += 1
                try:
                    decoded = dialect.decode(item)
                    if isinstance(decoded, Reply):
                        self.invalid.valid()
                        if not outbox.reply(now, decoded.frame):
                            suppressed += 1
                        wrote = True
                        continue
                    if not isinstance(decoded, Packet):
                        kind: PacketKind = "pose" if decoded.key[0] == "pose" else "mesh"
                        if self.session_id is None:
                            sessions.attach(decoded.session_id, now)
                            self.session_id = decoded.session_id
                        update_event = sessions.accept_update(
                            decoded, received_at_ms=received_at_ms, origin=origin
                        )
                        self.invalid.valid()
                        if update_event is None:
                            duplicates[kind] = duplicates.get(kind, 0) + 1
                            continue
                        accepted += 1
                        lane_mesh = decoded.lane_mesh()
                        if lane_mesh is not None:
                            meshes += 1
                            steps.append(MeshHandoff(update_event, lane_mesh))
                        else:
                            mesh_events += kind == "mesh"
                            steps.append(update_event)
                        continue
                    packet = decoded
                    if self.session_id is None:
                        sessions.attach(packet.session_id, now)
                        self.session_id = packet.session_id
                    elif packet.session_id != self.session_id:
                        raise PacketError(
                            f"$.session_id: this connection belongs to session {self.session_id!r}",
                            frame_number=packet.frame_number,
                            packet_type=packet.type,
                        )
                    event = sessions.accept(
                        packet, received_at_ms=received_at_ms, now=now, origin=origin
                    )
                except PacketError as exc:
                    invalid[exc.packet_type] = invalid.get(exc.packet_type, 0) + 1
                    if self.invalid.invalid():
                        ending = INVALID_PACKETS
                        break
                    if not self.reply_error(now, exc.message, exc.frame_number):
                        suppressed += 1
                    wrote = True
                    continue
                except SessionLimitError:
                    invalid["unknown"] = invalid.get("unknown", 0) + 1
                    if not self.reply_error(
                        now, "the relay holds too many sessions; retry later", None
                    ):
                        suppressed += 1
                    ending = TOO_MANY_SESSIONS
                    wrote = True
                    break
                self.invalid.valid()
                if event is None:
                    # Resent after a reconnect, most likely: already forwarded, no reply.
                    duplicates[packet.type] = duplicates.get(packet.type, 0) + 1
                    if origin is not None:
                        self.duplicates.append(packet.frame_number)
                        if not self.unacked and self.acknowledge(packet.session_id, []):
                            wrote = True
                    continue
                accepted += 1
                if origin is not None:
                    self.unacked += 1
                if packet.type == "mesh":
                    assert packet.mesh is not None
                    meshes += 1
                    steps.append(MeshHandoff(event, packet.mesh))
                else:
                    steps.append(event)
            elif type(item) is Pong:
                self.state.received_pong()
            elif type(item) is Ping:
                outbox.ping(item.payload)
                wrote = True
            elif type(item) is Close:
                self.state.received_close(item)
                ending = item
                break
            else:
                assert isinstance(item, Violation)
                ending = item
                break
        if packets:
            if meshes:
                self._uncharged = packets
                self._read_at = now
            else:
                self.read_again_at = self.throttle.read(packets, now)
        return Read(
            steps,
            meshes,
            mesh_events,
            packets,
            accepted,
            duplicates,
            invalid,
            suppressed,
            wrote,
            ending,
        )

    def handed_over(self) -> None:
        """The read's meshes are in the mesh lane: charge its packets to the read throttle
        (``read_again_at``). A read with meshes is charged only now, because the reader
        may have waited for a busy lane meanwhile, and that wait, credited by
        :meth:`wait_ends`, is ours. A read without meshes is charged at once."""
        if self._uncharged:
            self.read_again_at = self.throttle.read(self._uncharged, self._read_at)
            self._uncharged = 0

    # -- waits that are ours ----------------------------------------------------------

    def wait_begins(self, now: float, *, throttled: bool = False) -> None:
        """The reader waits: on a full queue or a busy mesh lane (our doing: the
        client's packets bunch up meanwhile, which the throttle forgives), or on the
        throttle itself (``throttled``: the client's doing). Either way a pong may
        sit unread meanwhile, which the heartbeat forgives."""
        self.state.block()
        if not throttled:
            self.throttle.pause(now)

    def wait_ends(self, now: float, *, throttled: bool = False) -> None:
        self.state.unblock()
        if not throttled:
            self.throttle.resume(now)

    # -- replies ----------------------------------------------------------------------

    def reply_error(
        self, now: float, message: str, frame_number: int | None, *, code: str = "invalid_packet"
    ) -> bool:
        """Queue an error reply; False if it was suppressed. Error replies are rate
        limited too, or a flood of bad packets would make us an amplifier."""
        return self.outbox.error(now, code, message, frame_number)

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> bool:
        """These frames are durable: tell the client, with any duplicates seen meanwhile.
        True if an acknowledgement is queued."""
        self.unacked -= len(frame_numbers)
        if self.duplicates:
            frame_numbers = frame_numbers + self.duplicates
            self.duplicates = []
        if not frame_numbers:
            return False
        self.outbox.ack(session_id, frame_numbers)
        return True

    def forget(self, count: int) -> bool:
        """These events will never be durable (STAG refused them): no acknowledgement,
        but the duplicates that waited for one need not wait longer. True if an
        acknowledgement is queued."""
        self.unacked -= count
        if not self.unacked and self.duplicates and self.session_id is not None:
            return self.acknowledge(self.session_id, [])
        return False

    # -- the heartbeat and the close handshake ----------------------------------------

    def beat(self, now: float) -> Beat:
        """The heartbeat at ``now``; on ``Beat.TIMEOUT`` our close frame (1011) is queued."""
        beat = self.state.beat(now)
        if beat is Beat.TIMEOUT:
            self.outbox.queue_close(
                websocket.close_frame(websocket.CLOSE_INTERNAL_ERROR, PING_TIMEOUT_REASON)
            )
            self.frames.closing()
        return beat

    def wake_at(self, now: float) -> float:
        """When the writer must look again if nothing new is queued: the next ping (none
        once our close frame is queued) or a summary of suppressed replies."""
        deadline = math.inf if self.outbox.closing else self.state.next_beat
        due = self.outbox.summary_due(now)
        if due is not None:
            deadline = min(deadline, due)
        return deadline

    def close(self, code: int | None, reason: str = "", *, keep_reading: bool = False) -> bool:
        """Queue our close frame (once); False if one is queued already. Unless
        ``keep_reading`` (a drain), only the peer's close frame is read from now on."""
        if not self.outbox.queue_close(websocket.close_frame(code, reason)):
            return False
        self.state.queue_close(websocket.CLOSE_NO_STATUS if code is None else code)
        if not keep_reading:
            self.frames.closing()
        return True

    def receive_closing(self, data: bytes | bytearray) -> bool:
        """After our close frame: only the peer's close frame matters in ``data``.
        True once it has come."""
        for item in self.frames.receive(data):
            if type(item) is Close:
                self.state.received_close(item)
        return self.frames.closed

    def sent_close(self) -> None:
        """The writer wrote our close frame."""
        self.state.sent_close()
