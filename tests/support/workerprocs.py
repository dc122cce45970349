"""Relays with worker processes (server.workers), run as operators run them, and what
their HTTP endpoints say, for the tests of the supervisor and its workers."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack
from functools import partial
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.clients import ClientConnection, connect_relay, pose_packet, stream_poses
from tests.support.relays import RelayProcess, http_get
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until


def start_workers(stag: StagServer, count: int = 2, **env: str) -> RelayProcess:
    return RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_SERVER_WORKERS": str(count),
            "RELAY_STAG_URL": stag.url,
            "RELAY_BATCH_MAX_SIZE": "50",
            **env,
        }
    )


def status(port: int) -> dict[str, Any]:
    code, _, body = http_get(port, "/status")
    assert code == 200
    result: dict[str, Any] = json.loads(body)
    return result


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    _, _, body = http_get(port, "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    raise AssertionError(f"{name}{labels or ''} not in /metrics")


def connections_by_worker(port: int, count: int) -> list[int] | None:
    """Each of the two workers' connections from /status once they add up to ``count``,
    else None. A worker's own figures are current, the other's up to a second old: only
    figures that account for every connection say which worker holds which."""
    listed = [w["connections"] for w in status(port)["workers"]]
    return listed if len(listed) == 2 and sum(listed) == count else None


def pose_packets_ok(port: int) -> int:
    return int(status(port)["packets"]["pose"]["ok"])


def open_on_both_workers(port: int, stack: ExitStack, prefix: str) -> list[ClientConnection]:
    """Open connections, each sending one packet (frame 1 of session prefix-n), until
    both workers hold some; returned once every packet is read, so each worker holds
    an event (STAG refusing, a drain then has something to wait for)."""
    before = pose_packets_ok(port)
    opened: list[ClientConnection] = []
    while len(opened) < 200:
        ws = stack.enter_context(connect_relay(port))
        opened.append(ws)
        ws.send(pose_packet(f"{prefix}-{len(opened)}", 1))
        if all(poll_until(partial(connections_by_worker, port, len(opened)))):
            poll_until(lambda: pose_packets_ok(port) == before + len(opened))
            return opened
    # The kernel hashes each connection to a worker: 2**-199 by chance.
    raise AssertionError("200 connections, all on one worker")


def stream_from_many(port: int, prefix: str, *, connections: int, packets: int) -> None:
    """``connections`` clients at once, each streaming ``packets`` poses as
    ``<prefix>-<n>``: new connections, so the kernel spreads them over the workers."""
    threads = [
        threading.Thread(target=stream_poses, args=(port, f"{prefix}-{n}", packets))
        for n in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for whoever inherited it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
