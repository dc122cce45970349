"""Strict parsing of one StreamKit WebSocket message into a :class:`Packet`.

Pure: no I/O, no trio. Every inbound message goes through :func:`parse_packet`,
tens of thousands of times a second. A valid pose, nearly every message, is decoded
and checked in C by a typed ``msgspec`` decoder; anything else is parsed by ``orjson``
and checked by a hand-written structure function, which names what is wrong. Both
check wire types exactly (``1.9``, ``"1"`` and ``true`` are not integers; ``"1.5"``
and ``true`` are not numbers) instead of coercing them (docs/performance.md).

A violation raises :class:`PacketError` whose message names the JSON path of the
offending value (``$.data.pose.rotation: expected 4 numbers, got 3``) and which
carries the frame number and packet type whenever they could be read, so the
gate can put them in its error reply and in the metric label.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, TypeGuard

import attrs
import msgspec
import orjson

from stag_relay.protocol import b64

PacketType = Literal["pose", "mesh"]

# frame_number must fit a signed 64-bit integer: STAG and the original Go relay
# store it as int64.
_FRAME_LIMIT: Final = 2**63
# The spec's bounds on identifiers: long enough for any UUID-based scheme, short
# enough that a session id is never a payload.
ID_MAX_CHARS: Final = 128
# Positions are metres in the client's world frame; a kilometre is beyond any
# room-scale or building-scale AR session, so a larger value is a client bug.
COORD_LIMIT: Final = 1000.0
# A unit quaternion from float32 client maths drifts a little; a squared norm
# outside [0.9, 1.1] is not drift but garbage. It is normalised downstream.
NORM_SQ_MIN: Final = 0.9
NORM_SQ_MAX: Final = 1.1
# Values echoed in error messages are cut to this many characters so that an
# 8 MiB string is never copied into a reply or a log line.
_ECHO_CHARS: Final = 40

# Unicode category Cc: C0 controls, DEL and C1 controls.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_MISSING: Final[Any] = object()
# What the shared checks below take for an absent key: they then say "missing".
MISSING: Final[Any] = _MISSING


class Pose(msgspec.Struct, forbid_unknown_fields=True):
    """A device pose as the client sent it (the rotation is not normalised here).

    A msgspec struct: the fast path's decoder builds it in C, bounds checked (the full
    path checks them itself and builds one from its values)."""

    x: Annotated[float, msgspec.Meta(ge=-COORD_LIMIT, le=COORD_LIMIT)]
    y: Annotated[float, msgspec.Meta(ge=-COORD_LIMIT, le=COORD_LIMIT)]
    z: Annotated[float, msgspec.Meta(ge=-COORD_LIMIT, le=COORD_LIMIT)]
    rotation: tuple[float, float, float, float]


MeshEncoding = Literal["draco", "sdk"]


@attrs.frozen(slots=True)
class MeshData:
    """A mesh packet's payload; ``vertices`` and ``faces`` are base64 text, untouched."""

    anchor_id: str
    vertices: str
    faces: str  # "" when the client sent none
    # What ``vertices`` holds: Draco (the seed dialect), or the StreamKit SDK's
    # compressed mesh buffer (``stag_relay.protocol.sdkmesh``).
    encoding: MeshEncoding = "draco"


# A msgspec struct, built in C (an attrs class's __init__ is Python) on a path taken
# for every packet. gc=False: it holds the client's values only, which cannot refer
# back to it.
class Packet(msgspec.Struct, gc=False):
    """One valid StreamKit packet. Exactly one of ``pose`` and ``mesh`` is set, per ``type``."""

    session_id: str
    frame_number: int
    timestamp: int
    type: PacketType
    pose: Pose | None
    mesh: MeshData | None


class PacketError(ValueError):
    """An invalid packet.

    ``frame_number`` is set when the packet carried a valid one, for the error
    reply; ``packet_type`` is ``"pose"``, ``"mesh"`` or ``"unknown"``, for the
    ``relay_packets_total{type}`` label.
    """

    def __init__(
        self,
        message: str,
        frame_number: int | None = None,
        packet_type: Literal["pose", "mesh", "unknown"] = "unknown",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.frame_number = frame_number
        self.packet_type = packet_type


class FieldError(Exception):
    """A wire value that breaks a rule; the message starts with its JSON path.

    Raised by the structure functions and the shared checks below, which the
    StreamKit SDK dialect (:mod:`stag_relay.protocol.sdk`) calls too, so that a
    pose is held to the same rules whichever dialect carried it. Callers wrap it
    in their dialect's error with the context they could read.
    """


# The fast path's view of a pose packet, decoded and checked in C by msgspec: types
# exactly as _structure's (strict: no bools or strings for numbers, no floats for
# integers), bounds as its own. What msgspec cannot say (printable ids, the quaternion's
# norm, frame numbers and timestamps beyond int64) is checked after it.
class _WirePoseData(msgspec.Struct, forbid_unknown_fields=True):
    pose: Pose


class _WirePosePacket(msgspec.Struct, forbid_unknown_fields=True):
    session_id: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS)]
    frame_number: Annotated[int, msgspec.Meta(ge=0)]
    timestamp: Annotated[int, msgspec.Meta(gt=0)]
    type: Literal["pose"]
    data: _WirePoseData


_decode_pose: Final = msgspec.json.Decoder(_WirePosePacket).decode

# What a fast path's msgspec decoder raises for a message it does not take; the full
# path then reads it again and words the error. The decoders' structs forbid unknown
# members: msgspec does not check UTF-8 or number ranges in what it skips, so a
# message with anything but the known fields goes through the full path, whose orjson
# checks the whole text. UnicodeError: a str with a lone surrogate, which is no JSON
# text, or (msgspec before 0.23) invalid UTF-8 in an unknown member's name.
# RecursionError: nesting deeper than Python's recursion limit; orjson's own limit
# words the error. The SDK's fast path (sdk.py) uses the same.
FAST_PATH_REFUSALS: Final = (msgspec.MsgspecError, UnicodeError, RecursionError)


def parse_packet(raw: bytes | str) -> Packet:
    """Parse and validate one WebSocket message (text or binary)."""
    packet = _valid_pose(raw)
    if packet is not None:
        return packet
    return parse_in_full(raw)


def parse_in_full(raw: bytes | str) -> Packet:
    """:func:`parse_packet` without its fast path: every check, each error worded."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PacketError(f"$: not valid JSON ({clip(str(exc), 80)})") from None
    if type(obj) is not dict:
        raise PacketError("$: not a JSON object")
    # Read the context first so that every error, whatever field it is about,
    # carries what could be known.
    fn = obj.get("frame_number")
    frame_number = fn if type(fn) is int and 0 <= fn < _FRAME_LIMIT else None
    kind = obj.get("type")
    packet_type: Literal["pose", "mesh", "unknown"] = (
        "pose" if kind == "pose" else "mesh" if kind == "mesh" else "unknown"
    )
    try:
        return _structure(obj, frame_number, packet_type)
    except FieldError as exc:
        raise PacketError(str(exc), frame_number, packet_type) from None


def _valid_pose(raw: bytes | str) -> Packet | None:
    """A valid pose packet, decoded and checked in one pass, or None: then the full
    path (``orjson`` and ``_structure``) parses it again and says what is wrong.

    Nearly every message is a pose: this is half of the full path's cost for one, and
    it names no fields, so nothing but a valid pose may pass it.
    tests/protocol/test_packets.py checks that the two agree on any input.
    """
    try:
        wire = _decode_pose(raw)
    except FAST_PATH_REFUSALS:
        return None
    session_id = wire.session_id
    frame_number = wire.frame_number
    timestamp = wire.timestamp
    pose = wire.data.pose
    a, b, c, d = pose.rotation
    if not (
        session_id.isprintable()
        and frame_number < _FRAME_LIMIT
        # The full path's orjson reads a larger integer as a float: not a timestamp.
        and timestamp < 2**64
        and NORM_SQ_MIN <= a * a + b * b + c * c + d * d <= NORM_SQ_MAX
    ):
        return None
    return Packet(session_id, frame_number, timestamp, "pose", pose, None)


def is_plain_id(value: Any) -> TypeGuard[str]:
    """Whether ``check_id`` accepts ``value`` without a second look: 1 to 128 printable
    characters. For the fast paths; an id with other non-printables is left to it."""
    return type(value) is str and 0 < len(value) <= ID_MAX_CHARS and value.isprintable()


def _structure(
    obj: dict[str, Any], frame_number: int | None, packet_type: Literal["pose", "mesh", "unknown"]
) -> Packet:
    session_id = check_id(obj.get("session_id", _MISSING), "$.session_id")
    if frame_number is None:
        raise FieldError(
            _mismatch(
                "$.frame_number",
                "an integer",
                obj.get("frame_number", _MISSING),
                "from 0 to 2**63-1",
            )
        )
    timestamp = obj.get("timestamp", _MISSING)
    if type(timestamp) is not int or timestamp <= 0:
        raise FieldError(
            _mismatch("$.timestamp", "an integer", timestamp, "> 0 (Unix milliseconds)")
        )
    if packet_type == "unknown":
        raise FieldError(_mismatch("$.type", '"pose" or "mesh"', obj.get("type", _MISSING)))
    data = obj.get("data", _MISSING)
    if type(data) is not dict:
        raise FieldError(_mismatch("$.data", "an object", data))
    if packet_type == "pose":
        pose = _structure_pose(data.get("pose", _MISSING))
        return Packet(session_id, frame_number, timestamp, "pose", pose, None)
    mesh = _structure_mesh(data.get("mesh", _MISSING))
    return Packet(session_id, frame_number, timestamp, "mesh", None, mesh)


def _structure_pose(pose: Any) -> Pose:
    if type(pose) is not dict:
        raise FieldError(_mismatch("$.data.pose", "an object", pose))
    x = check_coordinate(pose.get("x", _MISSING), "$.data.pose.x")
    y = check_coordinate(pose.get("y", _MISSING), "$.data.pose.y")
    z = check_coordinate(pose.get("z", _MISSING), "$.data.pose.z")
    rotation = check_rotation(pose.get("rotation", _MISSING), "$.data.pose.rotation")
    return Pose(x, y, z, rotation)


# --- checks shared with the SDK dialect -------------------------------------------


def check_id(value: Any, path: str) -> str:
    """An identifier: 1 to 128 characters, no control characters (``_MISSING`` if absent)."""
    if type(value) is not str or not 0 < len(value) <= ID_MAX_CHARS:
        raise FieldError(_mismatch(path, f"a string of 1 to {ID_MAX_CHARS} characters", value))
    # isprintable() is false for every control character; the regex only runs
    # for the rare id that also holds other non-printables (e.g. U+00A0).
    if not value.isprintable() and _CONTROL.search(value):
        raise FieldError(f"{path}: control characters are not allowed")
    return value


def check_rotation(rotation: Any, path: str) -> tuple[float, float, float, float]:
    """A quaternion [x, y, z, w] of numbers with a squared norm near 1, not normalised."""
    if type(rotation) is not list or len(rotation) != 4:
        if type(rotation) is list:
            raise FieldError(f"{path}: expected 4 numbers, got {len(rotation)}")
        raise FieldError(_mismatch(path, "an array of 4 numbers", rotation))
    a, b, c, d = rotation
    if not (_is_number(a) and _is_number(b) and _is_number(c) and _is_number(d)):
        for i, v in enumerate(rotation):
            if not _is_number(v):
                raise FieldError(_mismatch(f"{path}[{i}]", "a number", v))
    # orjson never yields NaN or infinities and caps integers at 64 bits, so the
    # squares are finite or +inf, and +inf fails the bound: no separate check.
    norm_sq = a * a + b * b + c * c + d * d
    if not NORM_SQ_MIN <= norm_sq <= NORM_SQ_MAX:
        raise FieldError(
            f"{path}: expected a squared norm within "
            f"[{NORM_SQ_MIN}, {NORM_SQ_MAX}], got {norm_sq:.4g}"
        )
    return (float(a), float(b), float(c), float(d))


def _is_number(v: object) -> bool:
    # Exact types: bool is an int subclass, and orjson only yields exact ints/floats.
    t = type(v)
    return t is float or t is int


def check_coordinate(v: Any, path: str) -> float:
    """A position coordinate: a number (not a bool) within the room-scale bound."""
    t = type(v)
    if t is float or t is int:
        if -COORD_LIMIT <= v <= COORD_LIMIT:
            return float(v)
        raise FieldError(f"{path}: expected a number with |v| <= {COORD_LIMIT:g}, got {echo(v)}")
    raise FieldError(_mismatch(path, "a number", v))


def _structure_mesh(mesh: Any) -> MeshData:
    if type(mesh) is not dict:
        raise FieldError(_mismatch("$.data.mesh", "an object", mesh))
    anchor_id = mesh.get("anchor_id", _MISSING)
    if type(anchor_id) is not str or not 0 < len(anchor_id) <= ID_MAX_CHARS:
        raise FieldError(
            _mismatch(
                "$.data.mesh.anchor_id", f"a string of 1 to {ID_MAX_CHARS} characters", anchor_id
            )
        )
    vertices = mesh.get("vertices", _MISSING)
    if type(vertices) is not str or not vertices or not _is_base64(vertices):
        raise FieldError(_mismatch("$.data.mesh.vertices", "non-empty standard base64", vertices))
    faces = mesh.get("faces", "")
    # Clients send the same Draco buffer twice when faces live in it: skip the
    # second decode of what can be megabytes.
    if faces != vertices and (type(faces) is not str or not _is_base64(faces)):
        raise FieldError(_mismatch("$.data.mesh.faces", "standard base64", faces))
    return MeshData(anchor_id, vertices, faces)


def _is_base64(text: str) -> bool:
    """Standard (RFC 4648 section 4) base64 with canonical padding; "" is valid."""
    return b64.decode(text) is not None


def _mismatch(path: str, expected: str, value: Any, qualifier: str = "") -> str:
    if value is _MISSING:
        return f"{path}: missing, expected {expected}"
    if expected.startswith("a string of") and type(value) is str:
        return f"{path}: expected {expected}, got {len(value)} characters"
    if qualifier and type(value) is int:
        return f"{path}: expected {expected} {qualifier}, got {echo(value)}"
    return f"{path}: expected {expected}, got {echo(value)}"


def echo(value: Any) -> str:
    """A short JSON-like rendering of a wire value for an error message."""
    if type(value) is dict:
        return "an object"
    if type(value) is list:
        return f"an array of {len(value)}"
    if type(value) is str:
        if len(value) > _ECHO_CHARS:
            return orjson.dumps(value[:_ECHO_CHARS]).decode()[:-1] + '..."'
        return orjson.dumps(value).decode()
    # Numbers, booleans, null: orjson renders them as the client wrote them.
    return clip(orjson.dumps(value).decode(), _ECHO_CHARS)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
