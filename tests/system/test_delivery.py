"""Delivery that loses nothing: acknowledgements, the spool, outages, crashes, restarts."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import structlog
import trio

from stag_relay.pipeline.delivery import DROP_LOG_INTERVAL
from stag_relay.service.relay import Relay
from tests.support.clients import connect_relay, pose_packet
from tests.support.delivery import AckingClient, dropped, frames_of, relay_env
from tests.support.relays import RelayProcess, http_get, make_config
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until, wait_until


async def test_without_a_spool_acks_follow_stag_acceptance(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = Relay(make_config(stag.url, batch={"max_size": 10}))
    await nursery.start(relay.run)

    def converse() -> AckingClient:
        client = AckingClient(relay.ports[0], "acked")
        client.send(range(1, 51))
        client.ws.send("not json")  # invalid: an error reply, never an ack
        client.wait_acked(set(range(1, 51)))
        # Everything acknowledged had reached STAG first.
        assert set(frames_of(stag, "acked")) >= client.acked
        # One ack frame per batch per connection, not one per packet.
        assert client.ack_frames <= len(stag.batches())
        # Resent after a "reconnect": duplicates are acknowledged too.
        client.send([3, 4, 5])
        client.send([51])
        client.wait_acked({51})
        client.close()
        return client

    client = await trio.to_thread.run_sync(converse)
    assert client.acked == set(range(1, 52))
    assert [e["code"] for e in client.errors] == ["invalid_packet"]
    assert sorted(frames_of(stag, "acked")) == list(range(1, 52))


async def test_with_a_spool_acks_come_once_committed_before_stag_has_them(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    relay = Relay(make_config(stag.url, batch={"max_size": 5}, delivery={"spool_path": str(spool)}))
    await nursery.start(relay.run)
    stag.pause()

    def converse() -> None:
        client = AckingClient(relay.ports[0], "durable")
        client.send(range(1, 41))
        client.wait_acked(set(range(1, 41)))
        assert stag.events() == []  # durable on disk, STAG has nothing yet
        client.close()

    await trio.to_thread.run_sync(converse)
    stag.resume()
    await trio.to_thread.run_sync(stag.wait_for_events, 40)
    assert sorted(frames_of(stag, "durable")) == list(range(1, 41))


async def test_outage_refused_then_503_then_back_loses_nothing_and_keeps_order(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = Relay(
        make_config(stag.url, batch={"max_size": 10, "timeout": 0.01}, stag={"max_in_flight": 1})
    )
    await nursery.start(relay.run)

    def stream_through_outage() -> None:
        with connect_relay(relay.ports[0]) as ws:
            for frame in range(1, 601):
                if frame == 150:
                    stag.stop()  # connection refused
                if frame == 300:
                    stag.start()  # back on the same port, but answering 503 for a while
                    stag.fail_for(503, 1.0)
                ws.send(pose_packet("ordered", frame))

    await trio.to_thread.run_sync(stream_through_outage)
    await trio.to_thread.run_sync(stag.wait_for_events, 600, 120.0)
    assert frames_of(stag, "ordered") == list(range(1, 601))
    statuses = {r.status for r in stag.requests()}
    assert 503 in statuses
    assert relay.sender.status()["consecutive_failures"] == 0


# Small enough that a few hundred pose packets fill it while STAG holds every request.
SMALL_SPOOL = 20_000


async def start_with_small_spool(
    nursery: trio.Nursery, server: StagServer, tmp_path: Path, **sections: dict[str, Any]
) -> Relay:
    """A relay whose spool fills up: batches of 5, STAG paused (resume it to drain)."""
    delivery: dict[str, Any] = {
        "spool_path": str(tmp_path / "s.sqlite3"),
        "spool_max_bytes": SMALL_SPOOL,
    }
    delivery.update(sections.pop("delivery", {}))
    relay = Relay(make_config(server.url, batch={"max_size": 5}, delivery=delivery, **sections))
    await nursery.start(relay.run)
    server.pause()
    return relay


async def test_full_spool_with_block_slows_clients_and_loses_nothing(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path
) -> None:
    relay = await start_with_small_spool(nursery, stag, tmp_path, websocket={"buffer_size": 5})
    total = 400
    done = trio.Event()

    def send_all() -> None:
        with connect_relay(relay.ports[0]) as ws:
            for frame in range(1, total + 1):
                ws.send(pose_packet("full", frame))

    async def sender() -> None:
        await trio.to_thread.run_sync(send_all)
        done.set()

    nursery.start_soon(sender)
    # The spool fills up and the relay stops reading: the connection waits on a full channel.
    await wait_until(lambda: any(c.blocked for c in relay.gate.connections))
    spool = relay.delivery.spool
    assert spool is not None
    assert spool.bytes <= SMALL_SPOOL + 2_000  # one batch may overshoot the bound
    assert relay.gate.events_in < total
    stag.resume()
    await done.wait()
    await trio.to_thread.run_sync(stag.wait_for_events, total, 120.0)
    assert sorted(frames_of(stag, "full")) == list(range(1, total + 1))
    assert dropped(relay, "spool_full") == 0


async def test_full_spool_with_drop_oldest_counts_exactly_what_it_drops(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path
) -> None:
    relay = await start_with_small_spool(
        nursery, stag, tmp_path, stag={"max_in_flight": 1}, delivery={"when_full": "drop_oldest"}
    )
    total = 1000

    def send_all() -> None:
        client = AckingClient(relay.ports[0], "lossy")
        client.send(range(1, total + 1))
        client.wait_acked(set(range(1, total + 1)))
        client.close()

    started = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        await trio.to_thread.run_sync(send_all)
    dropping = trio.current_time() - started
    stag.resume()
    lost = dropped(relay, "spool_full")
    assert lost is not None and lost > 0
    # Every new batch pushed an old one out: a line per drop would flood the log.
    drop_lines = [e for e in logs if e["event"].startswith("spool full")]
    assert 1 <= len(drop_lines) <= 1 + dropping // DROP_LOG_INTERVAL
    assert (drop_lines[0]["batches"], drop_lines[0]["events"]) > (0, 0)
    await trio.to_thread.run_sync(stag.wait_for_events, total - int(lost), 120.0)
    # Settled: the spool is empty, and what arrived plus what was dropped is all.
    await wait_until(lambda: relay.delivery.spool is not None and not relay.delivery.spool.batches)
    delivered = frames_of(stag, "lossy")
    assert len(delivered) == len(set(delivered))
    assert len(delivered) + lost == total
    # The oldest went first: what survived is the newest.
    assert max(delivered) == total


def test_kill_9_mid_stream_loses_nothing_acknowledged(stag: StagServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    first = RelayProcess(relay_env(stag, spool))
    try:
        client = AckingClient(first.port(), "crash")
        client.send(range(1, 201))
        client.wait_acked(set(range(1, 201)))
        stag.pause()  # from here on batches stay in the spool
        client.send(range(201, 401))
        client.wait_acked(set(range(201, 301)))
        first.proc.kill()  # SIGKILL: no shutdown sequence at all
        assert first.wait() == -signal.SIGKILL
        sent_up_to = 400
        acked = set(client.acked)
        client.close()
    finally:
        first.kill()
    stag.resume()
    second = RelayProcess(relay_env(stag, spool))
    try:
        resender = AckingClient(second.port(), "crash")
        # The client's rule: resend whatever was not acknowledged.
        unacked = [n for n in range(1, sent_up_to + 1) if n not in acked]
        resender.send(unacked)
        resender.wait_acked(set(unacked))
        stag.wait_for_events(1, timeout=60)
        delivered_ids: dict[int, set[str]] = {}

        def all_arrived() -> bool:
            delivered_ids.clear()
            for event in stag.events():
                delivered_ids.setdefault(event["frame_number"], set()).add(event["event_id"])
            return set(delivered_ids) >= set(range(1, sent_up_to + 1))

        stag._wait(all_arrived, 60, "every frame")
        resender.close()
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        second.kill()
    # Duplicates are allowed only with the same event_id.
    assert all(len(ids) == 1 for ids in delivered_ids.values())
    assert acked <= set(delivered_ids)


def test_sigterm_with_a_spool_keeps_what_stag_did_not_take_for_the_next_start(
    stag: StagServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    stag.stop()  # STAG is down for the whole first run
    first = RelayProcess(relay_env(stag, spool, RELAY_SERVER_SHUTDOWN_TIMEOUT="1s"))
    try:
        port = first.port()
        threads = []
        for n in range(4):

            def stream(session: str = f"flood-{n}") -> None:
                with connect_relay(port) as ws:
                    for frame in range(1, 1001):
                        ws.send(pose_packet(session, frame))

            threads.append(threading.Thread(target=stream))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait() == 0
        summary = first.wait_for_log("shutdown complete")
    finally:
        first.kill()
    assert summary["events_read"] == 4000
    assert summary["events_undelivered"] == 0
    assert summary["events_left_in_spool"] > 0
    stag.start()
    second = RelayProcess(relay_env(stag, spool))
    try:
        second.port()
        stag.wait_for_events(4000, timeout=120)
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        second.kill()
    assert len(set(stag.event_ids())) == 4000


def test_a_corrupt_spool_is_set_aside_and_the_relay_starts(
    stag: StagServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    spool.write_bytes(b"\x00garbage" * 1000)
    relay = RelayProcess(relay_env(stag, spool))
    try:
        relay.port()
        line = relay.wait_for_log(
            "spool file is corrupt or not ours; moved it aside and started a fresh spool"
        )
        assert line["spool"] == str(spool)
        moved = Path(line["moved_to"])
        assert moved.exists() and moved.read_bytes().startswith(b"\x00garbage")
        with connect_relay(relay.port()) as ws:
            ws.send(pose_packet("after-corruption", 1))
        stag.wait_for_events(1)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


def test_dead_letters_can_be_listed_and_requeued(stag: StagServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    spool = tmp_path / "spool.sqlite3"
    stag.reject_all(422, body=b'{"error": "unknown anchor"}')
    relay = RelayProcess(relay_env(stag, spool, RELAY_BATCH_MAX_SIZE="5"))
    try:
        port = relay.port()
        with connect_relay(port) as ws:
            for frame in range(1, 11):
                ws.send(pose_packet("refused", frame))

        def refused() -> int:
            status = json.loads(http_get(port, "/status")[2])
            return int(status["events"]["dropped"]["rejected"])

        # Both batches refused (a count of requests could include a resend on a
        # kept-alive connection the stand-in had closed).
        poll_until(lambda: refused() == 10)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()

    def spool_cmd(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "stag_relay", "spool", *args, "--spool", str(spool), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout

    dead = json.loads(spool_cmd("list-dead"))
    assert sum(d["count"] for d in dead) == 10
    assert {d["status"] for d in dead} == {422}
    assert "unknown anchor" in dead[0]["answer"]
    assert json.loads(spool_cmd("stats"))["dead_letters"] == len(dead)
    assert json.loads(spool_cmd("requeue-dead")) == {"requeued": len(dead)}
    stag.reset()
    again = RelayProcess(relay_env(stag, spool))
    try:
        again.port()
        stag.wait_for_events(10)
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait() == 0
    finally:
        again.kill()
    assert sorted(frames_of(stag, "refused")) == list(range(1, 11))
