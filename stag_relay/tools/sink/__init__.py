"""Local STAG stand-in: accepts the relay's batches like STAG and shows what arrives.

``stag-relay sink`` listens where the relay delivers by default
(``http://localhost:8080/ingest``), accepts ``POST`` batches, deduplicates them on
``Idempotency-Key`` as STAG does, and shows live events per second, batch sizes and
latency: from each event's ``timestamp`` (the client's clock) to the moment its
batch arrived, and from its ``received_at`` (the relay's clock) to the same moment.
It can answer errors on a schedule (``--fail 503 --for 10s``) to show the relay
retrying, and prints a summary (``--json`` for machines) when it stops.
``GET /stats`` answers the same summary at any time.

It is also the STAG the tests run against: the ledger's :class:`Programme` fails,
drops, holds and refuses on demand, and a test may serve connections with its own
:data:`Handler` to misbehave at the byte level.

The bookkeeping (:mod:`.ledger`: :class:`Ledger`, :class:`Programme`,
:class:`FailurePlan`, :class:`LatencyHistogram`, the wire formats) is plain code;
:class:`Sink` (:mod:`.server`) is the Trio and h11 server around it; :mod:`.cli` is
the command.
"""

from stag_relay.tools.sink.cli import (
    configure_parser,
    live_line,
    main,
    print_summary,
    run,
    settings_from_args,
)
from stag_relay.tools.sink.ledger import (
    DEFAULT_INGEST_PATH,
    MAX_BODY_BYTES,
    MAX_KEYS,
    Answer,
    BatchFormat,
    Delivery,
    Exchange,
    FailurePlan,
    LatencyHistogram,
    Ledger,
    Programme,
    Reply,
    Request,
    SpatialEventFormat,
    WireFormat,
)
from stag_relay.tools.sink.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Handler,
    Peer,
    Sink,
    SinkSettings,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_INGEST_PATH",
    "DEFAULT_PORT",
    "MAX_BODY_BYTES",
    "MAX_KEYS",
    "Answer",
    "BatchFormat",
    "Delivery",
    "Exchange",
    "FailurePlan",
    "Handler",
    "LatencyHistogram",
    "Ledger",
    "Peer",
    "Programme",
    "Reply",
    "Request",
    "Sink",
    "SinkSettings",
    "SpatialEventFormat",
    "WireFormat",
    "configure_parser",
    "live_line",
    "main",
    "print_summary",
    "run",
    "settings_from_args",
]
