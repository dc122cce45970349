"""server.workers: a supervisor and worker processes on one port, as operators run them."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest

from stag_relay.pipeline.spool import Spool
from tests.support.clients import pose_packet, stream_poses
from tests.support.relays import RelayProcess, http_get
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until
from tests.support.workerprocs import (
    connections_by_worker,
    gone,
    metric,
    open_on_both_workers,
    start_workers,
    status,
    stream_from_many,
)


@pytest.fixture
def workers(stag: StagServer) -> Iterator[RelayProcess]:
    relay = start_workers(stag)
    try:
        relay.wait_for_log("relay ready")
        yield relay
    finally:
        relay.kill()


def test_connections_land_on_both_workers_and_every_event_arrives_once(
    workers: RelayProcess, stag: StagServer
) -> None:
    port = workers.port()
    # The kernel hashes each connection to one worker: open them until both hold some.
    with ExitStack() as stack:
        held = len(open_on_both_workers(port, stack, "held"))
        by_worker = poll_until(partial(connections_by_worker, port, held))
        assert len(by_worker) == 2 and all(by_worker)
    stream_from_many(port, "flood", connections=8, packets=1000)
    expected = held + 8 * 1000
    stag.wait_for_events(expected)
    assert len(stag.events()) == len(set(stag.event_ids())) == expected
    # /metrics on whichever worker answers shows the whole relay.
    poll_until(lambda: metric(port, "relay_events_sent_total") == expected)
    assert (
        metric(
            port, "relay_packets_total", {"type": "pose", "status": "ok", "dialect": "streamkit"}
        )
        == expected
    )
    doc = status(port)
    assert doc["events"]["sent"] == expected
    assert doc["packets"]["pose"]["ok"] == expected
    assert doc["worker_restarts"] == 0
    # Each worker batches its half of the traffic in half batches (batch.max_size 50).
    assert max(len(batch["events"]) for batch in stag.batches()) == 25
    # One relay to STAG: every worker sends the same relay_id.
    assert len({batch["relay_id"] for batch in stag.batches()}) == 1

    workers.proc.send_signal(signal.SIGTERM)
    assert workers.wait(timeout=60) == 0
    summaries = [line for line in workers.lines if line.get("event") == "shutdown complete"]
    assert sorted(line["worker"] for line in summaries) == [0, 1]
    assert sum(line["events_read"] for line in summaries) == expected
    assert all(line["events_undelivered"] == 0 for line in summaries)
    assert "Traceback" not in "".join(workers.raw)


def test_a_killed_worker_is_replaced_and_the_relay_keeps_serving(
    workers: RelayProcess, stag: StagServer
) -> None:
    port = workers.port()
    before = status(port)["workers"]
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    workers.wait_for_log("worker exited unexpectedly; starting it again")

    def replaced() -> bool:
        pids = [w["pid"] for w in status(port)["workers"]]
        return len(pids) == 2 and victim not in pids

    poll_until(replaced)
    assert status(port)["worker_restarts"] == 1
    assert metric(port, "relay_worker_restarts_total") == 1
    # Both workers serve again: enough connections reach each of them.
    stream_from_many(port, "after", connections=10, packets=200)
    stag.wait_for_events(2000)
    assert len(set(stag.event_ids())) == 2000
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.wait(timeout=60) == 0


def test_health_is_503_while_any_worker_drains(stag: StagServer) -> None:
    # STAG refuses everything, so a draining worker holds its events until its
    # shutdown_timeout runs out: a window in which the other worker answers /health.
    stag.reject_all(503)
    relay = start_workers(stag, RELAY_SERVER_SHUTDOWN_TIMEOUT="5s", RELAY_BATCH_MAX_SIZE="1")
    try:
        with ExitStack() as stack:
            relay.wait_for_log("relay ready")
            port = relay.port()
            open_on_both_workers(port, stack, "stuck")
            assert http_get(port, "/health")[0] == 200
            draining = status(port)["workers"][1]["pid"]
            os.kill(draining, signal.SIGTERM)
            poll_until(lambda: http_get(port, "/health")[0] == 503)
            # The worker gives up after its timeout, counts what it dropped, and is replaced
            # (it was not the supervisor that stopped it); /health recovers with it.
            relay.wait_for_log("worker exited unexpectedly; starting it again")
            poll_until(lambda: http_get(port, "/health")[0] == 200)
            assert draining not in [w["pid"] for w in status(port)["workers"]]
            assert metric(port, "relay_events_dropped_total", {"reason": "shutdown"}) >= 1
    finally:
        relay.kill()


def test_a_port_in_use_fails_the_start_with_exit_1(stag: StagServer) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        relay = start_workers(stag, RELAY_SERVER_PORT=str(port))
        try:
            assert relay.wait(timeout=60) == 1
        finally:
            relay.kill()
    line = relay.wait_for_log("cannot listen")
    assert line["port"] == port
    assert "Traceback" not in "".join(relay.raw)


def test_changing_the_number_of_workers_loses_nothing_spooled(
    stag: StagServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    # STAG answers 503 for the whole first run: everything stays spooled. (Stopping the
    # stand-in would free its port for anything else on this machine to answer.)
    stag.reject_all(503)
    first = start_workers(
        stag, RELAY_DELIVERY_SPOOL_PATH=str(spool), RELAY_SERVER_SHUTDOWN_TIMEOUT="1s"
    )
    try:
        port = first.port()
        with ExitStack() as stack:
            clients = open_on_both_workers(port, stack, "kept")
            for n, ws in enumerate(clients, start=1):
                for frame in range(2, 101):
                    ws.send(pose_packet(f"kept-{n}", frame))
        sent = 100 * len(clients)
        # Everything spooled before the stop: the claim is about what the spool holds,
        # not about how much the drain's second can still commit.
        poll_until(lambda: (status(port)["spool"] or {}).get("events") == sent)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
    # Each worker kept its own file, and both hold batches.
    for index in (0, 1):
        held = Spool(spool.with_name(f"{spool.name}.{index}"))
        assert held.events > 0, "".join(first.raw)
        held.close()
    # One process now: it adopts both workers' files and delivers everything once.
    stag.reset()
    single = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            "RELAY_DELIVERY_SPOOL_PATH": str(spool),
        }
    )
    try:
        single.port()
        stag.wait_for_events(sent, timeout=120)
        single.proc.send_signal(signal.SIGTERM)
        assert single.wait(timeout=60) == 0
    finally:
        single.kill()
    assert len(stag.events()) == len(set(stag.event_ids())) == sent
    # The adopted files are gone: a later start does not send them again.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("spool.sqlite3.")] == []


def test_workers_do_not_outlive_a_killed_supervisor(workers: RelayProcess) -> None:
    port = workers.port()
    pids = [w["pid"] for w in status(port)["workers"]]
    # Every worker publishes its state before READY, so "relay ready" means all are listed.
    assert len(pids) == 2
    with open(f"/proc/{pids[0]}/environ", "rb") as environ:
        variables = dict(v.split(b"=", 1) for v in environ.read().split(b"\0") if b"=" in v)
    shared = Path(variables[b"STAG_RELAY_WORKER_DIR"].decode())
    assert shared.is_dir()
    workers.proc.kill()
    workers.proc.wait()
    poll_until(lambda: all(gone(pid) for pid in pids))
    # The last worker out removed the shared directory its supervisor could not.
    assert not shared.exists()
    # They drained like after SIGTERM, and let go of the port.
    assert sorted(
        line["worker"] for line in workers.lines if line.get("event") == "shutdown complete"
    ) == [0, 1]
    with socket.socket() as probe:
        # SO_REUSEADDR: the /status requests' TIME_WAIT does not count, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_a_hung_worker_is_killed_and_replaced(stag: StagServer) -> None:
    relay = start_workers(stag, RELAY_SERVER_WORKER_TIMEOUT="1s")
    try:
        relay.wait_for_log("relay ready")
        port = relay.port()
        hung = status(port)["workers"][0]["pid"]
        # A stopped process runs no event loop: exactly what a blocking call looks like.
        os.kill(hung, signal.SIGSTOP)
        line = relay.wait_for_log("worker stopped answering; killing it")
        assert line["pid"] == hung
        relay.wait_for_log("worker exited unexpectedly; starting it again")
        poll_until(lambda: hung not in [w["pid"] for w in status(port)["workers"]])
        poll_until(lambda: len(status(port)["workers"]) == 2)
        assert metric(port, "relay_worker_restarts_total") == 1
        stream_poses(port, "after-hang", 50)
        stag.wait_for_events(50)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=60) == 0
    finally:
        relay.kill()
