"""The gate: one task per WebSocket connection, reading and judging its packets.

The front door has checked the upgrade request; the gate answers it (101) and
then reads the socket in the connection's own task, 64 KiB at a time: every
complete frame of a read is parsed in one loop (``websocket.FrameReader``), every
packet of it parsed and transformed, and the read's events go into the queue to
the batcher in one operation. When the queue is full the connection waits and
stops reading its socket, so backpressure reaches the client over TCP (and reads
only 4 KiB at a time while it lasts); ``websocket.max_packets_per_second`` works
the same way: a connection over it waits before its next read. No packet is ever
refused for a limit. The heartbeat knows that a connection we are not reading is
not a dead peer. Invalid packets get an error reply and the connection stays open.

Everything the relay sends a client (replies, acknowledgements, pongs, pings,
the close frame) waits in the connection's outbox (outbox.py), which cannot
overflow, and is written by one writer task, which also keeps the heartbeat: one
writer at a time, and neither the reader nor the delivery stage ever waits on a
client that does not read. A client is dropped as a slow reader only when its
socket accepts nothing for SEND_TIMEOUT.

On drain (shutdown) the connection sends its close frame (1001) at once and goes
on reading, unthrottled, what the client sent before it saw it, up to the client's
own close frame: a packet in flight when the relay stops is not lost.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from typing import Final
from urllib.parse import parse_qs

import attrs
import structlog
import trio

from stag_relay.pipeline.eventqueue import EventSender
from stag_relay.pipeline.front import ReplayStream
from stag_relay.pipeline.meshpool import MeshPipeline
from stag_relay.protocol import websocket
from stag_relay.protocol.events import Event
from stag_relay.protocol.http import HttpRequest
from stag_relay.protocol.limits import InvalidStreak, ReadThrottle
from stag_relay.protocol.mesh import MeshError
from stag_relay.protocol.outbox import Outbox
from stag_relay.protocol.packets import MeshData, PacketError, parse_packet
from stag_relay.protocol.sessions import SessionLimitError, Sessions
from stag_relay.protocol.websocket import Close, FrameReader, Ping, Pong, Received, Violation
from stag_relay.service.config import Config
from stag_relay.service.metrics import RelayMetrics

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
# While the event queue is (nearly) full, a connection reads this much at a time: a
# few dozen poses held outside the queue per waiting connection instead of a 64 KiB
# read's several hundred, so memory under backpressure follows websocket.buffer_size,
# not the number of connections.
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


class Gate:
    """What every connection shares: the sessions, the event queue, the metrics."""

    def __init__(
        self,
        *,
        config: Config,
        sessions: Sessions,
        events: EventSender,
        metrics: RelayMetrics,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.events = events
        self.metrics = metrics
        self.connections: set[Connection] = set()
        # Events this gate put into the queue: the shutdown sequence compares it
        # with what STAG accepted to count what was not delivered.
        self.events_in = 0
        # The mesh pipeline (worker processes), once the app has started it.
        self.meshes: MeshPipeline | None = None
        # Counter children every connection uses, bound once.
        self.ok_pose = metrics.packet("pose", "ok")
        self.ok_mesh = metrics.packet("mesh", "ok")
        self.duplicate_pose = metrics.packet("pose", "duplicate")
        self.duplicate_mesh = metrics.packet("mesh", "duplicate")
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
        with trio.move_on_after(self.config.server.handshake_timeout) as handshake:
            try:
                await stream.send_all(websocket.switching_protocols(key))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if handshake.cancelled_caught:
            return
        bound = log.bind(conn=next(self._ids), peer=request.peer)
        async with trio.open_nursery() as nursery:
            connection = Connection(self, stream, bound, nursery, acks=_wants_acks(request.query))
            self._opened(connection)
            try:
                nursery.start_soon(connection.write_frames)
                await connection.run(prefix)
            finally:
                self._closed(connection)
                nursery.cancel_scope.cancel()

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
        self.metrics.connections_active.dec()
        if connection.session_id is not None:
            self.sessions.detach(connection.session_id, trio.current_time())
        if not self.connections:
            self._idle.set()


def _wants_acks(query: str) -> bool:
    return bool(query) and any(value in ("1", "true") for value in parse_qs(query).get("ack", ()))


@attrs.frozen
class _RelayClose:
    """Why the relay ends a connection, as the close frame will say."""

    code: int
    reason: str


# The client hung up without a close frame (end of stream, or a reset).
_GONE: Final = _RelayClose(1006, "gone")
# Drained: our close frame went out and the peer did not answer it in time.
_DRAINED: Final = _RelayClose(CLOSE_GOING_AWAY, "relay shutting down")
_Ending = Close | Violation | _RelayClose


class Connection:
    """One client's WebSocket: read, parse, transform, put into the event queue.

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
    ) -> None:
        self.gate = gate
        self.stream = stream
        self.acks = acks
        self.log = log
        self.session_id: str | None = None
        # The connection's whole nursery: cancelled to drop a client that does not read.
        self._nursery = nursery
        self._scope = nursery.cancel_scope
        settings = gate.config.websocket
        self._frames = FrameReader(settings.max_message_size)
        # What the writer owes the client (replies, acks, a pong, the close frame), and
        # the event that wakes the writer when there is something new (set while it waits).
        self.outbox = Outbox()
        self._wake: trio.Event | None = None
        # Set once the writer has sent the close frame (created when one is queued).
        self._close_written: trio.Event | None = None
        # A pong came since the last ping (the reader sets it, the heartbeat reads it).
        self._pong = False
        # Acknowledgements owed: events in the pipeline, and duplicates seen meanwhile
        # (acknowledged with the next acknowledgement, as they are already safe).
        self._unacked = 0
        self._duplicates: list[int] = []
        # True while the reader waits on us (a full queue, a busy mesh lane, the read
        # throttle); ``stalls`` counts such waits so the heartbeat can tell a stalled
        # reader from a dead peer.
        self.blocked = False
        self.stalls = 0
        # Puts shielded from draining; the shutdown deadline cancels them.
        self._send_scopes: set[trio.CancelScope] = set()
        # The mesh lane, started with the first mesh: meshes read and handed to it,
        # not yet in the queue.
        self._lane_send: trio.MemorySendChannel[tuple[Event, MeshData]] | None = None
        self._lane_done: trio.Event | None = None
        self._in_lane = 0
        self._read_scope = trio.CancelScope()
        # Limits that protect the other clients from this one (limits.py).
        self._throttle = ReadThrottle(settings.max_packets_per_second)
        self._read_again_at = -math.inf
        self._invalid = InvalidStreak(settings.max_invalid_packets)

    def stop_reading(self) -> None:
        self._read_scope.cancel()

    def abort_send(self) -> None:
        for scope in list(self._send_scopes):
            scope.cancel()

    # -- the reader -------------------------------------------------------------------

    async def run(self, prefix: bytes = b"") -> None:
        self.log.debug("connection opened")
        ending: _Ending | None = None
        # Only receives and the throttle's waits are ever cancelled by draining:
        # handling a read has no checkpoint but its shielded puts, so whatever was
        # read is judged and queued.
        with self._read_scope:
            ending = await self._read(prefix)
        if ending is None:
            ending = await self._read_after_drain()
        await self._end(ending)

    async def _read(self, data: bytes | bytearray) -> _Ending:
        receive_some = self.stream.receive_some
        frames = self._frames
        events = self.gate.events
        while True:
            if data:
                ending = await self._handle(frames.receive(data))
                if ending is not None:
                    return ending
                if self._read_again_at > trio.current_time():
                    await self._throttled()
            # While the queue is (nearly) full, what a read brings waits outside it:
            # read little, so that is a few packets per connection, not a whole read's.
            size = PRESSED_RECEIVE_BYTES if events.pressed() else RECEIVE_BYTES
            try:
                data = await receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return _GONE

    async def _throttled(self) -> None:
        """Over websocket.max_packets_per_second: read nothing until the bucket has
        tokens again, so TCP slows the client down. Not the heartbeat's business."""
        self.blocked = True
        self.stalls += 1
        started = trio.current_time()
        try:
            await trio.sleep_until(self._read_again_at)
        finally:
            self.blocked = False
            self.gate.metrics.throttled_seconds.inc(trio.current_time() - started)

    async def _read_after_drain(self) -> _Ending:
        """Drained: our close frame (1001) goes out, and what the client sent before it
        saw it is still read and queued, up to its own close frame. Unthrottled: that
        is what it sent already, and the shutdown has a deadline."""
        self._queue_close(CLOSE_GOING_AWAY, "relay shutting down", keep_reading=True)
        frames = self._frames
        with trio.move_on_after(SEND_TIMEOUT):
            while True:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return _GONE
                ending = await self._handle(frames.receive(data))
                if ending is not None:
                    return ending
        return _DRAINED

    async def _handle(self, items: list[Received]) -> _Ending | None:
        """Judge everything one read brought; the read's events go into the queue at once."""
        if not items:
            return None
        gate = self.gate
        sessions = gate.sessions
        origin = self if self.acks else None
        events: list[Event] = []
        ending: _Ending | None = None
        now = trio.current_time()
        # Every packet of a read arrived at once, as far as anyone can tell.
        received_at_ms = time.time_ns() // 1_000_000
        started = time.perf_counter()
        waited = 0.0
        # Tallies for the metrics, added once per read (each inc takes a lock).
        packets = accepted = meshes = duplicate_pose = duplicate_mesh = 0
        for item in items:
            if type(item) is bytes:
                packets += 1
                try:
                    packet = parse_packet(item)
                    if self.session_id is None:
                        sessions.attach(packet.session_id, now)
                        self.session_id = packet.session_id
                        self.log = self.log.bind(session=packet.session_id)
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
                    gate.metrics.packet(exc.packet_type, "invalid").inc()
                    if self._invalid.invalid():
                        ending = self._policy_close("invalid_packets", "too many invalid packets")
                        break
                    self._reply_error(exc.message, exc.frame_number)
                    continue
                except SessionLimitError:
                    gate.metrics.packet("unknown", "invalid").inc()
                    self.log.warning("session limit reached, connection refused")
                    self._reply_error("the relay holds too many sessions; retry later", None)
                    ending = _RelayClose(CLOSE_TRY_AGAIN_LATER, "too many sessions")
                    break
                self._invalid.valid()
                if event is None:
                    # Resent after a reconnect, most likely: already forwarded, no reply.
                    if packet.type == "pose":
                        duplicate_pose += 1
                    else:
                        duplicate_mesh += 1
                    if self.acks:
                        self._duplicates.append(packet.frame_number)
                        if not self._unacked:
                            self.acknowledge(packet.session_id, [])
                    continue
                accepted += 1
                if self.acks:
                    self._unacked += 1
                if packet.type == "mesh":
                    if gate.meshes is not None:
                        # Decoding and diffing take milliseconds: the mesh lane does it,
                        # so this connection's poses do not wait behind it.
                        assert packet.mesh is not None
                        before = time.perf_counter()
                        await self._to_mesh_lane(event, packet.mesh, events)
                        waited += time.perf_counter() - before
                        continue
                    meshes += 1
                events.append(event)
            elif type(item) is Pong:
                self._pong = True
            elif type(item) is Ping:
                self.outbox.ping(item.payload)
                self._notify()
            else:
                assert isinstance(item, Close | Violation)
                ending = item
                break
        if accepted:
            elapsed = time.perf_counter() - started - waited
            gate.metrics.observe_many(
                gate.metrics.processing_duration, elapsed / accepted, accepted
            )
        if packets:
            self._read_again_at = self._throttle.read(packets, now)
        if duplicate_pose:
            gate.duplicate_pose.inc(duplicate_pose)
        if duplicate_mesh:
            gate.duplicate_mesh.inc(duplicate_mesh)
        if events:
            await self._deliver(events, meshes)
        return ending

    async def _deliver(self, events: list[Event], meshes: int) -> None:
        """Put ``events`` (``meshes`` of them mesh events) into the queue, waiting for room.

        Shielded: draining stops reading but must not lose a packet already read;
        only the shutdown deadline (abort_send) cancels it, and what it gave up is
        counted as dropped.
        """
        gate = self.gate
        count = len(events)
        gate.events.put_nowait(events)
        if events:
            self.blocked = True
            self.stalls += 1
            # Not reading the client is our doing: its packets bunch up meanwhile.
            self._throttle.pause(trio.current_time())
            try:
                await self._shielded_put(events)
            finally:
                self.blocked = False
                self._throttle.resume(trio.current_time())
            if events:
                meshes -= sum(1 for event in events if event.type == "mesh")
        moved = count - len(events)
        events.clear()
        gate.events_in += moved
        if moved > meshes:
            gate.ok_pose.inc(moved - meshes)
        if meshes:
            gate.ok_mesh.inc(meshes)

    async def _shielded_put(self, events: list[Event]) -> None:
        try:
            with trio.CancelScope(shield=True) as scope:
                self._send_scopes.add(scope)
                await self.gate.events.put(events)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._send_scopes.discard(scope)
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
            await self._deliver(events, 0)
        self.blocked = True
        self.stalls += 1
        self._throttle.pause(trio.current_time())
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
            self.blocked = False
            self._throttle.resume(trio.current_time())
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
                    self.gate.metrics.packet("mesh", "invalid").inc()
                    if self.acks:
                        self.forget(1)
                    self._reply_error(exc.message, event.frame_number)
                    continue
                done = [attrs.evolve(event, meshes=(update,))]
                self.gate.events.put_nowait(done)
                if done:
                    await self._shielded_put(done)
                self._in_lane -= 1
                if not done:
                    self.gate.events_in += 1
                    self.gate.ok_mesh.inc()
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
        # Error replies are rate limited too, or a flood of bad packets would make us
        # an amplifier; the outbox counts and reports the ones it does not send.
        if not self.outbox.error(trio.current_time(), code, message, frame_number):
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
        interval = self.gate.config.websocket.heartbeat_interval
        outbox = self.outbox
        beat = trio.current_time() + interval
        ping_out = False
        stalls = 0
        closed_here = False
        while True:
            now = trio.current_time()
            if now >= beat and not outbox.closing:
                beat = now + interval
                if ping_out and not self._pong and not self.blocked and self.stalls == stalls:
                    self.gate.metrics.heartbeat_timeouts.inc()
                    self.log.info("no pong within heartbeat interval, closing", interval=interval)
                    self._queue_close(CLOSE_INTERNAL_ERROR, "ping timeout")
                    closed_here = True
                else:
                    # A ping unanswered while we were not reading is not the peer's
                    # fault: its pong may be sitting unread. Ping again.
                    self._pong = False
                    ping_out = True
                    # A ping sent while the reader waits cannot have its pong read
                    # until the wait ends: it is judged only if no wait overlaps it.
                    stalls = self.stalls if not self.blocked else -1
                    if not await self._write(_PING):
                        return False
                continue
            frame = outbox.pop(now)
            if frame is None:
                # Once the close frame is queued, no more pings: it comes next.
                deadline = math.inf if outbox.closing else beat
                due = outbox.summary_due(now)
                if due is not None:
                    deadline = min(deadline, due)
                self._wake = wake = trio.Event()
                with trio.move_on_at(deadline):
                    await wake.wait()
                self._wake = None
                continue
            if not await self._write(frame):
                return False
            if outbox.done:
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
        if not self.outbox.queue_close(websocket.close_frame(code, reason)):
            return
        self._close_written = trio.Event()
        if not keep_reading:
            self._frames.closing()
        self._notify()

    # -- acknowledgements (events.Origin) ---------------------------------------------

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        """These frames are durable: tell the client, with any duplicates seen meanwhile."""
        self._unacked -= len(frame_numbers)
        if self._duplicates:
            frame_numbers = frame_numbers + self._duplicates
            self._duplicates = []
        if frame_numbers:
            self.outbox.ack(session_id, frame_numbers)
            self._notify()

    def forget(self, count: int) -> None:
        """These events will never be durable (STAG refused them): no acknowledgement."""
        self._unacked -= count
        if not self._unacked and self._duplicates and self.session_id is not None:
            self.acknowledge(self.session_id, [])

    # -- the end ----------------------------------------------------------------------

    def _policy_close(self, reason: str, message: str) -> _RelayClose:
        self.gate.metrics.policy_closes.labels(reason).inc()
        self.log.info("closing a connection that hurts the others", reason=reason, code=1008)
        return _RelayClose(CLOSE_POLICY_VIOLATION, message)

    async def _end(self, ending: _Ending) -> None:
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
                self.gate.metrics.packet("unknown", "too_large").inc()
                self.log.info("message too large, connection closed", code=ending.code)
            else:
                self.log.info("protocol violation, connection closed", code=ending.code)
        await self._finish_mesh_lane()
        await self._close(ending.code, ending.reason)

    async def _close(self, code: int, reason: str) -> None:
        """Send our close frame and wait (within SEND_TIMEOUT) for the peer's."""
        self._queue_close(code, reason)
        with trio.move_on_after(SEND_TIMEOUT):
            frames = self._frames
            while not frames.closed:
                try:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                frames.receive(data)
        self.log.debug("connection closed", code=code)

    async def _wait_close_written(self) -> None:
        if self._close_written is not None:
            with trio.move_on_after(SEND_TIMEOUT):
                await self._close_written.wait()
