"""parse_packet: the StreamKit wire rules, strict types, error paths, and junk."""

from __future__ import annotations

import base64
import contextlib
import copy
from typing import Any

import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from stag_relay.protocol import packets as packets_module
from stag_relay.protocol.packets import MeshData, Packet, PacketError, Pose, parse_packet

# --- strategies for valid packets -------------------------------------------------

# orjson writes integers of up to 64 bits; wider ones are tested as raw JSON text.
_json_ints = st.integers(-(2**63), 2**64 - 1)
# Code points a session id may hold: anything but control characters (and the
# surrogates no JSON text can carry).
_id_chars = st.characters(exclude_categories=("Cc", "Cs"))
session_ids = st.text(_id_chars, min_size=1, max_size=128)
anchor_ids = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128)
frame_numbers = st.integers(0, 2**63 - 1)
# orjson reads integers up to 2**64 - 1 exactly; beyond, it yields floats.
timestamps = st.integers(1, 2**64 - 1)
coordinates = st.one_of(
    st.floats(-1000, 1000, allow_nan=False, allow_infinity=False),
    st.integers(-1000, 1000),
)


def _norm_sq(q: list[Any]) -> Any:
    return sum(v * v for v in q)


@st.composite
def rotations(draw: st.DrawFn) -> list[Any]:
    """Quaternions with a squared norm in [0.9, 1.1], floats or integers."""
    if draw(st.booleans()):
        # Axis-aligned unit quaternions, as clients write them: [0, 0, 0, 1].
        q: list[Any] = [0, 0, 0, 0]
        q[draw(st.integers(0, 3))] = draw(st.sampled_from([1, -1, 1.0, -1.0]))
        return q
    raw = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4))
    norm = _norm_sq(raw) ** 0.5
    assume(norm > 1e-3)
    target = draw(st.floats(0.9, 1.1)) ** 0.5
    q = [v / norm * target for v in raw]
    assume(0.9 <= _norm_sq(q) <= 1.1)
    return q


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


base64_texts = st.binary(min_size=1, max_size=64).map(_b64)
# Unknown fields are ignored, wherever they are.
extras = st.dictionaries(
    st.text(max_size=10).filter(
        lambda k: (
            k
            not in {
                "session_id",
                "frame_number",
                "timestamp",
                "type",
                "data",
                "pose",
                "mesh",
                "x",
                "y",
                "z",
                "rotation",
                "anchor_id",
                "vertices",
                "faces",
            }
        )
    ),
    st.one_of(st.none(), _json_ints, st.text(max_size=5)),
    max_size=3,
)


@st.composite
def pose_packets(draw: st.DrawFn) -> dict[str, Any]:
    pose = {
        "x": draw(coordinates),
        "y": draw(coordinates),
        "z": draw(coordinates),
        "rotation": draw(rotations()),
        **draw(extras),
    }
    return {
        "session_id": draw(session_ids),
        "frame_number": draw(frame_numbers),
        "timestamp": draw(timestamps),
        "type": "pose",
        "data": {"pose": pose, **draw(extras)},
        **draw(extras),
    }


@st.composite
def mesh_packets(draw: st.DrawFn) -> dict[str, Any]:
    vertices = draw(base64_texts)
    mesh: dict[str, Any] = {"anchor_id": draw(anchor_ids), "vertices": vertices, **draw(extras)}
    faces = draw(st.sampled_from(["absent", "empty", "same", "other"]))
    if faces == "empty":
        mesh["faces"] = ""
    elif faces == "same":
        mesh["faces"] = vertices
    elif faces == "other":
        mesh["faces"] = draw(base64_texts)
    return {
        "session_id": draw(session_ids),
        "frame_number": draw(frame_numbers),
        "timestamp": draw(timestamps),
        "type": "mesh",
        "data": {"mesh": mesh, **draw(extras)},
        **draw(extras),
    }


packets = st.one_of(pose_packets(), mesh_packets())


def _encode(obj: Any, as_text: bool = False) -> bytes | str:
    raw = orjson.dumps(obj)
    return raw.decode() if as_text else raw


def _expected(obj: dict[str, Any]) -> Packet:
    data = obj["data"]
    if obj["type"] == "pose":
        p = data["pose"]
        pose = Pose(float(p["x"]), float(p["y"]), float(p["z"]), tuple(map(float, p["rotation"])))  # type: ignore[arg-type]
        return Packet(obj["session_id"], obj["frame_number"], obj["timestamp"], "pose", pose, None)
    m = data["mesh"]
    mesh = MeshData(m["anchor_id"], m["vertices"], m.get("faces", ""))
    return Packet(obj["session_id"], obj["frame_number"], obj["timestamp"], "mesh", None, mesh)


def _error(raw: bytes | str) -> PacketError:
    with pytest.raises(PacketError) as info:
        parse_packet(raw)
    return info.value


def _path(error: PacketError) -> str:
    return error.message.split(": ", 1)[0]


POSE: dict[str, Any] = {
    "session_id": "session-123",
    "frame_number": 1,
    "timestamp": 1634567890123,
    "type": "pose",
    "data": {"pose": {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]}},
}
MESH: dict[str, Any] = {
    "session_id": "session-123",
    "frame_number": 2,
    "timestamp": 1634567890124,
    "type": "mesh",
    "data": {"mesh": {"vertices": "QUJDRA==", "faces": "RUZHSA==", "anchor_id": "anchor-456"}},
}


# A value for _mutate: remove the field.
_DELETE = object()


# --- valid packets ----------------------------------------------------------------


def test_issue_examples_parse() -> None:
    assert parse_packet(orjson.dumps(POSE)) == Packet(
        "session-123",
        1,
        1634567890123,
        "pose",
        Pose(1.0, 2.0, 3.0, (0.0, 0.0, 0.0, 1.0)),
        None,
    )
    assert parse_packet(orjson.dumps(MESH)) == Packet(
        "session-123",
        2,
        1634567890124,
        "mesh",
        None,
        MeshData("anchor-456", "QUJDRA==", "RUZHSA=="),
    )


@settings(max_examples=300)
@given(packets, st.booleans())
def test_valid_packets_parse_to_exactly_their_values(obj: dict[str, Any], as_text: bool) -> None:
    packet = parse_packet(_encode(obj, as_text))
    assert packet == _expected(obj)
    if packet.pose is not None:
        values = (packet.pose.x, packet.pose.y, packet.pose.z, *packet.pose.rotation)
        assert all(type(v) is float for v in values)
        assert packet.mesh is None
    else:
        assert packet.mesh is not None


@given(st.integers(0, 2**63 - 1))
@example(0)
@example(2**63 - 1)
def test_frame_number_bounds_inclusive(n: int) -> None:
    assert parse_packet(orjson.dumps(_mutate(POSE, "frame_number", n))).frame_number == n


@pytest.mark.parametrize(
    "rotation",
    [
        [0, 0, 0, 1],
        [0.0, 0.0, 0.0, -1.0],
        [0.5, 0.5, 0.5, 0.5],
        [0, 0, 0, 0.9487],
        [0, 0, 0, 1.0488],
    ],
)
def test_rotation_norm_within_bounds(rotation: list[float]) -> None:
    packet = parse_packet(orjson.dumps(_mutate(POSE, "data.pose.rotation", rotation)))
    assert packet.pose is not None
    assert packet.pose.rotation == tuple(rotation)


@pytest.mark.parametrize("value", [1000, -1000, 1000.0, -1000.0, 0, -0.0, 1e-300])
def test_coordinate_bounds_inclusive(value: float) -> None:
    packet = parse_packet(orjson.dumps(_mutate(POSE, "data.pose.y", value)))
    assert packet.pose is not None
    assert packet.pose.y == value


def test_session_id_may_hold_non_control_unicode() -> None:
    # Not printable (isprintable() is False) but not control characters either.
    for sid in ["a\u00a0b", "a\u2028b", "\u200b", "é" * 128, "🦌"]:
        assert parse_packet(orjson.dumps(_mutate(POSE, "session_id", sid))).session_id == sid


def test_mesh_faces_may_be_absent_empty_or_the_vertices() -> None:
    absent = parse_packet(orjson.dumps(_mutate(MESH, "data.mesh.faces", _DELETE)))
    empty = parse_packet(orjson.dumps(_mutate(MESH, "data.mesh.faces", "")))
    same = parse_packet(orjson.dumps(_mutate(MESH, "data.mesh.faces", "QUJDRA==")))
    assert absent.mesh == empty.mesh == MeshData("anchor-456", "QUJDRA==", "")
    assert same.mesh == MeshData("anchor-456", "QUJDRA==", "QUJDRA==")


def test_data_may_hold_the_other_object_too() -> None:
    obj = _mutate(POSE, "data.mesh", {"anything": 1})
    assert parse_packet(orjson.dumps(obj)).mesh is None


# --- every rule, broken in every way ----------------------------------------------

_non_strings = st.one_of(
    st.none(),
    st.booleans(),
    _json_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(_json_ints, max_size=3),
    st.dictionaries(st.text(max_size=3), _json_ints, max_size=2),
)
_non_numbers = st.one_of(
    st.none(),
    st.booleans(),
    # The cattrs coercion trap: numeric strings are not numbers.
    st.sampled_from(["1.5", "0", "1e3", "NaN"]),
    st.text(max_size=5),
    st.lists(st.floats(allow_nan=False), max_size=2),
    st.dictionaries(st.text(max_size=3), _json_ints, max_size=2),
)
_non_integers = st.one_of(
    _non_numbers,
    # 1.0 and 1.9 are numbers but not integers: neither may become int 1.
    st.floats(allow_nan=False, allow_infinity=False),
)
_control_chars = st.characters(categories=["Cc"])


@st.composite
def _with_control_char(draw: st.DrawFn) -> str:
    base = draw(st.text(_id_chars, max_size=127))
    i = draw(st.integers(0, len(base)))
    return base[:i] + draw(_control_chars) + base[i:]


@st.composite
def _bad_base64(draw: st.DrawFn) -> str:
    good = draw(base64_texts)
    kind = draw(st.sampled_from(["alphabet", "urlsafe", "unpadded", "surplus", "space", "after"]))
    if kind == "alphabet":
        i = draw(st.integers(0, len(good)))
        return good[:i] + draw(st.sampled_from("!*.-_~é\n\t ")) + good[i:]
    if kind == "urlsafe":
        raw = draw(st.binary(min_size=1, max_size=30).filter(lambda b: "+" in _b64e(b)))
        return base64.urlsafe_b64encode(raw).decode()
    if kind == "unpadded":
        assume(good.endswith("="))
        return good.rstrip("=")
    if kind == "surplus":
        return good + "=" * draw(st.integers(1, 4))
    if kind == "space":
        return good[:1] + " " + good[1:]
    # Data after the final padding.
    assume(good.endswith("="))
    return good + good


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


# (field path, strategy of wrong values, path in the message). _DELETE = missing.
_MUTATIONS: list[tuple[str, st.SearchStrategy[Any], str]] = [
    ("session_id", st.just(_DELETE), "$.session_id"),
    ("session_id", _non_strings, "$.session_id"),
    ("session_id", st.just(""), "$.session_id"),
    ("session_id", st.text(_id_chars, min_size=129, max_size=300), "$.session_id"),
    ("session_id", _with_control_char(), "$.session_id"),
    ("frame_number", st.just(_DELETE), "$.frame_number"),
    ("frame_number", _non_integers, "$.frame_number"),
    ("frame_number", st.integers(-(2**63), -1), "$.frame_number"),
    ("frame_number", st.integers(2**63, 2**64 - 1), "$.frame_number"),
    ("timestamp", st.just(_DELETE), "$.timestamp"),
    ("timestamp", _non_integers, "$.timestamp"),
    ("timestamp", st.integers(-(2**63), 0), "$.timestamp"),
    ("type", st.just(_DELETE), "$.type"),
    ("type", _non_strings, "$.type"),
    ("type", st.text(max_size=8).filter(lambda t: t not in ("pose", "mesh")), "$.type"),
    ("data", st.just(_DELETE), "$.data"),
    ("data", _non_strings.filter(lambda v: type(v) is not dict), "$.data"),
]
_POSE_MUTATIONS: list[tuple[str, st.SearchStrategy[Any], str]] = [
    ("data.pose", st.just(_DELETE), "$.data.pose"),
    ("data.pose", _non_strings.filter(lambda v: type(v) is not dict), "$.data.pose"),
    *[
        (f"data.pose.{axis}", wrong, f"$.data.pose.{axis}")
        for axis in "xyz"
        for wrong in (
            st.just(_DELETE),
            _non_numbers,
            st.floats(min_value=1000, exclude_min=True, allow_infinity=False),
            st.floats(max_value=-1000, exclude_max=True, allow_infinity=False),
            st.integers(1001, 2**64 - 1),
            st.integers(-(2**63), -1001),
        )
    ],
    ("data.pose.rotation", st.just(_DELETE), "$.data.pose.rotation"),
    (
        "data.pose.rotation",
        _non_strings.filter(lambda v: type(v) is not list),
        "$.data.pose.rotation",
    ),
    (
        "data.pose.rotation",
        st.lists(st.just(0.5), max_size=10).filter(lambda q: len(q) != 4),
        "$.data.pose.rotation",
    ),
    # Squared norm outside [0.9, 1.1].
    (
        "data.pose.rotation",
        st.lists(st.floats(-3, 3), min_size=4, max_size=4).filter(
            lambda q: not 0.9 <= _norm_sq(q) <= 1.1
        ),
        "$.data.pose.rotation",
    ),
    ("data.pose.rotation", st.just([0, 0, 0, 2**64 - 1]), "$.data.pose.rotation"),
    ("data.pose.rotation", st.just([0, 0, 0, 1.7e308]), "$.data.pose.rotation"),
    *[(f"data.pose.rotation.{i}", _non_numbers, f"$.data.pose.rotation[{i}]") for i in range(4)],
]
_MESH_MUTATIONS: list[tuple[str, st.SearchStrategy[Any], str]] = [
    ("data.mesh", st.just(_DELETE), "$.data.mesh"),
    ("data.mesh", _non_strings.filter(lambda v: type(v) is not dict), "$.data.mesh"),
    ("data.mesh.anchor_id", st.just(_DELETE), "$.data.mesh.anchor_id"),
    ("data.mesh.anchor_id", _non_strings, "$.data.mesh.anchor_id"),
    ("data.mesh.anchor_id", st.just(""), "$.data.mesh.anchor_id"),
    ("data.mesh.anchor_id", st.text(min_size=129, max_size=200), "$.data.mesh.anchor_id"),
    ("data.mesh.vertices", st.just(_DELETE), "$.data.mesh.vertices"),
    ("data.mesh.vertices", _non_strings, "$.data.mesh.vertices"),
    ("data.mesh.vertices", st.just(""), "$.data.mesh.vertices"),
    ("data.mesh.vertices", _bad_base64(), "$.data.mesh.vertices"),
    ("data.mesh.faces", _non_strings, "$.data.mesh.faces"),
    ("data.mesh.faces", _bad_base64(), "$.data.mesh.faces"),
]


def _mutate(obj: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with the field at ``field`` ("data.pose.rotation.2") set,
    or removed when ``value`` is ``_DELETE``."""
    obj = copy.deepcopy(obj)
    *parents, key = field.split(".")
    target: Any = obj
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if isinstance(target, list):
        target[int(key)] = value
    elif value is _DELETE:
        target.pop(key, None)
    else:
        target[key] = value
    return obj


@st.composite
def broken_packets(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid packet with one rule broken: (packet, field path, expected JSON path)."""
    kind = draw(st.sampled_from(["pose", "mesh"]))
    obj = draw(pose_packets() if kind == "pose" else mesh_packets())
    mutations = _MUTATIONS + (_POSE_MUTATIONS if kind == "pose" else _MESH_MUTATIONS)
    field, wrong, path = draw(st.sampled_from(mutations))
    value = draw(wrong)
    if field == "data.mesh.faces":
        # faces equal to vertices is allowed whatever it is.
        assume(value != obj["data"]["mesh"]["vertices"])
    return _mutate(obj, field, value), field, path


@settings(max_examples=600)
@given(broken_packets(), st.booleans())
def test_each_broken_rule_is_reported_at_its_path(
    case: tuple[dict[str, Any], str, str], as_text: bool
) -> None:
    obj, field, path = case
    error = _error(_encode(obj, as_text))
    assert _path(error) == path, error.message
    # Context for the reply and the metric label, whenever it could be read.
    expected_frame = None if field == "frame_number" else obj["frame_number"]
    assert error.frame_number == expected_frame
    expected_type = "unknown" if field == "type" else obj["type"]
    assert error.packet_type == expected_type
    assert len(error.message) < 200, error.message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # The cattrs coercion traps: each of these would pass a default Converter.
        ("frame_number", 1.9, "$.frame_number: expected an integer, got 1.9"),
        ("frame_number", 1.0, "$.frame_number: expected an integer, got 1.0"),
        ("frame_number", "1", '$.frame_number: expected an integer, got "1"'),
        ("frame_number", True, "$.frame_number: expected an integer, got true"),
        ("timestamp", False, "$.timestamp: expected an integer, got false"),
        ("timestamp", 1.6e12, "$.timestamp: expected an integer, got 1600000000000.0"),
        ("data.pose.x", "1.5", '$.data.pose.x: expected a number, got "1.5"'),
        ("data.pose.y", True, "$.data.pose.y: expected a number, got true"),
        ("data.pose.z", None, "$.data.pose.z: expected a number, got null"),
        (
            "data.pose.rotation",
            [0, 0, 0, True],
            "$.data.pose.rotation[3]: expected a number, got true",
        ),
        (
            "data.pose.rotation",
            ["0", 0, 0, 1],
            '$.data.pose.rotation[0]: expected a number, got "0"',
        ),
        ("session_id", 123, "$.session_id: expected a string of 1 to 128 characters, got 123"),
        # The forms the gate's replies show.
        ("data.pose.rotation", [0, 0, 1], "$.data.pose.rotation: expected 4 numbers, got 3"),
        (
            "data.pose.rotation",
            [0, 0, 0, 2],
            "$.data.pose.rotation: expected a squared norm within [0.9, 1.1], got 4",
        ),
        (
            "data.pose.rotation",
            {"w": 1},
            "$.data.pose.rotation: expected an array of 4 numbers, got an object",
        ),
        (
            "data.pose.x",
            1000.5,
            "$.data.pose.x: expected a number with |v| <= 1000, got 1000.5",
        ),
        (
            "session_id",
            "",
            "$.session_id: expected a string of 1 to 128 characters, got 0 characters",
        ),
        ("session_id", "a\x00b", "$.session_id: control characters are not allowed"),
        ("session_id", "a\x85b", "$.session_id: control characters are not allowed"),
        ("session_id", _DELETE, "$.session_id: missing, expected a string of 1 to 128 characters"),
        ("frame_number", -1, "$.frame_number: expected an integer from 0 to 2**63-1, got -1"),
        ("timestamp", 0, "$.timestamp: expected an integer > 0 (Unix milliseconds), got 0"),
        ("type", "Pose", '$.type: expected "pose" or "mesh", got "Pose"'),
        ("data", [], "$.data: expected an object, got an array of 0"),
        ("data", {"mesh": {}}, "$.data.pose: missing, expected an object"),
    ],
)
def test_error_messages(field: str, value: Any, message: str) -> None:
    assert _error(orjson.dumps(_mutate(POSE, field, value))).message == message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "data.mesh.vertices",
            "",
            '$.data.mesh.vertices: expected non-empty standard base64, got ""',
        ),
        (
            "data.mesh.vertices",
            "QUJDRA",
            '$.data.mesh.vertices: expected non-empty standard base64, got "QUJDRA"',
        ),
        ("data.mesh.faces", None, "$.data.mesh.faces: expected standard base64, got null"),
        (
            "data.mesh.anchor_id",
            "a" * 129,
            "$.data.mesh.anchor_id: expected a string of 1 to 128 characters, got 129 characters",
        ),
    ],
)
def test_mesh_error_messages(field: str, value: Any, message: str) -> None:
    assert _error(orjson.dumps(_mutate(MESH, field, value))).message == message


@pytest.mark.parametrize(
    "text",
    [
        "AAAA=",  # surplus padding, which binascii's strict mode lets through
        "AAAA====",
        "QUJDRA==QUJDRA==",  # data after padding
        "QUJDRA",  # missing padding
        "QUJD RA==",
        "QUJDRA==\n",
        "-_8=",  # the URL-safe alphabet is not standard base64
        "=AAA",
        "AA=A",
        "QUJDRA==é",
    ],
)
def test_non_standard_base64_is_rejected(text: str) -> None:
    assert _path(_error(orjson.dumps(_mutate(MESH, "data.mesh.vertices", text)))) == (
        "$.data.mesh.vertices"
    )


@given(st.binary(min_size=1, max_size=300))
def test_any_standard_base64_is_accepted(data: bytes) -> None:
    text = _b64(data)
    packet = parse_packet(orjson.dumps(_mutate(MESH, "data.mesh.vertices", text)))
    assert packet.mesh is not None
    assert packet.mesh.vertices == text


def test_huge_values_are_not_echoed() -> None:
    huge = "x" * 1_000_000
    for field in ("frame_number", "session_id", "data.pose.x", "type"):
        error = _error(orjson.dumps(_mutate(POSE, field, huge)))
        assert len(error.message) < 120, error.message
    error = _error(orjson.dumps(_mutate(POSE, "data.pose.rotation", [huge] * 4)))
    assert len(error.message) < 120


# --- not JSON, not an object -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"not json",
        b'{"x": NaN}',
        b'{"x": Infinity}',
        b'{"x": 1e400}',  # would be infinity
        b'{"session_id": "\xff"}',  # invalid UTF-8
        '{"session_id": "\ud800"}',  # a lone surrogate in text
        b"[" * 2000,
    ],
)
def test_not_json(raw: bytes | str) -> None:
    error = _error(raw)
    assert error.message.startswith("$: not valid JSON ("), error.message
    assert error.message.endswith(")")
    assert len(error.message) < 120
    assert (error.frame_number, error.packet_type) == (None, "unknown")


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"pose"', b"null", b"true", b"[{}]"])
def test_not_an_object(raw: bytes) -> None:
    error = _error(raw)
    assert error.message == "$: not a JSON object"
    assert (error.frame_number, error.packet_type) == (None, "unknown")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        # Wider than 64 bits: orjson reads these as floats, so not integers.
        (b'{"session_id": "s", "frame_number": 99999999999999999999999}', "$.frame_number"),
        (b'{"session_id": "s", "frame_number": -99999999999999999999999}', "$.frame_number"),
        (
            b'{"session_id": "s", "frame_number": 1, "timestamp": 1, "type": "pose",'
            b' "data": {"pose": {"x": 1, "y": 1, "z": 1,'
            b' "rotation": [0, 0, 0, 99999999999999999999999]}}}',
            "$.data.pose.rotation",
        ),
    ],
)
def test_integers_beyond_64_bits(raw: bytes, path: str) -> None:
    assert _path(_error(raw)) == path


def test_context_is_kept_when_known() -> None:
    obj = _mutate(_mutate(POSE, "frame_number", 42), "data.pose.x", "1")
    error = _error(orjson.dumps(obj))
    assert (error.frame_number, error.packet_type) == (42, "pose")
    error = _error(orjson.dumps({"frame_number": 7, "type": "mesh"}))
    assert (error.frame_number, error.packet_type) == (7, "mesh")
    assert _path(error) == "$.session_id"
    # An invalid frame number is not reported as the frame number.
    error = _error(orjson.dumps({"frame_number": 7.0, "type": "nope"}))
    assert (error.frame_number, error.packet_type) == (None, "unknown")


def test_packet_error_is_a_value_error() -> None:
    error = _error(b"[]")
    assert isinstance(error, ValueError)
    assert str(error) == error.message


# --- junk --------------------------------------------------------------------------

_json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        _json_ints,
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=30,
)
_field_names = st.sampled_from(
    [
        "session_id",
        "frame_number",
        "timestamp",
        "type",
        "data",
        "pose",
        "mesh",
        "x",
        "y",
        "z",
        "rotation",
        "anchor_id",
        "vertices",
        "faces",
    ]
)
# Objects shaped roughly like packets, so that the junk reaches the deep checks.
_packet_like = st.recursive(
    _json_values,
    lambda children: st.dictionaries(_field_names, children, max_size=6),
    max_leaves=20,
)


def _parses_or_rejects(raw: bytes | str) -> None:
    try:
        packet = parse_packet(raw)
    except PacketError as error:
        assert error.packet_type in ("pose", "mesh", "unknown")
        assert error.message.startswith("$")
    else:
        assert isinstance(packet, Packet)


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
def test_arbitrary_bytes_never_raise_anything_else(raw: bytes | str) -> None:
    _parses_or_rejects(raw)


@settings(max_examples=150)
@given(st.one_of(_json_values, _packet_like))
def test_arbitrary_json_never_raises_anything_else(value: Any) -> None:
    _parses_or_rejects(orjson.dumps(value))


@settings(max_examples=150)
@given(packets, st.data())
def test_packets_with_junk_in_any_field_never_raise_anything_else(
    obj: dict[str, Any], data: st.DataObject
) -> None:
    paths = ["session_id", "frame_number", "timestamp", "type", "data"]
    if obj["type"] == "pose":
        paths += ["data.pose", "data.pose.x", "data.pose.rotation", "data.pose.rotation.2"]
    else:
        paths += ["data.mesh", "data.mesh.anchor_id", "data.mesh.vertices", "data.mesh.faces"]
    field = data.draw(st.sampled_from(paths))
    _parses_or_rejects(orjson.dumps(_mutate(obj, field, data.draw(_packet_like))))


# --- the pose fast path ------------------------------------------------------------


def _checked_in_full(raw: bytes) -> Packet | None:
    """What the full path makes of a message (None: it refuses it)."""
    try:
        return packets_module.parse_in_full(raw)
    except PacketError:
        return None


_POSE_KEYS = {"session_id", "frame_number", "timestamp", "type", "data"}


def _only_a_pose(obj: Any) -> bool:
    """Whether a pose packet holds nothing but what the fast path reads."""
    data = obj.get("data")
    pose = data.get("pose") if type(data) is dict else None
    return (
        set(obj) <= _POSE_KEYS
        and type(data) is dict
        and set(data) <= {"pose"}
        and type(pose) is dict
        and set(pose) <= {"x", "y", "z", "rotation"}
    )


_near_coordinate = st.one_of(
    st.floats(-1000.01, 1000.01), st.integers(-1001, 1001), st.sampled_from([1000.0001, True])
)
_near_component = st.one_of(st.floats(-1.1, 1.1), st.integers(-1, 1), st.just(False))
# For each field of a pose packet, values on both sides of its rules, and junk.
_POSE_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "session_id": st.text(max_size=130),
    "frame_number": st.one_of(st.integers(-2, 2), st.integers(2**63 - 2, 2**64 - 1)),
    "timestamp": st.integers(-2, 2),
    "data": _packet_like,
    "data.pose": _packet_like,
    "data.pose.x": _near_coordinate,
    "data.pose.y": _near_coordinate,
    "data.pose.z": _near_coordinate,
    "data.pose.rotation": st.lists(_near_component, min_size=3, max_size=5),
    "data.pose.rotation.0": _near_component,
    "data.pose.rotation.3": _near_component,
}


@settings(max_examples=1000)
@given(pose_packets(), st.data())
def test_the_pose_fast_path_agrees_with_the_full_checks(
    obj: dict[str, Any], data: st.DataObject
) -> None:
    """``_valid_pose`` accepts only what the full checks accept, as the same packet; it
    may leave to them what it cannot decide (an id with non-printable characters)."""
    for _ in range(data.draw(st.integers(0, 2))):
        field = data.draw(st.sampled_from(sorted(_POSE_FIELD_VALUES)))
        removal = st.nothing() if field[-1].isdigit() else st.just(_DELETE)
        value = data.draw(st.one_of(_POSE_FIELD_VALUES[field], _packet_like, removal))
        # A second change may name a field the first one took away: then only the first.
        # (AttributeError: the first made a parent None, which has nothing to delete.)
        with contextlib.suppress(TypeError, KeyError, IndexError, ValueError, AttributeError):
            obj = _mutate(obj, field, value)
    raw = orjson.dumps(obj)
    fast = packets_module._valid_pose(raw)
    full = _checked_in_full(raw)
    if fast is not None:
        assert fast == full
    elif full is not None and full.type == "pose" and _only_a_pose(obj):
        # What the fast path may leave to the full one: a non-printable id.
        assert not full.session_id.isprintable()


@given(pose_packets())
def test_valid_poses_take_the_fast_path(obj: dict[str, Any]) -> None:
    assume(obj["session_id"].isprintable())
    expected = _expected(obj)
    # Only what a pose holds: members of other names go to the full path.
    obj = {key: obj[key] for key in _POSE_KEYS}
    obj["data"] = {"pose": {key: obj["data"]["pose"][key] for key in ("x", "y", "z", "rotation")}}
    assert packets_module._valid_pose(orjson.dumps(obj)) == expected


# How else JSON may spell a pose packet's values: (valid, invalid) spellings, with
# numbers in other notations and beyond 64 bits, escapes, other types, and junk.
_SPELLINGS: dict[str, tuple[list[str], list[str]]] = {
    "session_id": (
        ['"s1"', '"s\\u0031"', '"\u00e9t\u00e9"', '"' + "a" * 128 + '"'],
        ['"s\\u0000"', '""', "1", "null", '"' + "a" * 129 + '"'],
    ),
    "frame_number": (
        ["7", "0", "9223372036854775807"],
        ["-1", "7.0", "7e0", '"7"', "true", "9223372036854775808", "18446744073709551616"],
    ),
    "timestamp": (
        ["1700000000000", "9223372036854775808", "18446744073709551615"],
        ["0", "1.7e12", "18446744073709551616", "1" + "0" * 30, "null"],
    ),
    "type": (['"pose"', '"p\\u006fse"'], ['"mesh"', '"Pose"', "1"]),
    "x": (
        ["0", "-0.0", "1.5", "1e3", "1E3", "-1000", "0.7071067811865476"],
        ["1000.0000001", "1e400", "true", '"1"', "null"],
    ),
}


@st.composite
def pose_texts(draw: st.DrawFn) -> bytes:
    """A pose packet as JSON text, spelled any way JSON allows, with up to two values
    that break a rule, members repeated (the last one counts) and in any order."""
    broken = draw(st.sets(st.sampled_from([*_SPELLINGS, "rotation"]), max_size=2))

    def spell(field: str) -> str:
        valid, invalid = _SPELLINGS[field]
        return draw(st.sampled_from(invalid if field in broken else valid))

    def obj(members: list[tuple[str, str]]) -> str:
        members = list(draw(st.permutations(members)))
        if draw(st.integers(0, 3)) == 0:
            key, _ = draw(st.sampled_from(members))
            extra = (key, draw(st.sampled_from(["1", '"x"', "{}", "[]"])))
            members.insert(draw(st.integers(0, len(members))), extra)
        if draw(st.integers(0, 4)) == 0:
            # A member the fast path does not know, with what orjson refuses and
            # msgspec would skip unchecked (invalid UTF-8 as surrogate escapes).
            unknown = (draw(_UNKNOWN_KEYS), draw(_UNKNOWN_VALUES))
            members.insert(draw(st.integers(0, len(members))), unknown)
        space = draw(st.sampled_from(["", " ", "\n\t"]))
        return "{" + ",".join(f'{space}"{k}"{space}:{space}{v}' for k, v in members) + "}"

    quaternions = ["[0,0,0,1]", "[0.5,0.5,0.5,0.5]", "[1e0,0,0,0]", "[0,0.7071,0,0.7071]"]
    wrong = ["[0,0,0]", "[0,0,0,1,0]", "[0,0,0,2]", "[0,0,0,true]", '[0,0,0,"1"]', "[]"]
    rotation = draw(st.sampled_from(wrong if "rotation" in broken else quaternions))
    pose = obj([("x", spell("x")), ("y", "0.5"), ("z", "-2"), ("rotation", rotation)])
    fields = [(key, spell(key)) for key in ("session_id", "frame_number", "timestamp", "type")]
    text = obj([*fields, ("data", obj([("pose", pose)]))])
    return text.encode("utf-8", errors="surrogateescape")


_UNKNOWN_KEYS = st.sampled_from(["q", "note", "\udcff"])
_UNKNOWN_VALUES = st.sampled_from(
    ['"ok"', "1", "[[[]]]", '"\udcc0\udcaf"', '"\udced\udca0\udc80"', "1.8e308", "9" * 400]
)


@settings(max_examples=1500)
@given(pose_texts())
@example(
    b'{"session_id":"s","frame_number":1,"timestamp":18446744073709551616,"type":"pose",'
    b'"data":{"pose":{"x":0,"y":0,"z":0,"rotation":[0,0,0,1]}}}'
)
def test_the_pose_fast_path_agrees_with_the_full_checks_on_any_spelling(raw: bytes) -> None:
    """The fast path reads the text itself (msgspec, not orjson): whatever it accepts,
    orjson and the full checks accept too, as the same packet."""
    fast = packets_module._valid_pose(raw)
    if fast is not None:
        assert fast == _checked_in_full(raw)


_POSE_PACKET = (
    b'{"session_id":"s","frame_number":1,"timestamp":1700000000000,"type":"pose",'
    b'"data":{"pose":{"x":0,"y":0,"z":0,"rotation":[0,0,0,1]%s}%s}%s}'
)


@pytest.mark.parametrize(
    "raw",
    [
        # What msgspec would skip unchecked at any level: invalid UTF-8 (overlong, a
        # surrogate, beyond U+10FFFF, in a key), numbers beyond a double.
        _POSE_PACKET % (b',"q":"\xc0\xaf"', b"", b""),
        _POSE_PACKET % (b"", b',"q":"\xed\xa0\x80"', b""),
        _POSE_PACKET % (b"", b"", b',"q":"\xf4\x90\x80\x80"'),
        _POSE_PACKET % (b"", b"", b',"\xff":1'),
        _POSE_PACKET % (b"", b"", b',"q":1.8e308'),
        _POSE_PACKET % (b"", b"", b',"q":' + b"9" * 400),
        # Nesting deeper than Python's recursion limit and orjson's.
        b'{"a":' * 1100,
        _POSE_PACKET % (b"", b"", b',"q":' + b"[" * 1100),
    ],
)
def test_what_the_pose_fast_path_cannot_vouch_for_gets_the_full_checks(raw: bytes) -> None:
    assert packets_module._valid_pose(raw) is None
    with pytest.raises(PacketError):
        parse_packet(raw)


def test_a_packet_with_more_than_a_pose_holds_is_read_in_full() -> None:
    raw = _POSE_PACKET % (b',"q":1', b"", b',"note":"\xc3\xa9t\xc3\xa9"')
    assert packets_module._valid_pose(raw) is None
    assert parse_packet(raw).pose == Pose(0.0, 0.0, 0.0, (0.0, 0.0, 0.0, 1.0))
