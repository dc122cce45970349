"""A gate of its own for a test (no relay around it), and what it put into its queue
and its metrics."""

from __future__ import annotations

from typing import Any

import trio

from stag_relay.pipeline.eventqueue import EventReceiver, open_event_queue
from stag_relay.pipeline.gate import Gate
from stag_relay.protocol.events import Event
from stag_relay.protocol.sessions import Sessions
from stag_relay.service.metrics import RelayMetrics
from tests.support.relays import make_config


def build_gate(capacity: int = 10_000, **websocket: Any) -> tuple[Gate, EventReceiver]:
    """A gate with the test relay's defaults, ``websocket`` settings on top, and an
    event queue of ``capacity`` events."""
    config = make_config("http://127.0.0.1:9", websocket=websocket)
    send, receive = open_event_queue(capacity)
    gate = Gate(
        websocket=config.websocket,
        handshake_timeout=config.server.handshake_timeout,
        sessions=Sessions(ttl=300.0, max_sessions=100),
        events=send,
        metrics=RelayMetrics(),
    )
    return gate, receive


def sample(gate: Gate, name: str, **labels: str) -> float:
    return gate.metrics.registry.get_sample_value(name, labels) or 0.0


def drain(events: EventReceiver) -> list[Event]:
    """Every event in the queue now."""
    received = []
    while True:
        try:
            received.append(events.receive_nowait())
        except trio.WouldBlock:
            return received
