"""The StreamKit SDK's dialect end to end: what its Swift code sends, over a real WebSocket
(the `websockets` library, not our code), into a relay and out to a real HTTP STAG."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from stag_relay.service.relay import Relay
from stag_relay.tools.sink import SpatialEventFormat
from tests.support.clients import connect_relay, pose_packet
from tests.support.relays import http_get, make_config
from tests.support.sdk import (
    ANCHOR_ID,
    ANCHOR_UPDATE,
    MESH_ID,
    MESH_UPDATE_DELTA,
    MESH_UPDATE_FULL,
    MESH_V1_VERTICES_GZ,
    PING,
    POSE_POSITION,
    POSE_ROTATION,
    POSE_UNIX_SECONDS,
    SESSION_ID,
    anchor_inner,
    mesh_buffer,
    mesh_inner,
    sdk_compress,
    wsmessage,
)
from tests.support.stag_server import StagServer

SDK_PATH = f"/api/v1/ws?session_id={SESSION_ID}"


async def start_relay(nursery: trio.Nursery, server: StagServer, **sections: Any) -> Relay:
    relay = Relay(make_config(server.url, **sections))
    await nursery.start(relay.run)
    return relay


def receive_binary(ws: ClientConnection) -> dict[str, Any]:
    """The next reply, which must be a binary frame (the SDK ignores text frames)."""
    reply = ws.recv(timeout=30)
    assert isinstance(reply, bytes), f"a text frame: {reply!r}"
    message: dict[str, Any] = json.loads(reply)
    return message


def packets(relay: Relay, packet_type: str, status: str, dialect: str) -> float:
    value = relay.metrics.registry.get_sample_value(
        "relay_packets_total", {"type": packet_type, "status": status, "dialect": dialect}
    )
    return value or 0.0


async def test_the_sdk_fixtures_arrive_as_events_and_ping_gets_a_binary_pong(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})

    def talk() -> dict[str, Any]:
        with connect_relay(relay.ports[0], SDK_PATH) as ws:
            ws.send(ANCHOR_UPDATE)
            ws.send(MESH_UPDATE_FULL)
            ws.send(MESH_UPDATE_DELTA)
            ws.send(ANCHOR_UPDATE)  # a resend: a duplicate, not a second event
            ws.send(PING)
            return receive_binary(ws)

    pong = await trio.to_thread.run_sync(talk)
    assert pong["type"] == "pong"
    assert pong["sessionId"] == SESSION_ID
    assert isinstance(pong["timestamp"], int)

    events = await trio.to_thread.run_sync(stag.wait_for_events, 3, 30.0)
    assert len(events) == 3
    assert {e["session_id"] for e in events} == {SESSION_ID}
    pose = next(e for e in events if e["type"] == "pose")
    (anchor,) = pose["anchors"]
    assert anchor["id"] == ANCHOR_ID
    # The SDK's seconds since 2001-01-01, in Unix milliseconds.
    assert pose["timestamp"] == round(POSE_UNIX_SECONDS * 1000)
    meshes = [e["meshes"][0] for e in events if e["type"] == "mesh"]
    full = next(m for m in meshes if m.get("delta_data", "") == "")
    delta = next(m for m in meshes if m.get("delta_data", "") != "")
    # The full mesh was checked in a worker, and goes on untouched.
    assert base64.b64decode(full["vertices_delta"]) == MESH_V1_VERTICES_GZ
    assert full["mesh_id"] == MESH_ID
    assert (full["vertex_count"], full["face_count"]) == (4, 2)
    # The SDK's own delta passes through, never decoded.
    assert delta["base_mesh_id"] == MESH_ID
    assert delta["is_delta"] is False
    assert packets(relay, "pose", "ok", "sdk") == 1
    assert packets(relay, "pose", "duplicate", "sdk") == 1
    assert packets(relay, "mesh", "ok", "sdk") == 2


async def test_invalid_messages_get_a_binary_error_and_the_connection_lives(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})
    bad_pose = wsmessage(
        "anchor_update",
        anchor_inner((0.0, 5000.0, 0.0), (0.0, 0.0, 0.0, 1.0), POSE_UNIX_SECONDS),
        timestamp=1,
    )
    bomb = sdk_compress(b"\0" * (64 * 1024 * 1024))
    bad_mesh = wsmessage("mesh_update", mesh_inner(bomb), timestamp=2)
    out_of_range = sdk_compress(mesh_buffer([(0.0, 0.0, 0.0)] * 3, [0, 1, 7]))
    bad_indices = wsmessage("mesh_update", mesh_inner(out_of_range), timestamp=3)

    def talk() -> list[dict[str, Any]]:
        with connect_relay(relay.ports[0], SDK_PATH) as ws:
            replies = []
            for message in (bad_pose, b'{"type":"teleport","timestamp":1}', bad_mesh, bad_indices):
                ws.send(message)
                replies.append(receive_binary(ws))
            ws.send(ANCHOR_UPDATE)
            ws.send(PING)
            replies.append(receive_binary(ws))
            return replies

    replies = await trio.to_thread.run_sync(talk)
    assert [r["type"] for r in replies] == ["error"] * 4 + ["pong"]
    messages = [json.loads(base64.b64decode(r["data"]))["message"] for r in replies[:4]]
    assert "$.data.pose.position" in messages[0]
    assert "teleport" in messages[1]
    assert "$.data.vertices" in messages[2]
    assert "$.data.vertices" in messages[3]
    await trio.to_thread.run_sync(stag.wait_for_events, 1, 30.0)
    assert packets(relay, "pose", "invalid", "sdk") == 1
    assert packets(relay, "mesh", "invalid", "sdk") == 2


async def test_the_upgrade_names_the_session_and_the_dialects_stay_apart(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})
    port = relay.ports[0]

    def refused(path: str) -> int:
        with pytest.raises(InvalidStatus) as refusal:
            connect_relay(port, path)
        return refusal.value.response.status_code

    assert await trio.to_thread.run_sync(refused, "/api/v1/ws") == 400
    assert await trio.to_thread.run_sync(refused, "/api/v1/ws?session_id=") == 400
    status, _, _ = await trio.to_thread.run_sync(http_get, port, "/api/v1/ws")
    assert status == 426

    def seed_packet_on_sdk_path() -> dict[str, Any]:
        with connect_relay(port, SDK_PATH) as ws:
            # A seed packet is not a WSMessage: refused, with the reason.
            ws.send(pose_packet(SESSION_ID, 1))
            return receive_binary(ws)

    reply = await trio.to_thread.run_sync(seed_packet_on_sdk_path)
    assert reply["type"] == "error"

    def other_session() -> dict[str, Any]:
        with connect_relay(port, SDK_PATH) as ws:
            ws.send(ANCHOR_UPDATE.replace(SESSION_ID.encode(), b"OTHER-SESSION"))
            return receive_binary(ws)

    reply = await trio.to_thread.run_sync(other_session)
    assert "sessionId" in json.loads(base64.b64decode(reply["data"]))["message"]
    assert (
        packets(relay, "unknown", "invalid", "sdk") + packets(relay, "pose", "invalid", "sdk") == 2
    )


async def test_an_sdk_stream_through_a_stag_outage_arrives_once_each_as_sent(
    nursery: trio.Nursery,
) -> None:
    """What the SDK's Swift code writes, to a spatial-event relay and a stand-in that
    holds every body to the public STAGs' bindings; STAG is down for 1.5 s mid-stream."""
    poses, meshes = 300, 6
    pose_ms = [round(POSE_UNIX_SECONDS * 1000) + 17 * n for n in range(poses)]
    buffers = [
        sdk_compress(
            mesh_buffer([(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, float(n), 1.0)], [0, 1, 2])
        )
        for n in range(1, meshes + 1)
    ]
    with StagServer(ingest_path="/api/v1/ingest", wire_format=SpatialEventFormat()) as stag:
        relay = await start_relay(
            nursery,
            stag,
            stag={"format": "spatial-event", "ingest_path": ""},
            batch={"max_size": 20},
        )

        def stream() -> tuple[dict[str, Any], int | None]:
            with connect_relay(relay.ports[0], SDK_PATH) as ws:
                for n, ms in enumerate(pose_ms):
                    if n == poses // 3:
                        stag.fail_for(503, 1.5)
                    inner = anchor_inner(POSE_POSITION, POSE_ROTATION, ms / 1000)
                    ws.send(wsmessage("anchor_update", inner, timestamp=ms + 1))
                    if n % (poses // meshes) == 0:
                        k = n // (poses // meshes)
                        mesh = mesh_inner(buffers[k], mesh_id=f"MESH-{k}")
                        ws.send(wsmessage("mesh_update", mesh, timestamp=ms + 2))
                ws.send(PING)
                pong = receive_binary(ws)
                ws.close(1000)
                return pong, ws.close_code

        pong, close_code = await trio.to_thread.run_sync(stream)
        assert pong["type"] == "pong"
        assert close_code == 1000
        await trio.to_thread.run_sync(stag.wait_for_events, poses + meshes, 60.0)
        bodies = stag.batches()

    anchors = [a for body in bodies for a in body["anchors"]]
    assert sorted(a["timestamp"] for a in anchors) == pose_ms
    assert {a["id"] for a in anchors} == {ANCHOR_ID}
    assert {a["session_id"] for a in anchors} | {b["session_id"] for b in bodies} == {SESSION_ID}
    sent_meshes = {m["id"]: m for body in bodies for m in body["meshes"]}
    assert sorted(sent_meshes) == [f"MESH-{k}" for k in range(meshes)]
    for k in range(meshes):
        assert base64.b64decode(sent_meshes[f"MESH-{k}"]["vertices"]) == buffers[k]
    assert packets(relay, "pose", "ok", "sdk") == poses
    assert relay.metrics.registry.get_sample_value(
        "relay_stag_requests_total", {"outcome": "retry"}
    )


@pytest.mark.parametrize(
    ("inner", "path"),
    [
        (
            b'{"id":"m","anchorId":"a","vertices":"%%%","faces":"","compressionLevel":5,'
            b'"isDelta":false}',
            "$.data.vertices",
        ),
        (mesh_inner(b"\x78\x9c not deflate at all"), "$.data.vertices"),
        (
            mesh_inner(sdk_compress(mesh_buffer([(0.0, 0.0, 0.0)] * 3, [0, 1, 2])[:-4])),
            "$.data.vertices",
        ),
        (
            anchor_inner(POSE_POSITION, (0.0, 0.0, 0.0, 3.0), POSE_UNIX_SECONDS),
            "$.data.pose.rotation",
        ),
    ],
    ids=["bad base64", "bad deflate", "wrong counts", "bad quaternion"],
)
async def test_bad_sdk_input_gets_its_error_and_the_connection_lives(
    nursery: trio.Nursery, stag: StagServer, inner: bytes, path: str
) -> None:
    relay = await start_relay(nursery, stag, batch={"max_size": 1})
    kind = "mesh_update" if b"vertices" in inner else "anchor_update"

    def talk() -> list[dict[str, Any]]:
        with connect_relay(relay.ports[0], SDK_PATH) as ws:
            ws.send(wsmessage(kind, inner, timestamp=1))
            error = receive_binary(ws)
            ws.send(PING)
            return [error, receive_binary(ws)]

    error, pong = await trio.to_thread.run_sync(talk)
    assert (error["type"], pong["type"]) == ("error", "pong")
    assert path in json.loads(base64.b64decode(error["data"]))["message"]
