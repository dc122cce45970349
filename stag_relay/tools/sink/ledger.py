"""What the STAG stand-in decides and records, as plain values: no sockets, no Trio.

:class:`Ledger` takes a whole request (:class:`Request`) and gives the answer
(:class:`Answer`) STAG would give, in this order:

1. ``GET /stats`` and ``GET /health`` are the stand-in's own; any other path than
   ``ingest_path`` gets 404, another method 405, a body over the limit 413, and a
   missing or wrong ``X-API-Key`` 401 when ``api_key`` is set;
2. the :class:`Programme`'s one-off replies (``script``), in order (a ``hold`` among
   them is no answer: the server holds requests from the one that finds it);
3. the programme's failure window (:meth:`Ledger.fail_for`);
4. the scheduled failures (:class:`FailurePlan`, the command line's ``--fail``);
5. the programme's ``reject``, for every request until reset;
6. the wire format's verdict on the body (400 for what is not a delivery), the
   programme's event limit (413), then 200, once per ``Idempotency-Key``.

How a body is read is the wire format's (:class:`WireFormat`); :class:`BatchFormat`
is the relay's batch.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import attrs
import orjson

DEFAULT_INGEST_PATH: Final = "/ingest"
# Idempotency keys remembered. The relay retries a batch for as long as STAG
# fails, at most stag.retry_max (10 s) apart; at 1,000 batches/s this still covers
# minutes, and it bounds a long-running sink's memory (~150 bytes a key).
MAX_KEYS: Final = 500_000
# A batch of 1,000 40,000-triangle meshes is ~100 MB; refuse beyond that (413).
MAX_BODY_BYTES: Final = 128 * 1024 * 1024
# Histogram buckets grow by 1%: percentiles within 1% of the exact value, and a
# bounded number of buckets (about 2,300 from 0.01 ms to an hour).
_GROWTH: Final = 1.01
_LOG_GROWTH: Final = math.log(_GROWTH)
# Latencies below this (ms) share one bucket reported as 0: below the 1 ms
# resolution of the timestamps anyway.
_FLOOR_MS: Final = 0.01


# --- latency ---------------------------------------------------------------------


class LatencyHistogram:
    """Milliseconds, in buckets 1% wide: constant memory, percentiles within 1%."""

    __slots__ = ("_buckets", "_low", "count", "max", "min", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._low = 0  # values below _FLOOR_MS (including negative: clock skew)
        self.count = 0
        self.total = 0.0
        self.max = -math.inf
        self.min = math.inf

    def add(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        if ms > self.max:
            self.max = ms
        if ms < self.min:
            self.min = ms
        if ms < _FLOOR_MS:
            self._low += 1
            return
        key = int(math.log(ms / _FLOOR_MS) / _LOG_GROWTH)
        buckets = self._buckets
        buckets[key] = buckets.get(key, 0) + 1

    def merge(self, other: LatencyHistogram) -> None:
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)
        self._low += other._low
        for key, n in other._buckets.items():
            self._buckets[key] = self._buckets.get(key, 0) + n

    def percentile(self, q: float) -> float | None:
        """The nearest-rank ``q``-th percentile (0 < q <= 100); ``None`` when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = self._low
        if seen >= rank:
            return max(self.min, 0.0)
        for key in sorted(self._buckets):
            seen += self._buckets[key]
            if seen >= rank:
                # The bucket's geometric middle, clamped to what was really seen.
                middle = _FLOOR_MS * math.exp((key + 0.5) * _LOG_GROWTH)
                return min(max(middle, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "count": self.count,
            "p50": r(self.percentile(50)),
            "p90": r(self.percentile(90)),
            "p99": r(self.percentile(99)),
            "max": r(self.max) if self.count else None,
            "mean": r(self.mean),
        }


# --- failures ----------------------------------------------------------------------


@attrs.frozen
class FailurePlan:
    """Answer ``status`` from ``after`` seconds for ``duration`` seconds (``None``:
    until stopped), again every ``every`` seconds when set."""

    status: int
    after: float = 0.0
    duration: float | None = None
    every: float | None = None
    retry_after: str | None = None

    def __attrs_post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"a failure status is 400-599, got {self.status}")
        if self.every is not None and (self.duration is None or self.every <= self.duration):
            raise ValueError("--every must be longer than --for")

    def active(self, elapsed: float) -> bool:
        """Whether a request ``elapsed`` seconds after the start gets the failure."""
        if elapsed < self.after:
            return False
        into = elapsed - self.after
        if self.every is not None:
            into %= self.every
        return self.duration is None or into < self.duration

    def remaining(self, elapsed: float) -> float | None:
        """Seconds left of the current failure window (``None``: not failing or no end)."""
        if not self.active(elapsed) or self.duration is None:
            return None
        into = elapsed - self.after
        if self.every is not None:
            into %= self.every
        return self.duration - into


@attrs.frozen
class Reply:
    """One programmed answer. ``body`` ``None``: the stand-in's own for the status;
    ``delay``: seconds before it goes out; ``close``: hang up instead of answering.
    ``hold``: no answer but a pause from this request on, until resumed: the one
    request that finds it waits, then takes the next reply (a pause that starts at a
    known request, where a test must see the relay between two answers)."""

    status: int = 200
    retry_after: str | None = None
    body: bytes | None = None
    delay: float = 0.0
    close: bool = False
    hold: bool = False


@attrs.define
class Programme:
    """Misbehaviour programmed while the stand-in runs, for tests of the relay.

    Times are on the owning :class:`Ledger`'s clock.
    """

    # One-off replies, taken one a request, in order.
    script: deque[Reply] = attrs.field(factory=deque)
    # Every request until this moment gets ``window_reply``.
    window_until: float = -math.inf
    window_reply: Reply = Reply()
    # Every request until reset() gets this.
    reject: Reply | None = None
    # A delivery of more events than this gets 413.
    max_events: int | None = None
    # Requests wait (in the server) while this is set.
    paused: bool = False

    def arrive(self) -> None:
        """A request arrived: a hold first in the script pauses from here on."""
        while self.script and self.script[0].hold:
            self.script.popleft()
            self.paused = True

    def take(self, now: float) -> Reply | None:
        """The programmed reply for a request arriving ``now``, if any (one-offs used up)."""
        self.arrive()
        if self.script:
            return self.script.popleft()
        if now < self.window_until:
            return self.window_reply
        return None

    def resume(self) -> None:
        """Hold nothing any more: neither the requests held now, nor the next one if a
        hold is waiting for it."""
        while self.script and self.script[0].hold:
            self.script.popleft()
        self.paused = False

    def reset(self) -> None:
        """Forget every programmed failure and the pause."""
        self.script.clear()
        self.window_until = -math.inf
        self.reject = None
        self.max_events = None
        self.paused = False


# --- requests, answers, wire formats -----------------------------------------------------


@attrs.frozen
class Request:
    """A whole request as read; header names lower-cased."""

    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes
    # The body was over the limit and not kept (``body`` is empty).
    too_large: bool = False

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @property
    def json(self) -> Any:
        """The body parsed; ``None`` when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@attrs.frozen
class Answer:
    """What to send back. ``close``: hang up without answering (``status`` is then
    what the request was recorded with: none)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    close: bool = False


@attrs.frozen
class Exchange:
    """A request and the status it was answered (``None``: the connection was dropped)."""

    request: Request
    status: int | None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def path(self) -> str:
        return self.request.target

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers

    @property
    def body(self) -> bytes:
        return self.request.body

    @property
    def json(self) -> Any:
        return self.request.json

    @property
    def idempotency_key(self) -> str | None:
        return self.request.idempotency_key


@attrs.frozen
class Delivery:
    """What one accepted body carries: its events, and the key it is deduplicated on
    when the request has no ``Idempotency-Key``."""

    key: str
    events: list[dict[str, Any]]
    # The parsed body, as recorded for tests.
    document: Any


class WireFormat(Protocol):
    """How STAG reads a body. ``parse`` answers a :class:`Delivery`, or why the body is
    not one (a 400)."""

    name: str
    default_path: str

    def parse(self, body: bytes) -> Delivery | str: ...

    def accepted(self, delivery: Delivery, duplicate: bool) -> object:
        """The 200 answer's JSON for an accepted body (``duplicate``: seen before)."""
        ...


def _json_object(body: bytes) -> dict[str, Any] | str:
    """The body as a JSON object, or why it is not one (for the 400)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body is not JSON"
    if type(document) is not dict:
        return "body is not a JSON object"
    return document


class BatchFormat:
    """The relay's batch: ``{"batch_id": ..., "events": [...]}``, POSTed to ``/ingest``."""

    name: str = "batch"
    default_path: str = DEFAULT_INGEST_PATH

    def parse(self, body: bytes) -> Delivery | str:
        batch = _json_object(body)
        if isinstance(batch, str):
            return batch
        events = batch.get("events")
        batch_id = batch.get("batch_id")
        if type(events) is not list or type(batch_id) is not str:
            return "a batch needs batch_id (string) and events (array)"
        if not all(type(e) is dict for e in events):
            return "every event must be an object"
        return Delivery(batch_id, events, batch)

    def accepted(self, delivery: Delivery, duplicate: bool) -> object:
        if duplicate:
            return {"status": "duplicate", "accepted": 0}
        return {"status": "ok", "accepted": len(delivery.events)}


SPATIAL_EVENT_PATH: Final = "/api/v1/ingest"
# What the public STAGs' gin bindings require (tabularxr/Stag's SpatialEvent, and
# the anchor and mesh fields both STAGs key their storage on).
_EVENT_FIELDS: Final = ("session_id", "event_id", "timestamp")
_ANCHOR_FIELDS: Final = ("id", "session_id", "timestamp")
_MESH_FIELDS: Final = ("id", "anchor_id", "timestamp")
_MAX_COMPRESSION_LEVEL: Final = 9


class SpatialEventFormat:
    """The public STAGs' ingest API (tabularxr/stag, tabularxr/Stag): one
    ``SpatialEvent`` per ``POST /api/v1/ingest``, ``{"session_id", "event_id",
    "timestamp", "anchors": [...], "meshes": [...]}``, answered as tabularxr/stag does:
    ``{"success": true, "event_id", "processed": anchors + meshes}``. A body their
    bindings would refuse gets 400 with the field. Each anchor counts as a pose
    event and each mesh as a mesh event, for the figures."""

    name: str = "spatial-event"
    default_path: str = SPATIAL_EVENT_PATH

    def parse(self, body: bytes) -> Delivery | str:
        event = _json_object(body)
        if isinstance(event, str):
            return event
        problem = _required(event, _EVENT_FIELDS, "")
        if problem is not None:
            return problem
        anchors, meshes = event.get("anchors") or [], event.get("meshes") or []
        if type(anchors) is not list or type(meshes) is not list:
            return "anchors and meshes must be arrays"
        events: list[dict[str, Any]] = []
        for i, anchor in enumerate(anchors):
            if type(anchor) is not dict:
                return f"anchors[{i}] must be an object"
            problem = _required(anchor, _ANCHOR_FIELDS, f"anchors[{i}].")
            if problem is not None:
                return problem
            events.append({"type": "pose", "timestamp": anchor["timestamp"]})
        for i, mesh in enumerate(meshes):
            if type(mesh) is not dict:
                return f"meshes[{i}] must be an object"
            problem = _required(mesh, _MESH_FIELDS, f"meshes[{i}].")
            if problem is not None:
                return problem
            level = mesh.get("compression_level", 0)
            if type(level) is not int or not 0 <= level <= _MAX_COMPRESSION_LEVEL:
                return f"meshes[{i}].compression_level must be an integer from 0 to 9"
            events.append({"type": "mesh", "timestamp": mesh["timestamp"], "meshes": [mesh]})
        return Delivery(event["event_id"], events, event)

    def accepted(self, delivery: Delivery, duplicate: bool) -> object:
        return {"success": True, "event_id": delivery.key, "processed": len(delivery.events)}


def _required(doc: dict[str, Any], fields: Sequence[str], where: str) -> str | None:
    """What gin's ``binding:"required"`` says about ``doc``: a missing or zero field."""
    for field in fields:
        value = doc.get(field)
        if field == "timestamp":
            if type(value) is not int or value == 0:
                return f"{where}{field} is required: a non-zero integer (Unix ms)"
        elif type(value) is not str or not value:
            return f"{where}{field} is required: a non-empty string"
    return None


WIRE_FORMATS: Final[dict[str, type[BatchFormat] | type[SpatialEventFormat]]] = {
    "batch": BatchFormat,
    "spatial-event": SpatialEventFormat,
}


def _json_answer(status: int, payload: object, *headers: tuple[str, str]) -> Answer:
    return Answer(status, orjson.dumps(payload), headers)


def _reply_answer(reply: Reply, default: object) -> Answer:
    body = reply.body if reply.body is not None else orjson.dumps(default)
    headers = (("retry-after", reply.retry_after),) if reply.retry_after else ()
    return Answer(reply.status, body, headers, reply.delay, reply.close)


# --- STAG's bookkeeping -------------------------------------------------------------


class Ledger:
    """What STAG would record: deliveries once per ``Idempotency-Key``, their events,
    sizes and latencies. ``clock`` is wall-clock seconds (event timestamps are Unix
    milliseconds). ``keep``: also keep every exchange and accepted body, for tests
    (a long-running sink keeps only counts)."""

    def __init__(
        self,
        *,
        failures: Sequence[FailurePlan] = (),
        ingest_path: str | None = None,
        api_key: str | None = None,
        wire_format: WireFormat | None = None,
        max_keys: int = MAX_KEYS,
        keep: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.wire_format: WireFormat = wire_format if wire_format is not None else BatchFormat()
        self.ingest_path = ingest_path if ingest_path is not None else self.wire_format.default_path
        # When set, a delivery without this X-API-Key gets 401, as STAG would answer.
        self.api_key = api_key
        self.failures = tuple(failures)
        self.programme = Programme()
        self._max_keys = max_keys
        self._clock = clock
        self.started_at = clock()
        self._keys: OrderedDict[str, None] = OrderedDict()
        self.requests = 0
        self.batches = 0
        self.duplicate_batches = 0
        self.failed_requests = 0
        self.bad_requests = 0
        self.events = 0
        self.events_by_type: dict[str, int] = {}
        # Characters of mesh payload (full buffers or delta fields) that reached us.
        self.mesh_chars = 0
        self.batch_sizes: dict[int, int] = {}
        self.latency = LatencyHistogram()
        # Per event type: pose latency beside meshes is what a mesh load must not hurt.
        self.latency_by_type: dict[str, LatencyHistogram] = {}
        self.relay_latency = LatencyHistogram()
        # Latency since the last take_window(), for a live display.
        self.window = LatencyHistogram()
        self.first_arrival_at: float | None = None
        self.last_arrival_at: float | None = None
        self.keep = keep
        # With ``keep``: every exchange but the stand-in's own endpoints, in order;
        # the accepted bodies and their events, once per key.
        self.exchanges: list[Exchange] = []
        self.accepted: list[Any] = []
        self.accepted_events: list[dict[str, Any]] = []

    def failing(self, now: float | None = None) -> FailurePlan | None:
        elapsed = (self._clock() if now is None else now) - self.started_at
        for plan in self.failures:
            if plan.active(elapsed):
                return plan
        return None

    # -- programming -----------------------------------------------------------------

    def fail_for(self, reply: Reply, seconds: float) -> None:
        """Answer ``reply`` to every delivery for the next ``seconds``."""
        self.programme.window_reply = reply
        self.programme.window_until = self._clock() + seconds

    # -- answering -------------------------------------------------------------------

    def answer(self, request: Request, arrival: float | None = None) -> Answer:
        """Answer one whole ``request`` that finished arriving at ``arrival``."""
        arrival = self._clock() if arrival is None else arrival
        path, method = request.path, request.method
        if path != self.ingest_path and method == "GET":
            if path == "/stats":
                return _json_answer(200, self.summary())
            if path == "/health":
                return _json_answer(200, {"status": "ok"})
        answer = self._route(request, arrival)
        if self.keep:
            status = None if answer.close else answer.status
            self.exchanges.append(Exchange(request, status))
        return answer

    def _route(self, request: Request, arrival: float) -> Answer:
        if request.path != self.ingest_path:
            return _json_answer(404, {"error": f"no such endpoint: {request.path}"})
        if request.method != "POST":
            return _json_answer(405, {"error": "use POST"}, ("allow", "POST"))
        if request.too_large:
            return _json_answer(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _json_answer(401, {"error": "missing or wrong X-API-Key"})
        return self.receive(request.body, request.idempotency_key, arrival)

    def receive(self, body: bytes, idempotency_key: str | None, arrival: float) -> Answer:
        """Answer one delivery of ``body`` that finished arriving at ``arrival``."""
        self.requests += 1
        programme = self.programme
        reply = programme.take(arrival)
        if reply is None:
            plan = self.failing(arrival)
            if plan is not None:
                reply = Reply(plan.status, plan.retry_after)
                return self._failed(reply, {"error": "scheduled failure"})
        if reply is None:
            reply = programme.reject
        if reply is not None and (reply.close or not 200 <= reply.status < 300):
            return self._failed(reply, {"error": f"programmed failure {reply.status}"})
        parsed = self.wire_format.parse(body)
        if isinstance(parsed, str):
            if reply is not None:
                # A programmed success for what is not a delivery: answered, not recorded.
                return _reply_answer(reply, {"status": "ok"})
            self.bad_requests += 1
            return _json_answer(400, {"error": parsed})
        if programme.max_events is not None and len(parsed.events) > programme.max_events:
            self.failed_requests += 1
            return _json_answer(413, {"error": f"over {programme.max_events} events"})
        key = idempotency_key or parsed.key
        duplicate = key in self._keys
        if duplicate:
            self.duplicate_batches += 1
        else:
            self._remember(key)
            self._record(parsed, arrival)
        outcome = self.wire_format.accepted(parsed, duplicate)
        if reply is not None:
            return _reply_answer(reply, outcome)
        return _json_answer(200, outcome)

    def _failed(self, reply: Reply, default: object) -> Answer:
        self.failed_requests += 1
        return _reply_answer(reply, default)

    def _remember(self, key: str) -> None:
        keys = self._keys
        keys[key] = None
        if len(keys) > self._max_keys:
            keys.popitem(last=False)

    def _record(self, delivery: Delivery, arrival: float) -> None:
        events = delivery.events
        n = len(events)
        self.batches += 1
        self.events += n
        if self.keep:
            self.accepted.append(delivery.document)
            self.accepted_events.extend(events)
        self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
        if self.first_arrival_at is None:
            self.first_arrival_at = arrival
        self.last_arrival_at = arrival
        arrival_ms = arrival * 1000.0
        by_type = self.events_by_type
        latency, relay, window = self.latency.add, self.relay_latency.add, self.window.add
        by_type_latency = self.latency_by_type
        for event in events:
            kind = event.get("type")
            kind = kind if type(kind) is str else "unknown"
            by_type[kind] = by_type.get(kind, 0) + 1
            stamp = event.get("timestamp")
            if type(stamp) is int or type(stamp) is float:
                ms = arrival_ms - stamp
                latency(ms)
                window(ms)
                histogram = by_type_latency.get(kind)
                if histogram is None:
                    histogram = by_type_latency[kind] = LatencyHistogram()
                histogram.add(ms)
            received = event.get("received_at")
            if type(received) is int or type(received) is float:
                relay(arrival_ms - received)
            if kind == "mesh":
                self.mesh_chars += _mesh_chars(event)

    def take_window(self) -> LatencyHistogram:
        """The latencies since the last call, for a live display."""
        window, self.window = self.window, LatencyHistogram()
        return window

    def summary(self) -> dict[str, Any]:
        """Everything counted so far, as ``GET /stats`` and ``--json`` give it."""
        sizes = self.batch_sizes
        batches = sum(sizes.values())
        span = (
            self.last_arrival_at - self.first_arrival_at
            if self.first_arrival_at is not None and self.last_arrival_at is not None
            else 0.0
        )
        plan = self.failing()
        return {
            "uptime_seconds": round(self._clock() - self.started_at, 3),
            "requests": self.requests,
            "batches": self.batches,
            "duplicate_batches": self.duplicate_batches,
            "failed_requests": self.failed_requests,
            "bad_requests": self.bad_requests,
            "failing": plan.status if plan is not None else None,
            "events": self.events,
            "events_by_type": dict(sorted(self.events_by_type.items())),
            "mesh_chars": self.mesh_chars,
            "events_per_second": round(self.events / span, 1) if span > 0 else None,
            "first_arrival_at": self.first_arrival_at,
            "last_arrival_at": self.last_arrival_at,
            "batch_size": {
                "min": min(sizes) if sizes else None,
                "mean": round(self.events / batches, 2) if batches else None,
                "max": max(sizes) if sizes else None,
            },
            "latency_ms": self.latency.to_json(),
            "latency_ms_by_type": {
                kind: histogram.to_json()
                for kind, histogram in sorted(self.latency_by_type.items())
            },
            "relay_latency_ms": self.relay_latency.to_json(),
        }


def _mesh_chars(event: dict[str, Any]) -> int:
    total = 0
    meshes = event.get("meshes")
    if type(meshes) is not list:
        return 0
    for mesh in meshes:
        if type(mesh) is dict:
            # The batch format's fields, then the spatial-event format's.
            for field in (
                "vertices_delta",
                "faces_delta",
                "removed_faces",
                "added",
                "vertices",
                "faces",
                "delta_data",
            ):
                value = mesh.get(field)
                if type(value) is str:
                    total += len(value)
    return total
