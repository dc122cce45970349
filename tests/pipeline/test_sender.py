"""The STAG client against a real HTTP server: the sink (stag_relay.tools.sink), in a
thread (tests/support/stag_server.py) or, where an answer must misbehave at the byte
level, with the test's own connection handler (tests/support/raw_http.py).

Real sockets run in real time, so retries use tiny delays and the tests wait for
outcomes (the stand-in's condition variable, the sender's state), never for a time.
Tests about how long the sender waits run on trio's mock clock.
"""

from __future__ import annotations

import json
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import structlog
import trio
import trio.lowlevel
import trio.testing
import trustme

from stag_relay.pipeline.delivery import Delivery, ToSender
from stag_relay.pipeline.sender import Shipment, StagSender
from stag_relay.protocol.events import Anchor, AnchorPose, Batch, Event, MeshUpdate, to_wire
from stag_relay.protocol.spatial_event import encode_wire, spatial_event_id
from stag_relay.service.config import DeliveryConfig, StagConfig
from stag_relay.service.metrics import RelayMetrics
from tests.support.raw_http import Peer, RawServer, serve_all
from tests.support.stag_server import StagServer
from tests.support.waiting import wait_until

VERSION = "1.2.3"
RELAY_ID = "relay-test"
# Far longer than any request here takes on a loaded CI machine; a test that hangs
# fails with a message instead of stalling the suite.
GUARD = 20.0


def event(n: int, session: str = "session-1") -> Event:
    if n % 2:
        return Event(
            event_id=f"{session}-e{n}",
            session_id=session,
            frame_number=n,
            timestamp=1_634_567_890_000 + n,
            received_at=1_634_567_890_002 + n,
            type="mesh",
            anchors=(),
            meshes=(MeshUpdate("anchor-456", False, "AAEC", ""),),
        )
    return Event(
        event_id=f"{session}-e{n}",
        session_id=session,
        frame_number=n,
        timestamp=1_634_567_890_000 + n,
        received_at=1_634_567_890_002 + n,
        type="pose",
        anchors=(
            Anchor(
                "anchor_x", AnchorPose(1.0, 2.0, 3.0, (0.0, 0.0, 0.0, 1.0)), 1_634_567_890_000 + n
            ),
        ),
        meshes=(),
    )


def batch(batch_id: str, first: int, size: int) -> Batch:
    return Batch(batch_id, tuple(event(n) for n in range(first, first + size)))


def config(server_url: str, **changes: Any) -> StagConfig:
    # Retries in milliseconds: the tests wait for outcomes, so this only keeps them fast.
    base = StagConfig(url=server_url, timeout=GUARD, retry_initial=0.001, retry_max=0.005)
    return attrs.evolve(base, **changes)


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def server() -> Iterator[StagServer]:
    with StagServer() as s:
        yield s


class Run:
    """A sender running in a nursery, fed through an unbuffered channel."""

    def __init__(self, sender: StagSender, send: trio.MemorySendChannel[Shipment]) -> None:
        self.sender = sender
        self.send = send
        self.done = trio.Event()


@pytest.fixture
async def run_sender() -> AsyncIterator[Callable[[StagSender], Run]]:
    async with trio.open_nursery() as nursery:

        def start(sender: StagSender) -> Run:
            send, recv = trio.open_memory_channel[Shipment](0)
            run = Run(sender, send)

            async def go() -> None:
                await sender.run(recv)
                run.done.set()

            nursery.start_soon(go)
            return run

        yield start
        # A test that failed half-way must not leave its sender retrying forever.
        nursery.cancel_scope.cancel()


async def deliver(sender: StagSender, *batches: Batch) -> None:
    """Hand ``batches`` to a fresh run of ``sender`` and wait until it returns."""
    send, recv = trio.open_memory_channel[Shipment](0)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run, recv)
            async with send:
                for b in batches:
                    await send.send(Shipment(to_wire(b)))


async def test_delivers_with_headers_and_body(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, api_key="s3cret"), metrics, relay_id=RELAY_ID, version=VERSION
    )
    b = batch("batch-1", 0, 3)
    before_ms = int(time.time() * 1000)
    await deliver(sender, b)

    [request] = server.requests()
    assert request.method == "POST"
    assert request.path == "/ingest"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"stag-relay/{VERSION}"
    assert request.headers["idempotency-key"] == "batch-1"
    assert request.headers["x-api-key"] == "s3cret"
    body = request.json
    assert body["batch_id"] == "batch-1"
    assert body["relay_id"] == RELAY_ID
    assert body["count"] == 3
    assert body["timestamp"] >= before_ms
    assert body["events"] == [e.to_json() for e in b.events]

    assert server.event_ids() == ["session-1-e0", "session-1-e1", "session-1-e2"]
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    assert sample(metrics, "relay_events_sent_total") == 3
    assert sample(metrics, "relay_batches_sent_total") == 1
    assert sample(metrics, "relay_batch_size_count") == 1
    assert sample(metrics, "relay_batch_size_sum") == 3
    assert sample(metrics, "relay_stag_request_duration_seconds_count") == 1
    status = sender.status()
    assert status["reachable"] is True
    assert status["consecutive_failures"] == 0
    assert status["events_sent"] == 3
    assert status["batches_sent"] == 1
    assert isinstance(status["last_success"], float)
    assert status["last_failure"] is None
    assert sender.held_events() == 0


async def test_no_api_key_header_without_a_key(server: StagServer) -> None:
    sender = StagSender(config(server.url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    await deliver(sender, batch("b", 0, 1))
    [request] = server.requests()
    assert "x-api-key" not in request.headers


async def test_url_with_a_path_prefix_and_custom_ingest_path() -> None:
    with StagServer(ingest_path="/stag/v1/events") as server:
        sender = StagSender(
            config(server.url + "/stag/", ingest_path="/v1/events"),
            RelayMetrics(),
            relay_id=RELAY_ID,
            version=VERSION,
        )
        await deliver(sender, batch("b", 0, 2))
        assert len(server.events()) == 2


def test_status_before_any_attempt() -> None:
    sender = StagSender(
        config("http://127.0.0.1:9"), RelayMetrics(), relay_id=RELAY_ID, version=VERSION
    )
    assert sender.status() == {
        "state": "unknown",
        "last_status": None,
        "reachable": None,
        "last_success": None,
        "last_failure": None,
        "consecutive_failures": 0,
        "events_sent": 0,
        "batches_sent": 0,
    }
    assert sender.held_events() == 0


async def test_retries_503_without_loss_and_with_the_same_key(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.fail_next(503, times=3)
    await deliver(sender, batch("batch-7", 0, 4))

    requests = server.requests()
    assert [r.status for r in requests] == [503, 503, 503, 200]
    assert {r.idempotency_key for r in requests} == {"batch-7"}
    assert {r.json["batch_id"] for r in requests} == {"batch-7"}
    assert len(server.event_ids()) == 4
    assert sample(metrics, "relay_stag_requests_total", outcome="retry") == 3
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    status = sender.status()
    assert status["reachable"] is True
    assert status["consecutive_failures"] == 0
    assert isinstance(status["last_failure"], float)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
async def test_retries_every_transient_status(server: StagServer, status: int) -> None:
    sender = StagSender(config(server.url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    server.fail_next(status, times=2)
    await deliver(sender, batch("b", 0, 2))
    assert [r.status for r in server.requests()] == [status, status, 200]
    assert len(server.events()) == 2


async def test_retries_dropped_connections_and_timeouts(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, timeout=0.05), metrics, relay_id=RELAY_ID, version=VERSION
    )
    server.drop_next(times=2)
    # Answered, but long after the client gave up: STAG got it and the retry is the same
    # batch again, which the Idempotency-Key lets STAG recognise.
    server.fail_next(200, delay=0.25)
    await deliver(sender, batch("b", 0, 3))

    # The late answer is recorded when it is given, after the retry's.
    requests = await trio.to_thread.run_sync(server.wait_for_requests, 4)
    assert {r.idempotency_key for r in requests} == {"b"}
    assert server.event_ids() == ["session-1-e0", "session-1-e1", "session-1-e2"]
    assert server.duplicates >= 1
    assert sample(metrics, "relay_stag_requests_total", outcome="error") >= 3
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    assert sender.held_events() == 0


async def test_retry_after_is_honoured(
    server: StagServer, mock_clock: trio.testing.MockClock
) -> None:
    """On a frozen clock the sender's sleep is the only deadline: its length is the delay
    the policy chose, and the batch goes out again once that much time has passed."""
    sender = StagSender(
        # Backoff alone would wait at most 5 ms.
        config(server.url, retry_initial=0.001, retry_max=0.005),
        RelayMetrics(),
        relay_id=RELAY_ID,
        version=VERSION,
    )
    server.fail_next(503, retry_after="30")
    send, recv = trio.open_memory_channel[Shipment](1)
    send.send_nowait(Shipment(to_wire(batch("b", 0, 2))))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run, recv)
        # Mock time does not move, so the guard is wall time.
        guard = time.monotonic() + GUARD
        while failures(sender) == 0:
            assert time.monotonic() < guard, "the sender never saw the 503"
            await trio.lowlevel.checkpoint()
        # The sender set its failure state and went to sleep in the same step.
        waiting = trio.lowlevel.current_statistics().seconds_to_next_deadline
        assert waiting == pytest.approx(30.0)
        mock_clock.jump(29.9)
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.requests()) == 1
        mock_clock.jump(0.1)
        await send.aclose()
    assert [r.status for r in server.requests()] == [503, 200]
    assert len(server.events()) == 2


async def test_4xx_is_rejected_logged_and_counted(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.reject_all(400, body=b"invalid event: " + b"x" * 500)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 3), batch("c", 3, 2))

    # Not retried.
    assert [r.status for r in server.requests()] == [400, 400]
    assert server.events() == []
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 5
    assert sample(metrics, "relay_stag_requests_total", outcome="rejected") == 2
    assert sample(metrics, "relay_events_sent_total") == 0
    assert sender.held_events() == 0
    # Both batches were in flight at once: sort for a stable order.
    rejections = sorted(
        (entry for entry in logs if entry.get("status") == 400), key=lambda e: e["batch_id"]
    )
    assert len(rejections) == 2
    assert rejections[0]["log_level"] == "warning"
    assert rejections[0]["batch_id"] == "b"
    assert rejections[0]["events"] == 3
    assert rejections[0]["answer"] == "invalid event: " + "x" * 185
    # STAG answered: it is reachable, even though it refused.
    assert sender.status()["reachable"] is True


async def test_413_splits_the_batch_until_it_fits(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.too_large_over(2)
    await deliver(sender, batch("big", 0, 5))

    assert server.event_ids() == [f"session-1-e{n}" for n in range(5)]
    assert [b["batch_id"] for b in server.batches()] == ["big.0", "big.1.0", "big.1.1"]
    assert all(b["count"] <= 2 for b in server.batches())
    assert sample(metrics, "relay_stag_requests_total", outcome="too_large") == 2
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 3
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    assert sender.status()["batches_sent"] == 3
    assert sender.held_events() == 0


async def test_413_for_a_single_event_rejects_it(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.too_large_over(0)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("one", 0, 1), batch("two", 1, 2))
    assert server.events() == []
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 3
    assert sample(metrics, "relay_stag_requests_total", outcome="too_large") == 4
    assert sorted(entry["batch_id"] for entry in logs if entry.get("status") == 413) == [
        "one",
        "two.0",
        "two.1",
    ]
    assert sender.held_events() == 0


def failures(sender: StagSender) -> int:
    count = sender.status()["consecutive_failures"]
    assert isinstance(count, int)
    return count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_connection_refused_then_stag_comes_up(
    run_sender: Callable[[StagSender], Run],
) -> None:
    metrics = RelayMetrics()
    server = StagServer(port=free_port())
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        run = run_sender(sender)
        await run.send.send(Shipment(to_wire(batch("b", 0, 3))))
        await wait_until(lambda: failures(sender) >= 3, what="3 failures")
        assert sender.status()["reachable"] is False
        assert sender.held_events() == 3
        with server:
            await run.send.aclose()
            with trio.fail_after(GUARD):
                await run.done.wait()
            assert server.event_ids() == ["session-1-e0", "session-1-e1", "session-1-e2"]

    assert sample(metrics, "relay_stag_requests_total", outcome="error") >= 3
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    status = sender.status()
    assert status["reachable"] is True
    assert status["consecutive_failures"] == 0
    assert sender.held_events() == 0
    # Once per change of state, not once per failed attempt.
    changes = [entry for entry in logs if entry["event"].startswith("STAG ")]
    assert [(entry["event"], entry["log_level"]) for entry in changes] == [
        ("STAG unreachable, retrying until it answers", "warning"),
        ("STAG reachable", "info"),
    ]
    assert "ConnectError" in changes[0]["reason"]


async def test_max_in_flight_is_respected(
    server: StagServer, run_sender: Callable[[StagSender], Run]
) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, max_in_flight=2), metrics, relay_id=RELAY_ID, version=VERSION
    )
    server.pause()
    run = run_sender(sender)
    batches = [batch(f"b{n}", 3 * n, 3) for n in range(6)]
    taken = 0
    async with trio.open_nursery() as nursery:

        async def feed() -> None:
            nonlocal taken
            async with run.send:
                for b in batches:
                    await run.send.send(Shipment(to_wire(b)))
                    taken += 1

        nursery.start_soon(feed)
        await trio.to_thread.run_sync(server.wait_for_in_flight, 2)
        await trio.testing.wait_all_tasks_blocked()
        # Two slots busy: the sender holds exactly two batches and takes no third, so the
        # feeder waits (backpressure) with the third batch still in its hands.
        assert taken == 2
        assert sender.held_events() == 6
        server.resume()
    with trio.fail_after(GUARD):
        await run.done.wait()
    assert server.max_in_flight == 2
    assert sorted(server.event_ids()) == sorted(e.event_id for b in batches for e in b.events)
    assert sample(metrics, "relay_batches_sent_total") == 6
    assert sender.held_events() == 0


async def test_concurrent_batches_all_arrive(server: StagServer) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, max_in_flight=4),
        metrics,
        relay_id=RELAY_ID,
        version=VERSION,
        rng=random.Random(1),
    )
    # Some failures sprinkled in: still exactly once each.
    server.fail_next(503, times=3)
    server.drop_next(times=2)
    server.fail_next(429, times=3, retry_after="0")
    batches = [batch(f"b{n}", 5 * n, 5) for n in range(40)]
    await deliver(sender, *batches)
    ids = server.event_ids()
    assert len(ids) == 200
    assert set(ids) == {e.event_id for b in batches for e in b.events}
    assert sample(metrics, "relay_events_sent_total") == 200
    assert sender.status()["events_sent"] == 200


async def test_credentials_in_the_url_go_as_basic_auth_and_stay_out_of_logs(
    server: StagServer,
) -> None:
    url = server.url.replace("http://", "http://relay:pa55word@")
    sender = StagSender(config(url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 1))
    [request] = server.requests()
    assert request.headers["authorization"] == "Basic cmVsYXk6cGE1NXdvcmQ="
    assert logs
    assert "pa55word" not in repr(logs)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_holds_the_batch_until_stag_url_is_where_it_points(
    nursery: trio.Nursery, status: int
) -> None:
    # A proxy that moved STAG to https:// answers every POST with a redirect: the relay
    # does not follow it with the batch, it keeps the batch and says where to point.
    location = "https://stag.example/ingest"

    async def redirect_twice(peer: Peer) -> None:
        while await peer.request() is not None:
            if len(stag.requests) <= 2:
                await peer.answer(status, b"", headers=[("location", location)])
            else:
                await peer.answer()

    stag = await RawServer(redirect_twice).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 2))
    assert [json.loads(r.body)["batch_id"] for r in stag.requests] == ["b", "b", "b"]
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    assert sample(metrics, "relay_stag_requests_total", outcome="misconfigured") == 2
    assert sender.status()["events_sent"] == 2
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]
    [error] = [e for e in logs if e["event"] == CONFIG_LOG]
    assert (error["status"], error["location"]) == (status, location)
    assert "stag.url" in error["fix"]


async def test_batches_share_kept_alive_connections(nursery: trio.Nursery) -> None:
    stag = await RawServer().start(nursery)
    sender = StagSender(
        config(stag.url, max_in_flight=2), RelayMetrics(), relay_id=RELAY_ID, version=VERSION
    )
    await deliver(sender, *(batch(f"b{n}", 2 * n, 2) for n in range(10)))
    assert len(stag.requests) == 10
    # At most one connection per slot, kept for the next batches.
    assert stag.connections <= 2


async def test_a_garbage_answer_is_retried_like_a_dropped_connection(
    nursery: trio.Nursery,
) -> None:
    async def garbage_first(peer: Peer) -> None:
        if stag.connections == 1:
            await peer.request()
            await peer.raw(b"HTTP/1.1 ok\r\n\r\n")
        else:
            await serve_all(peer)

    stag = await RawServer(garbage_first).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 3))
    assert [json.loads(r.body)["batch_id"] for r in stag.requests] == ["b", "b"]
    assert sample(metrics, "relay_stag_requests_total", outcome="error") == 1
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    [unreachable] = [e for e in logs if e["event"].startswith("STAG unreachable")]
    assert unreachable["reason"].startswith("RemoteProtocolError: ")


async def test_a_silent_stag_times_out_and_the_batch_is_retried(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent_first(peer: Peer) -> None:
        if stag.connections == 1:
            await peer.request()
            await trio.sleep_forever()
        await serve_all(peer)

    stag = await RawServer(silent_first).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(config(stag.url, timeout=5.0), metrics, relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 3))
    assert len(stag.requests) == 2
    assert sample(metrics, "relay_stag_requests_total", outcome="error") == 1
    [unreachable] = [e for e in logs if e["event"].startswith("STAG unreachable")]
    assert unreachable["reason"].startswith("ReadTimeout: ")


async def test_https_stag_with_a_given_tls_context(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    stag = await RawServer(tls=server_tls).start(nursery)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    sender = StagSender(
        config(stag.url, max_in_flight=1),
        RelayMetrics(),
        relay_id=RELAY_ID,
        version=VERSION,
        tls=client_tls,
    )
    await deliver(sender, batch("b", 0, 2), batch("c", 2, 2))
    assert [json.loads(r.body)["count"] for r in stag.requests] == [2, 2]
    assert stag.connections == 1


async def test_a_proxy_variable_is_reported_and_not_used(
    server: StagServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    # Nothing listens there: had the sender used it, nothing would arrive.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    sender = StagSender(config(server.url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("b", 0, 2))
    assert len(server.events()) == 2
    [warning] = [e for e in logs if e["event"].startswith("proxy variable ignored")]
    assert (warning["log_level"], warning["variable"]) == ("warning", "HTTP_PROXY")


# -- answers that say the configuration is wrong -------------------------------------------

CONFIG_LOG = (
    "STAG answers that the relay's configuration is wrong;"
    " holding batches and retrying until it is fixed"
)
CLEARED_LOG = "STAG accepts the relay's requests again: configuration error cleared"


def state_lines(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The log lines about STAG's state, as (event, level): no per-batch lines."""
    return [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("STAG ")]


def misconfigured_gauge(metrics: RelayMetrics) -> dict[str, float]:
    return {
        status: sample(metrics, "relay_stag_misconfigured", status=status)
        for status in ("401", "403", "404", "405", "407")
    }


async def test_a_wrong_ingest_path_holds_the_batches_until_stag_serves_it(
    server: StagServer, run_sender: Callable[[StagSender], Run]
) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, ingest_path="/v2/ingest", max_in_flight=2),
        metrics,
        relay_id=RELAY_ID,
        version=VERSION,
    )
    with structlog.testing.capture_logs() as logs:
        run = run_sender(sender)
        await run.send.send(Shipment(to_wire(batch("a", 0, 3))))
        await run.send.send(Shipment(to_wire(batch("b", 3, 2))))
        # Both batches refused several times each: still held, nothing dropped.
        await wait_until(lambda: failures(sender) >= 10, what="10 refusals")
        status = sender.status()
        assert status["state"] == "misconfigured"
        assert status["last_status"] == 404
        assert status["reachable"] is False
        assert sender.held_events() == 5
        assert misconfigured_gauge(metrics) == {
            "401": 0,
            "403": 0,
            "404": 1,
            "405": 0,
            "407": 0,
        }
        # STAG redeployed at the path the relay was configured with.
        server.move_ingest_path("/v2/ingest")
        await run.send.aclose()
        with trio.fail_after(GUARD):
            await run.done.wait()

    assert sorted(server.event_ids()) == sorted(f"session-1-e{n}" for n in range(5))
    assert sender.held_events() == 0
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    assert sample(metrics, "relay_stag_requests_total", outcome="misconfigured") >= 10
    assert sample(metrics, "relay_stag_requests_total", outcome="rejected") == 0
    assert set(misconfigured_gauge(metrics).values()) == {0}
    status = sender.status()
    assert (status["state"], status["last_status"]) == ("reachable", 200)
    assert status["consecutive_failures"] == 0
    # One error line for the whole episode (both batches, every retry), one when it clears.
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]
    [error] = [e for e in logs if e["event"] == CONFIG_LOG]
    assert error["url"] == server.url + "/v2/ingest"
    assert error["status"] == 404
    assert error["answer"] == '{"error":"no such endpoint: /v2/ingest"}'
    assert "stag.ingest_path" in error["fix"]
    [cleared] = [e for e in logs if e["event"] == CLEARED_LOG]
    assert cleared["status"] == 200
    assert cleared["after_failures"] >= 10


async def test_a_wrong_api_key_holds_the_batch_until_stag_takes_it(
    server: StagServer, run_sender: Callable[[StagSender], Run]
) -> None:
    metrics = RelayMetrics()
    sender = StagSender(
        config(server.url, api_key="old-key"), metrics, relay_id=RELAY_ID, version=VERSION
    )
    server.require_api_key("new-key")
    with structlog.testing.capture_logs() as logs:
        run = run_sender(sender)
        await run.send.send(Shipment(to_wire(batch("k", 0, 4))))
        await wait_until(lambda: failures(sender) >= 3, what="3 refusals")
        assert (sender.state(), sender.status()["last_status"]) == ("misconfigured", 401)
        assert misconfigured_gauge(metrics)["401"] == 1
        server.require_api_key("old-key")  # STAG takes the relay's key again
        await run.send.aclose()
        with trio.fail_after(GUARD):
            await run.done.wait()
    assert server.event_ids() == [f"session-1-e{n}" for n in range(4)]
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]
    [error] = [e for e in logs if e["event"] == CONFIG_LOG]
    assert error["status"] == 401
    assert error["answer"] == '{"error":"missing or wrong X-API-Key"}'
    assert "stag.api_key" in error["fix"]
    # The key itself is never logged.
    assert "old-key" not in repr(logs)


@pytest.mark.parametrize("status", [403, 405, 407])
async def test_other_configuration_answers_are_held_and_retried(
    server: StagServer, run_sender: Callable[[StagSender], Run], status: int
) -> None:
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.reject_all(status, body=b"<html>" + b"x" * 500)
    with structlog.testing.capture_logs() as logs:
        run = run_sender(sender)
        await run.send.send(Shipment(to_wire(batch("c", 0, 2))))
        await wait_until(lambda: failures(sender) >= 3, what="3 refusals")
        assert sender.state() == "misconfigured"
        assert misconfigured_gauge(metrics)[str(status)] == 1
        server.reset()
        await run.send.aclose()
        with trio.fail_after(GUARD):
            await run.done.wait()
    assert len(server.events()) == 2
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    [error] = [e for e in logs if e["event"] == CONFIG_LOG]
    assert error["status"] == status
    # The start of STAG's answer, not all of it.
    assert error["answer"] == "<html>" + "x" * 194
    assert error["fix"]


async def test_an_outage_inside_an_episode_does_not_end_it(
    server: StagServer, run_sender: Callable[[StagSender], Run]
) -> None:
    # STAG being redeployed behind its proxy: 404 while it is gone, 502 while it starts,
    # then 200. Neither the 502 nor a dropped connection says the URL is right again.
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.fail_next(404, times=2)
    server.fail_next(502, times=2)
    server.drop_next()
    # The retry after the drop waits while the test looks at the sender.
    server.hold_next()
    with structlog.testing.capture_logs() as logs:
        run = run_sender(sender)
        await run.send.send(Shipment(to_wire(batch("r", 0, 1))))
        await wait_until(lambda: len(server.requests()) >= 5, what="5 requests")
        await wait_until(lambda: failures(sender) >= 5, what="5 failures")
        assert (sender.state(), sender.status()["last_status"]) == ("misconfigured", 502)
        assert misconfigured_gauge(metrics)["404"] == 1
        server.resume()
        await run.send.aclose()
        with trio.fail_after(GUARD):
            await run.done.wait()
    assert [r.status for r in server.requests()] == [404, 404, 502, 502, None, 200]
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]
    assert sender.state() == "reachable"


async def test_another_configuration_status_in_an_episode_is_logged_with_its_fix(
    server: StagServer,
) -> None:
    # The path is fixed, then the key turns out wrong too: each has its own fix; the
    # same status again is not logged again.
    sender = StagSender(config(server.url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    server.fail_next(404, times=3)
    server.fail_next(401, times=3)
    server.fail_next(404)
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("s", 0, 1))
    assert [r.status for r in server.requests()] == [404] * 3 + [401] * 3 + [404, 200]
    assert state_lines(logs) == [
        (CONFIG_LOG, "error"),
        (CONFIG_LOG, "error"),
        (CLEARED_LOG, "info"),
    ]
    assert [e["status"] for e in logs if e["event"] == CONFIG_LOG] == [404, 401]


async def test_a_4xx_about_the_batch_ends_the_episode(server: StagServer) -> None:
    # STAG judged the batch: the URL and the key reached it. That batch is dropped
    # (counted); the configuration error is over.
    metrics = RelayMetrics()
    sender = StagSender(config(server.url), metrics, relay_id=RELAY_ID, version=VERSION)
    server.fail_next(404, times=2)
    server.fail_next(422, body=b'{"error":"bad event"}')
    with structlog.testing.capture_logs() as logs:
        await deliver(sender, batch("j", 0, 2))
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 2
    assert [line for line in state_lines(logs) if line[0] != "STAG rejected a batch"] == [
        (CONFIG_LOG, "error"),
        (CLEARED_LOG, "info"),
    ]
    assert (sender.state(), sender.status()["last_status"]) == ("reachable", 422)


async def test_an_answer_to_a_request_sent_before_the_episode_does_not_end_it(
    nursery: trio.Nursery,
) -> None:
    # Two batches in flight: the first request is answered 200 only after the second
    # was refused with 404 and the sender saw it. That 200 was earned before the
    # configuration broke, so the episode goes on until a later request succeeds.
    requests = 0
    misconfigured_seen = trio.Event()
    first_delivered = trio.Event()

    async def handler(peer: Peer) -> None:
        nonlocal requests
        while await peer.request() is not None:
            requests += 1
            if requests == 1:
                await misconfigured_seen.wait()
                await peer.answer(200)
            elif requests == 2:
                await peer.answer(404, b'{"error":"not found"}')
            else:
                await first_delivered.wait()
                await peer.answer(200)

    stag = await RawServer(handler).start(nursery)
    sender = StagSender(
        config(stag.url, max_in_flight=2), RelayMetrics(), relay_id=RELAY_ID, version=VERSION
    )
    send, recv = trio.open_memory_channel[Shipment](0)
    with structlog.testing.capture_logs() as logs, trio.fail_after(GUARD):
        async with trio.open_nursery() as inner:
            inner.start_soon(sender.run, recv)
            await send.send(
                Shipment(to_wire(batch("first", 0, 1)), on_delivered=first_delivered.set)
            )
            await wait_until(lambda: requests == 1, what="the first request")
            await send.send(Shipment(to_wire(batch("second", 1, 1))))
            await wait_until(lambda: sender.state() == "misconfigured", what="the 404")
            misconfigured_seen.set()
            await first_delivered.wait()
            # /status shows the answer that counts: the refusal, not that late 200.
            assert (sender.state(), sender.status()["last_status"]) == ("misconfigured", 404)
            await send.aclose()
    assert sender.state() == "reachable"
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]


# -- stag.format: spatial-event ------------------------------------------------------------

INGEST = "/api/v1/ingest"
Answerer = Callable[[dict[str, Any]], tuple[int, bytes]]


def spatial_config(server_url: str, **changes: Any) -> StagConfig:
    return config(server_url, format="spatial-event", ingest_path=INGEST, **changes)


def lower_stag(body: dict[str, Any]) -> tuple[int, bytes]:
    """tabularxr/stag's 200: success, the event id, and how many items it processed."""
    processed = len(body["anchors"]) + len(body["meshes"])
    answer = {"success": True, "event_id": body["event_id"], "processed": processed}
    return 200, json.dumps(answer).encode()


def stag_like(answer: Answerer) -> Callable[[Peer], Awaitable[None]]:
    """A connection handler answering each SpatialEvent with ``answer(body)``."""

    async def handler(peer: Peer) -> None:
        while (received := await peer.request()) is not None:
            await peer.answer(*answer(json.loads(received.body)))

    return handler


def two_sessions(batch_id: str) -> Batch:
    """Events of sessions "s" and "t" interleaved: 3 of "s" (poses and a mesh), 2 of "t"."""
    return Batch(
        batch_id,
        (event(0, "s"), event(1, "t"), event(2, "s"), event(3, "s"), event(4, "t")),
    )


@attrs.define
class Outcome:
    delivered: int = 0
    rejected: list[tuple[int, str]] = attrs.Factory(list)

    def shipment(self, b: Batch) -> Shipment:
        def on_delivered() -> None:
            self.delivered += 1

        return Shipment(to_wire(b), on_delivered, lambda *refusal: self.rejected.append(refusal))


async def ship(sender: StagSender, *shipments: Shipment) -> None:
    send, recv = trio.open_memory_channel[Shipment](0)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run, recv)
            async with send:
                for s in shipments:
                    await send.send(s)


async def test_spatial_event_posts_one_request_per_session(nursery: trio.Nursery) -> None:
    stag = await RawServer(stag_like(lower_stag)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(
        spatial_config(stag.url, max_in_flight=1), metrics, relay_id=RELAY_ID, version=VERSION
    )
    b = two_sessions("batch-1")
    outcome = Outcome()
    await ship(sender, outcome.shipment(b))

    expected = encode_wire(to_wire(b))
    assert [r.body for r in stag.requests] == [r.body for r in expected]
    assert [r.target for r in stag.requests] == [INGEST, INGEST]
    assert [r.headers["idempotency-key"] for r in stag.requests] == [
        spatial_event_id("batch-1", "s"),
        spatial_event_id("batch-1", "t"),
    ]
    assert [json.loads(r.body)["event_id"] for r in stag.requests] == [r.event_id for r in expected]
    # One slot: the batch's requests go in turn, on the slot's one connection.
    assert stag.connections == 1
    assert (outcome.delivered, outcome.rejected) == (1, [])
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 2
    assert sample(metrics, "relay_events_sent_total") == 5
    assert sample(metrics, "relay_batches_sent_total") == 1
    assert sample(metrics, "relay_batch_size_sum") == 5
    assert sender.status()["events_sent"] == 5
    assert sender.status()["batches_sent"] == 1
    assert sender.held_events() == 0


async def test_spatial_event_retries_send_the_same_event_id_and_bytes(
    nursery: trio.Nursery,
) -> None:
    seen: dict[str, int] = {}

    def flaky(body: dict[str, Any]) -> tuple[int, bytes]:
        # Each session's request fails twice (503, then 500) before it is taken.
        seen[body["session_id"]] = seen.get(body["session_id"], 0) + 1
        return (503, b"") if seen[body["session_id"]] <= 2 else lower_stag(body)

    stag = await RawServer(stag_like(flaky)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    await ship(sender, Shipment(to_wire(two_sessions("b"))))

    by_key: dict[str, set[bytes]] = {}
    for r in stag.requests:
        by_key.setdefault(r.headers["idempotency-key"], set()).add(r.body)
    assert {key: len(bodies) for key, bodies in by_key.items()} == {
        spatial_event_id("b", "s"): 1,
        spatial_event_id("b", "t"): 1,
    }
    assert len(stag.requests) == 6
    assert sample(metrics, "relay_stag_requests_total", outcome="retry") == 4
    assert sample(metrics, "relay_events_sent_total") == 5


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b'{"success":false,"event_id":"%s","processed":3}', "success false"),
        (b'{"success":true,"event_id":"%s","processed":2}', "processed 2 for 3 items"),
        (b'{"success":true,"event_id":"another","processed":3}', 'event_id "another"'),
        (b'{"message":"ok","event_id":"%s","anchors_count":1,"meshes_count":1}', "anchors_count"),
    ],
)
async def test_a_200_that_contradicts_the_request_is_rejected_and_logged(
    nursery: trio.Nursery, answer: bytes, reason: str
) -> None:
    def contradict(body: dict[str, Any]) -> tuple[int, bytes]:
        return 200, answer.replace(b"%s", body["event_id"].encode())

    stag = await RawServer(stag_like(contradict)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    b = Batch("c", (event(0, "s"), event(1, "s"), event(2, "s")))  # 2 anchors, 1 mesh
    outcome = Outcome()
    with structlog.testing.capture_logs() as logs:
        await ship(sender, outcome.shipment(b))

    # Not retried: STAG answered, and what it answered is final.
    assert len(stag.requests) == 1
    sent_answer = answer.replace(b"%s", spatial_event_id("c", "s").encode()).decode()
    assert (outcome.delivered, outcome.rejected) == (0, [(200, sent_answer)])
    assert sample(metrics, "relay_stag_requests_total", outcome="rejected") == 1
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 0
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 3
    assert sample(metrics, "relay_events_sent_total") == 0
    assert sender.held_events() == 0
    [line] = [e for e in logs if e["event"] == "STAG answered 200 but contradicts the request"]
    assert line["log_level"] == "warning"
    assert (line["status"], line["answer"], line["events"]) == (200, sent_answer, 3)
    assert (line["batch_id"], line["session_id"]) == ("c", "s")
    assert line["event_id"] == spatial_event_id("c", "s")
    assert reason in line["reason"]


@pytest.mark.parametrize("answer", [b'{"status":"ok"}', b"OK", b"", b"[1,2]"])
async def test_a_200_saying_nothing_checkable_is_a_delivery(
    nursery: trio.Nursery, answer: bytes
) -> None:
    stag = await RawServer(stag_like(lambda body: (200, answer))).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    outcome = Outcome()
    await ship(sender, outcome.shipment(two_sessions("d")))
    assert (outcome.delivered, outcome.rejected) == (1, [])
    assert sample(metrics, "relay_events_sent_total") == 5


async def test_one_session_rejected_counts_each_sessions_events_exactly(
    nursery: trio.Nursery,
) -> None:
    def refuse_s(body: dict[str, Any]) -> tuple[int, bytes]:
        if body["session_id"] == "s":
            return 400, b'{"details":"EOF","error":"Validation error"}'
        return lower_stag(body)

    stag = await RawServer(stag_like(refuse_s)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    outcome = Outcome()
    with structlog.testing.capture_logs() as logs:
        await ship(sender, outcome.shipment(two_sessions("e")))

    # "s" was refused first, and "t" still went; the batch is refused once, after both.
    assert [json.loads(r.body)["session_id"] for r in stag.requests] == ["s", "t"]
    assert outcome.delivered == 0
    assert outcome.rejected == [(400, '{"details":"EOF","error":"Validation error"}')]
    assert sample(metrics, "relay_events_sent_total") == 2
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 3
    assert sample(metrics, "relay_stag_requests_total", outcome="success") == 1
    assert sample(metrics, "relay_stag_requests_total", outcome="rejected") == 1
    assert sample(metrics, "relay_batches_sent_total") == 0
    assert sender.status()["events_sent"] == 2
    assert sender.held_events() == 0
    [line] = [e for e in logs if e["event"] == "STAG rejected a spatial event"]
    assert (line["status"], line["session_id"], line["events"]) == (400, "s", 3)


async def test_spatial_event_404_is_a_misconfiguration_episode(
    nursery: trio.Nursery,
) -> None:
    requests = 0

    def moved(body: dict[str, Any]) -> tuple[int, bytes]:
        nonlocal requests
        requests += 1
        return (404, b"404 page not found") if requests <= 3 else lower_stag(body)

    stag = await RawServer(stag_like(moved)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    outcome = Outcome()
    with structlog.testing.capture_logs() as logs:
        await ship(sender, outcome.shipment(two_sessions("f")))
    assert (outcome.delivered, outcome.rejected) == (1, [])
    assert sample(metrics, "relay_stag_requests_total", outcome="misconfigured") == 3
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 0
    assert sample(metrics, "relay_events_sent_total") == 5
    assert state_lines(logs) == [(CONFIG_LOG, "error"), (CLEARED_LOG, "info")]
    [error] = [e for e in logs if e["event"] == CONFIG_LOG]
    assert error["url"] == stag.url + INGEST
    assert "stag.ingest_path" in error["fix"]
    assert sender.state() == "reachable"


async def test_spatial_event_413_splits_a_sessions_events(nursery: trio.Nursery) -> None:
    def at_most_two(body: dict[str, Any]) -> tuple[int, bytes]:
        if len(body["anchors"]) + len(body["meshes"]) > 2:
            return 413, b"request entity too large"
        return lower_stag(body)

    stag = await RawServer(stag_like(at_most_two)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    b = Batch("g", tuple(event(n, "s") for n in range(5)))
    outcome = Outcome()
    await ship(sender, outcome.shipment(b))

    bodies = [json.loads(r.body) for r in stag.requests]
    delivered = [body for body in bodies if len(body["anchors"]) + len(body["meshes"]) <= 2]
    assert [body["event_id"] for body in delivered] == [
        spatial_event_id("g.0", "s"),
        spatial_event_id("g.1.0", "s"),
        spatial_event_id("g.1.1", "s"),
    ]
    timestamps = [item["timestamp"] for body in delivered for item in body["anchors"]]
    timestamps += [item["timestamp"] for body in delivered for item in body["meshes"]]
    assert sorted(timestamps) == [e.timestamp for e in b.events]
    assert (outcome.delivered, outcome.rejected) == (1, [])
    assert sample(metrics, "relay_stag_requests_total", outcome="too_large") == 2
    assert sample(metrics, "relay_events_sent_total") == 5
    # The relay's batch, not the requests it was sent as.
    assert sample(metrics, "relay_batches_sent_total") == 1


async def test_a_batch_with_a_relay_delta_is_rejected_unsent(nursery: trio.Nursery) -> None:
    stag = await RawServer(stag_like(lower_stag)).start(nursery)
    metrics = RelayMetrics()
    sender = StagSender(spatial_config(stag.url), metrics, relay_id=RELAY_ID, version=VERSION)
    delta = MeshUpdate("anchor-456", True, base_event_id="s-e1", removed_faces="", added="")
    spooled = Batch("h", (event(0, "s"), Event("s-e3", "s", 3, 3, 3, "mesh", (), (delta,))))
    outcome = Outcome()
    with structlog.testing.capture_logs() as logs:
        await ship(sender, outcome.shipment(spooled), outcome.shipment(two_sessions("i")))

    assert [json.loads(r.body)["session_id"] for r in stag.requests] == ["s", "t"]
    assert outcome.delivered == 1
    [(status, answer)] = outcome.rejected
    assert status == 0
    assert answer.startswith("not sent: ") and "relay mesh delta" in answer
    assert sample(metrics, "relay_events_dropped_total", reason="rejected") == 2
    assert sample(metrics, "relay_events_sent_total") == 5
    assert sender.held_events() == 0
    [line] = [e for e in logs if e["event"].startswith("a batch the spatial-event format")]
    assert (line["log_level"], line["batch_id"], line["events"]) == ("error", "h", 2)
    assert "stag.format: batch" in line["fix"]


async def test_a_batch_handed_to_a_waiting_slot_is_always_counted_by_someone(
    server: StagServer, run_sender: Callable[[StagSender], Run]
) -> None:
    """Memory only, the batcher hands a batch straight to a slot that waits: until that
    slot runs, the outlet counts its events, then the sender, then they are sent. The
    relay's shutdown tally adds the two, so it never misses a batch in between."""
    sender = StagSender(config(server.url), RelayMetrics(), relay_id=RELAY_ID, version=VERSION)
    run = run_sender(sender)
    outlet = ToSender(run.send, Delivery(DeliveryConfig(), RelayMetrics()).ship)
    await trio.testing.wait_all_tasks_blocked()
    outlet.send_nowait(batch("b1", 0, 3))
    seen: list[tuple[int, int, int]] = []
    with trio.fail_after(GUARD):
        while True:
            counts = (outlet.held_events(), sender.held_events(), sender.status()["events_sent"])
            if not seen or seen[-1] != counts:
                seen.append(counts)
            assert sum(counts) == 3, seen
            if counts[2] == 3:
                break
            await trio.lowlevel.checkpoint()
    assert [held for held in seen if held[0]] == [(3, 0, 0)]
    assert (0, 3, 0) in seen
