"""Meshes through the whole relay: real Draco in, exact diffs out, hostile buffers survived."""

from __future__ import annotations

import base64
import json
import random
import time

import trio

from stag_relay.protocol.geometry import apply_mesh_diff, decode_mesh, triangles_equal
from stag_relay.service.relay import Relay
from tests.support.clients import connect_relay, mesh_packet, pose_packet
from tests.support.meshes import scan_step
from tests.support.relays import make_config
from tests.support.stag_server import StagServer


async def test_a_growing_scan_arrives_as_diffs_that_rebuild_every_mesh(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = Relay(make_config(stag.url, batch={"max_size": 1}))
    await nursery.start(relay.run)
    steps = [scan_step(cols) for cols in range(20, 32)]

    def scan() -> None:
        with connect_relay(relay.ports[0]) as ws:
            for frame, vertices in enumerate(steps, start=1):
                ws.send(mesh_packet("scanner", frame, anchor_id="room", vertices=vertices))
                # One update at a time, as a scanning client does: diffs are only
                # computed against a mesh STAG has accepted.
                stag.wait_for_events(frame)

    await trio.to_thread.run_sync(scan)
    updates = [e["meshes"][0] for e in stag.events()]
    event_ids = [e["event_id"] for e in stag.events()]
    assert updates[0]["is_delta"] is False
    assert any(u["is_delta"] for u in updates)
    # STAG's recipe, applied in turn, rebuilds every mesh the client sent.
    held: dict[str, object] = {}
    current = None
    for event_id, update, vertices in zip(event_ids, updates, steps, strict=True):
        if update["is_delta"]:
            assert update["base_event_id"] in held
            current = apply_mesh_diff(held[update["base_event_id"]], update)  # type: ignore[arg-type]
        else:
            assert update["vertices_delta"] == vertices  # the client's buffer, untouched
            current = apply_mesh_diff(None, update)
        assert triangles_equal(current, decode_mesh(vertices).triangles)
        assert update["face_count"] == len(current)
        held[event_id] = current
    out = relay.metrics.registry.get_sample_value("relay_mesh_bytes_out_total") or 0
    received = relay.metrics.registry.get_sample_value("relay_mesh_bytes_in_total") or 0
    assert 0 < out < received
    assert relay.metrics.registry.get_sample_value("relay_mesh_updates_total", {"kind": "delta"})


async def test_truncated_and_bit_flipped_draco_get_answers_and_others_keep_flowing(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = Relay(make_config(stag.url, batch={"max_size": 1}))
    await nursery.start(relay.run)
    good = base64.b64decode(scan_step(12))
    rng = random.Random(7)
    hostile = [good[:cut] for cut in range(1, len(good), max(1, len(good) // 40))]
    for _ in range(60):
        flipped = bytearray(good)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        hostile.append(bytes(flipped))

    def send() -> int:
        errors = 0
        with connect_relay(relay.ports[0]) as ws:
            for frame, data in enumerate(hostile, start=1):
                vertices = base64.b64encode(data).decode()
                ws.send(mesh_packet("fuzz", frame, anchor_id=f"a{frame}", vertices=vertices))
            ws.send(pose_packet("fuzz", 1))

            def meshes_through() -> int:
                return sum(1 for e in stag.events() if e["type"] == "mesh")

            # Every hostile buffer ends as an error reply or a checked mesh at STAG.
            deadline = time.monotonic() + 60
            while errors + meshes_through() < len(hostile):
                assert time.monotonic() < deadline, (errors, meshes_through(), len(hostile))
                try:
                    reply = json.loads(ws.recv(timeout=0.1))
                except TimeoutError:
                    continue
                assert reply["type"] == "error"
                errors += 1
        return errors

    errors = await trio.to_thread.run_sync(send)
    samples = relay.metrics.registry.get_sample_value
    invalid = (
        samples(
            "relay_packets_total", {"type": "mesh", "status": "invalid", "dialect": "streamkit"}
        )
        or 0
    )
    assert errors == invalid > 0
    # The pose after all of it arrived too: the relay kept serving.
    events = await trio.to_thread.run_sync(stag.wait_for_events, len(hostile) - errors + 1)
    assert any(e["type"] == "pose" for e in events)
