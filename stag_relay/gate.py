"""The gate: one task per WebSocket connection.

A connection reads messages, parses and transforms them, and puts the events
into the channel to the batcher. When the channel is full the connection waits
and stops reading its socket, so backpressure reaches the client over TCP; the
heartbeat knows that a connection waiting on backpressure is not a dead peer.
Invalid packets get an error reply and the connection stays open.
"""

from __future__ import annotations

import itertools
import time
from typing import Final, TypeVar
from urllib.parse import parse_qs

import attrs
import orjson
import structlog
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from stag_relay.config import Config
from stag_relay.events import Event
from stag_relay.front import HttpRequest
from stag_relay.limits import InvalidStreak, PacketRate, ReplyBudget, Verdict
from stag_relay.mesh import MeshError
from stag_relay.meshwork import MeshPipeline
from stag_relay.metrics import RelayMetrics
from stag_relay.packets import MeshData, PacketError, parse_packet
from stag_relay.transform import SessionLimitError, Sessions

# trio-websocket reads 4 KiB at a time by default; a flood of small packets then
# costs one receive per few packets. 64 KiB keeps idle memory untouched (the
# buffer is allocated per read) and cuts receives under load.
RECEIVE_BYTES: Final = 64 * 1024
# Messages trio-websocket may hold between its reader task and ours. Each one is
# read from the socket but not yet in the channel, so keep it small.
MESSAGE_QUEUE_SIZE: Final = 4
# A client that does not take an error reply or a close frame within this long is
# not reading: give up on it rather than hold its task.
SEND_TIMEOUT: Final = 5.0
# Meshes a connection may have waiting for its mesh lane: a client sends about one
# per second beside 60 Hz poses; one more in hand keeps the lane busy, not the reader.
MESH_LANE: Final = 1
# Replies (errors, acks) waiting for a client: acks come one per batch, so this is
# many batches' worth; a client further behind than that is not reading.
REPLY_QUEUE: Final = 64
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013

log = structlog.get_logger("stag_relay.gate")
T = TypeVar("T")


class Gate:
    """What every connection shares: the sessions, the channel, the metrics."""

    def __init__(
        self,
        *,
        config: Config,
        sessions: Sessions,
        events: trio.MemorySendChannel[Event],
        metrics: RelayMetrics,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.events = events
        self.metrics = metrics
        self.connections: set[Connection] = set()
        # Events this gate put into the channel: the shutdown sequence compares
        # it with what STAG accepted to count what was not delivered.
        self.events_in = 0
        # The mesh pipeline (worker processes), once the app has started it.
        self.meshes: MeshPipeline | None = None
        self._ids = itertools.count(1)
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, stream: trio.abc.Stream, request: HttpRequest) -> None:
        """Run one WebSocket connection on ``stream`` (the upgrade request replayed)."""
        conn_id = next(self._ids)
        bound = log.bind(conn=conn_id, peer=request.peer)
        async with trio.open_nursery() as nursery:
            ws: WebSocketConnection | None = None
            with trio.move_on_after(self.config.server.handshake_timeout):
                try:
                    ws_request = await trio_websocket.wrap_server_stream(
                        nursery,
                        stream,
                        message_queue_size=MESSAGE_QUEUE_SIZE,
                        max_message_size=self.config.websocket.max_message_size,
                        receive_buffer_size=RECEIVE_BYTES,
                    )
                    ws = await ws_request.accept()
                except (ConnectionClosed, trio_websocket.HandshakeError):
                    ws = None
            if ws is None:
                nursery.cancel_scope.cancel()
                return
            connection = Connection(
                self, ws, bound, nursery.cancel_scope, acks=_wants_acks(request.query)
            )
            self._opened(connection)
            try:
                nursery.start_soon(connection.heartbeat)
                nursery.start_soon(connection.write_replies)
                nursery.start_soon(connection.mesh_lane)
                await connection.run()
            finally:
                self._closed(connection)
                nursery.cancel_scope.cancel()

    def drain(self) -> None:
        """Shutdown step: every connection stops reading and closes with 1001."""
        for connection in list(self.connections):
            connection.stop_reading()

    def abort(self) -> None:
        """Shutdown deadline: give up sends still waiting on a full channel."""
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
    return any(value in ("1", "true") for value in parse_qs(query).get("ack", ()))


class Connection:
    """One client's WebSocket: read, parse, transform, send into the channel.

    Replies (errors, acknowledgements) go through a small queue drained by
    ``write_replies``, so neither this task nor the delivery stage ever waits on a
    client that does not read; a client whose queue overflows is closed.
    """

    def __init__(
        self,
        gate: Gate,
        ws: WebSocketConnection,
        log: structlog.typing.FilteringBoundLogger,
        scope: trio.CancelScope,
        *,
        acks: bool = False,
    ) -> None:
        self.gate = gate
        self.ws = ws
        self.acks = acks
        # The connection's whole nursery: cancelled to drop a client that does not read.
        self._scope = scope
        # Texts to send; an Event marks a point the writer sets once it got there.
        self._replies_send, self._replies_recv = trio.open_memory_channel[str | trio.Event](
            REPLY_QUEUE
        )
        # Acknowledgements owed: events in the pipeline, and duplicates seen meanwhile
        # (acknowledged with the next acknowledgement, as they are already safe).
        self._unacked = 0
        self._duplicates: list[int] = []
        self.log = log
        self.session_id: str | None = None
        # True while a send waits on a full channel; ``stalls`` counts such waits
        # so the heartbeat can tell a stalled pipeline from a dead peer.
        self.blocked = False
        self.stalls = 0
        # Sends shielded from draining; the shutdown deadline cancels them.
        self._send_scopes: set[trio.CancelScope] = set()
        # Meshes read and handed to the mesh lane, not yet in the channel.
        self._lane_send, self._lane_recv = trio.open_memory_channel[tuple[Event, MeshData]](
            MESH_LANE
        )
        self._lane_done = trio.Event()
        self._in_lane = 0
        self._read_scope = trio.CancelScope()
        metrics = gate.metrics
        self._ok = {t: metrics.packet(t, "ok") for t in ("pose", "mesh")}
        self._duplicate = {t: metrics.packet(t, "duplicate") for t in ("pose", "mesh")}
        self._processing = metrics.processing_duration
        # Limits that protect the other clients from this one (limits.py).
        settings = gate.config.websocket
        self._rate = PacketRate(settings.max_packets_per_second)
        self._invalid = InvalidStreak(settings.max_invalid_packets)
        self._error_budget = ReplyBudget()
        self._rate_limited = metrics.packet("unknown", "rate_limited")

    def stop_reading(self) -> None:
        self._read_scope.cancel()

    def abort_send(self) -> None:
        for scope in list(self._send_scopes):
            scope.cancel()

    async def run(self) -> None:
        self.log.debug("connection opened")
        try:
            with self._read_scope:
                while True:
                    message = await self.ws.get_message()
                    await self._on_message(message)
        except ConnectionClosed as exc:
            reason = exc.reason
            if reason is not None and reason.code == 1009:
                # trio-websocket closed it for us: the message exceeded max_message_size.
                self.gate.metrics.packet("unknown", "too_large").inc()
                self.log.info("message too large, connection closed", code=1009)
            else:
                self.log.debug("connection closed by peer", code=getattr(reason, "code", None))
            await self._finish_mesh_lane()
            return
        # Drained: once the meshes read are through the lane, everything read from
        # this client is in the channel.
        await self._finish_mesh_lane()
        await self._close(CLOSE_GOING_AWAY, "relay shutting down")

    async def _on_message(self, message: str | bytes) -> None:
        started = time.perf_counter()
        gate = self.gate
        # Before parsing: a flood must not cost us the parsing of what we refuse.
        verdict = self._rate.check(trio.current_time())
        if verdict is not Verdict.ACCEPT:
            self._rate_limited.inc()
            if verdict is Verdict.CLOSE:
                await self._close_for_policy("rate_limit", "far over the packet rate for long")
                return
            limit = self._rate.limit
            await self._reply_error(
                f"over {limit} packets per second; packet dropped", None, code="rate_limited"
            )
            return
        try:
            packet = parse_packet(message)
            if self.session_id is None:
                gate.sessions.attach(packet.session_id, trio.current_time())
                self.session_id = packet.session_id
                self.log = self.log.bind(session=packet.session_id)
            elif packet.session_id != self.session_id:
                raise PacketError(
                    f"$.session_id: this connection belongs to session {self.session_id!r}",
                    frame_number=packet.frame_number,
                    packet_type=packet.type,
                )
            event = gate.sessions.accept(
                packet,
                received_at_ms=time.time_ns() // 1_000_000,
                now=trio.current_time(),
                origin=self if self.acks else None,
            )
        except PacketError as exc:
            gate.metrics.packet(exc.packet_type, "invalid").inc()
            if self._invalid.invalid():
                await self._close_for_policy("invalid_packets", "too many invalid packets")
                return
            await self._reply_error(exc.message, exc.frame_number)
            return
        except SessionLimitError:
            gate.metrics.packet("unknown", "invalid").inc()
            self.log.warning("session limit reached, connection refused")
            await self._reply_error("the relay holds too many sessions; retry later", None)
            await self._flush_replies()
            await self._close(CLOSE_TRY_AGAIN_LATER, "too many sessions")
            return
        self._invalid.valid()
        if event is None:
            # Resent after a reconnect, most likely: already forwarded, no reply needed.
            self._duplicate[packet.type].inc()
            if self.acks:
                self._duplicates.append(packet.frame_number)
                if not self._unacked:
                    self.acknowledge(packet.session_id, [])
            return
        self._processing.observe(time.perf_counter() - started)
        if self.acks:
            self._unacked += 1
        if packet.type == "mesh" and gate.meshes is not None:
            # Decoding and diffing take milliseconds: the mesh lane does it, so this
            # connection's poses do not wait behind it.
            assert packet.mesh is not None
            self._in_lane += 1
            try:
                self._lane_send.send_nowait((event, packet.mesh))
            except trio.WouldBlock:
                if not await self._send_waiting(self._lane_send, (event, packet.mesh)):
                    self._in_lane -= 1
            return
        try:
            gate.events.send_nowait(event)
        except trio.WouldBlock:
            if not await self._send_waiting(gate.events, event):
                return
        gate.events_in += 1
        self._ok[packet.type].inc()

    async def _send_waiting(self, channel: trio.MemorySendChannel[T], item: T) -> bool:
        """Wait for room in ``channel``; False if shutdown gave up on ``item``.

        Shielded: draining stops reading but must not lose a packet already read;
        only the shutdown deadline (abort_send) cancels it.
        """
        self.blocked = True
        self.stalls += 1
        # Not reading the client is our doing: its packets bunch up meanwhile.
        self._rate.pause(trio.current_time())
        try:
            return await self._shielded_send(channel, item)
        finally:
            self.blocked = False
            self._rate.resume(trio.current_time())

    async def _shielded_send(self, channel: trio.MemorySendChannel[T], item: T) -> bool:
        try:
            with trio.CancelScope(shield=True) as scope:
                self._send_scopes.add(scope)
                await channel.send(item)
                return True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            self._send_scopes.discard(scope)
        self.gate.metrics.events_dropped.labels("shutdown").inc()
        return False

    async def mesh_lane(self) -> None:
        """Decode and diff this connection's meshes in turn, then send their events on."""
        meshes = self.gate.meshes
        async with self._lane_recv:
            async for event, mesh in self._lane_recv:
                try:
                    if meshes is None:
                        raise MeshError("mesh pipeline not running")
                    update = await meshes.process(event.session_id, event.event_id, mesh)
                except MeshError as exc:
                    self._in_lane -= 1
                    self.gate.metrics.packet("mesh", "invalid").inc()
                    if self.acks:
                        self.forget(1)
                    await self._reply_error(exc.message, event.frame_number)
                    continue
                event = attrs.evolve(event, meshes=(update,))
                try:
                    self.gate.events.send_nowait(event)
                    sent = True
                except trio.WouldBlock:
                    sent = await self._shielded_send(self.gate.events, event)
                self._in_lane -= 1
                if sent:
                    self.gate.events_in += 1
                    self._ok["mesh"].inc()
        self._lane_done.set()

    async def _finish_mesh_lane(self) -> None:
        """Let the lane finish the meshes already read (their packets are not lost)."""
        self._lane_send.close()
        await self._lane_done.wait()

    async def _reply_error(
        self, message: str, frame_number: int | None, *, code: str = "invalid_packet"
    ) -> None:
        # Error replies are rate limited too, or a flood of bad packets would make us
        # an amplifier; the next reply sent says how many were suppressed.
        suppressed = self._error_budget.take(trio.current_time())
        if suppressed is None:
            self.gate.metrics.error_replies_suppressed.inc()
            await trio.lowlevel.checkpoint()
            return
        reply: dict[str, object] = {"type": "error", "code": code, "message": message}
        if frame_number is not None:
            reply["frame_number"] = frame_number
        if suppressed:
            reply["suppressed"] = suppressed
        self._reply(orjson.dumps(reply).decode())
        await trio.lowlevel.checkpoint()

    async def _close_for_policy(self, reason: str, message: str) -> None:
        self.gate.metrics.policy_closes.labels(reason).inc()
        self.log.info("closing a connection that hurts the others", reason=reason, code=1008)
        await self._flush_replies()
        await self._close(CLOSE_POLICY_VIOLATION, message)

    async def _flush_replies(self) -> None:
        """Wait until the replies queued so far are sent (within SEND_TIMEOUT), so
        that a close frame follows them instead of overtaking them."""
        sent = trio.Event()
        try:
            self._replies_send.send_nowait(sent)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return
        with trio.move_on_after(SEND_TIMEOUT):
            await sent.wait()

    def _reply(self, text: str) -> None:
        """Queue a reply; a client that lets the queue fill is not reading: drop it."""
        try:
            self._replies_send.send_nowait(text)
        except trio.WouldBlock:
            if not self._scope.cancel_called:
                self.log.info("client does not read its replies, closing")
                self.gate.metrics.policy_closes.labels("slow_reader").inc()
            self._scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The connection has ended (the writer is gone once the client closed,
            # while packets it sent before closing are still being judged).
            pass

    async def write_replies(self) -> None:
        """Send queued replies in order; give up on a client that stops reading."""
        async with self._replies_recv:
            async for text in self._replies_recv:
                if isinstance(text, trio.Event):
                    text.set()
                    continue
                with trio.move_on_after(SEND_TIMEOUT) as timeout:
                    try:
                        await self.ws.send_message(text)
                    except ConnectionClosed:
                        return
                if timeout.cancelled_caught:
                    self.log.info("client does not read its replies, closing")
                    self.gate.metrics.policy_closes.labels("slow_reader").inc()
                    self._scope.cancel()
                    return

    # -- acknowledgements (events.Origin) ---------------------------------------------

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        """These frames are durable: tell the client, with any duplicates seen meanwhile."""
        self._unacked -= len(frame_numbers)
        if self._duplicates:
            frame_numbers = frame_numbers + self._duplicates
            self._duplicates = []
        if frame_numbers:
            message = {"type": "ack", "session_id": session_id, "frame_numbers": frame_numbers}
            self._reply(orjson.dumps(message).decode())

    def forget(self, count: int) -> None:
        """These events will never be durable (STAG refused them): no acknowledgement."""
        self._unacked -= count
        if not self._unacked and self._duplicates and self.session_id is not None:
            self.acknowledge(self.session_id, [])

    async def _close(self, code: int, reason: str) -> None:
        with trio.move_on_after(SEND_TIMEOUT):
            await self.ws.aclose(code, reason)
        self.log.debug("connection closed", code=code)

    async def heartbeat(self) -> None:
        """Ping every heartbeat_interval; close a peer that does not answer in time."""
        interval = self.gate.config.websocket.heartbeat_interval
        try:
            while True:
                await trio.sleep(interval)
                stalls = self.stalls
                with trio.move_on_after(interval) as wait:
                    await self.ws.ping()
                if not wait.cancelled_caught:
                    continue
                if self.blocked or self.stalls != stalls:
                    # We were not reading the socket (full channel), so its pong
                    # may be sitting unread: not the peer's fault.
                    continue
                self.gate.metrics.heartbeat_timeouts.inc()
                self.log.info("no pong within heartbeat interval, closing", interval=interval)
                await self._close(CLOSE_INTERNAL_ERROR, "ping timeout")
                return
        except ConnectionClosed:
            return
