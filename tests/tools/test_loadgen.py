"""The load generator's wire format and bookkeeping, without sockets."""

from __future__ import annotations

import base64
import itertools
import json
import struct
import zlib

import DracoPy
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from stag_relay.protocol.packets import parse_packet
from stag_relay.tools.loadgen import (
    APPLE_EPOCH_OFFSET,
    MESH_GROWTH_STEPS,
    LoadGenerator,
    LoadSettings,
    encode_masked_frame,
    mesh_scan,
    mesh_template,
    pose_template,
    sdk_anchor_update,
    sdk_mesh_update,
)


def parse_frame(data: bytes) -> tuple[Frame, int]:
    """One client frame, as websockets' server side reads it; and the bytes left over."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=True, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        return done.value, len(reader.buffer)
    raise AssertionError("incomplete frame")


@given(payload=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
# Each length encoding at its boundaries: 7-bit, 16-bit, 64-bit.
@example(payload=b"x" * 125, mask=b"\x00\x00\x00\x00")
@example(payload=b"x" * 126, mask=b"abcd")
@example(payload=b"x" * 65535, mask=b"abcd")
@example(payload=b"x" * 65536, mask=b"\xff\xff\xff\xff")
def test_frames_decode_as_one_final_masked_text_frame(payload: bytes, mask: bytes) -> None:
    frame, left = parse_frame(encode_masked_frame(payload, mask))
    assert frame.opcode is Opcode.TEXT
    assert frame.fin
    assert frame.data == payload
    assert left == 0


session_ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=128)


@settings(max_examples=50)
@given(
    session_id=session_ids,
    frame_number=st.integers(0, 2**63 - 1),
    timestamp=st.integers(1, 2**53),
)
def test_pose_packets_are_valid_for_the_relay(
    session_id: str, frame_number: int, timestamp: int
) -> None:
    packet = parse_packet(pose_template(session_id) % (frame_number, timestamp))
    assert packet.type == "pose"
    assert packet.session_id == session_id
    assert packet.frame_number == frame_number
    assert packet.timestamp == timestamp


@settings(max_examples=20)
@given(session_id=session_ids, anchor_id=session_ids)
def test_mesh_packets_are_valid_for_the_relay(session_id: str, anchor_id: str) -> None:
    vertices = base64.b64encode(b"\x00\x01\x02\x03").decode()
    packet = parse_packet(mesh_template(session_id, anchor_id, vertices) % (7, 1234))
    assert packet.type == "mesh"
    assert packet.session_id == session_id
    assert packet.mesh is not None
    assert packet.mesh.anchor_id == anchor_id
    assert packet.mesh.vertices == vertices
    assert (packet.frame_number, packet.timestamp) == (7, 1234)


def triangles(scan: str) -> set[bytes]:
    """The mesh's triangles, each as its decoded corner positions rotated to start at
    the smallest (Draco may rotate a face's corners; the orientation stays)."""
    mesh = DracoPy.decode(base64.b64decode(scan))
    points = np.asarray(mesh.points, dtype=np.float32)
    result = set()
    for face in np.asarray(mesh.faces, dtype=np.int64):
        corners = [points[i].tobytes() for i in face]
        first = corners.index(min(corners))
        result.add(b"".join(corners[first:] + corners[:first]))
    return result


def test_a_mesh_scan_grows_and_keeps_what_it_scanned_before() -> None:
    scans = [triangles(scan) for scan in mesh_scan(400)]
    assert len(scans) == MESH_GROWTH_STEPS
    counts = [len(scan) for scan in scans]
    assert counts == sorted(counts)
    assert counts[0] < counts[-1]
    assert 0.9 * 400 <= counts[-1] <= 1.1 * 400
    # What a relay diffing meshes relies on: an update decodes the earlier
    # triangles to exactly the same coordinates.
    for before, after in itertools.pairwise(scans):
        assert before <= after


@pytest.mark.parametrize(
    "changes",
    [
        {"connections": 0},
        {"rate": -1.0},
        {"count": None, "duration": None},
        {"count": -1},
        {"url": "http://127.0.0.1:8081/ws/streamkit"},
        {"mesh_triangles": 100, "mesh_rate": 0.0},
        {"dialect": "go"},
        {"dialect": "sdk", "ack": True},
    ],
)
def test_settings_refuse_what_cannot_run(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LoadSettings(**changes)  # type: ignore[arg-type]


def test_replies_are_counted_by_kind() -> None:
    gen = LoadGenerator(LoadSettings(connections=1, count=1))
    gen.on_reply(b'{"type":"ack","session_id":"s","frame_numbers":[1,2,3]}')
    gen.on_reply(b'{"type":"ack","session_id":"s","frame_numbers":[4]}')
    gen.on_reply(b'{"type":"error","code":"invalid_packet","message":"$.x: bad","frame_number":5}')
    gen.on_reply(b'{"type":"something else"}')
    gen.on_reply(b"not json")
    assert (gen._ack_frames, gen._acked, gen._errors, gen._other) == (2, 4, 1, 2)
    assert gen._error_samples == ["$.x: bad"]


def test_a_run_without_a_prefix_gets_session_ids_of_its_own() -> None:
    first = LoadGenerator(LoadSettings(connections=2, count=1))
    second = LoadGenerator(LoadSettings(connections=2, count=1))
    assert len(set(first.session_ids)) == 2
    assert not set(first.session_ids) & set(second.session_ids)
    named = LoadGenerator(LoadSettings(connections=2, count=1, session_prefix="run"))
    assert named.session_ids == ["run-0", "run-1"]


# -- the SDK dialect: what tabularxr/streamkit's StreamingClient sends ------------------


def test_sdk_anchor_updates_are_ws_messages_with_base64_inner_json() -> None:
    now = 1_765_000_000.25
    message = json.loads(sdk_anchor_update("9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14", now - 1, now))
    assert set(message) == {"type", "sessionId", "data", "timestamp"}
    assert message["type"] == "anchor_update"
    assert message["timestamp"] == int(now * 1000)
    inner = json.loads(base64.b64decode(message["data"]))
    assert set(inner) == {"id", "pose"}
    assert len(inner["pose"]["position"]) == 3
    assert len(inner["pose"]["rotation"]) == 4
    # Seconds since 2001-01-01 (Foundation's reference date).
    unix = inner["pose"]["timestamp"] + APPLE_EPOCH_OFFSET
    assert unix == pytest.approx(now - 1, abs=1e-6)


def test_sdk_meshes_are_gzip_buffers_of_counts_vertices_and_indices() -> None:
    scan = mesh_scan(200, dialect="sdk")
    assert len(scan) == MESH_GROWTH_STEPS
    raw = zlib.decompress(base64.b64decode(scan[-1]), 31)  # 31: a gzip container
    vertex_count, index_count = struct.unpack_from("<II", raw)
    assert index_count % 3 == 0 and index_count // 3 >= 180
    assert len(raw) == 8 + vertex_count * 12 + index_count * 4
    indices = np.frombuffer(raw, "<u4", offset=8 + vertex_count * 12)
    assert indices.max() < vertex_count
    message = json.loads(sdk_mesh_update("s", "M-1", "anchor-0-0", scan[0], 1_765_000_000.0))
    assert message["type"] == "mesh_update"
    inner = json.loads(base64.b64decode(message["data"]))
    assert inner == {
        "id": "M-1",
        "anchorId": "anchor-0-0",
        "vertices": scan[0],
        "faces": "",
        "compressionLevel": 5,
        "isDelta": False,
    }


def test_sdk_runs_use_upper_case_uuid_sessions_and_count_base64_errors() -> None:
    gen = LoadGenerator(LoadSettings(connections=2, count=1, dialect="sdk"))
    for session in gen.session_ids:
        assert session == session.upper() and len(session) == 36
    data = base64.b64encode(b'{"code":"invalid_packet","message":"$.pose: bad"}').decode()
    gen.on_reply(json.dumps({"type": "error", "sessionId": "s", "data": data}).encode())
    gen.on_reply(b'{"type":"pong","sessionId":"s","timestamp":1}')
    assert (gen._errors, gen._other) == (1, 1)
    assert gen._error_samples == ["$.pose: bad"]
