r"""The relay: builds the pipeline, owns the root nursery and the shutdown sequence.

    connections (gate) --events--> batcher --batches--> STAG sender --> STAG
                                            \--> spool --/   (with delivery.spool_path)

Everything runs under one root nursery; cancelling it stops every task. The
whole shutdown sequence is ``Relay._shut_down``, in the order it happens.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
import uuid
from typing import Any, Final

import attrs
import structlog
import trio

from stag_relay import __version__
from stag_relay.pipeline.access import AccessControl
from stag_relay.pipeline.batcher import Batcher
from stag_relay.pipeline.delivery import Delivery, ToSender
from stag_relay.pipeline.eventqueue import open_event_queue
from stag_relay.pipeline.front import FrontDoor, error_sites
from stag_relay.pipeline.gate import Gate
from stag_relay.pipeline.meshpool import open_mesh_pipeline
from stag_relay.pipeline.sender import Shipment, StagSender
from stag_relay.protocol.batching import BatchPolicy
from stag_relay.protocol.connection import Dialect, SeedDialect
from stag_relay.protocol.events import Batch
from stag_relay.protocol.http import HttpRequest, HttpResponse, error_response, json_response
from stag_relay.protocol.mesh import MeshSettings
from stag_relay.protocol.sdk import SDK_PATH, SdkDialect, session_from_query
from stag_relay.protocol.sessions import Sessions
from stag_relay.service.config import Config, format_ingest_path, redact_url
from stag_relay.service.metrics import (
    DIALECTS,
    DROP_REASONS,
    PACKET_STATUSES,
    PACKET_TYPES,
    RelayMetrics,
)
from stag_relay.service.systemd import Notifier, StatusSnapshot, run_watchdog
from stag_relay.service.tls import TlsError, reload_certificate, server_context
from stag_relay.service.workers import (
    STATE_INTERVAL,
    WorkerRole,
    combine_states,
    open_shared_listeners,
    orphan_spools,
    publish_state,
    read_states,
    read_supervisor,
    spool_path_for,
    state_file,
    worker_batch_size,
)

WEBSOCKET_PATH: Final = "/ws/streamkit"
# How often expired sessions are swept; a session may outlive its ttl by this much.
_MAX_SWEEP_INTERVAL: Final = 30.0
# Retry-After for an upgrade refused at server.max_connections: long enough that a
# fleet of reconnecting clients does not hammer a full relay, short enough to matter.
_FULL_RETRY_AFTER: Final = "5"

log = structlog.get_logger("stag_relay.app")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _dialect(request: HttpRequest) -> Dialect:
    """Each WebSocket path's client dialect (the front door admitted the request)."""
    if request.path == SDK_PATH:
        return SdkDialect(session_from_query(request.query), _wall_ms)
    return SeedDialect()


def default_relay_id() -> str:
    """Host name plus a boot id: two relays on one host, or one restarted, differ."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class Relay:
    """One relay: call ``run`` (with ``nursery.start`` to learn its ports), then ``shut_down``."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: RelayMetrics | None = None,
        relay_id: str | None = None,
        notifier: Notifier | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        self.config = config
        # systemd's sd_notify (a worker's goes to its supervisor); the default one does
        # nothing (tests, Docker, a terminal).
        self.notifier = notifier if notifier is not None else Notifier()
        # One of several worker processes (server.workers > 1), or None when alone.
        self.worker = worker
        if metrics is None:
            metrics = RelayMetrics(worker.directory if worker is not None else None)
        self.metrics = metrics
        self.metrics.channel_capacity.set(config.websocket.buffer_size)
        if worker is not None:
            directory = worker.directory
            self.metrics.worker_restarts = lambda: int(
                read_supervisor(directory).get("worker_restarts", 0)
            )
        self.relay_id = relay_id or config.stag.relay_id or default_relay_id()
        self.draining = False
        self.ports: list[int] = []
        self._started_at = time.time()
        # Counted in events; each connection puts a whole read's events at once.
        self._events_send, self._events_recv = open_event_queue(config.websocket.buffer_size)
        # Unbuffered: a batch the next stage cannot take yet stays where it is, so
        # the batcher stops draining the event channel and backpressure flows back.
        self._batches_send, self._batches_recv = trio.open_memory_channel[Batch](0)
        self._shipments_send, self._shipments_recv = trio.open_memory_channel[Shipment](0)
        # Memory only: the batcher's way to the sender (set when the relay runs).
        self._outlet: ToSender | None = None
        self.sessions = Sessions(ttl=config.session.ttl, max_sessions=config.session.max_sessions)
        self.gate = Gate(
            websocket=config.websocket,
            handshake_timeout=config.server.handshake_timeout,
            sessions=self.sessions,
            events=self._events_send,
            metrics=self.metrics,
            dialect=_dialect,
        )
        self.policy = BatchPolicy(
            max_size=worker_batch_size(config.batch.max_size, worker),
            timeout=config.batch.timeout,
            new_batch_id=lambda: uuid.uuid4().hex,
        )
        self.batcher = Batcher(self.policy, self.metrics)
        self.delivery = Delivery(
            attrs.evolve(
                config.delivery, spool_path=spool_path_for(config.delivery.spool_path, worker)
            ),
            self.metrics,
        )
        self.sender = StagSender(
            config.stag, self.metrics, relay_id=self.relay_id, version=__version__
        )
        # Keys (re-read on SIGHUP) and origins; see access.py and SECURITY.md.
        self.access = AccessControl(config.auth, config.websocket.allowed_origins, self.metrics)
        self._tls: ssl.SSLContext | None = None
        if config.server.tls_cert:
            self._tls = server_context(config.server.tls_cert, config.server.tls_key)
        # WebSocket connections from admission to their end (server.max_connections).
        self._websockets = 0
        self.front = FrontDoor(
            endpoints={
                "/health": self._health,
                "/status": self.access.protect(self._status),
                "/metrics": self.access.protect(self._metrics),
            },
            websocket_paths={WEBSOCKET_PATH, SDK_PATH},
            admit=self._admit,
            serve_websocket=self._serve_websocket,
            handshake_timeout=config.server.handshake_timeout,
            on_error=self._connection_failed,
        )
        self._shutdown_requested = trio.Event()
        self._delivered = trio.Event()
        self._listen_scope = trio.CancelScope()
        # One state write at a time, each with the figures as of its turn: the periodic
        # write and the one at the start of a drain overlap, and the older state must
        # not land last (a draining worker shown as serving).
        self._publishing = trio.Lock()

    def shut_down(self) -> None:
        """Begin the graceful shutdown (what SIGTERM does). Idempotent."""
        self._shutdown_requested.set()

    async def listen(self) -> list[trio.SocketListener]:
        """Open the spool and bind the port: what can fail at start, before any task
        runs, so such errors surface plainly (OSError, SpoolUnavailable)."""
        orphans = await trio.to_thread.run_sync(
            orphan_spools, self.config.delivery.spool_path, self.worker
        )
        await self.delivery.open(adopt=orphans)
        server = self.config.server
        if self.worker is not None:
            listeners = await open_shared_listeners(server.host, server.port)
        else:
            listeners = await trio.open_tcp_listeners(server.port, host=server.host or None)
        self.ports = sorted({listener.socket.getsockname()[1] for listener in listeners})
        return listeners

    async def run(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shut_down``; ``task_status`` gets the bound ports."""
        if listeners is None:
            listeners = await self.listen()
        mesh = self.config.mesh
        settings = MeshSettings(
            max_vertices=mesh.max_vertices,
            max_faces=mesh.max_faces,
            keyframe_interval=mesh.keyframe_interval,
            max_state_bytes=mesh.max_state_bytes,
        )
        try:
            # Mesh workers are processes: started by the first mesh packet, stopped after
            # the shutdown sequence (a mesh still being diffed then is counted lost).
            async with open_mesh_pipeline(
                settings,
                workers=mesh.workers,
                metrics=self.metrics.mesh,
                # The spatial-event STAGs take full meshes only.
                deltas=self.config.stag.format == "batch",
            ) as meshes:
                self.gate.meshes = meshes
                self.delivery.meshes = meshes
                await self._run(listeners, task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.delivery.close()

    async def _run(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[list[int]]
    ) -> None:
        server = self.config.server
        async with trio.open_nursery() as root:
            if self.delivery.spool is None:
                # Memory only: a free sender slot takes each batch from the batcher.
                self._outlet = self.delivery.outlet(self._shipments_send)
                root.start_soon(self.batcher.run, self._events_recv, self._outlet)
            else:
                outlet = self.delivery.spool_outlet(self._batches_send)
                root.start_soon(self.batcher.run, self._events_recv, outlet)
                root.start_soon(self.delivery.run, self._batches_recv, self._shipments_send)
            root.start_soon(self._deliver)
            root.start_soon(self._sweep_sessions)
            root.start_soon(self._abort_sends_when_cancelled)
            root.start_soon(self.gate.poll_sockets)
            if self.worker is not None:
                # Before serving: a worker that answered /status itself before the others
                # could read its state would be listed by one worker and not the other
                # (a replacement, say). And before READY: once the supervisor says the
                # relay is ready, /status on any worker lists every worker.
                await self._publish_now()
                root.start_soon(self._publish_state)
            root.start_soon(self._serve, listeners)
            root.start_soon(run_watchdog, self.notifier, self.status_snapshot)
            log.info(
                "relay listening",
                host=server.host,
                ports=self.ports,
                stag=redact_url(self.config.stag.url),
                relay_id=self.relay_id,
                version=__version__,
                tls=self._tls is not None,
                workers=self.worker.count if self.worker is not None else 1,
            )
            self.access.announce()
            task_status.started(self.ports)
            self.notifier.ready(f"listening on port {', '.join(map(str, self.ports))}")
            await self._shutdown_requested.wait()
            summary = await self._shut_down()
            root.cancel_scope.cancel()
        # Every task has ended, so no spool write is under way: what the spool holds now
        # is what `stag-relay spool stats` will say, and what the next start sends.
        log.info(
            "shutdown complete", **summary, events_left_in_spool=self.delivery.spooled_events()
        )

    async def _shut_down(self) -> dict[str, object]:
        """The shutdown sequence, in order. Bounded by server.shutdown_timeout. Returns
        the counts for the summary line."""
        timeout = self.config.server.shutdown_timeout
        log.info("shutting down", timeout=timeout, connections=len(self.gate.connections))
        self.notifier.stopping(f"draining {len(self.gate.connections)} connections")
        # 1. /health answers 503 and the listener closes: no new clients.
        self.draining = True
        self._listen_scope.cancel()
        await self._publish_now()
        with trio.move_on_after(timeout) as deadline:
            # 2. Every connection stops reading; each closes with 1001 once what
            #    it read is in the channel.
            self.gate.drain()
            await self.gate.wait_idle()
            # 3. Closing the channel makes the batcher flush its partial batch and
            #    close its output: the sender's, or with a spool delivery's, which
            #    commits what it gets and ends the sender once all is handed on.
            await self._events_send.aclose()
            # 4. The sender delivers what it holds (with a spool: what is spooled).
            await self._delivered.wait()
        if deadline.cancelled_caught:
            # Sends still waiting on a full channel give up their event (counted there).
            self.gate.abort()
        # 5. Whatever is neither delivered nor spooled by now is lost: count it and
        #    say so. With a spool, what the sender still holds stays spooled.
        spooled = self.delivery.spool is not None
        undelivered = (
            self._events_recv.statistics().current_buffer_used
            + self.gate.held_events()
            + self.batcher.held_events()
            + self.delivery.held_events()
            + (0 if spooled else self.sender.held_events())
            + (0 if self._outlet is None else self._outlet.held_events())
        )
        if undelivered > 0:
            self.metrics.events_dropped.labels("shutdown").inc(undelivered)
            log.error("events not delivered before shutdown timeout", events=undelivered)
        return {
            "events_read": self.gate.events_in,
            "events_delivered": self.sender.status()["events_sent"],
            "events_undelivered": undelivered,
        }

    def status_snapshot(self) -> StatusSnapshot:
        """Counts for systemd's STATUS line."""
        sent = self.metrics.registry.get_sample_value("relay_events_sent_total") or 0
        return StatusSnapshot(
            connections=len(self.gate.connections),
            events_received=self.gate.events_in,
            events_sent=int(sent),
            draining=self.draining,
        )

    async def _abort_sends_when_cancelled(self) -> None:
        """Sends shielded for draining must also give up when the root is cancelled
        from outside (a crash elsewhere, a test's teardown), or cancelling would wait
        on them forever."""
        try:
            await trio.sleep_forever()
        finally:
            self.gate.abort()

    async def _deliver(self) -> None:
        await self.sender.run(self._shipments_recv)
        await self.delivery.settle()
        self._delivered.set()

    async def _serve(self, listeners: list[trio.SocketListener]) -> None:
        served: list[trio.abc.Listener[Any]] = list(listeners)
        if self._tls is not None:
            # The TLS handshake runs lazily, inside the front door's handshake_timeout.
            served = [
                trio.SSLListener(listener, self._tls, https_compatible=True)
                for listener in listeners
            ]
        async with trio.open_nursery() as handlers:
            with self._listen_scope:
                await trio.serve_listeners(self.front.handle, served, handler_nursery=handlers)

    def _connection_failed(self, peer: str, error: Exception) -> None:
        self.metrics.connection_errors.inc()
        log.error("connection ended by an unexpected error", peer=peer, sites=error_sites(error))

    def reload_keys(self) -> str | None:
        """SIGHUP: re-read auth.api_keys_file (None: none configured); connections stay."""
        return self.access.reload()

    def reload_tls(self) -> str | None:
        """SIGHUP: load server.tls_cert and tls_key again (None: no TLS). New connections
        get the new certificate; a pair that cannot be loaded keeps the one in use."""
        if self._tls is None:
            return None
        server = self.config.server
        try:
            reload_certificate(self._tls, server.tls_cert, server.tls_key)
        except TlsError as exc:
            log.error("TLS certificate not reloaded, keeping the one in use", problem=str(exc))
            return "TLS certificate not reloaded, see the log"
        log.info("TLS certificate reloaded", cert=server.tls_cert)
        return "TLS certificate reloaded"

    async def _serve_websocket(self, stream: trio.abc.Stream, request: HttpRequest) -> None:
        # Counted from admission (no checkpoint between _admit and here), so that
        # concurrent handshakes cannot overshoot server.max_connections.
        self._websockets += 1
        try:
            await self.gate.serve(stream, request)
        finally:
            self._websockets -= 1

    async def _sweep_sessions(self) -> None:
        interval = max(1.0, min(self.config.session.ttl / 4, _MAX_SWEEP_INTERVAL))
        while True:
            await trio.sleep(interval)
            evicted = self.sessions.evict_expired(trio.current_time())
            if evicted:
                log.debug("sessions expired", count=evicted, held=len(self.sessions))

    # -- the front door's answers ---------------------------------------------

    def _admit(self, request: HttpRequest) -> HttpResponse | None:
        if self.draining:
            self.metrics.connections_refused.labels("draining").inc()
            return error_response(503, "relay is shutting down", (("retry-after", "1"),))
        refusal = self.access.admit(request)
        if refusal is not None:
            return refusal
        if request.path == SDK_PATH:
            try:
                session_from_query(request.query)
            except ValueError as exc:
                return error_response(400, str(exc))
        if self._websockets >= self.config.server.max_connections:
            self.metrics.connections_refused.labels("capacity").inc()
            return error_response(
                503, "relay is at its connection limit", (("retry-after", _FULL_RETRY_AFTER),)
            )
        return None

    def _health(self, request: HttpRequest) -> HttpResponse:
        states = self._worker_states()
        if any(state["draining"] for state in states):
            return json_response(503, {"status": "draining"})
        return json_response(
            200,
            {
                "status": "ok",
                "version": __version__,
                "uptime_seconds": round(time.time() - self._started_at, 3),
                # From the workers' states (a second old at most): probes come often, and
                # reading every metric file for one figure is not worth it.
                "connections": sum(state["connections"] for state in states),
            },
        )

    def _metrics(self, request: HttpRequest) -> HttpResponse:
        self._refresh_gauges()
        body, content_type = self.metrics.render(request.header("accept"))
        return HttpResponse(200, body, content_type)

    def _status(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, self.status())

    def _refresh_gauges(self) -> None:
        self.metrics.channel_events.set(self._events_recv.statistics().current_buffer_used)
        self.metrics.held_events.set(self._events_send.waiting_events() + self.gate.held_events())
        self.metrics.sessions_active.set(len(self.sessions))
        spool = self.delivery.status()
        if spool is not None:
            self.metrics.spool_batches.set(spool["batches"])
            self.metrics.spool_events.set(spool["events"])
            self.metrics.spool_bytes.set(spool["bytes"])
            self.metrics.spool_oldest_age.set(spool["oldest_batch_age_seconds"])
            self.metrics.spool_dead_letters.set(spool["dead_letters"])

    def worker_state(self) -> dict[str, Any]:
        """This process's figures, as the other workers read them (see workers.py)."""
        return {
            "index": self.worker.index if self.worker is not None else 0,
            "pid": os.getpid(),
            "draining": self.draining,
            "connections": len(self.gate.connections),
            "sessions": len(self.sessions),
            "events_in": self.gate.events_in,
            "channel_depth": self._events_recv.statistics().current_buffer_used,
            "channel_capacity": self.config.websocket.buffer_size,
            "stag": self.sender.status(),
            "spool": self.delivery.status(),
        }

    def _worker_states(self) -> list[dict[str, Any]]:
        """Every worker's state, this one's fresh; just this one's when alone."""
        own = self.worker_state()
        if self.worker is None:
            return [own]
        others = [s for s in read_states(self.worker.directory) if s.get("index") != own["index"]]
        return sorted([own, *others], key=lambda state: int(state["index"]))

    async def _publish_state(self) -> None:
        # On a fixed schedule, not a sleep after each write: the writes' own time (a
        # thread to start, a busy event loop) would add up and age the state past
        # STATE_MAX_AGE. A worker that fell behind writes at once, then keeps the pace.
        due = trio.current_time()
        while True:
            due = max(due + STATE_INTERVAL, trio.current_time())
            await trio.sleep_until(due)
            await self._publish_now()

    async def _publish_now(self) -> None:
        if self.worker is None:
            return
        async with self._publishing:
            # Another worker's /metrics shows these gauges too, so keep them current here.
            self._refresh_gauges()
            await trio.to_thread.run_sync(
                publish_state,
                self.worker.directory,
                state_file(self.worker.index),
                self.worker_state(),
            )

    def status(self) -> dict[str, Any]:
        """The /status document: what an operator needs to see at a glance, totalled over
        every worker (each one listed under ``workers``)."""
        sample = self.metrics.totals()
        combined = combine_states(self._worker_states())
        # Counters and the connection gauge are live in every worker's metric files;
        # the rest of the other workers' figures are up to STATE_MAX_AGE old.
        stag = combined["stag"]
        stag["events_sent"] = int(sample("relay_events_sent_total"))
        stag["batches_sent"] = int(sample("relay_batches_sent_total"))
        spool = combined["spool"]
        if spool is not None:
            spool["path"] = self.config.delivery.spool_path
        return {
            "version": __version__,
            "relay_id": self.relay_id,
            "uptime_seconds": round(time.time() - self._started_at, 3),
            "draining": combined["draining"],
            "connections": {"active": int(sample("relay_connections_active"))},
            "sessions": {"active": combined["sessions"]},
            "channel": {
                "depth": combined["channel_depth"],
                "capacity": combined["channel_capacity"],
            },
            "batch": {
                "max_size": self.config.batch.max_size,
                "timeout_seconds": self.config.batch.timeout,
            },
            "stag": {
                "url": redact_url(self.config.stag.url),
                "ingest_path": self.config.stag.ingest_path
                or format_ingest_path(self.config.stag.format),
                **stag,
            },
            # null when delivery.spool_path is empty (memory only).
            "spool": spool,
            "events": {
                "sent": stag["events_sent"],
                "batches_sent": stag["batches_sent"],
                "dropped": {
                    reason: int(sample("relay_events_dropped_total", {"reason": reason}))
                    for reason in DROP_REASONS
                },
            },
            "packets": {
                packet_type: {
                    status: sum(
                        int(
                            sample(
                                "relay_packets_total",
                                {"type": packet_type, "status": status, "dialect": dialect},
                            )
                        )
                        for dialect in DIALECTS
                    )
                    for status in PACKET_STATUSES
                }
                for packet_type in PACKET_TYPES
            },
            "workers": combined["workers"],
            "worker_restarts": self.metrics.worker_restarts(),
        }
