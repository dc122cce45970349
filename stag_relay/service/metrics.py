"""Every Prometheus metric the relay exports, in one registry object.

One registry per relay (not prometheus-client's global default) so tests can
run several relays in one process. Label values are small fixed sets, never a
session or connection id, so the series count stays bounded whatever clients send.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from stag_relay import __version__
from stag_relay.protocol.retry import MISCONFIGURED_STATUSES
from stag_relay.service import metricfiles

# The *_created series double the exposition for no use on a long-running daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]

PACKET_TYPES: Final = ("pose", "mesh", "unknown")
# ok: forwarded; invalid: error reply sent; duplicate: frame not newer than the last
# accepted one (resends after reconnects), dropped without a reply; too_large: over
# websocket.max_message_size, the connection is closed with 1009. No packet is refused
# for its rate: websocket.max_packets_per_second slows the reading down instead.
PACKET_STATUSES: Final = ("ok", "invalid", "duplicate", "too_large")
# The client dialects: the relay's own packets (/ws/streamkit) and the StreamKit
# iOS SDK's (/api/v1/ws).
DIALECTS: Final = ("streamkit", "sdk")
# Why an upgrade was answered with an HTTP error instead: 401, 403, 503 (full), 503.
REFUSAL_REASONS: Final = ("unauthorized", "origin", "capacity", "draining")
# Why the relay closed a connection to protect the others: max_invalid_packets in a row
# (1008), its socket took no byte of what the relay sent for the send timeout (dropped).
POLICY_CLOSE_REASONS: Final = ("invalid_packets", "slow_reader")
# rejected: STAG answered a 4xx that retrying cannot fix; shutdown: still held when
# server.shutdown_timeout ran out; spool_full: dropped by delivery.when_full=drop_oldest.
DROP_REASONS: Final = ("rejected", "shutdown", "spool_full")
# misconfigured: STAG answered 404, 405, 401, 403 or 407 (a wrong URL or key): retried.
STAG_OUTCOMES: Final = ("success", "retry", "misconfigured", "rejected", "too_large", "error")

# Batches are 1..batch.max_size events; these cover the defaults (5) to large (1000).
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Parsing and transforming a pose packet takes tens of microseconds.
_PROCESSING_BUCKETS: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)


MESH_KINDS: Final = ("full", "delta")
# crash: the worker process died (a decoder segfault); timeout: it ran past the job
# timeout and was killed; error: the job raised, a bug in the relay.
FAILURE_REASONS: Final = ("crash", "timeout", "error")
# A 40,000-triangle mesh decodes in about 3.5 ms; a million vertices in ~100 ms.
_DECODE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


def unchecked_inc(counter: Counter) -> Callable[[float], None]:
    """``counter.inc``, for a hot path whose amounts are never negative, without its
    per-call checks (observability, sign, exemplar): the value's own increment, under
    the same lock, or into the same file in multiprocess mode."""
    inc: Callable[[float], None] = counter._value.inc
    return inc


class PendingObservations:
    """Observations of ``histogram`` added up in plain numbers until :meth:`flush` writes
    them: for a path that observes far more often than anyone reads the histogram
    (each write takes a lock, and a lock costs five additions)."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = histogram._upper_bounds
        self._sum = 0.0
        self._counts = [0] * len(self._bounds)
        self._pending = False

    def observe_many(self, amount: float, count: int) -> None:
        """As :meth:`RelayMetrics.observe_many`, written at the next flush."""
        self._sum += amount * count
        # The first bucket whose bound is >= amount (the last bound is +Inf).
        self._counts[bisect_left(self._bounds, amount)] += count
        self._pending = True

    def flush(self) -> None:
        if not self._pending:
            return
        self._pending = False
        histogram = self._histogram
        histogram._sum.inc(self._sum)
        self._sum = 0.0
        counts = self._counts
        for bucket, count in enumerate(counts):
            if count:
                histogram._buckets[bucket].inc(count)
                counts[bucket] = 0


class MeshMetrics:
    """The mesh pipeline's metrics, registered in the relay's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes_in = Counter(
            "relay_mesh_bytes_in",
            "Mesh data received from clients: base64 characters of vertices and faces",
            registry=registry,
        )
        self.bytes_out = Counter(
            "relay_mesh_bytes_out",
            "Mesh data sent to STAG: base64 characters of the full buffers, or of "
            "removed_faces and added",
            registry=registry,
        )
        self.updates = Counter(
            "relay_mesh_updates",
            "Mesh updates sent to STAG, by kind (full or delta)",
            ["kind"],
            registry=registry,
        )
        for kind in MESH_KINDS:
            self.updates.labels(kind)
        self.decode_seconds = Histogram(
            "relay_mesh_decode_seconds",
            "Time to decode and check one mesh packet, in a worker process",
            buckets=_DECODE_BUCKETS,
            registry=registry,
        )
        self.state_bytes = Gauge(
            "relay_mesh_state_bytes",
            "Bytes of mesh state held by the workers to compute deltas",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.worker_failures = Counter(
            "relay_mesh_worker_failures",
            "Mesh jobs whose worker process was lost or failed, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self.worker_failures.labels(reason)


class RelayMetrics:
    """The relay's metrics. Hot-path children are bound once here, not per packet.

    With ``multiprocess_dir`` (a worker among several, see workers.py) every process
    writes its values to files there (prometheus-client's multiprocess mode, chosen
    by ``PROMETHEUS_MULTIPROC_DIR`` before it is imported) and ``render`` shows the
    sum over all workers: counters and histograms add up, gauges are ``livesum``
    (``livemax`` for an age) so a dead worker's gauges leave with it.
    """

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Restarts of dead workers, as the supervisor counts them (0 with no supervisor).
        self.worker_restarts: Callable[[], int] = lambda: 0
        r.register(_LocalCollector(self))
        self._exposed = r
        self._files = multiprocess_dir
        if multiprocess_dir is not None:
            self._exposed = CollectorRegistry()
            self._exposed.register(metricfiles.FileCollector(multiprocess_dir))
            self._exposed.register(_LocalCollector(self))
        self.packets = Counter(
            "relay_packets",
            "StreamKit packets received, by type, status and client dialect",
            ["type", "status", "dialect"],
            registry=r,
        )
        for t in PACKET_TYPES:
            for s in PACKET_STATUSES:
                for d in DIALECTS:
                    self.packets.labels(t, s, d)
        self.connections_active = Gauge(
            "relay_connections_active",
            "Open WebSocket connections",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_total = Counter(
            "relay_connections", "WebSocket connections accepted", registry=r
        )
        self.heartbeat_timeouts = Counter(
            "relay_heartbeat_timeouts",
            "Connections closed because the client did not answer a ping in time",
            registry=r,
        )
        self.connections_refused = Counter(
            "relay_connections_refused",
            "WebSocket upgrades refused before the handshake, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.connections_refused.labels(reason)
        self.policy_closes = Counter(
            "relay_policy_closes",
            "Connections the relay closed to protect the others, by reason",
            ["reason"],
            registry=r,
        )
        for reason in POLICY_CLOSE_REASONS:
            self.policy_closes.labels(reason)
        self.connection_errors = Counter(
            "relay_connection_errors",
            "Connections ended by an unexpected error in the relay (a bug; logged)",
            registry=r,
        )
        self.error_replies_suppressed = Counter(
            "relay_error_replies_suppressed",
            "Error replies not sent: over a connection's error reply rate, or too many "
            "waiting for a client to read them",
            registry=r,
        )
        self.throttled_seconds = Counter(
            "relay_throttled_seconds",
            "Time connections waited before reading again, to keep to "
            "websocket.max_packets_per_second",
            registry=r,
        )
        self.batch_size = Histogram(
            "relay_batch_size",
            "Events per batch sent to STAG",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.processing_duration = Histogram(
            "relay_processing_duration_seconds",
            "Time to parse and transform one packet",
            buckets=_PROCESSING_BUCKETS,
            registry=r,
        )
        self.stag_requests = Counter(
            "relay_stag_requests", "Requests to STAG, by outcome", ["outcome"], registry=r
        )
        for o in STAG_OUTCOMES:
            self.stag_requests.labels(o)
        self.stag_misconfigured = Gauge(
            "relay_stag_misconfigured",
            "1 while STAG answers that the relay's configuration is wrong (a wrong URL: 404,"
            " 405, a redirect 3xx; wrong credentials: 401, 403, 407), by that status;"
            " batches are held",
            ["status"],
            registry=r,
            multiprocess_mode="livemax",
        )
        for status in sorted(MISCONFIGURED_STATUSES):
            self.stag_misconfigured.labels(str(status))
        self.stag_request_duration = Histogram(
            "relay_stag_request_duration_seconds", "Duration of one request to STAG", registry=r
        )
        self.events_sent = Counter("relay_events_sent", "Events STAG accepted", registry=r)
        self.batches_sent = Counter("relay_batches_sent", "Batches STAG accepted", registry=r)
        self.events_dropped = Counter(
            "relay_events_dropped",
            "Events that were not delivered, by reason",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.events_dropped.labels(reason)
        self.channel_events = Gauge(
            "relay_channel_events",
            "Events waiting in the channel to the batcher",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.held_events = Gauge(
            "relay_held_events",
            "Events read from clients and not yet in the channel: waiting for room, or "
            "meshes being decoded",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.channel_capacity = Gauge(
            "relay_channel_capacity",
            "Events the channel to the batcher holds at most (websocket.buffer_size)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions_active = Gauge(
            "relay_sessions_active",
            "Sessions held (connected or within session.ttl)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_batches = Gauge(
            "relay_spool_batches",
            "Batches in the spool, waiting for STAG",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_events = Gauge(
            "relay_spool_events", "Events in the spool", registry=r, multiprocess_mode="livesum"
        )
        self.spool_bytes = Gauge(
            "relay_spool_bytes",
            "Bytes of batches in the spool",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_oldest_age = Gauge(
            "relay_spool_oldest_age_seconds",
            "Age of the oldest batch in the spool",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spool_dead_letters = Gauge(
            "relay_spool_dead_letters",
            "Batches STAG refused, kept in the spool",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.spool_corrupt = Counter(
            "relay_spool_corrupt",
            "Spool files found corrupt or foreign at start and moved aside",
            registry=r,
        )
        self.spool_disk_full = Gauge(
            "relay_spool_disk_full",
            "1 while the spool's disk is full or failing (the spool is then full)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spool_disk_full_episodes = Counter(
            "relay_spool_disk_full_episodes",
            "Times the spool's disk became full or failing",
            registry=r,
        )
        self.mesh = MeshMetrics(r)

    def observe_many(self, histogram: Histogram, amount: float, count: int) -> None:
        """``histogram.observe(amount)`` ``count`` times, in one step.

        The gate observes the packets of one socket read together (their mean
        processing time): per packet, ``observe`` would cost more than a packet's
        transform. Same result as the loop: ``_count`` stays one per packet.
        """
        histogram._sum.inc(amount * count)
        # The first bucket whose bound is >= amount (the last bound is +Inf).
        histogram._buckets[bisect_left(histogram._upper_bounds, amount)].inc(count)

    def packet(self, packet_type: str, status: str, dialect: str = "streamkit") -> Counter:
        """The counter child for one (type, status, dialect); unknown types count as
        ``unknown``."""
        if packet_type not in PACKET_TYPES:
            packet_type = "unknown"
        return self.packets.labels(packet_type, status, dialect)

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, negotiated from ``Accept``."""
        encoder, content_type = choose_encoder(accept_header or "")
        with metricfiles.reading(self._files):
            return encoder(self._exposed), content_type

    def totals(self) -> SampleLookup:
        """A lookup of sample values as ``/metrics`` shows them now (all workers)."""
        with metricfiles.reading(self._files):
            families = list(self._exposed.collect())
        values = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families
            for sample in family.samples
        }

        def lookup(name: str, labels: dict[str, str] | None = None) -> float:
            return values.get((name, tuple(sorted((labels or {}).items()))), 0.0)

        return lookup


class SampleLookup(Protocol):
    """A sample's value by name and labels (0 when absent)."""

    def __call__(self, name: str, labels: dict[str, str] | None = None) -> float: ...


class _LocalCollector(Collector):
    """What only this process knows and no multiprocess file holds: the build, and the
    supervisor's count of worker restarts."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily("relay_build", "stag-relay build", value={"version": __version__})
        yield CounterMetricFamily(
            "relay_worker_restarts",
            "Worker processes the supervisor restarted after they died unexpectedly",
            value=self._metrics.worker_restarts(),
        )
