"""The gate: one task per WebSocket connection, reading and handing over its packets.

The front door has checked the upgrade request; the gate answers it (101) and
then reads the socket, 64 KiB at a time, and feeds each read to the connection's
sans-I/O core (``protocol.connection``), which parses
every complete frame and packet of it and says what the read brought: the events go
into the queue to the batcher in one operation, the meshes to the connection's mesh
lane. When the queue is full the connection waits and stops reading its socket, so
backpressure reaches the client over TCP (and reads only 4 KiB at a time once the
waiting connections hold a queue's worth); ``websocket.max_packets_per_second`` works
the same way: a connection over it waits before its next read. No packet is ever
refused for a limit. The heartbeat knows that a connection we are not reading is not
a dead peer. Invalid packets get an error reply and the connection stays open.

Everything the relay sends a client (replies, acknowledgements, pongs, pings,
the close frame) waits in the connection's outbox (outbox.py), which cannot
overflow, and is written by one writer task, which also keeps the heartbeat: one
writer at a time, and neither the reader nor the delivery stage ever waits on a
client that does not read. A client is dropped as a slow reader only when its
socket accepts nothing for SEND_TIMEOUT.

On drain (shutdown) the connection sends its close frame (1001) at once and goes
on reading, unthrottled, what the client sent before it saw it, up to the client's
own close frame: a packet in flight when the relay stops is not lost.

Who reads: while a connection has nothing to wait for, the gate's poller
(poller.py) reads its socket, beside every other such connection's, and judges
each read at once (``Connection._polled``); the connection's own task is parked
and is woken only for what needs it (a mesh for its lane, events that wait for
room, the read throttle, the end). Plain TCP sockets on Linux; a TLS connection,
or any connection where there is no epoll, reads in its own task.

The tasks here only read, write, wait and hand over; what a read means, what the
client is owed and when the heartbeat is due are the core's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import parse_qs

import attrs
import msgspec
import structlog
import trio
from prometheus_client import Counter

from stag_relay.pipeline.eventqueue import EventSender
from stag_relay.pipeline.front import ReplayStream
from stag_relay.pipeline.meshpool import MeshPipeline
from stag_relay.pipeline.poller import AVAILABLE as POLLER_AVAILABLE
from stag_relay.pipeline.poller import Poller
from stag_relay.protocol import websocket
from stag_relay.protocol.connection import (
    TOO_MANY_SESSIONS,
    ConnectionCore,
    Dialect,
    Ending,
    MeshHandoff,
    Read,
    RelayClose,
    SeedDialect,
)
from stag_relay.protocol.events import Event, MeshUpdate
from stag_relay.protocol.http import HttpRequest
from stag_relay.protocol.mesh import MeshError
from stag_relay.protocol.packets import MeshData
from stag_relay.protocol.sessions import Sessions
from stag_relay.protocol.websocket import Beat, Close, Violation
from stag_relay.service.config import WebSocketConfig
from stag_relay.service.metrics import PendingObservations, RelayMetrics, unchecked_inc

# Bytes asked of the socket per read: a flood of small packets then costs one
# receive per few hundred packets. The buffer exists only during a read, so idle
# connections do not pay for it.
RECEIVE_BYTES: Final = 64 * 1024
# A client that does not take a reply, a ping or a close frame within this long,
# or does not answer our close frame within it, is not reading: give up on it
# rather than hold its tasks.
SEND_TIMEOUT: Final = 5.0
# Meshes a connection may have waiting for its mesh lane: a client sends about one
# per second beside 60 Hz poses; one more in hand keeps the lane busy, not the reader.
MESH_LANE: Final = 1
# Once the connections waiting for room hold a queue's worth of events, a connection
# reads this much at a time: a few dozen poses held outside the queue per waiting
# connection instead of a 64 KiB read's several hundred, so memory under backpressure
# follows websocket.buffer_size, not the number of connections (EventSender.pressed).
PRESSED_RECEIVE_BYTES: Final = 4 * 1024
# Frames longer than this go to the socket in pieces, each with its own SEND_TIMEOUT:
# a slow reader is one whose socket takes nothing, not one behind on a long ack.
WRITE_CHUNK: Final = 16 * 1024
CLOSE_GOING_AWAY: Final = websocket.CLOSE_GOING_AWAY
CLOSE_POLICY_VIOLATION: Final = websocket.CLOSE_POLICY_VIOLATION
CLOSE_INTERNAL_ERROR: Final = websocket.CLOSE_INTERNAL_ERROR
CLOSE_TRY_AGAIN_LATER: Final = websocket.CLOSE_TRY_AGAIN_LATER
_PING: Final = websocket.ping_frame()

log = structlog.get_logger("stag_relay.gate")


def seed_dialect(request: HttpRequest) -> Dialect:
    """The seed dialect, whatever the upgrade request says."""
    return SeedDialect()


def _mesh_events(events: list[Event]) -> int:
    return sum(1 for event in events if event.type == "mesh")


def _with_client_fields(event: Event, update: MeshUpdate) -> MeshUpdate:
    """The mesh workers' update with what the client's mesh carried beyond geometry
    (the SDK's mesh id, normals, compression level), which they pass on untouched."""
    sent = event.meshes[0] if event.meshes else None
    if sent is None or sent.mesh_id is None:
        return update
    return attrs.evolve(
        update,
        mesh_id=sent.mesh_id,
        normals=sent.normals,
        compression_level=sent.compression_level,
    )


class PacketTally:
    """One dialect's ``relay_packets_total`` children, bound once (labels() costs a lookup).

    ``add_ok_pose`` is bumped once per socket read, for most reads one packet: it is
    the counter's own ``inc`` without ``Counter.inc``'s checks, which cost twice the
    increment (a count of packets is never negative).
    """

    def __init__(self, metrics: RelayMetrics, dialect: str) -> None:
        self.metrics = metrics
        self.dialect = dialect
        self.ok_pose = metrics.packet("pose", "ok", dialect)
        self.add_ok_pose = unchecked_inc(self.ok_pose)
        # Accepted poses of the poller's current turn, written by Gate.end_turn.
        self.turn_ok_pose = 0
        self.ok_mesh = metrics.packet("mesh", "ok", dialect)
        self.duplicate_pose = metrics.packet("pose", "duplicate", dialect)
        self.duplicate_mesh = metrics.packet("mesh", "duplicate", dialect)

    def packet(self, packet_type: str, status: str) -> Counter:
        return self.metrics.packet(packet_type, status, self.dialect)


class Gate:
    """What every connection shares: the sessions, the event queue, the metrics.

    ``websocket`` is the relay's ``websocket`` configuration section;
    ``handshake_timeout`` bounds the sending of the 101 answer; ``dialect`` makes
    each connection's client dialect from its upgrade request.
    """

    def __init__(
        self,
        *,
        websocket: WebSocketConfig,
        handshake_timeout: float,
        sessions: Sessions,
        events: EventSender,
        metrics: RelayMetrics,
        dialect: Callable[[HttpRequest], Dialect] = seed_dialect,
    ) -> None:
        self.websocket = websocket
        self.handshake_timeout = handshake_timeout
        self.sessions = sessions
        self.events = events
        self.metrics = metrics
        self.dialect = dialect
        self.connections: set[Connection] = set()
        # Events this gate put into the queue: the shutdown sequence compares it
        # with what STAG accepted to count what was not delivered.
        self.events_in = 0
        # The mesh pipeline (worker processes), once the app has started it.
        self.meshes: MeshPipeline | None = None
        # The poller, while poll_sockets runs: connections with nothing to wait for
        # follow it instead of reading their own sockets (poller.py says why).
        self.poller: Poller[Ending | Taken] | None = None
        # Counter children every connection uses, bound once per dialect.
        self._tallies: dict[str, PacketTally] = {}
        # The processing times of the poller's current turn, written by end_turn.
        self.turn_processing = PendingObservations(metrics.processing_duration)
        self._ids = itertools.count(1)
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, stream: trio.abc.Stream, request: HttpRequest) -> None:
        """Answer the upgrade ``request`` (checked by the front door) and run the
        WebSocket connection on ``stream``."""
        prefix = b""
        if isinstance(stream, ReplayStream):
            # Read the socket directly; what h11 read past the request head comes first.
            prefix, stream = stream.detach()
        key = request.header("sec-websocket-key") or ""
        with trio.move_on_after(self.handshake_timeout) as handshake:
            try:
                await stream.send_all(websocket.switching_protocols(key))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if handshake.cancelled_caught:
            return
        bound = log.bind(conn=next(self._ids), peer=request.peer)
        async with trio.open_nursery() as nursery:
            dialect = self.dialect(request)
            connection = Connection(
                self,
                stream,
                bound,
                nursery,
                acks=dialect.acknowledges and _wants_acks(request.query),
                dialect=dialect,
            )
            self._opened(connection)
            try:
                nursery.start_soon(connection.write_frames)
                await connection.run(prefix)
            finally:
                self._closed(connection)
                nursery.cancel_scope.cancel()

    async def poll_sockets(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the sockets of connections with nothing to wait for, until cancelled
        (without it, or where there is no epoll, each connection reads its own)."""
        if not POLLER_AVAILABLE:
            task_status.started()
            return
        with Poller[Ending | Taken](self._read_size, self.end_turn) as poller:
            self.poller = poller
            task_status.started()
            try:
                await poller.run()
            finally:
                self.poller = None

    def end_turn(self) -> None:
        """The poller's turn is over: what its reads counted goes into the metrics.

        The reads of a turn count into plain numbers (``Connection._polled``), as a
        metric's write takes a lock; the turn has no checkpoint, so no other task of
        this process, a scrape included, sees the metrics before this. (Another
        worker's scrape reads this one's metric files at any time: a turn behind.)"""
        try:
            self.turn_processing.flush()
            for tally in self._tallies.values():
                if tally.turn_ok_pose:
                    tally.add_ok_pose(tally.turn_ok_pose)
                    tally.turn_ok_pose = 0
        except Exception:
            # A metric that cannot be written must not stop the poller, and with it
            # every connection; the events themselves are queued already.
            log.exception("could not write the metrics of a poller turn")

    def _read_size(self) -> int:
        # While the queue is (nearly) full, what a read brings waits outside it: read
        # little, so that is a few packets per connection, not a whole read's.
        return PRESSED_RECEIVE_BYTES if self.events.pressed() else RECEIVE_BYTES

    def tally(self, dialect: str) -> PacketTally:
        tally = self._tallies.get(dialect)
        if tally is None:
            tally = self._tallies[dialect] = PacketTally(self.metrics, dialect)
        return tally

    def drain(self) -> None:
        """Shutdown step: every connection stops reading and closes with 1001."""
        for connection in list(self.connections):
            connection.stop_reading()

    def abort(self) -> None:
        """Shutdown deadline: give up puts still waiting on a full queue."""
        for connection in list(self.connections):
            connection.abort_send()

    def held_events(self) -> int:
        """Mesh packets read and still in a mesh lane (lost if the relay stops now)."""
        return sum(connection._in_lane for connection in self.connections)

    async def wait_idle(self) -> None:
        """Return once no connection is open."""
        await self._idle.wait()

    def _opened(self, connection: Connection) -> None:
        self.connections.add(connection)
        self._idle = trio.Event()
        self.metrics.connections_total.inc()
        self.metrics.connections_active.inc()

    def _closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if self.poller is not None and connection.fd >= 0:
            self.poller.forget(connection.fd)
        self.metrics.connections_active.dec()
        if connection.session_id is not None:
            self.sessions.detach(connection.session_id, trio.current_time())
        if not self.connections:
            self._idle.set()


def _socket_reader(stream: trio.SocketStream) -> Callable[[int], Awaitable[bytes]]:
    """Reads of a plain TCP connection: wait until its socket is readable, then one read.

    ``SocketStream.receive_some`` first tries a read, and waits only when that fails;
    a client that paces its messages has sent nothing new when the relay comes back
    for more, so that first try is a failed syscall, a raised ``BlockingIOError`` and
    an async context manager per message, on the relay's hottest loop. Waiting first
    costs nothing when data is there already (the wait returns at the next
    scheduler pass, the checkpoint a read owes the other connections anyway). Its
    errors are the caller's to translate, as ``OSError`` or ``trio.ClosedResourceError``.
    """
    fd = stream.socket.fileno()
    wait_readable = trio.lowlevel.wait_readable
    read = os.read

    async def receive(size: int) -> bytes:
        while True:
            await wait_readable(fd)
            try:
                return read(fd, size)
            except BlockingIOError:
                continue

    return receive


def _wants_acks(query: str) -> bool:
    return bool(query) and any(value in ("1", "true") for value in parse_qs(query).get("ack", ()))


@attrs.define(slots=True)
class Taken:
    """A read the poller judged that needs the connection's own task: a mesh for its
    lane, an ending, events that wait for room, or the read throttle."""

    read: Read
    # How many events the read had before a put_nowait took the first of them
    # (what is left in read.steps waits for room); None: nothing was put yet.
    count: int | None = None


# The client hung up without a close frame (end of stream, or a reset).
_GONE: Final = RelayClose(1006, "gone")
# Drained: our close frame went out and the peer did not answer it in time.
_DRAINED: Final = RelayClose(CLOSE_GOING_AWAY, "relay shutting down")


class Connection:
    """One client's WebSocket: read, feed the core, hand over what it says.

    ``run`` is the reader (the connection's own task); ``write_frames`` is the one
    writer and the heartbeat; ``mesh_lane`` starts with the first mesh packet.
    """

    def __init__(
        self,
        gate: Gate,
        stream: trio.abc.Stream,
        log: structlog.typing.FilteringBoundLogger,
        nursery: trio.Nursery,
        *,
        acks: bool = False,
        dialect: Dialect | None = None,
    ) -> None:
        self.gate = gate
        self.stream = stream
        self.log = log
        settings = gate.websocket
        dialect = dialect if dialect is not None else SeedDialect()
        # This connection's relay_packets_total children.
        self.tally = gate.tally(dialect.name)
        self.core = ConnectionCore(
            sessions=gate.sessions,
            max_message_size=settings.max_message_size,
            max_packets_per_second=settings.max_packets_per_second,
            max_invalid_packets=settings.max_invalid_packets,
            heartbeat_interval=settings.heartbeat_interval,
            dialect=dialect,
            origin=self if acks else None,
        )
        # The connection's whole nursery: cancelled to drop a client that does not read.
        self._nursery = nursery
        self._scope = nursery.cancel_scope
        # Wakes the writer when the outbox has something new (set while it waits).
        self._wake: trio.Event | None = None
        # Set once the writer has sent the close frame (created when one is queued).
        self._close_written: trio.Event | None = None
        # What draining does not interrupt and the shutdown deadline does: mesh-lane
        # sends in shielded scopes (cancelled), and the tasks in a queue put (the
        # reader, the mesh lane; aborted with EventSender.abort_put).
        self._send_scopes: set[trio.CancelScope | trio.lowlevel.Task] = set()
        # The mesh lane, started with the first mesh: meshes read and handed to it,
        # not yet in the queue.
        self._lane_send: trio.MemorySendChannel[tuple[Event, MeshData]] | None = None
        self._lane_done: trio.Event | None = None
        self._in_lane = 0
        self._read_scope = trio.CancelScope()
        # The socket, for the poller (-1: not a plain TCP socket, read by this task).
        self.fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1

    @property
    def acks(self) -> bool:
        return self.core.acks

    @property
    def session_id(self) -> str | None:
        return self.core.session_id

    @property
    def blocked(self) -> bool:
        """The reader waits on us (a full queue, a busy mesh lane, the read throttle)."""
        return self.core.state.blocked

    def stop_reading(self) -> None:
        self._read_scope.cancel()

    def abort_send(self) -> None:
        for waiting in list(self._send_scopes):
            if isinstance(waiting, trio.CancelScope):
                waiting.cancel()
            else:
                self.gate.events.abort_put(waiting)

    # -- the reader -------------------------------------------------------------------

    async def run(self, prefix: bytes = b"") -> None:
        self.log.debug("connection opened")
        ending: Ending | None = None
        # Only receives and the throttle's waits are ever cancelled by draining:
        # handling a read has no checkpoint but its shielded puts, so whatever was
        # read is judged and queued.
        with self._read_scope:
            ending = await self._read(prefix)
        if ending is None:
            ending = await self._read_after_drain()
        await self._end(ending)

    async def _read(self, data: bytes | bytearray) -> Ending:
        stream = self.stream
        receive_some: Callable[[int], Awaitable[bytes | bytearray]] = stream.receive_some
        if type(stream) is trio.SocketStream:
            receive_some = _socket_reader(stream)
        fd = self.fd
        core = self.core
        gate = self.gate
        while True:
            if data:
                ending = await self._handle(data)
                if ending is not None:
                    return ending
                if core.read_again_at > trio.current_time():
                    await self._throttled()
            poller = gate.poller
            if poller is not None and fd >= 0:
                data = b""
                taken = await poller.follow(fd, self._polled)
                if taken is None:
                    continue
                if not isinstance(taken, Taken):
                    return taken
                ending = await self._finish(taken.read, taken.count)
                if ending is not None:
                    return ending
                if core.read_again_at > trio.current_time():
                    await self._throttled()
                continue
            try:
                data = await receive_some(gate._read_size())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                return _GONE

    def _polled(self, data: bytes) -> Ending | Taken | None:
        """One read the poller made for us: judged and queued at once when nothing in it
        must wait (None); else what this connection's task must finish."""
        if not data:
            return _GONE
        now = trio.current_time()
        read = self._take(data, now, in_turn=True)
        if read.meshes or read.ending is not None:
            return Taken(read)
        events: list[Event] = read.steps  # type: ignore[assignment]
        if events:
            count = len(events)
            self.gate.events.put_nowait(events)
            if events:
                return Taken(read, count)
            self._delivered(count, read.mesh_events, in_turn=True)
        if self.core.read_again_at > now:
            return Taken(read)
        return None

    async def _throttled(self) -> None:
        """Over websocket.max_packets_per_second: read nothing until the bucket has
        tokens again, so TCP slows the client down. Not the heartbeat's business."""
        core = self.core
        started = trio.current_time()
        core.wait_begins(started, throttled=True)
        try:
            await trio.sleep_until(core.read_again_at)
        finally:
            now = trio.current_time()
            core.wait_ends(now, throttled=True)
            self.gate.metrics.throttled_seconds.inc(now - started)

    async def _read_after_drain(self) -> Ending:
        """Drained: our close frame (1001) goes out, and what the client sent before it
        saw it is still read and queued, up to its own close frame. Unthrottled: that
        is what it sent already, and the shutdown has a deadline."""
        self._queue_close(CLOSE_GOING_AWAY, "relay shutting down", keep_reading=True)
        with trio.move_on_after(SEND_TIMEOUT):
            while True:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return _GONE
                ending = await self._handle(data)
                if ending is not None:
                    return ending
        return _DRAINED

    async def _handle(self, data: bytes | bytearray) -> Ending | None:
        """Feed one read to the core, count what it says, and hand its events over."""
        return await self._finish(self._take(data, trio.current_time()))

    async def _finish(self, read: Read, count: int | None = None) -> Ending | None:
        """Hand over what ``read`` brought; ``count`` as in :class:`Taken`."""
        steps = read.steps
        if read.meshes:
            await self._hand_over(steps)
        elif steps:
            # Nothing for the mesh lane: every step is an event. Most reads fit in
            # the queue at once, and then nothing here waits.
            events: list[Event] = steps  # type: ignore[assignment]
            if count is None:
                count = len(events)
                self.gate.events.put_nowait(events)
            if events:
                await self._deliver(events, read.mesh_events, count)
            else:
                self._delivered(count, read.mesh_events)
        return read.ending

    def _take(self, data: bytes | bytearray, now: float, *, in_turn: bool = False) -> Read:
        """What the core makes of one read at ``now`` (trio's clock), counted and logged;
        ``in_turn``: read by the poller, whose turn's end writes the hot counts
        (Gate.end_turn)."""
        core = self.core
        bound = core.session_id is not None
        # The processing time is the real one (trio's clock may be a test's MockClock).
        started = time.perf_counter()
        # Every packet of a read arrived at once, as far as anyone can tell.
        read = core.receive(data, now, time.time_ns() // 1_000_000)
        elapsed = time.perf_counter() - started
        if read.wrote:
            self._notify()
        if not bound and core.session_id is not None:
            self.log = self.log.bind(session=core.session_id)
        self._count(read, elapsed, in_turn)
        ending = read.ending
        if type(ending) is RelayClose:
            if ending is TOO_MANY_SESSIONS:
                self.log.warning("session limit reached, connection refused")
            elif ending.policy is not None:
                self.gate.metrics.policy_closes.labels(ending.policy).inc()
                self.log.info(
                    "closing a connection that hurts the others",
                    reason=ending.policy,
                    code=ending.code,
                )
        return read

    def _count(self, read: Read, elapsed: float, in_turn: bool) -> None:
        """The read's tallies into the metrics, once per read (each inc takes a lock)."""
        gate = self.gate
        metrics = gate.metrics
        if read.accepted:
            if in_turn:
                gate.turn_processing.observe_many(elapsed / read.accepted, read.accepted)
            else:
                metrics.observe_many(
                    metrics.processing_duration, elapsed / read.accepted, read.accepted
                )
        for kind, count in read.invalid.items():
            self.tally.packet(kind, "invalid").inc(count)
        if read.suppressed:
            metrics.error_replies_suppressed.inc(read.suppressed)
        duplicates = read.duplicates
        if duplicates:
            if pose := duplicates.get("pose"):
                self.tally.duplicate_pose.inc(pose)
            if mesh := duplicates.get("mesh"):
                self.tally.duplicate_mesh.inc(mesh)

    async def _hand_over(self, steps: list[Event | MeshHandoff]) -> None:
        """Events to the queue and meshes to the mesh lane, in order: what came before a
        mesh goes into the queue before the reader waits for a busy lane."""
        events: list[Event] = []
        for step in steps:
            if type(step) is MeshHandoff:
                if self.gate.meshes is not None:
                    # Decoding and diffing take milliseconds: the mesh lane does it,
                    # so this connection's poses do not wait behind it.
                    await self._to_mesh_lane(step.event, step.mesh, events)
                    continue
                events.append(step.event)
            else:
                assert isinstance(step, Event)
                events.append(step)
        self.core.handed_over()
        if events:
            await self._deliver(events, _mesh_events(events))

    async def _deliver(self, events: list[Event], meshes: int, count: int | None = None) -> None:
        """Put ``events`` (``meshes`` of them mesh events) into the queue, waiting for room;
        ``count``: how many there were before a ``put_nowait`` that took the first of them.

        Shielded: draining stops reading but must not lose a packet already read;
        only the shutdown deadline (abort_send) cancels it, and what it gave up is
        counted as dropped.
        """
        if count is None:
            count = len(events)
            self.gate.events.put_nowait(events)
        if events:
            # Not reading the client is our doing: its packets bunch up meanwhile.
            self.core.wait_begins(trio.current_time())
            try:
                await self._shielded_put(events)
            finally:
                self.core.wait_ends(trio.current_time())
            if events:
                meshes -= sum(1 for event in events if event.type == "mesh")
        moved = count - len(events)
        events.clear()
        self._delivered(moved, meshes)

    def _delivered(self, moved: int, meshes: int, *, in_turn: bool = False) -> None:
        """``moved`` events are in the queue, ``meshes`` of them mesh events;
        ``in_turn`` as for :meth:`_take`."""
        self.gate.events_in += moved
        if moved > meshes:
            if in_turn:
                self.tally.turn_ok_pose += moved - meshes
            else:
                self.tally.add_ok_pose(moved - meshes)
        if meshes:
            self.tally.ok_mesh.inc(meshes)

    async def _shielded_put(self, events: list[Event]) -> None:
        task = trio.lowlevel.current_task()
        self._send_scopes.add(task)
        try:
            await self.gate.events.put_shielded(events)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._send_scopes.discard(task)
        if events:
            self.gate.metrics.events_dropped.labels("shutdown").inc(len(events))

    # -- the mesh lane ----------------------------------------------------------------

    async def _to_mesh_lane(self, event: Event, mesh: MeshData, events: list[Event]) -> None:
        if self._lane_send is None:
            self._lane_send, lane_recv = trio.open_memory_channel[tuple[Event, MeshData]](MESH_LANE)
            self._lane_done = trio.Event()
            self._nursery.start_soon(self.mesh_lane, lane_recv)
        self._in_lane += 1
        try:
            self._lane_send.send_nowait((event, mesh))
            return
        except trio.WouldBlock:
            pass
        # The lane is busy: what this read produced so far goes first.
        if events:
            await self._deliver(events, _mesh_events(events))
        self.core.wait_begins(trio.current_time())
        sent = False
        try:
            with trio.CancelScope(shield=True) as scope:
                self._send_scopes.add(scope)
                await self._lane_send.send((event, mesh))
                sent = True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._send_scopes.discard(scope)
            self.core.wait_ends(trio.current_time())
        if not sent:
            self._in_lane -= 1
            self.gate.metrics.events_dropped.labels("shutdown").inc()

    async def mesh_lane(self, lane: trio.MemoryReceiveChannel[tuple[Event, MeshData]]) -> None:
        """Decode and diff this connection's meshes in turn, then put their events on."""
        meshes = self.gate.meshes
        async with lane:
            async for event, mesh in lane:
                try:
                    if meshes is None:
                        raise MeshError("mesh pipeline not running")
                    update = await meshes.process(event.session_id, event.event_id, mesh)
                except MeshError as exc:
                    self._in_lane -= 1
                    self.tally.packet("mesh", "invalid").inc()
                    if self.acks:
                        self.forget(1)
                    self._reply_error(exc.message, event.frame_number)
                    continue
                sent = (_with_client_fields(event, update),)
                done = [msgspec.structs.replace(event, meshes=sent)]
                self.gate.events.put_nowait(done)
                if done:
                    await self._shielded_put(done)
                self._in_lane -= 1
                if not done:
                    self.gate.events_in += 1
                    self.tally.ok_mesh.inc()
        assert self._lane_done is not None
        self._lane_done.set()

    async def _finish_mesh_lane(self) -> None:
        """Let the lane finish the meshes already read (their packets are not lost)."""
        if self._lane_send is None or self._lane_done is None:
            return
        self._lane_send.close()
        await self._lane_done.wait()

    # -- replies ------------------------------------------------------------------------

    def _reply_error(
        self, message: str, frame_number: int | None, *, code: str = "invalid_packet"
    ) -> None:
        # The outbox counts and reports the replies it does not send.
        if not self.core.reply_error(trio.current_time(), message, frame_number, code=code):
            self.gate.metrics.error_replies_suppressed.inc()
        # Either a reply to write, or a summary of suppressed ones to schedule.
        self._notify()

    def _notify(self) -> None:
        """Something new in the outbox: wake the writer if it waits."""
        wake = self._wake
        if wake is not None:
            wake.set()

    def _drop_slow_reader(self) -> None:
        if not self._scope.cancel_called:
            self.log.info("client does not read what the relay sends, closing")
            self.gate.metrics.policy_closes.labels("slow_reader").inc()
        self._scope.cancel()

    async def write_frames(self) -> None:
        """The one writer: the outbox in order, and a ping every heartbeat_interval;
        a peer that answers no ping within an interval is closed (1011), unless we
        were the ones not reading (backpressure, the read throttle)."""
        try:
            closed_here = await self._write_until_closed()
        finally:
            # Done with the close frame, or given up: either way nobody waits longer.
            if self._close_written is not None:
                self._close_written.set()
        if closed_here:
            # The reader ends the connection when the peer answers our close frame.
            await trio.sleep(SEND_TIMEOUT)
            self._scope.cancel()

    async def _write_until_closed(self) -> bool:
        """Write until the close frame is out (True if the heartbeat sent it) or
        writing failed (False)."""
        core = self.core
        outbox = core.outbox
        core.state.start(trio.current_time())
        closed_here = False
        while True:
            now = trio.current_time()
            beat = core.beat(now)
            if beat is Beat.TIMEOUT:
                interval = core.state.interval
                self.gate.metrics.heartbeat_timeouts.inc()
                self.log.info("no pong within heartbeat interval, closing", interval=interval)
                self._close_written = trio.Event()
                closed_here = True
                continue
            if beat is Beat.PING:
                if not await self._write(_PING):
                    return False
                continue
            frame = outbox.pop(now)
            if frame is None:
                self._wake = wake = trio.Event()
                with trio.move_on_at(core.wake_at(now)):
                    await wake.wait()
                self._wake = None
                continue
            if not await self._write(frame):
                return False
            if outbox.done:
                core.sent_close()
                await self._half_close()
                return closed_here

    async def _write(self, frame: bytes) -> bool:
        """Send ``frame``; False if the peer is gone, or if its socket took none of it
        for SEND_TIMEOUT (a slow reader, dropped). A long frame goes in chunks, each
        with that timeout: a client that reads slowly but reads is not dropped."""
        stream = self.stream
        for start in range(0, len(frame), WRITE_CHUNK):
            chunk = frame if len(frame) <= WRITE_CHUNK else frame[start : start + WRITE_CHUNK]
            with trio.move_on_after(SEND_TIMEOUT) as timeout:
                try:
                    await stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False
            if timeout.cancelled_caught:
                self._drop_slow_reader()
                return False
        return True

    async def _half_close(self) -> None:
        """Nothing follows a close frame: say so with a FIN (TCP, not TLS), so a peer
        that waits for the end of the stream instead of answering sees it at once.
        The peer can still send its close frame, which the reader waits for."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_eof()

    def _queue_close(
        self, code: int | None, reason: str = "", *, keep_reading: bool = False
    ) -> None:
        """Queue our close frame (once). Unless ``keep_reading`` (a drain), only the
        peer's close frame is read from now on."""
        if not self.core.close(code, reason, keep_reading=keep_reading):
            return
        self._close_written = trio.Event()
        self._notify()

    # -- acknowledgements (events.Origin) ---------------------------------------------

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        """These frames are durable: tell the client, with any duplicates seen meanwhile."""
        if self.core.acknowledge(session_id, frame_numbers):
            self._notify()

    def forget(self, count: int) -> None:
        """These events will never be durable (STAG refused them): no acknowledgement."""
        if self.core.forget(count):
            self._notify()

    # -- the end ----------------------------------------------------------------------

    async def _end(self, ending: Ending) -> None:
        if isinstance(ending, Close):
            self.log.debug("connection closed by peer", code=ending.code)
            # Answer at once (the peer waits for it), then let the lane finish.
            self._queue_close(ending.code)
            await self._wait_close_written()
            await self._finish_mesh_lane()
            return
        if ending is _GONE:
            self.log.debug("connection lost without a close frame")
            await self._finish_mesh_lane()
            return
        if ending is _DRAINED:
            self.log.debug("no close frame from the peer after ours", code=CLOSE_GOING_AWAY)
            await self._wait_close_written()
            await self._finish_mesh_lane()
            return
        if isinstance(ending, Violation):
            if ending.code == websocket.CLOSE_TOO_BIG:
                self.tally.packet("unknown", "too_large").inc()
                self.log.info("message too large, connection closed", code=ending.code)
            else:
                self.log.info("protocol violation, connection closed", code=ending.code)
        await self._finish_mesh_lane()
        await self._close(ending.code, ending.reason)

    async def _close(self, code: int, reason: str) -> None:
        """Send our close frame and wait (within SEND_TIMEOUT) for the peer's."""
        self._queue_close(code, reason)
        with trio.move_on_after(SEND_TIMEOUT):
            core = self.core
            while not core.frames.closed:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                core.receive_closing(data)
        self.log.debug("connection closed", code=code)

    async def _wait_close_written(self) -> None:
        if self._close_written is not None:
            with trio.move_on_after(SEND_TIMEOUT):
                await self._close_written.wait()
