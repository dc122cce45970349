"""Every Prometheus metric the relay exports, in one registry object.

One registry per relay (not prometheus-client's global default) so tests can
run several relays in one process. Label values are small fixed sets, never a
session or connection id, so the series count stays bounded whatever clients send.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from stag_relay import __version__

# The *_created series double the exposition for no use on a long-running daemon.
disable_created_metrics()  # type: ignore[no-untyped-call]

PACKET_TYPES: Final = ("pose", "mesh", "unknown")
# ok: forwarded; invalid: error reply sent; duplicate: frame not newer than the last
# accepted one (resends after reconnects), dropped without a reply; too_large: over
# websocket.max_message_size, the connection is closed with 1009.
PACKET_STATUSES: Final = ("ok", "invalid", "duplicate", "too_large")
# rejected: STAG answered a 4xx that retrying cannot fix; shutdown: still held when
# server.shutdown_timeout ran out; spool_full: dropped by delivery.when_full=drop_oldest.
DROP_REASONS: Final = ("rejected", "shutdown", "spool_full")
STAG_OUTCOMES: Final = ("success", "retry", "rejected", "too_large", "error")

# Batches are 1..batch.max_size events; these cover the defaults (5) to large (1000).
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Parsing and transforming a pose packet takes tens of microseconds.
_PROCESSING_BUCKETS: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)


class RelayMetrics:
    """The relay's metrics. Hot-path children are bound once here, not per packet."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.packets = Counter(
            "relay_packets",
            "StreamKit packets received, by type and status",
            ["type", "status"],
            registry=r,
        )
        for t in PACKET_TYPES:
            for s in PACKET_STATUSES:
                self.packets.labels(t, s)
        self.connections_active = Gauge(
            "relay_connections_active", "Open WebSocket connections", registry=r
        )
        self.connections_total = Counter(
            "relay_connections", "WebSocket connections accepted", registry=r
        )
        self.heartbeat_timeouts = Counter(
            "relay_heartbeat_timeouts",
            "Connections closed because the client did not answer a ping in time",
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
            "relay_channel_events", "Events waiting in the channel to the batcher", registry=r
        )
        self.sessions_active = Gauge(
            "relay_sessions_active", "Sessions held (connected or within session.ttl)", registry=r
        )
        self.spool_batches = Gauge(
            "relay_spool_batches", "Batches in the spool, waiting for STAG", registry=r
        )
        self.spool_events = Gauge("relay_spool_events", "Events in the spool", registry=r)
        self.spool_bytes = Gauge("relay_spool_bytes", "Bytes of batches in the spool", registry=r)
        self.spool_oldest_age = Gauge(
            "relay_spool_oldest_age_seconds", "Age of the oldest batch in the spool", registry=r
        )
        self.spool_dead_letters = Gauge(
            "relay_spool_dead_letters", "Batches STAG refused, kept in the spool", registry=r
        )
        self.spool_corrupt = Counter(
            "relay_spool_corrupt",
            "Spool files found corrupt or foreign at start and moved aside",
            registry=r,
        )
        self.build_info = Info("relay_build", "stag-relay build", registry=r)
        self.build_info.info({"version": __version__})

    def packet(self, packet_type: str, status: str) -> Counter:
        """The counter child for one (type, status); unknown types count as ``unknown``."""
        if packet_type not in PACKET_TYPES:
            packet_type = "unknown"
        return self.packets.labels(packet_type, status)

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, negotiated from ``Accept``."""
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type
