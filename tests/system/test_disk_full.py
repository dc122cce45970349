"""A full or failing disk under the spool is a full spool, never a crash: clients are
slowed (or the oldest batches dropped, counted), and everything acknowledged arrives."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import trio

from stag_relay.service.relay import Relay
from tests.support.delivery import AckingClient, dropped, frames_of, relay_env
from tests.support.relays import RelayProcess, http_get, make_config
from tests.support.smalldisk import small_file_system
from tests.support.stag_server import StagServer
from tests.support.waiting import wait_until

CLIENTS = 10
# The spool file may grow to this many pages (4 KiB): a few hundred pose events.
MAX_PAGES = 60


def sample(relay: Relay, name: str) -> float | None:
    return relay.metrics.registry.get_sample_value(name)


class Streamers:
    """``CLIENTS`` acknowledging clients, each sending ``frames`` from its own thread
    (a send blocks while the relay does not read: backpressure)."""

    def __init__(self, port: int, prefix: str, frames: int) -> None:
        self.frames = frames
        self.clients = [AckingClient(port, f"{prefix}-{n}") for n in range(CLIENTS)]
        self.threads = [
            threading.Thread(target=c.send, args=(range(1, frames + 1),), daemon=True)
            for c in self.clients
        ]
        for thread in self.threads:
            thread.start()

    def all_open(self) -> bool:
        return all(c.ws.close_code is None for c in self.clients)

    def finish(self) -> None:
        """Wait until every client has sent everything and had it all acknowledged."""
        for thread in self.threads:
            thread.join(120)
            assert not thread.is_alive(), "a client could not send everything"
        for client in self.clients:
            client.wait_acked(set(range(1, self.frames + 1)), timeout=120)
            assert client.errors == []
        assert self.all_open(), "a slowed client was closed"
        for client in self.clients:
            client.close()


async def start_on_a_full_disk(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path, when_full: str
) -> Relay:
    config = make_config(
        stag.url,
        batch={"max_size": 5},
        websocket={"buffer_size": 5},
        delivery={"spool_path": str(tmp_path / "s.sqlite3"), "when_full": when_full},
    )
    relay = Relay(config)
    await nursery.start(relay.run)
    assert relay.delivery.spool is not None
    # SQLite refuses to grow the file past this: SQLITE_FULL, as on a full disk.
    relay.delivery.spool.set_max_pages(MAX_PAGES)
    stag.stop()  # STAG is down: everything stays in the spool
    return relay


async def test_full_disk_with_block_slows_clients_and_delivers_everything_acknowledged(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path
) -> None:
    relay = await start_on_a_full_disk(nursery, stag, tmp_path, "block")
    frames = 200
    streamers = await trio.to_thread.run_sync(Streamers, relay.ports[0], "block", frames)
    # The disk fills, commits fail and the relay stops reading: clients wait, still open.
    await wait_until(lambda: sample(relay, "relay_spool_disk_full") == 1)
    await wait_until(lambda: any(c.blocked for c in relay.gate.connections))
    assert relay.gate.events_in < CLIENTS * frames
    assert len(relay.gate.connections) == CLIENTS
    assert streamers.all_open()
    status, _, _ = await trio.to_thread.run_sync(http_get, relay.ports[0], "/health")
    assert status == 200
    # The metric counts episodes, not failed attempts: retries do not add to it.
    assert sample(relay, "relay_spool_disk_full_episodes_total") == 1
    stag.start()
    await trio.to_thread.run_sync(streamers.finish)
    await trio.to_thread.run_sync(stag.wait_for_events, CLIENTS * frames, 120.0)
    for client in streamers.clients:
        assert sorted(frames_of(stag, client.session_id)) == list(range(1, frames + 1))
    assert dropped(relay, "spool_full") == 0
    # Deliveries freed the room: the episode ends by itself.
    await wait_until(lambda: sample(relay, "relay_spool_disk_full") == 0)


async def test_full_disk_with_drop_oldest_counts_exactly_what_it_drops(
    nursery: trio.Nursery, stag: StagServer, tmp_path: Path
) -> None:
    relay = await start_on_a_full_disk(nursery, stag, tmp_path, "drop_oldest")
    frames = 200
    streamers = await trio.to_thread.run_sync(Streamers, relay.ports[0], "drop", frames)
    # Dropping makes the room: every packet is committed and acknowledged, STAG down.
    await trio.to_thread.run_sync(streamers.finish)
    lost = dropped(relay, "spool_full")
    assert lost is not None and lost > 0
    assert sample(relay, "relay_spool_disk_full_episodes_total") == 1
    stag.start()
    total = CLIENTS * frames
    await trio.to_thread.run_sync(stag.wait_for_events, total - int(lost), 120.0)
    await wait_until(lambda: relay.delivery.spool is not None and not relay.delivery.spool.batches)
    delivered = [frames_of(stag, c.session_id) for c in streamers.clients]
    assert all(len(d) == len(set(d)) for d in delivered)
    assert sum(map(len, delivered)) + lost == total


def spool_stats(spool: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "stag_relay", "spool", "stats", "--spool", str(spool), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats: dict[str, Any] = json.loads(result.stdout)
    return stats


def test_a_small_file_system_fills_and_the_relay_carries_on(
    stag: StagServer, tmp_path: Path
) -> None:
    """A real full disk (ENOSPC): a 3 MiB tmpfs under a spool allowed 1 GiB."""
    with small_file_system(tmp_path / "disk", 3 * 1024**2) as disk:
        spool = disk / "spool.sqlite3"
        stag.stop()
        relay = RelayProcess(
            relay_env(stag, spool, RELAY_BATCH_MAX_SIZE="5", RELAY_WEBSOCKET_BUFFER_SIZE="5")
        )
        try:
            warning = relay.wait_for_log(
                "the spool's file system has less free space than delivery.spool_max_bytes; "
                "when it fills, the spool is full (delivery.when_full applies) before "
                "delivery.spool_max_bytes is reached"
            )
            assert warning["spool_max_bytes"] == 1024**3
            assert warning["free_bytes"] < 3 * 1024**2
            assert "delivery.spool_max_bytes" in warning["fix"]
            frames = 1500
            streamers = Streamers(relay.port(), "real", frames)
            full = relay.wait_for_log(
                "spool's disk is full or failing: the spool is full until deliveries free room"
            )
            assert full["spool"] == str(spool) and full["free_bytes"] < 256 * 1024
            assert relay.proc.poll() is None
            assert streamers.all_open()
            stag.start()
            streamers.finish()
            relay.wait_for_log("spool's disk takes writes again")
            stag.wait_for_events(CLIENTS * frames, timeout=120)
            for client in streamers.clients:
                assert sorted(set(frames_of(stag, client.session_id))) == list(range(1, frames + 1))
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.wait() == 0
            summary = relay.wait_for_log("shutdown complete")
        finally:
            relay.kill()
        assert summary["events_left_in_spool"] == spool_stats(spool)["events"]
        assert [line for line in relay.lines if line.get("event") == full["event"]] == [full]


def test_the_shutdown_summary_counts_what_the_spool_holds(stag: StagServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    stag.stop()  # nothing is delivered: everything read stays spooled
    relay = RelayProcess(relay_env(stag, spool, RELAY_SERVER_SHUTDOWN_TIMEOUT="1s"))
    try:
        streamers = Streamers(relay.port(), "kept", 300)
        streamers.finish()
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
        summary = relay.wait_for_log("shutdown complete")
    finally:
        relay.kill()
    stats = spool_stats(spool)
    assert summary["events_left_in_spool"] == stats["events"] == CLIENTS * 300
    assert summary["events_undelivered"] == 0
