"""Packets in over a real WebSocket (the `websockets` library), events out to a real HTTP STAG."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from stag_relay.service.relay import Relay
from tests.support.clients import connect_relay, mesh_packet, pose_packet, stream_poses
from tests.support.meshes import draco_grid
from tests.support.relays import http_get, make_config
from tests.support.stag_server import StagServer


def metric_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = http_get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def packets_metric(samples: dict, packet_type: str, status: str) -> float:
    labels = (("dialect", "streamkit"), ("status", status), ("type", packet_type))
    return samples[("relay_packets_total", labels)]


async def start_relay(nursery: trio.Nursery, stag: StagServer, **sections: dict) -> Relay:
    relay = Relay(make_config(stag.url, **sections))
    await nursery.start(relay.run)
    return relay


@pytest.mark.slow
async def test_flood_of_20_connections_loses_and_duplicates_nothing(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 100})
    port = relay.ports[0]
    connections, per_connection = 20, 5000

    async with trio.open_nursery() as clients:
        for n in range(connections):
            clients.start_soon(
                trio.to_thread.run_sync, stream_poses, port, f"flood-{n}", per_connection
            )

    total = connections * per_connection
    events = await trio.to_thread.run_sync(stag.wait_for_events, total, 120.0)
    assert len(events) == total
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == total
    per_session = Counter(e["session_id"] for e in events)
    assert per_session == {f"flood-{n}": per_connection for n in range(connections)}
    assert max(len(b["events"]) for b in stag.batches()) <= 100
    assert all(b["count"] == len(b["events"]) for b in stag.batches())

    samples = await trio.to_thread.run_sync(metric_samples, port)
    assert packets_metric(samples, "pose", "ok") == total
    assert samples[("relay_events_sent_total", ())] == total
    assert samples[("relay_connections_total", ())] == connections
    assert samples[("relay_batch_size_count", ())] == len(stag.batches())


async def test_event_and_request_shape(nursery: trio.Nursery, stag: StagServer) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 2})

    def send() -> None:
        with connect_relay(relay.ports[0]) as ws:
            ws.send(
                pose_packet("session-123", 1, timestamp=1634567890123, rotation=(0, 0, 0, 1.02))
            )
            ws.send(mesh_packet("session-123", 2, anchor_id="anchor-456", timestamp=1634567890124))

    await trio.to_thread.run_sync(send)
    events = await trio.to_thread.run_sync(stag.wait_for_events, 2)
    request = stag.requests()[0]
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("stag-relay/")
    assert request.idempotency_key == request.json["batch_id"]
    body = request.json
    assert body["relay_id"] == relay.relay_id
    # The mesh may come in a batch of its own: the first mesh starts the decoders.
    assert body["count"] == len(body["events"])
    assert sum(r.json["count"] for r in stag.requests()) == 2
    pose, mesh = sorted(events, key=lambda event: event["type"] != "pose")
    assert pose["type"] == "pose"
    assert pose["session_id"] == "session-123"
    assert pose["timestamp"] == 1634567890123
    assert pose["received_at"] >= pose["timestamp"]
    assert pose["meshes"] == []
    (anchor,) = pose["anchors"]
    assert anchor["id"].startswith("anchor_")
    # The rotation arrives normalised.
    assert anchor["pose"] == {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]}
    assert mesh["anchors"] == []
    assert mesh["meshes"][0]["anchor_id"] == "anchor-456"
    assert mesh["meshes"][0]["is_delta"] is False
    assert mesh["meshes"][0]["vertices_delta"] == draco_grid()
    assert mesh["meshes"][0]["face_count"] == 128


INVALID = [
    ("not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (pose_packet("s", 2, rotation=(0, 0, 0)), "$.data.pose.rotation"),
    (pose_packet("s", 3, x=5000.0), "$.data.pose.x"),
    (
        json.dumps(
            {"session_id": "s", "frame_number": 4, "timestamp": 1, "type": "sound", "data": {}}
        ),
        "$.type",
    ),
    (
        json.dumps(
            {"session_id": "s", "frame_number": 1.9, "timestamp": 1, "type": "pose", "data": {}}
        ),
        "$.frame_number",
    ),
    (pose_packet("other-session", 5), "$.session_id"),
    (mesh_packet("s", 6, vertices="not base64!"), "$.data.mesh.vertices"),
]


async def test_invalid_packets_get_an_error_reply_and_the_connection_keeps_working(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})

    def converse() -> list[dict]:
        replies = []
        with connect_relay(relay.ports[0]) as ws:
            ws.send(pose_packet("s", 1))
            for message, _ in INVALID:
                ws.send(message)
                replies.append(json.loads(ws.recv(timeout=30)))
            ws.send(pose_packet("s", 10))
            ws.send(b'{"binary": true}')  # a binary frame is parsed the same way
            replies.append(json.loads(ws.recv(timeout=30)))
        return replies

    replies = await trio.to_thread.run_sync(converse)
    for reply, (_, expected) in zip(replies, INVALID, strict=False):
        assert reply["type"] == "error"
        assert reply["code"] == "invalid_packet"
        assert expected in reply["message"], (expected, reply)
    assert replies[2]["frame_number"] == 2
    assert "frame_number" not in replies[0]
    events = await trio.to_thread.run_sync(stag.wait_for_events, 2)
    assert sorted(e["frame_number"] for e in events) == [1, 10]
    samples = await trio.to_thread.run_sync(metric_samples, relay.ports[0])
    invalid = sum(packets_metric(samples, t, "invalid") for t in ("pose", "mesh", "unknown"))
    assert invalid == len(INVALID) + 1


async def test_duplicates_are_counted_not_forwarded_and_not_answered(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})

    def send() -> None:
        with connect_relay(relay.ports[0]) as ws:
            for frame in (1, 2, 2, 1, 3):
                ws.send(pose_packet("dup", frame))
            ws.send(mesh_packet("dup", 1, anchor_id="a"))
            ws.send(mesh_packet("dup", 1, anchor_id="b"))
            ws.send(mesh_packet("dup", 1, anchor_id="a"))
            # A pong-free round trip: an invalid packet's reply proves all before it was handled.
            ws.send("{}")
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error"

    await trio.to_thread.run_sync(send)
    events = await trio.to_thread.run_sync(stag.wait_for_events, 5)
    # Batches travel concurrently (stag.max_in_flight), so compare without order.
    assert sorted((e["type"], e["frame_number"]) for e in events) == [
        ("mesh", 1),
        ("mesh", 1),
        ("pose", 1),
        ("pose", 2),
        ("pose", 3),
    ]
    samples = await trio.to_thread.run_sync(metric_samples, relay.ports[0])
    assert packets_metric(samples, "pose", "duplicate") == 2
    assert packets_metric(samples, "mesh", "duplicate") == 1


async def test_reconnecting_client_continues_its_session(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})

    def session_twice() -> None:
        with connect_relay(relay.ports[0]) as ws:
            ws.send(pose_packet("again", 1))
            ws.send(pose_packet("again", 2))
        with connect_relay(relay.ports[0]) as ws:
            # Resends everything, as a client unsure what arrived would.
            for frame in (1, 2, 3):
                ws.send(pose_packet("again", frame))

    await trio.to_thread.run_sync(session_twice)
    events = await trio.to_thread.run_sync(stag.wait_for_events, 3)
    assert sorted(e["frame_number"] for e in events) == [1, 2, 3]


async def test_message_over_max_size_closes_with_1009(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, websocket={"max_message_size": 1024})

    def oversize() -> int | None:
        with connect_relay(relay.ports[0]) as ws:
            ws.send(pose_packet("big", 1, padding="x" * 2000))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            return closed.value.rcvd.code if closed.value.rcvd else None

    assert await trio.to_thread.run_sync(oversize) == 1009
    samples = await trio.to_thread.run_sync(metric_samples, relay.ports[0])
    assert packets_metric(samples, "unknown", "too_large") == 1


async def test_stag_503_for_a_while_loses_nothing(nursery: trio.Nursery, stag: StagServer) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 10, "timeout": 0.01})
    port = relay.ports[0]
    total = 2000

    def stream_with_outage() -> None:
        with connect_relay(port) as ws:
            for frame in range(1, total + 1):
                if frame == total // 4:
                    stag.fail_for(503, 5.0, retry_after="1")
                ws.send(pose_packet("outage", frame))

    await trio.to_thread.run_sync(stream_with_outage)
    events = await trio.to_thread.run_sync(stag.wait_for_events, total, 120.0)
    assert sorted(e["frame_number"] for e in events) == list(range(1, total + 1))
    assert any(r.status == 503 for r in stag.requests())
    _, _, body = await trio.to_thread.run_sync(http_get, port, "/status")
    status = json.loads(body)
    assert status["stag"]["reachable"] is True
    assert status["events"]["dropped"] == {"rejected": 0, "shutdown": 0, "spool_full": 0}


async def test_stag_rejection_is_counted_as_dropped(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})
    stag.reject_all(400, body=b'{"error": "schema mismatch"}')

    def send() -> None:
        with connect_relay(relay.ports[0]) as ws:
            ws.send(pose_packet("rejected", 1))

    await trio.to_thread.run_sync(send)
    await trio.to_thread.run_sync(stag.wait_for_requests, 1)
    # The stand-in records a request before answering it: wait until the relay has
    # taken the answer in, which is what the metric says.
    with trio.fail_after(30):
        while True:
            samples = await trio.to_thread.run_sync(metric_samples, relay.ports[0])
            if samples[("relay_events_dropped_total", (("reason", "rejected"),))] == 1:
                break
            await trio.sleep(0.05)
    assert len(stag.requests()) == 1
