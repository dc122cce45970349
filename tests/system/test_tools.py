"""The tools beside the relay: loadgen and sink against real relays, demo end to end."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import httpx
import orjson
import pytest
import trio

from stag_relay.service.relay import Relay
from stag_relay.tools.loadgen import LoadGenerator, LoadSettings, LoadSummary
from stag_relay.tools.sink import FailurePlan, Sink, SinkSettings
from tests.support.relays import make_config
from tests.support.stag_server import StagServer
from tests.support.waiting import wait_until


async def run_loadgen(**settings: object) -> LoadSummary:
    """The asyncio load generator in a worker thread, so the trio test keeps serving."""
    load = LoadSettings(**settings)  # type: ignore[arg-type]
    return await trio.to_thread.run_sync(lambda: asyncio.run(LoadGenerator(load).run()))


def ws_url(relay: Relay) -> str:
    return f"ws://127.0.0.1:{relay.ports[0]}/ws/streamkit"


async def start_sink(nursery: trio.Nursery, **settings: object) -> Sink:
    sink = Sink(SinkSettings(port=0, **settings))  # type: ignore[arg-type]
    await nursery.start(sink.run)
    return sink


async def test_loadgen_floods_a_relay_and_everything_arrives(
    relay: Relay, stag: StagServer
) -> None:
    summary = await run_loadgen(url=ws_url(relay), connections=3, rate=0, count=200, duration=None)
    assert (summary.connected, summary.pose_sent, summary.errors) == (3, 600, 0)
    assert summary.ok
    events = await trio.to_thread.run_sync(stag.wait_for_events, 600)
    assert len({e["event_id"] for e in events}) == 600
    assert len({e["session_id"] for e in events}) == 3


async def test_loadgen_paced_with_acks_waits_until_everything_is_acknowledged(
    relay: Relay, stag: StagServer
) -> None:
    summary = await run_loadgen(
        url=ws_url(relay), connections=2, rate=200, count=50, duration=None, ack=True
    )
    assert summary.pose_sent == 100
    assert summary.acked_frames == 100
    assert summary.ack_frames >= 1
    assert summary.unanswered == 0
    assert len(stag.events()) == 100


async def test_loadgen_counts_the_relays_refusals(relay: Relay) -> None:
    # A session id over 128 characters: every packet is refused with an error reply.
    summary = await run_loadgen(
        url=ws_url(relay),
        connections=1,
        rate=0,
        count=20,
        duration=None,
        ack=True,
        session_prefix="s" * 130,
    )
    assert summary.errors == 20
    assert summary.unanswered == 0
    assert summary.error_samples and "$.session_id" in summary.error_samples[0]
    assert not summary.ok


async def test_loadgen_reports_connections_it_could_not_open() -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        summary = await run_loadgen(
            url=f"ws://127.0.0.1:{port}/ws/streamkit", connections=2, count=1, duration=None
        )
    assert (summary.connected, summary.connect_failures, summary.sent) == (0, 2, 0)
    assert summary.connect_errors


class BackgroundLoad:
    """A load generator in a worker thread that the test can stop (as Ctrl-C would)."""

    def __init__(self, settings: LoadSettings) -> None:
        self.gen = LoadGenerator(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.summary: LoadSummary | None = None

    def run(self) -> None:
        async def main() -> LoadSummary:
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            return await self.gen.run()

        self.summary = asyncio.run(main())

    def stop(self) -> None:
        self._ready.wait()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.gen.stop)


async def test_loadgen_holds_quiet_connections_open_until_stopped(relay: Relay) -> None:
    load = BackgroundLoad(LoadSettings(url=ws_url(relay), connections=5, count=0, duration=None))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, load.run)
        await wait_until(lambda: len(relay.gate.connections) == 5)
        load.stop()
    assert load.summary is not None
    assert (load.summary.connected, load.summary.sent) == (5, 0)
    assert load.summary.ok
    await wait_until(lambda: not relay.gate.connections)


async def test_relay_delivers_to_the_sink(nursery: trio.Nursery) -> None:
    sink = await start_sink(nursery)
    relay = Relay(make_config(sink.url, batch={"max_size": 10, "timeout": 0.01}))
    await nursery.start(relay.run)
    summary = await run_loadgen(url=ws_url(relay), connections=2, rate=0, count=100, duration=None)
    assert summary.sent == 200
    await wait_until(lambda: sink.ledger.events == 200)
    stats = sink.ledger.summary()
    assert stats["batch_size"]["max"] <= 10
    assert stats["latency_ms"]["count"] == 200
    assert stats["events_by_type"] == {"pose": 200}
    assert stats["duplicate_batches"] == 0


async def test_relay_rides_out_a_failing_sink(nursery: trio.Nursery) -> None:
    sink = await start_sink(nursery, failures=(FailurePlan(503),))
    relay = Relay(make_config(sink.url, batch={"max_size": 5}))
    await nursery.start(relay.run)
    summary = await run_loadgen(url=ws_url(relay), connections=1, rate=0, count=50, duration=None)
    await wait_until(lambda: sink.ledger.failed_requests >= 3)
    assert sink.ledger.events == 0
    # STAG is back.
    sink.ledger.failures = ()
    await wait_until(lambda: sink.ledger.events == summary.sent)
    assert (sink.ledger.events, sink.ledger.duplicate_batches) == (50, 0)


async def test_sink_speaks_http_like_stag(nursery: trio.Nursery) -> None:
    sink = await start_sink(nursery, api_key="secret")
    body = orjson.dumps(
        {
            "batch_id": "b-1",
            "relay_id": "r",
            "timestamp": 1,
            "count": 1,
            "events": [{"event_id": "e", "type": "pose", "timestamp": 1, "received_at": 1}],
        }
    )
    headers = {"X-API-Key": "secret", "Idempotency-Key": "b-1"}
    async with httpx.AsyncClient(base_url=sink.url) as client:
        answer = await client.post("/ingest", content=body, headers=headers)
        assert (answer.status_code, answer.json()) == (200, {"status": "ok", "accepted": 1})
        again = await client.post("/ingest", content=body, headers=headers)
        assert again.json()["accepted"] == 0
        refused = await client.post("/ingest", content=body, headers={"Idempotency-Key": "x"})
        assert refused.status_code == 401
        bad = await client.post("/ingest", content=b"{", headers=headers)
        assert bad.status_code == 400
        assert (await client.get("/ingest")).status_code == 405
        assert (await client.get("/nowhere")).status_code == 404
        stats = (await client.get("/stats")).json()
    assert (stats["events"], stats["batches"], stats["duplicate_batches"]) == (1, 1, 1)
    assert stats["bad_requests"] == 1


async def test_sink_fails_on_schedule_then_recovers(nursery: trio.Nursery) -> None:
    forever = await start_sink(nursery, failures=(FailurePlan(503, retry_after="1"),))
    brief = await start_sink(nursery, failures=(FailurePlan(502, duration=0.2),))
    body = orjson.dumps({"batch_id": "b", "events": [{"type": "pose", "timestamp": 1}]})
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{forever.url}/ingest", content=body)
        assert (answer.status_code, answer.headers["retry-after"]) == (503, "1")
        statuses: list[int] = []

        async def post_until_accepted() -> None:
            while not statuses or statuses[-1] != 200:
                statuses.append(
                    (await client.post(f"{brief.url}/ingest", content=body)).status_code
                )
                await trio.sleep(0.05)

        with trio.fail_after(30):
            await post_until_accepted()
    assert set(statuses) <= {502, 200}
    assert brief.ledger.events == 1
    assert brief.ledger.failed_requests == len(statuses) - 1
    assert forever.ledger.events == 0


async def test_sink_command_line_writes_its_summary() -> None:
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "stag_relay.tools.sink",
            "--port",
            "0",
            "--duration",
            "0.1s",
            "--json",
            "-",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    summary = orjson.loads(result.stdout)
    assert summary["events"] == 0
    assert b"sink listening on http://127.0.0.1:" in result.stderr


@pytest.mark.parametrize(
    ("dialect", "stag_format"), [("streamkit", "batch"), ("sdk", "spatial-event")]
)
async def test_demo_runs_the_whole_pipeline_and_ends_by_itself(
    dialect: str, stag_format: str
) -> None:
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "stag_relay.tools.demo",
            "--duration",
            "0.5s",
            "--connections",
            "2",
            "--rate",
            "20",
            "--dialect",
            dialect,
            "--format",
            stag_format,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, output + result.stderr.decode()
    assert "packets in (relay)" in output
    assert "every one of the" in output
