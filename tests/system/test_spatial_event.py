"""A spatial-event relay: seed and SDK clients in, the public STAGs' SpatialEvents out.

What arrives is checked against what both STAGs' Go types and gin bindings take
(tabularxr/stag and tabularxr/Stag, pkg/api/types.go): every pose exactly once as an
anchor, meshes full with the client's buffers, integers as JSON integers.
"""

from __future__ import annotations

import base64
import functools
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from stag_relay.service.relay import Relay
from stag_relay.tools.sink import SpatialEventFormat
from tests.support.clients import connect_relay, mesh_packet, pose_packet
from tests.support.meshes import scan_step
from tests.support.relays import RelayProcess, make_config
from tests.support.sdk import (
    ANCHOR_ID,
    ANCHOR_UPDATE,
    MESH_ID,
    MESH_UPDATE_DELTA,
    MESH_UPDATE_FULL,
    MESH_V1_VERTICES_GZ,
    POSE_UNIX_SECONDS,
    SESSION_ID,
)
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until

INGEST = "/api/v1/ingest"
SESSIONS = ("ios-1", "ios-2")
POSES = 300
MESHES = 4
BASE_MS = 1_765_000_000_000


def _is_int(value: Any) -> bool:
    return type(value) is int


def _check_bindings(event: dict[str, Any]) -> None:
    assert type(event["session_id"]) is str and event["session_id"]
    assert type(event["event_id"]) is str and event["event_id"]
    assert _is_int(event["timestamp"]) and event["timestamp"] != 0
    for anchor in event["anchors"]:
        assert type(anchor["id"]) is str and anchor["id"]
        assert anchor["session_id"] == event["session_id"]
        assert _is_int(anchor["timestamp"]) and anchor["timestamp"] != 0
        assert set(anchor["pose"]) == {"x", "y", "z", "rotation"}
        assert len(anchor["pose"]["rotation"]) == 4
    for mesh in event["meshes"]:
        assert type(mesh["id"]) is str and mesh["id"]
        assert type(mesh["anchor_id"]) is str and mesh["anchor_id"]
        assert _is_int(mesh["timestamp"]) and mesh["timestamp"] != 0
        assert _is_int(mesh["compression_level"]) and 0 <= mesh["compression_level"] <= 9


def test_seed_clients_arrive_as_spatial_events_once_each(tmp_path: Path) -> None:
    # A configuration file of its own: run from the repository, the relay would read its
    # relay.yaml, which names stag.ingest_path (/ingest) and so keeps it for any format.
    config = tmp_path / "relay.yaml"
    config.write_text("{}\n")
    # The sink as the public STAGs: their bindings enforced (400 otherwise), answered
    # as tabularxr/stag answers. A short outage first: retries must not duplicate.
    with StagServer(ingest_path=INGEST, wire_format=SpatialEventFormat()) as stag:
        stag.fail_next(503, times=3)
        relay = RelayProcess(
            {
                "RELAY_CONFIG": str(config),
                "RELAY_SERVER_HOST": "127.0.0.1",
                "RELAY_SERVER_PORT": "0",
                "RELAY_STAG_URL": stag.url,
                "RELAY_STAG_FORMAT": "spatial-event",
                "RELAY_STAG_RETRY_INITIAL": "0.01",
                "RELAY_STAG_RETRY_MAX": "0.2",
            }
        )
        try:
            port = relay.port()
            scans = [scan_step(cols) for cols in range(12, 12 + MESHES)]

            def taken() -> list[dict[str, Any]]:
                return [r.json for r in stag.requests() if r.status == 200]

            def meshes_arrived(session: str, count: int) -> bool:
                meshes = sum(len(e["meshes"]) for e in taken() if e["session_id"] == session)
                return meshes >= count

            def stream(session: str) -> None:
                with connect_relay(port) as ws:
                    for frame in range(1, POSES + 1):
                        timestamp = BASE_MS + frame
                        ws.send(pose_packet(session, frame, timestamp=timestamp, x=frame / 10))
                    for n, vertices in enumerate(scans, start=1):
                        frame = POSES + n
                        ws.send(
                            mesh_packet(
                                session,
                                frame,
                                anchor_id="room",
                                vertices=vertices,
                                timestamp=BASE_MS + frame,
                            )
                        )
                        # One at a time, each taken before the next: in the batch format
                        # every later one would go as a delta of the one before.
                        poll_until(functools.partial(meshes_arrived, session, n), limit=120)

            clients = [threading.Thread(target=stream, args=(s,), daemon=True) for s in SESSIONS]
            for client in clients:
                client.start()
            for client in clients:
                client.join(120)
                assert not client.is_alive()

            stag.wait_for_events(len(SESSIONS) * (POSES + MESHES), timeout=120)
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.wait() == 0
        finally:
            relay.kill()

        requests = stag.requests()
        events = taken()
        assert events == stag.batches()

    assert [r.status for r in requests[:3]] == [503, 503, 503]
    assert {r.path for r in requests} == {INGEST}
    for request in requests:
        # One session per request; its event id is the Idempotency-Key.
        assert request.idempotency_key == request.json["event_id"]
    # Each request taken once: an event id is never taken twice.
    assert len({e["event_id"] for e in events}) == len(events)
    for event in events:
        _check_bindings(event)

    poses = Counter(
        (event["session_id"], anchor["timestamp"])
        for event in events
        for anchor in event["anchors"]
    )
    assert poses == Counter(
        (session, BASE_MS + frame) for session in SESSIONS for frame in range(1, POSES + 1)
    )
    for event in events:
        for anchor in event["anchors"]:
            frame = anchor["timestamp"] - BASE_MS
            assert anchor["pose"] == {
                "x": frame / 10,
                "y": 2.0,
                "z": 3.0,
                "rotation": [0.0, 0.0, 0.0, 1.0],
            }
    # One anchor id per session (the seed dialect's), different between sessions.
    anchor_ids: dict[str, set[str]] = {}
    for event in events:
        anchor_ids.setdefault(event["session_id"], set()).update(a["id"] for a in event["anchors"])
    assert all(len(ids) == 1 for ids in anchor_ids.values())
    assert len(set.union(*anchor_ids.values())) == len(SESSIONS)

    # Meshes go full, with the client's Draco buffer untouched: no relay deltas here.
    meshes = [(event["session_id"], mesh) for event in events for mesh in event["meshes"]]
    assert sorted((session, mesh["timestamp"]) for session, mesh in meshes) == sorted(
        (session, BASE_MS + n) for session in SESSIONS for n in range(POSES + 1, POSES + 1 + MESHES)
    )
    for _, mesh in meshes:
        assert mesh["is_delta"] is False
        assert mesh["vertices"] == scans[mesh["timestamp"] - BASE_MS - POSES - 1]
        assert mesh["anchor_id"] == "room"


async def test_the_sdks_updates_arrive_as_spatial_events(nursery: trio.Nursery) -> None:
    with StagServer(ingest_path=INGEST, wire_format=SpatialEventFormat()) as stag:
        config = make_config(
            stag.url, stag={"format": "spatial-event", "ingest_path": INGEST}, batch={"max_size": 1}
        )
        relay = Relay(config)
        await nursery.start(relay.run)

        def talk() -> None:
            with connect_relay(relay.ports[0], f"/api/v1/ws?session_id={SESSION_ID}") as ws:
                for message in (ANCHOR_UPDATE, MESH_UPDATE_FULL, MESH_UPDATE_DELTA):
                    ws.send(message)

        await trio.to_thread.run_sync(talk)
        await trio.to_thread.run_sync(stag.wait_for_events, 3, 30.0)
        events = stag.batches()

    for event in events:
        _check_bindings(event)
    [anchor] = [a for e in events for a in e["anchors"]]
    assert anchor["id"] == ANCHOR_ID
    assert anchor["session_id"] == SESSION_ID
    # The SDK's seconds since 2001-01-01, in Unix milliseconds.
    assert anchor["timestamp"] == round(POSE_UNIX_SECONDS * 1000)
    meshes = [m for e in events for m in e["meshes"]]
    [full] = [m for m in meshes if not m["is_delta"]]
    [delta] = [m for m in meshes if m["is_delta"]]
    # Decoded in a worker only to check it; STAG gets the SDK's buffer as it was.
    assert full["id"] == MESH_ID
    assert base64.b64decode(full["vertices"]) == MESH_V1_VERTICES_GZ
    assert "delta_data" not in full
    # The SDK's own delta, never decoded.
    assert (delta["id"], delta["base_mesh_id"]) == (MESH_ID, MESH_ID)
    assert delta["delta_data"]
