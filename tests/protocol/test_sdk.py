"""parse_message and the replies: the StreamKit SDK's dialect, from bytes its Swift code writes."""

from __future__ import annotations

import base64
import binascii
import contextlib
import random
import struct
import uuid
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stag_relay.protocol import b64, sdk
from stag_relay.protocol.packets import PacketError
from stag_relay.protocol.sdk import (
    AnchorUpdate,
    MeshUpdate,
    Ping,
    SdkError,
    encode_error,
    encode_pong,
    parse_message,
)
from tests.support.sdk import (
    ANCHOR_ID,
    ANCHOR_UPDATE,
    MESH_DELTA_JSON,
    MESH_ID,
    MESH_UPDATE_DELTA,
    MESH_UPDATE_FULL,
    MESH_V1_NORMALS_GZ,
    MESH_V1_VERTICES_GZ,
    PING,
    SESSION_ID,
    TRACE_IDS,
    anchor_inner,
    emulated_fixtures,
    sdk_compress,
    text_message,
    wsmessage,
)


def _f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def _parse(raw: bytes | str, *, binary: bool = True, session_id: str = SESSION_ID) -> Any:
    return parse_message(raw, binary=binary, session_id=session_id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _error(raw: bytes | str, *, binary: bool = True, session_id: str = SESSION_ID) -> SdkError:
    with pytest.raises(SdkError) as info:
        _parse(raw, binary=binary, session_id=session_id)
    return info.value


def _outer(message: bytes) -> dict[str, Any]:
    return orjson.loads(message)  # type: ignore[no-any-return]


def _inner(message: bytes) -> dict[str, Any]:
    return orjson.loads(base64.b64decode(_outer(message)["data"]))  # type: ignore[no-any-return]


def _with_inner(message: bytes, inner: dict[str, Any]) -> bytes:
    outer = _outer(message)
    outer["data"] = base64.b64encode(orjson.dumps(inner)).decode()
    return orjson.dumps(outer)


# --- the Swift-derived fixtures ---------------------------------------------------------------


def test_the_checked_in_fixtures_are_what_the_swift_emulation_writes() -> None:
    import tests.support.sdk as fixtures

    for name, value in emulated_fixtures().items():
        assert getattr(fixtures, name) == value, name


def test_the_fixtures_carry_swift_s_escaped_slashes() -> None:
    # The inner JSON's base64 strings hold "/", which Swift writes as "\/".
    assert b"\\/" in base64.b64decode(_outer(MESH_UPDATE_FULL)["data"])


def test_an_anchor_update_parses_to_its_values() -> None:
    update = _parse(ANCHOR_UPDATE)
    assert update == AnchorUpdate(
        session_id=SESSION_ID,
        anchor_id=ANCHOR_ID,
        x=0.25,
        y=1.5,
        z=-0.75,
        rotation=(0.0, 0.38268343, 0.0, 0.9238795),
        # 755142800.125 s after 2001-01-01 is 1733450000.125 s after 1970.
        timestamp=1733450000125,
        sent_at=1733450000127,
        trace_id=TRACE_IDS[0],
        metadata=None,
    )


def test_a_full_mesh_update_keeps_the_sdk_s_buffers_untouched() -> None:
    update = _parse(MESH_UPDATE_FULL)
    assert update == MeshUpdate(
        session_id=SESSION_ID,
        mesh_id=MESH_ID,
        anchor_id=ANCHOR_ID,
        vertices=_b64(MESH_V1_VERTICES_GZ),
        faces="",
        normals=_b64(MESH_V1_NORMALS_GZ),
        compression_level=5,
        is_delta=False,
        base_mesh_id=None,
        timestamp=1733450000231,
        trace_id=TRACE_IDS[1],
    )


def test_a_delta_mesh_update_names_its_base_and_keeps_the_sdk_s_diff() -> None:
    update = _parse(MESH_UPDATE_DELTA)
    assert isinstance(update, MeshUpdate)
    assert update.is_delta and update.base_mesh_id == MESH_ID and update.normals is None
    assert update.vertices == _b64(sdk_compress(MESH_DELTA_JSON))


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("AAAA", "AAAA"), ("AA==", "AA=="), ("AB==", "AA=="), ("AAB=", "AAA="), ("AP//", "AP//")],
)
def test_mesh_buffers_go_on_as_the_canonical_base64_of_their_bytes(sent: str, kept: str) -> None:
    # Unused low bits set in the last character decode to the same bytes: what goes
    # on spells them as an encoder would, so the text is the bytes' one encoding.
    update = _parse(_mesh_with(vertices=sent, normals=sent, faces=sent))
    assert isinstance(update, MeshUpdate)
    assert (update.vertices, update.normals, update.faces) == (kept, kept, kept)
    assert base64.b64decode(kept) == base64.b64decode(sent)


def test_a_ping_parses() -> None:
    assert _parse(PING) == Ping(SESSION_ID, 1733450030127, None)


@given(st.randoms(use_true_random=False))
def test_key_order_does_not_matter(rng: random.Random) -> None:
    # Swift writes dictionaries in a per-process random order, at every level.
    for message in (ANCHOR_UPDATE, MESH_UPDATE_FULL, MESH_UPDATE_DELTA):
        outer = _outer(message)
        inner = _inner(message)
        if "pose" in inner:
            pose = list(inner["pose"].items())
            rng.shuffle(pose)
            inner["pose"] = dict(pose)
        items = list(inner.items())
        rng.shuffle(items)
        outer["data"] = base64.b64encode(orjson.dumps(dict(items))).decode()
        top = list(outer.items())
        rng.shuffle(top)
        assert _parse(orjson.dumps(dict(top))) == _parse(message)


# --- any valid anchor round-trips --------------------------------------------------------------

_f32_coordinates = st.floats(-1000, 1000, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-4)


@st.composite
def _unit_quaternions(draw: st.DrawFn) -> tuple[float, ...]:
    raw = draw(st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4))
    norm = sum(v * v for v in raw) ** 0.5
    assume(norm > 0.1)
    q = tuple(_f32(v / norm) for v in raw)
    # Swift prints what it holds; the emulation prints positionally only above 1e-4.
    assume(all(v == 0 or abs(v) >= 1e-4 for v in q))
    return q


@given(
    position=st.tuples(_f32_coordinates, _f32_coordinates, _f32_coordinates),
    rotation=_unit_quaternions(),
    # From 2001 to 2100, in whole milliseconds, as ARKit's clock yields them.
    pose_ms=st.integers(978_307_200_000, 4_102_444_800_000),
    sent_at=st.integers(1, 2**63 - 1),
    anchor_id=st.uuids().map(lambda u: str(u).upper()),
)
def test_any_valid_anchor_update_round_trips(
    position: tuple[float, float, float],
    rotation: tuple[float, float, float, float],
    pose_ms: int,
    sent_at: int,
    anchor_id: str,
) -> None:
    inner = anchor_inner(position, rotation, pose_ms / 1000, anchor_id)
    message = wsmessage("anchor_update", inner, timestamp=sent_at, trace_id=TRACE_IDS[0])
    update = _parse(message)
    assert isinstance(update, AnchorUpdate)
    assert update.anchor_id == anchor_id and update.sent_at == sent_at
    # Swift prints a Float's shortest form; read back, it is the same float32.
    assert tuple(_f32(v) for v in (update.x, update.y, update.z)) == position
    assert tuple(_f32(v) for v in update.rotation) == rotation
    assert abs(update.timestamp - pose_ms) <= 1
    event = update.to_event(received_at_ms=5)
    assert event.anchors[0].id == anchor_id and event.timestamp == update.timestamp
    assert abs(sum(v * v for v in event.anchors[0].rotation) - 1) < 1e-9


def test_the_reference_date_conversion_is_exact_for_whole_milliseconds() -> None:
    for ms in (978_307_200_001, 1733450000125, 1733450000127, 4_102_444_799_999):
        message = wsmessage(
            "anchor_update", anchor_inner((0, 0, 0), (0, 0, 0, 1), ms / 1000), timestamp=1
        )
        assert _parse(message).timestamp == ms


# --- text frames: STAG's Go WSMessage -----------------------------------------------------------


def test_a_text_frame_may_use_snake_case_keys_and_inline_data() -> None:
    inner = orjson.loads(anchor_inner((0.25, 1.5, -0.75), (0, 0, 0, 1), 1733450000.125))
    text = text_message("anchor_update", inner, timestamp=1733450000127)
    update = _parse(text, binary=False)
    assert isinstance(update, AnchorUpdate)
    assert update.timestamp == 1733450000125 and update.anchor_id == ANCHOR_ID


def test_a_text_frame_may_carry_the_sdk_s_own_message() -> None:
    assert _parse(ANCHOR_UPDATE.decode(), binary=False) == _parse(ANCHOR_UPDATE)


def test_a_text_frame_may_use_stag_s_pose_and_mesh_spellings() -> None:
    pose = {"id": "a1", "pose": {"x": 1, "y": 2.5, "z": -3, "rotation": [0, 0, 0, 1]}}
    update = _parse(text_message("anchor_update", pose, timestamp=77), binary=False)
    assert isinstance(update, AnchorUpdate)
    assert (update.x, update.y, update.z, update.timestamp) == (1.0, 2.5, -3.0, 77)
    mesh = {
        "id": "m1",
        "anchor_id": "a1",
        "vertices": base64.b64encode(MESH_V1_VERTICES_GZ).decode(),
        "faces": "",
        "compression_level": 3,
        "is_delta": False,
    }
    update = _parse(text_message("mesh_update", mesh, timestamp=78), binary=False)
    assert isinstance(update, MeshUpdate)
    assert (update.anchor_id, update.compression_level, update.timestamp) == ("a1", 3, 78)


def test_a_binary_frame_is_held_to_what_the_sdk_writes() -> None:
    inline = orjson.loads(anchor_inner((0, 0, 0), (0, 0, 0, 1), 1733450000.0))
    error = _error(orjson.dumps({"type": "anchor_update", "data": inline, "timestamp": 1}))
    assert error.message.startswith("$.data: expected base64 text in a binary frame")
    # STAG's spellings are unknown keys there, ignored like any other.
    outer = _outer(ANCHOR_UPDATE)
    outer["session_id"] = "someone else"
    assert _parse(orjson.dumps(outer)) == _parse(ANCHOR_UPDATE)


def test_the_same_field_twice_in_two_spellings_is_refused() -> None:
    outer = _outer(ANCHOR_UPDATE)
    outer["session_id"] = SESSION_ID
    error = _error(orjson.dumps(outer).decode(), binary=False)
    assert error.message == "$.sessionId and $.session_id: the same field twice; send one"


# --- sessions, types, errors ---------------------------------------------------------------------


def test_a_message_naming_another_session_is_invalid() -> None:
    error = _error(ANCHOR_UPDATE, session_id="B0B")
    assert error.code == sdk.INVALID_MESSAGE and error.kind == "anchor_update"
    assert error.trace_id == TRACE_IDS[0]
    assert error.message == (
        f'$.sessionId: names session "{SESSION_ID}", but this connection streams session "B0B"'
        " (the URL's session_id); send each session on its own connection"
    )


def test_a_message_without_a_session_is_the_connection_s() -> None:
    message = wsmessage("ping", timestamp=9, session_id=None)
    assert _parse(message, session_id="S") == Ping("S", 9, None)


def test_an_unknown_type_gets_its_own_code() -> None:
    error = _error(wsmessage("subscribe", timestamp=1, trace_id="t-1"))
    assert error.code == sdk.UNKNOWN_TYPE and error.kind == "unknown" and error.trace_id == "t-1"
    assert error.message == (
        '$.type: unknown message type "subscribe"; expected "anchor_update", '
        '"mesh_update" or "ping"'
    )


def _anchor_with(**changes: Any) -> bytes:
    inner = _inner(ANCHOR_UPDATE)
    pose = inner["pose"]
    for key, value in changes.items():
        target = pose if key in ("position", "rotation", "timestamp") else inner
        if value is None:
            del target[key]
        else:
            target[key] = value
    return _with_inner(ANCHOR_UPDATE, inner)


def _mesh_with(**changes: Any) -> bytes:
    inner = _inner(MESH_UPDATE_FULL)
    for key, value in changes.items():
        if value is None:
            del inner[key]
        else:
            inner[key] = value
    return _with_inner(MESH_UPDATE_FULL, inner)


def _outer_with(message: bytes, **changes: Any) -> bytes:
    outer = _outer(message)
    for key, value in changes.items():
        if value is None:
            del outer[key]
        else:
            outer[key] = value
    return orjson.dumps(outer)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "$: not valid JSON"),
        (b"[1]", "$: expected a JSON object (a WSMessage), got an array of 1"),
        (
            _outer_with(PING, timestamp=None),
            "$.timestamp: missing, expected an integer > 0 (Unix milliseconds)",
        ),
        (
            _outer_with(PING, timestamp=1.5),
            "$.timestamp: expected an integer > 0 (Unix milliseconds), got 1.5",
        ),
        (_outer_with(PING, sessionId=7), "$.sessionId: expected a string, got 7"),
        (
            _outer_with(PING, traceId=""),
            "$.traceId: expected a string of 1 to 128 characters, got 0 characters",
        ),
        (
            _outer_with(PING, type=None),
            '$.type: missing, expected "anchor_update", "mesh_update" or "ping"',
        ),
        (
            _outer_with(ANCHOR_UPDATE, data=None),
            "$.data: missing, expected base64 text of a JSON object",
        ),
        (_outer_with(ANCHOR_UPDATE, data="eyJ"), "$.data: not standard base64; use the RFC 4648"),
        (_outer_with(ANCHOR_UPDATE, data="eyJ9"), "$.data: the base64 does not hold JSON"),
        (_outer_with(ANCHOR_UPDATE, data="WzFd"), "$.data: expected base64 of a JSON object"),
        (_anchor_with(id=None), "$.data.id: missing, expected a string of 1 to 128 characters"),
        (_anchor_with(id="a" * 129), "$.data.id: expected a string of 1 to 128 characters"),
        (_anchor_with(id="a\nb"), "$.data.id: control characters are not allowed"),
        (_anchor_with(pose=[]), "$.data.pose: expected an object, got an array of 0"),
        (
            _anchor_with(position=[1, 2]),
            "$.data.pose.position: expected 3 numbers [x, y, z], got 2",
        ),
        (
            _anchor_with(position=[1, 2, 1000.5]),
            "$.data.pose.position[2]: expected a number with |v| <= 1000, got 1000.5",
        ),
        (
            _anchor_with(position=[1, True, 3]),
            "$.data.pose.position[1]: expected a number, got true",
        ),
        (
            _anchor_with(rotation=[0, 0, 0, 2]),
            "$.data.pose.rotation: expected a squared norm within [0.9, 1.1], got 4",
        ),
        (_anchor_with(rotation=[0, 0, 1]), "$.data.pose.rotation: expected 4 numbers, got 3"),
        (
            _anchor_with(timestamp=None),
            "$.data.pose.timestamp: missing, expected seconds since 2001-01-01T00:00:00Z",
        ),
        (
            _anchor_with(timestamp=-978307200),
            "$.data.pose.timestamp: expected seconds since 2001-01-01T00:00:00Z (a number, "
            "after 1970), got -978307200",
        ),
        (_anchor_with(timestamp=1e300), "$.data.pose.timestamp: expected seconds since"),
        (_anchor_with(metadata=[1]), "$.data.metadata: expected an object, got an array of 1"),
        (_mesh_with(id=None), "$.data.id: missing"),
        (_mesh_with(anchorId=None), "$.data.anchorId: missing"),
        (_mesh_with(vertices=None), "$.data.vertices: missing, expected base64 text"),
        (_mesh_with(vertices=""), "$.data.vertices: empty, expected the compressed mesh as base64"),
        (_mesh_with(vertices="H4sI=AAA"), "$.data.vertices: not standard base64"),
        (_mesh_with(vertices="AAAA\n"), "$.data.vertices: not standard base64"),
        (_mesh_with(faces="AA="), "$.data.faces: not standard base64"),
        (_mesh_with(normals=5), "$.data.normals: expected base64 text, got 5"),
        (
            _mesh_with(compressionLevel=10),
            "$.data.compressionLevel: expected an integer from 0 to 9, got 10",
        ),
        (_mesh_with(compressionLevel=None), "$.data.compressionLevel: missing"),
        (_mesh_with(isDelta=1), "$.data.isDelta: expected true or false, got 1"),
        (
            _mesh_with(isDelta=True),
            "$.data.baseMeshId: missing; a delta (isDelta true) names the mesh it changes",
        ),
    ],
)
def test_invalid_messages_name_the_path_and_the_fix(raw: bytes, message: str) -> None:
    error = _error(raw)
    assert error.message.startswith(message), error.message
    assert error.code == sdk.INVALID_MESSAGE


def test_an_error_carries_the_kind_and_trace_it_could_read() -> None:
    error = _error(_mesh_with(compressionLevel=-1))
    assert (error.kind, error.trace_id) == ("mesh_update", TRACE_IDS[1])
    # Handled wherever an invalid seed packet is: a PacketError with the metric's type.
    assert isinstance(error, PacketError)
    assert (error.packet_type, error.frame_number) == ("mesh", None)
    assert _error(_anchor_with(id=None)).packet_type == "pose"
    assert _error(_outer_with(PING, timestamp=0)).packet_type == "unknown"


# --- junk never crashes ---------------------------------------------------------------------------

_VALID = (ANCHOR_UPDATE, MESH_UPDATE_FULL, MESH_UPDATE_DELTA, PING)


def _parses_or_refuses(raw: bytes | str, binary: bool) -> None:
    try:
        _parse(raw, binary=binary)
    except SdkError as exc:
        assert exc.message.startswith("$")


@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_parse_or_raise_sdk_error(raw: bytes, binary: bool) -> None:
    _parses_or_refuses(raw, binary)


@given(st.sampled_from(_VALID), st.data(), st.booleans())
def test_any_cut_of_a_valid_message_parses_or_raises_sdk_error(
    message: bytes, data: st.DataObject, binary: bool
) -> None:
    cut = data.draw(st.integers(0, len(message)))
    _parses_or_refuses(message[:cut], binary)
    _parses_or_refuses(message[cut:], binary)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


@given(st.sampled_from(_VALID), st.data(), _json_values, st.booleans())
def test_any_field_replaced_parses_or_raises_sdk_error(
    message: bytes, data: st.DataObject, value: Any, binary: bool
) -> None:
    outer = _outer(message)
    if "data" in outer and data.draw(st.booleans()):
        inner = _inner(message)
        key = data.draw(st.sampled_from(sorted(inner)))
        inner[key] = value
        outer["data"] = base64.b64encode(orjson.dumps(inner)).decode()
    else:
        outer[data.draw(st.sampled_from(sorted(outer)))] = value
    _parses_or_refuses(orjson.dumps(outer), binary)


@given(st.sampled_from(_VALID), st.data())
def test_any_byte_flipped_in_the_base64_data_parses_or_raises_sdk_error(
    message: bytes, data: st.DataObject
) -> None:
    outer = _outer(message)
    assume("data" in outer)
    raw = bytearray(base64.b64decode(outer["data"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] = data.draw(st.integers(0, 255))
    outer["data"] = base64.b64encode(bytes(raw)).decode()
    _parses_or_refuses(orjson.dumps(outer), True)


# --- events and ids -------------------------------------------------------------------------------


def test_event_ids_are_deterministic_in_session_kind_id_and_timestamp() -> None:
    update = _parse(ANCHOR_UPDATE)
    expected = uuid.uuid5(
        uuid.UUID("6f1c3b1e-5a0d-4c8e-9a57-2f4d0b8e1c73"),
        f"{SESSION_ID}\x00pose\x00{ANCHOR_ID}\x001733450000125",
    )
    assert update.event_id == str(expected)
    assert update.key == ("pose", ANCHOR_ID, 1733450000125)
    # Another pose time, another event; the send time does not matter.
    later = _parse(_anchor_with(timestamp=755142800.126))
    assert later.event_id != update.event_id
    assert _parse(_outer_with(ANCHOR_UPDATE, timestamp=5)).event_id == update.event_id
    mesh = _parse(MESH_UPDATE_FULL)
    assert mesh.key == ("mesh", MESH_ID, 1733450000231)
    assert mesh.event_id == sdk.sdk_event_id(SESSION_ID, "mesh", MESH_ID, 1733450000231)


def test_an_anchor_update_becomes_a_pose_event_with_the_sdk_s_anchor_id() -> None:
    event = _parse(ANCHOR_UPDATE).to_event(received_at_ms=1733450000200)
    assert (event.type, event.session_id, event.frame_number) == ("pose", SESSION_ID, 0)
    assert event.event_id == _parse(ANCHOR_UPDATE).event_id
    (anchor,) = event.anchors
    assert anchor.id == ANCHOR_ID and anchor.timestamp == 1733450000125
    assert (anchor.x, anchor.y, anchor.z) == (0.25, 1.5, -0.75)
    assert "metadata" not in anchor.to_json()


def test_metadata_reaches_the_event() -> None:
    event = _parse(_anchor_with(metadata={"room": "lab"})).to_event(received_at_ms=1)
    assert event.anchors[0].to_json()["metadata"] == {"room": "lab"}


def test_a_full_mesh_becomes_a_mesh_event_with_the_client_s_base64_text() -> None:
    inner = _inner(MESH_UPDATE_FULL)
    event = _parse(MESH_UPDATE_FULL).to_event(received_at_ms=1)
    (mesh,) = event.meshes
    assert mesh.vertices_delta == inner["vertices"] and mesh.normals == inner["normals"]
    assert (mesh.mesh_id, mesh.anchor_id, mesh.compression_level) == (MESH_ID, ANCHOR_ID, 5)
    assert not mesh.is_delta and mesh.delta_data == "" and mesh.base_mesh_id is None


def test_a_delta_mesh_becomes_a_pass_through_delta() -> None:
    inner = _inner(MESH_UPDATE_DELTA)
    (mesh,) = _parse(MESH_UPDATE_DELTA).to_event(received_at_ms=1).meshes
    assert mesh.delta_data == inner["vertices"] and mesh.base_mesh_id == MESH_ID
    # Not a relay delta: nothing for the relay's own diff code.
    assert not mesh.is_delta and mesh.vertices_delta == ""


# --- replies --------------------------------------------------------------------------------------


def _as_the_sdk_reads_it(payload: bytes) -> dict[str, Any]:
    """StreamingClient.swift:188-218: a WSMessage with a String type and an Int64 timestamp."""
    message = orjson.loads(payload)
    assert type(message["type"]) is str and type(message["timestamp"]) is int
    assert set(message) <= {"type", "sessionId", "data", "timestamp", "traceId"}
    return message  # type: ignore[no-any-return]


def test_a_pong_is_a_wsmessage_the_sdk_decodes() -> None:
    assert _as_the_sdk_reads_it(encode_pong(SESSION_ID, 1733450030150)) == {
        "type": "pong",
        "sessionId": SESSION_ID,
        "timestamp": 1733450030150,
    }


def test_an_error_s_data_is_base64_of_code_and_message() -> None:
    payload = encode_error(SESSION_ID, 7, sdk.INVALID_MESSAGE, "$.data: bad", trace_id="t")
    message = _as_the_sdk_reads_it(payload)
    assert (message["type"], message["sessionId"], message["traceId"]) == ("error", SESSION_ID, "t")
    inner = orjson.loads(binascii.a2b_base64(message["data"], strict_mode=True))
    # The SDK shows the app an error only when data holds a "message" string.
    assert inner == {"code": "INVALID_MESSAGE", "message": "$.data: bad"}


def test_an_error_reply_for_an_invalid_message_is_ready_made() -> None:
    error = _error(_anchor_with(rotation=[0, 0, 0, 2]))
    payload = encode_error(SESSION_ID, 1, error.code, error.message, error.trace_id)
    inner = orjson.loads(base64.b64decode(orjson.loads(payload)["data"]))
    assert inner["message"].startswith("$.data.pose.rotation:")


# --- the anchor_update fast path ----------------------------------------------------------


def _checked_in_full(raw: bytes) -> sdk.Message | None:
    """What the full path makes of a binary frame (None: it refuses it)."""
    try:
        return sdk.parse_in_full(raw, binary=True, session_id=SESSION_ID)
    except PacketError:  # SdkError
        return None


_near_coordinate = st.one_of(
    st.sampled_from([1000, -1000.0, 1000.0001, -1000.0001, 1001, True, None, "1"]),
    st.floats(-1000.01, 1000.01),
    st.integers(-1001, 1001),
)
_near_component = st.one_of(st.floats(-1.1, 1.1), st.integers(-1, 1), st.just(False))
# Containers are built per draw (st.builds): one object shared by two changes of one
# example can end up inside itself ("pose" set to it, then "pose.position").
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=8), st.builds(dict)
)
_ids = st.one_of(st.text(max_size=130), st.sampled_from(["", "a\u00a0b", "a\nb", "x" * 129]))
# For each field, values on both sides of its rules; "" paths are the outer message's.
_OUTER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["mesh_update", "ping", "anchor_update_", "Anchor_update"]),
    "timestamp": st.one_of(st.integers(-2, 2), st.integers(2**63 - 2, 2**64 - 1), _junk),
    "sessionId": st.one_of(st.just(SESSION_ID), st.just("another"), _junk),
    "traceId": st.one_of(_ids, _junk),
    "data": st.one_of(st.sampled_from(["", "AAAA=", "e30=", "W10=", "bnVsbA=="]), _junk),
    "session_id": _junk,
}
_KNOWN_OUTER = {"type", "sessionId", "data", "timestamp", "traceId"}
_INNER_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.one_of(_ids, _junk),
    "metadata": st.one_of(st.fixed_dictionaries({"k": st.just(1)}), _junk),
    "pose": _junk,
    "pose.position": st.one_of(st.lists(_near_coordinate, min_size=2, max_size=4), _junk),
    "pose.position.0": _near_coordinate,
    "pose.position.1": _near_coordinate,
    "pose.position.2": _near_coordinate,
    "pose.rotation": st.one_of(st.lists(_near_component, min_size=3, max_size=5), _junk),
    "pose.rotation.1": _near_component,
    "pose.rotation.3": _near_component,
    "pose.timestamp": st.one_of(
        st.floats(-1e16, 1e16),
        st.floats(-9e15, -978_307_200.0),
        st.sampled_from([9e15, -9e15, -978_307_200.0, -978_307_199.999]),
        _junk,
    ),
    "confidence": _junk,
    "pose.scale": _junk,
}
_KNOWN_INNER = {"id", "pose", "metadata"}
_KNOWN_POSE = {"position", "rotation", "timestamp"}
_GONE = object()


def _set(obj: dict[str, Any], field: str, value: Any) -> None:
    *parents, key = field.split(".")
    target: Any = obj
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(key)] = value
    elif value is _GONE:
        target.pop(key, None)
    else:
        target[key] = value


@settings(max_examples=1000)
@given(
    position=st.tuples(_f32_coordinates, _f32_coordinates, _f32_coordinates),
    rotation=_unit_quaternions(),
    pose_ms=st.integers(978_307_200_000, 4_102_444_800_000),
    trace=st.sampled_from([None, *TRACE_IDS]),
    data=st.data(),
)
def test_the_anchor_update_fast_path_agrees_with_the_full_checks(
    position: tuple[float, float, float],
    rotation: tuple[float, float, float, float],
    pose_ms: int,
    trace: str | None,
    data: st.DataObject,
) -> None:
    """``_valid_anchor_update`` accepts only what the full checks accept, as the same
    update; it may leave to them what it cannot decide (ids with non-printables)."""
    outer = _outer(
        wsmessage(
            "anchor_update",
            anchor_inner(position, rotation, pose_ms / 1000),
            timestamp=1_700_000_000_000,
            trace_id=trace,
        )
    )
    inner = orjson.loads(base64.b64decode(outer["data"]))
    for _ in range(data.draw(st.integers(0, 2))):
        if data.draw(st.booleans()):
            field = data.draw(st.sampled_from(sorted(_OUTER_VALUES)))
            target, choices = outer, _OUTER_VALUES
        else:
            field = data.draw(st.sampled_from(sorted(_INNER_VALUES)))
            target, choices = inner, _INNER_VALUES
        removal = st.nothing() if field[-1].isdigit() else st.just(_GONE)
        value = data.draw(st.one_of(choices[field], removal))
        # A second change may name a field the first one took away: then only the first.
        with contextlib.suppress(TypeError, KeyError, IndexError, AttributeError):
            _set(target, field, value)
        if target is inner and outer.get("data") is not None and type(outer["data"]) is str:
            outer["data"] = base64.b64encode(orjson.dumps(inner)).decode()
    raw = orjson.dumps(outer)
    fast = sdk._valid_anchor_update(raw, SESSION_ID)
    full = _checked_in_full(raw)
    if fast is not None:
        assert fast == full
    elif (
        isinstance(full, AnchorUpdate)
        and set(outer) <= _KNOWN_OUTER
        and set(inner) <= _KNOWN_INNER
        and set(inner["pose"]) <= _KNOWN_POSE
    ):
        # What the fast path may leave to the full one: non-printable ids.
        assert not (full.anchor_id.isprintable() and (full.trace_id or "x").isprintable())


def _changed_near_the_end(change: tuple[bytes, int, str]) -> str:
    """The base64 of some bytes, its ``back``-th character from the end replaced."""
    data, back, character = change
    text = base64.b64encode(data).decode()
    at = len(text) - back
    return text[:at] + character + text[at + 1 :]


@settings(max_examples=2000)
@given(
    st.one_of(
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n",
            max_size=24,
        ),
        st.binary(max_size=18).map(lambda raw: base64.b64encode(raw).decode()),
        # Around b64.decode's switch to pybase64 (1,024 characters), with a character
        # changed near the end, where padding and alphabet go wrong.
        st.tuples(
            st.binary(min_size=760, max_size=775),
            st.integers(1, 6),
            st.sampled_from("A=/+-_ \n"),
        ).map(_changed_near_the_end),
    )
)
def test_the_fast_path_reads_base64_as_strictly_as_the_full_checks(text: str) -> None:
    """msgspec decodes the data of an anchor_update on the fast path: the same text
    must be base64 to it as to b64.decode, as the same bytes."""
    outer = orjson.dumps({"type": "anchor_update", "data": text, "timestamp": 1})
    try:
        decoded: bytes | None = sdk._decode_anchor_message(outer).data
    except msgspec.ValidationError:
        decoded = None
    assert decoded == b64.decode(text)


def test_the_sdks_own_anchor_update_takes_the_fast_path() -> None:
    fast = sdk._valid_anchor_update(ANCHOR_UPDATE, SESSION_ID)
    assert fast is not None and fast == _checked_in_full(ANCHOR_UPDATE)


def _anchor_message(inner: bytes, **outer: bytes) -> bytes:
    extra = b"".join(b',"' + key.encode() + b'":' + value for key, value in outer.items())
    return (
        b'{"type":"anchor_update","data":"'
        + base64.b64encode(inner)
        + b'","timestamp":1'
        + extra
        + b"}"
    )


_POSE_JSON = b'"pose":{"position":[0,0,0],"rotation":[0,0,0,1],"timestamp":%s}'


@pytest.mark.parametrize(
    "raw",
    [
        # What msgspec would skip unchecked, in the message and in its data: invalid
        # UTF-8 (overlong, a surrogate, beyond U+10FFFF), numbers beyond a double.
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0" + b',"q":"\xc0\xaf"}'),
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0" + b',"q":"\xed\xa0\x80"}'),
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0" + b',"q":1.8e308}'),
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0", q=b'"\xf4\x90\x80\x80"'),
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0" + b"}", q=b"9" * 400),
        # Nesting deeper than Python's recursion limit and orjson's.
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"0" + b',"metadata":' + b'{"a":' * 1100),
        # A pose time before 1970: no Unix millisecond timestamp.
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"-978307200.0" + b"}"),
        _anchor_message(b'{"id":"a",' + _POSE_JSON % b"-2000000000" + b"}"),
    ],
)
def test_what_the_fast_path_cannot_vouch_for_gets_the_full_checks(raw: bytes) -> None:
    assert sdk._valid_anchor_update(raw, SESSION_ID) is None
    with pytest.raises(SdkError):
        _parse(raw)
