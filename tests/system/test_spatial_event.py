"""A spatial-event relay process: seed clients in, the public STAGs' SpatialEvents out.

What arrives is checked against what both STAGs' Go types and gin bindings take
(tabularxr/stag and tabularxr/Stag, pkg/api/types.go): every pose exactly once as an
anchor, meshes full with the client's buffers, integers as JSON integers.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.clients import connect_relay, mesh_packet, pose_packet
from tests.support.meshes import scan_step
from tests.support.relays import RelayProcess
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
    with StagServer(ingest_path=INGEST) as stag:
        # The stand-in takes batches; told to answer 200 to everything, it records each
        # SpatialEvent as sent. A short outage first: retries must not duplicate.
        stag.fail_next(503, times=3)
        stag.reject_all(200, body=b'{"message":"Event ingested successfully"}')
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

            def items() -> int:
                return sum(len(e["anchors"]) + len(e["meshes"]) for e in taken())

            poll_until(lambda: items() >= len(SESSIONS) * (POSES + MESHES), limit=120)
            relay.proc.send_signal(signal.SIGTERM)
            assert relay.wait() == 0
        finally:
            relay.kill()

        requests = stag.requests()
        events = taken()

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
