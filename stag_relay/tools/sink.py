"""Local STAG stand-in: accepts the relay's batches like STAG and shows what arrives.

``stag-relay sink`` listens where the relay delivers by default
(``http://localhost:8080/ingest``), accepts ``POST`` batches, deduplicates them on
``Idempotency-Key`` as STAG does, and shows live events per second, batch sizes and
latency: from each event's ``timestamp`` (the client's clock) to the moment its
batch arrived, and from its ``received_at`` (the relay's clock) to the same moment.
It can answer errors on a schedule (``--fail 503 --for 10s``) to show the relay
retrying, and prints a summary (``--json`` for machines) when it stops.
``GET /stats`` answers the same summary at any time.

The bookkeeping (:class:`Ledger`, :class:`FailurePlan`, :class:`LatencyHistogram`)
is plain code; :class:`Sink` is the Trio and h11 server around it.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO

import attrs
import h11
import orjson
import trio

from stag_relay import __version__
from stag_relay.service.config import duration_argument

DEFAULT_HOST: Final = "127.0.0.1"
# The relay's default stag.url is http://localhost:8080: a sink started with no
# options is where a relay started with no options delivers.
DEFAULT_PORT: Final = 8080
DEFAULT_INGEST_PATH: Final = "/ingest"
# Idempotency keys remembered. The relay retries a batch for as long as STAG
# fails, at most stag.retry_max (10 s) apart; at 1,000 batches/s this still covers
# minutes, and it bounds a long-running sink's memory (~150 bytes a key).
MAX_KEYS: Final = 500_000
# A batch of 1,000 40,000-triangle meshes is ~100 MB; refuse beyond that (413).
MAX_BODY_BYTES: Final = 128 * 1024 * 1024
# Request heads are a few hundred bytes; anything near this is not a relay.
_MAX_HEAD_BYTES: Final = 64 * 1024
_RECEIVE_BYTES: Final = 256 * 1024
# Histogram buckets grow by 1%: percentiles within 1% of the exact value, and a
# bounded number of buckets (about 2,300 from 0.01 ms to an hour).
_GROWTH: Final = 1.01
_LOG_GROWTH: Final = math.log(_GROWTH)
# Latencies below this (ms) share one bucket reported as 0: below the 1 ms
# resolution of the timestamps anyway.
_FLOOR_MS: Final = 0.01
_SERVER: Final = f"stag-relay-sink/{__version__}"


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


# --- failures on a schedule ----------------------------------------------------------


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


# --- STAG's bookkeeping -------------------------------------------------------------


@attrs.frozen
class Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json_answer(status: int, payload: object, *headers: tuple[str, str]) -> Answer:
    return Answer(status, orjson.dumps(payload), headers)


class Ledger:
    """What STAG would record: batches once per ``Idempotency-Key``, their events,
    sizes and latencies. ``clock`` is wall-clock seconds (event timestamps are Unix
    milliseconds)."""

    def __init__(
        self,
        *,
        failures: Sequence[FailurePlan] = (),
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.failures = tuple(failures)
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

    def failing(self, now: float | None = None) -> FailurePlan | None:
        elapsed = (self._clock() if now is None else now) - self.started_at
        for plan in self.failures:
            if plan.active(elapsed):
                return plan
        return None

    def receive(self, body: bytes, idempotency_key: str | None, arrival: float) -> Answer:
        """Answer one ``POST`` of ``body`` that finished arriving at ``arrival``."""
        self.requests += 1
        plan = self.failing(arrival)
        if plan is not None:
            self.failed_requests += 1
            headers = (("retry-after", plan.retry_after),) if plan.retry_after else ()
            return _json_answer(plan.status, {"error": "scheduled failure"}, *headers)
        try:
            batch = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._bad("body is not JSON")
        if type(batch) is not dict:
            return self._bad("body is not a JSON object")
        events = batch.get("events")
        batch_id = batch.get("batch_id")
        if type(events) is not list or type(batch_id) is not str:
            return self._bad("a batch needs batch_id (string) and events (array)")
        key = idempotency_key or batch_id
        if key in self._keys:
            self.duplicate_batches += 1
            return _json_answer(200, {"status": "duplicate", "accepted": 0})
        if not all(type(e) is dict for e in events):
            return self._bad("every event must be an object")
        self._remember(key)
        self._record(events, arrival)
        return _json_answer(200, {"status": "ok", "accepted": len(events)})

    def _bad(self, message: str) -> Answer:
        self.bad_requests += 1
        return _json_answer(400, {"error": message})

    def _remember(self, key: str) -> None:
        keys = self._keys
        keys[key] = None
        if len(keys) > self._max_keys:
            keys.popitem(last=False)

    def _record(self, events: list[dict[str, Any]], arrival: float) -> None:
        n = len(events)
        self.batches += 1
        self.events += n
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
            for field in ("vertices_delta", "faces_delta", "removed_faces", "added"):
                value = mesh.get(field)
                if type(value) is str:
                    total += len(value)
    return total


# --- the server --------------------------------------------------------------------


@attrs.frozen
class SinkSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    ingest_path: str = DEFAULT_INGEST_PATH
    failures: tuple[FailurePlan, ...] = ()
    # When set, a batch without this X-API-Key gets 401, as STAG would answer.
    api_key: str | None = None
    # Added before every answer: STAG's own processing time.
    delay: float = 0.0


class Sink:
    """The HTTP server: ``await nursery.start(sink.run)`` gives the bound port."""

    def __init__(self, settings: SinkSettings, *, ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.ledger = ledger if ledger is not None else Ledger(failures=settings.failures)
        self.port: int | None = None

    @property
    def url(self) -> str:
        """The base URL for the relay's ``stag.url``."""
        return f"http://{self.settings.host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        try:
            while True:
                request = await self._next(stream, conn)
                if not isinstance(request, h11.Request):
                    return
                body = bytearray()
                too_large = False
                while True:
                    event = await self._next(stream, conn)
                    if isinstance(event, h11.Data):
                        if len(body) + len(event.data) > MAX_BODY_BYTES:
                            too_large = True
                        else:
                            body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                arrival = time.time()
                answer = self._answer(request, bytes(body), arrival, too_large)
                if self.settings.delay:
                    await trio.sleep(self.settings.delay)
                await self._send(stream, conn, answer)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def _next(self, stream: trio.SocketStream, conn: h11.Connection) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_RECEIVE_BYTES))
                continue
            return event

    def _answer(self, request: h11.Request, body: bytes, arrival: float, too_large: bool) -> Answer:
        path = request.target.decode("latin-1").partition("?")[0]
        method = request.method.decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        if path == self.settings.ingest_path:
            if method != "POST":
                return _json_answer(405, {"error": "use POST"}, ("allow", "POST"))
            if too_large:
                return _json_answer(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            key = self.settings.api_key
            if key is not None and headers.get("x-api-key") != key:
                return _json_answer(401, {"error": "missing or wrong X-API-Key"})
            return self.ledger.receive(body, headers.get("idempotency-key"), arrival)
        if path in ("/stats", "/health") and method == "GET":
            payload = self.ledger.summary() if path == "/stats" else {"status": "ok"}
            return _json_answer(200, payload)
        return _json_answer(404, {"error": f"no such endpoint: {path}"})

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, answer: Answer) -> None:
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(answer.body))),
            ("server", _SERVER),
            *answer.headers,
        ]
        data = conn.send(h11.Response(status_code=answer.status, headers=headers))
        data += conn.send(h11.Data(data=answer.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)


# --- command line ---------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 for any (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--ingest-path",
        default=DEFAULT_INGEST_PATH,
        help=f"path batches are POSTed to (default {DEFAULT_INGEST_PATH})",
    )
    parser.add_argument(
        "--fail", type=int, metavar="STATUS", help="answer this status (e.g. 503) on a schedule"
    )
    parser.add_argument(
        "--for",
        dest="fail_for",
        type=duration_argument,
        metavar="DURATION",
        help="... for this long (default: until stopped)",
    )
    parser.add_argument(
        "--after",
        dest="fail_after",
        type=duration_argument,
        default=0.0,
        metavar="DURATION",
        help="... starting this long after start (default 0s)",
    )
    parser.add_argument(
        "--every",
        dest="fail_every",
        type=duration_argument,
        metavar="DURATION",
        help="... and again every DURATION",
    )
    parser.add_argument(
        "--retry-after", metavar="SECONDS", help="send Retry-After with the failures"
    )
    parser.add_argument("--api-key", help="require this X-API-Key (401 otherwise)")
    parser.add_argument(
        "--delay", type=duration_argument, default=0.0, help="wait this long before each answer"
    )
    parser.add_argument("--duration", type=duration_argument, help="stop after this long")
    parser.add_argument(
        "--json", metavar="PATH", help="write the summary as JSON to PATH ('-': stdout)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live display (the summary still prints)"
    )


def settings_from_args(args: argparse.Namespace) -> SinkSettings:
    failures: tuple[FailurePlan, ...] = ()
    if args.fail is not None:
        failures = (
            FailurePlan(
                status=args.fail,
                after=args.fail_after,
                duration=args.fail_for,
                every=args.fail_every,
                retry_after=args.retry_after,
            ),
        )
    elif args.fail_for is not None or args.fail_every is not None:
        raise ValueError("--for and --every need --fail STATUS")
    return SinkSettings(
        host=args.host,
        port=args.port,
        ingest_path=args.ingest_path,
        failures=failures,
        api_key=args.api_key,
        delay=args.delay,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"stag-relay sink: {exc}", file=sys.stderr)
        return 2
    sink = Sink(settings)
    live = not args.quiet and sys.stdout.isatty()
    try:
        trio.run(_serve, sink, args.duration, live)
    except OSError as exc:
        print(
            f"stag-relay sink: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    summary = sink.ledger.summary()
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        if args.json:
            with open(args.json, "w") as out:
                json.dump(summary, out, indent=2)
        print_summary(summary, sys.stdout)
    return 0


async def _serve(sink: Sink, duration: float | None, live: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            # On stderr, always, and plain: a script that started it with --port 0
            # reads the port from this line.
            print(
                f"sink listening on {sink.url}{sink.settings.ingest_path}",
                file=sys.stderr,
                flush=True,
            )
            if live:
                nursery.start_soon(_show_live, sink.ledger)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if duration is not None:
                await trio.sleep(duration)
                nursery.cancel_scope.cancel()


async def _show_live(ledger: Ledger) -> None:
    from rich.live import Live

    last_events, last_time = ledger.events, time.monotonic()
    window = LatencyHistogram()
    with Live(live_line(ledger, 0.0, window), auto_refresh=False, transient=True) as live:
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            rate = (ledger.events - last_events) / (now - last_time)
            last_events, last_time = ledger.events, now
            window = ledger.take_window()
            live.update(live_line(ledger, rate, window), refresh=True)


def live_line(ledger: Ledger, rate: float, window: LatencyHistogram) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    sizes = ledger.batch_sizes
    mean = ledger.events / ledger.batches if ledger.batches else 0.0
    line = (
        f"sink  events {ledger.events:>10,} ({rate:>8,.0f}/s)  batches {ledger.batches:>8,} "
        f"(mean {mean:.1f}, max {max(sizes) if sizes else 0})  latency ms p50 "
        f"{ms(window.percentile(50))} p99 {ms(window.percentile(99))}  "
        f"duplicates {ledger.duplicate_batches:,}"
    )
    plan = ledger.failing()
    if plan is not None:
        left = plan.remaining(time.time() - ledger.started_at)
        until = f" for {left:.1f}s more" if left is not None else ""
        line += f"  FAILING {plan.status}{until}"
    return line


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    lat, relay, size = summary["latency_ms"], summary["relay_latency_ms"], summary["batch_size"]
    rate = summary["events_per_second"]
    by_type = ", ".join(f"{n:,} {t}" for t, n in summary["events_by_type"].items()) or "none"
    lines = [
        "sink summary",
        f"  events     {summary['events']:,} ({by_type})"
        + (f", {rate:,.0f}/s while arriving" if rate else ""),
        f"  batches    {summary['batches']:,} (size min {size['min']}, mean {size['mean']}, "
        f"max {size['max']}), {summary['duplicate_batches']:,} duplicates",
        f"  requests   {summary['requests']:,}: {summary['failed_requests']:,} answered with a "
        f"scheduled failure, {summary['bad_requests']:,} bad",
        f"  latency    client timestamp to arrival: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms",
        f"             relay received_at to arrival: p50 {relay['p50']} ms, p99 {relay['p99']} ms",
    ]
    out.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stag-relay sink", description=(__doc__ or "").strip().splitlines()[0]
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
