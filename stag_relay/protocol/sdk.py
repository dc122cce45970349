"""The StreamKit SDK's WebSocket dialect: one message in, one typed value out; replies out.

Pure: no I/O, no trio. The SDK (tabularxr/streamkit, "StreamKit v2") sends every
message as a binary frame holding a ``WSMessage`` as Swift's ``JSONEncoder``
writes it: ``{"type", "sessionId", "data", "timestamp", "traceId"}``, camelCase
keys, nil fields omitted, ``data`` the inner JSON document base64-encoded (Swift
encodes ``Data`` so), ``timestamp`` Unix milliseconds. Key order is whatever
Swift's dictionaries iterate in and ``/`` is escaped as ``\\/``: messages are
parsed, never compared as bytes. Text frames are accepted too, as STAG's own Go
``WSMessage`` writes them: snake_case ``session_id``/``trace_id`` (camelCase
still allowed), ``data`` either base64 text or an inline JSON object, and inside
``data`` the snake_case spellings of the mesh keys and STAG's ``{"x","y","z"}``
pose. A binary frame is held to exactly what the SDK writes.

:func:`parse_message` returns an :class:`AnchorUpdate`, a :class:`MeshUpdate` or
a :class:`Ping`, or raises :class:`SdkError` whose message names the JSON path of
the culprit and how to fix it, like :func:`stag_relay.protocol.packets.parse_packet`
does for the seed dialect. Poses are held to the seed dialect's rules by the same
functions (finite, |v| <= 1000, quaternion norm); ids to the same 128 characters.
The size of a whole message is the WebSocket layer's ``max_message_size``.

Replies (:func:`encode_pong`, :func:`encode_error`) are the payloads of binary
frames: the SDK ignores text frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs

import attrs
import msgspec
import orjson

from stag_relay.protocol import b64, events
from stag_relay.protocol.connection import Reply
from stag_relay.protocol.packets import (
    COORD_LIMIT,
    FAST_PATH_REFUSALS,
    ID_MAX_CHARS,
    MISSING,
    NORM_SQ_MAX,
    NORM_SQ_MIN,
    FieldError,
    MeshData,
    PacketError,
    check_coordinate,
    check_id,
    check_rotation,
    clip,
    echo,
    is_plain_id,
)
from stag_relay.protocol.sessions import event_id
from stag_relay.protocol.websocket import Binary, binary_frame

# Apple's reference date, 2001-01-01T00:00:00Z, in Unix milliseconds: the SDK
# encodes a pose's Date as seconds since it (JSONEncoder's .deferredToDate).
REFERENCE_DATE_UNIX_MS: Final = 978_307_200_000

# Error codes in the replies; the same words Stag v2's own WebSocket hub uses.
INVALID_MESSAGE: Final = "INVALID_MESSAGE"
UNKNOWN_TYPE: Final = "UNKNOWN_TYPE"

MessageKind = Literal["anchor_update", "mesh_update", "ping", "unknown"]

# Timestamps are int64 in the SDK and in STAG.
_INT64_LIMIT: Final = 2**63
# |seconds since 2001| beyond this would overflow int64 milliseconds.
_MAX_REFERENCE_SECONDS: Final = 9e15
_MAX_COMPRESSION_LEVEL: Final = 9
# A position component as the full checks take it (packets.check_coordinate).
_Coordinate = Annotated[float, msgspec.Meta(ge=-COORD_LIMIT, le=COORD_LIMIT)]
_PACKET_TYPES: Final[dict[MessageKind, Literal["pose", "mesh", "unknown"]]] = {
    "anchor_update": "pose",
    "mesh_update": "mesh",
    "ping": "unknown",
    "unknown": "unknown",
}
_KINDS: Final[dict[object, MessageKind]] = {
    "anchor_update": "anchor_update",
    "mesh_update": "mesh_update",
    "ping": "ping",
}


class SdkError(PacketError):
    """An invalid SDK message.

    A :class:`~stag_relay.protocol.packets.PacketError`, so that what handles an
    invalid seed packet handles it too: no frame number, and ``packet_type``
    ``"pose"`` or ``"mesh"`` for the metric label when the type was readable.
    ``code`` goes in the error reply (:data:`INVALID_MESSAGE` or
    :data:`UNKNOWN_TYPE`); ``kind`` is the message type when it was one of the
    known ones, else ``"unknown"``; ``trace_id`` is the message's when it could
    be read, to send back with the reply.
    """

    def __init__(
        self,
        message: str,
        code: str = INVALID_MESSAGE,
        kind: MessageKind = "unknown",
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message, None, _PACKET_TYPES[kind])
        self.code = code
        self.kind = kind
        self.trace_id = trace_id


# A msgspec struct, built in C, as one is per pose; gc=False as for events.Anchor.
class AnchorUpdate(msgspec.Struct, gc=False):
    """A device pose: ``timestamp`` is the pose's own time in Unix ms.

    ``sent_at`` is the WSMessage's timestamp (when the SDK queued it). The
    rotation is as sent, not normalised.
    """

    session_id: str
    anchor_id: str
    x: float
    y: float
    z: float
    rotation: tuple[float, float, float, float]
    timestamp: int
    sent_at: int
    trace_id: str | None = None
    metadata: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        """What makes two updates the same within a session: for duplicate detection."""
        return ("pose", self.anchor_id, self.timestamp)

    @property
    def event_id(self) -> str:
        return sdk_event_id(self.session_id, "pose", self.anchor_id, self.timestamp)

    def lane_mesh(self) -> None:
        return None

    def to_event(self, received_at_ms: int, origin: events.Origin | None = None) -> events.Event:
        a, b, c, d = self.rotation
        # Checked to a squared norm in [0.9, 1.1]: never a division by zero.
        norm = math.sqrt(a * a + b * b + c * c + d * d)
        anchor = events.Anchor(
            self.anchor_id,
            events.AnchorPose(self.x, self.y, self.z, (a / norm, b / norm, c / norm, d / norm)),
            self.timestamp,
            self.metadata,
        )
        return events.Event(
            self.event_id,
            self.session_id,
            0,
            self.timestamp,
            received_at_ms,
            "pose",
            (anchor,),
            (),
            origin,
        )


@attrs.frozen(slots=True)
class MeshUpdate:
    """A mesh: the SDK's buffers as the standard base64 text they came in.

    A full mesh's ``vertices`` is the SDK's compressed mesh buffer (see
    :mod:`stag_relay.protocol.sdkmesh`); a delta's (``is_delta``) is the SDK's
    own compressed diff, which nobody decodes. The text is checked here and kept
    as sent (the canonical base64 of the bytes): the mesh workers and STAG take
    base64, so decoding it only to encode it again would cost two passes over a
    mesh of tens of kilobytes. ``timestamp`` is the WSMessage's: the SDK puts no
    time in a mesh.
    """

    session_id: str
    mesh_id: str
    anchor_id: str
    vertices: str
    faces: str
    normals: str | None
    compression_level: int
    is_delta: bool
    base_mesh_id: str | None
    timestamp: int
    trace_id: str | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        """What makes two updates the same within a session: for duplicate detection."""
        return ("mesh", self.mesh_id, self.timestamp)

    @property
    def event_id(self) -> str:
        return sdk_event_id(self.session_id, "mesh", self.mesh_id, self.timestamp)

    def lane_mesh(self) -> MeshData | None:
        """What the mesh workers check (and, for the ``batch`` format, diff): a full
        mesh's buffer. None for the SDK's own delta, which nobody decodes."""
        if self.is_delta:
            return None
        return MeshData(self.anchor_id, self.vertices, "", "sdk")

    def to_event(self, received_at_ms: int, origin: events.Origin | None = None) -> events.Event:
        update = events.MeshUpdate(
            self.anchor_id,
            False,
            "" if self.is_delta else self.vertices,
            self.faces,
            mesh_id=self.mesh_id,
            normals=self.normals or "",
            compression_level=self.compression_level,
            base_mesh_id=self.base_mesh_id,
            delta_data=self.vertices if self.is_delta else "",
        )
        return events.Event(
            self.event_id,
            self.session_id,
            0,
            self.timestamp,
            received_at_ms,
            "mesh",
            (),
            (update,),
            origin,
        )


@attrs.frozen(slots=True)
class Ping:
    """The SDK's application-level heartbeat, answered with :func:`encode_pong`."""

    session_id: str
    timestamp: int
    trace_id: str | None = None


Message = AnchorUpdate | MeshUpdate | Ping


def sdk_event_id(session_id: str, type: str, item_id: str, timestamp: int) -> str:
    """The deterministic event id of an SDK update, the same on every relay.

    A uuid5 in the seed dialect's namespace (``sessions.NAMESPACE``) of the name
    ``session_id NUL type NUL item_id NUL timestamp``: the seed's names end in a
    bare frame number after two NULs, these hold three, so the two dialects never
    produce the same name.
    """
    return event_id(session_id, f"{type}\x00{item_id}", timestamp)


def parse_message(raw: bytes | str, *, binary: bool, session_id: str) -> Message:
    """Parse and check one WebSocket message of a connection streaming ``session_id``.

    ``binary`` says which kind of frame carried it: a binary frame must be the
    SDK's WSMessage exactly; a text frame may also use STAG's spellings.
    """
    # The SDK writes keys in no fixed order: a mesh_update whose data comes before its
    # type would be base64-decoded whole by the fast path before it is refused.
    if (
        binary
        and isinstance(raw, bytes)
        # startswith first: `in` costs a few hundred ns more for a pose (CPython 3.11).
        and (raw.startswith(_ANCHOR_UPDATE_FIRST) or _ANCHOR_UPDATE in raw)
    ):
        update = _valid_anchor_update(raw, session_id)
        if update is not None:
            return update
    return parse_in_full(raw, binary=binary, session_id=session_id)


def parse_in_full(raw: bytes | str, *, binary: bool, session_id: str) -> Message:
    """:func:`parse_message` without its fast path: every check, each error worded."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SdkError(f"$: not valid JSON ({clip(str(exc), 80)})") from None
    if type(obj) is not dict:
        raise SdkError("$: expected a JSON object (a WSMessage), got " + echo(obj))
    message_type = obj.get("type")
    kind = _KINDS.get(message_type, "unknown") if type(message_type) is str else "unknown"
    trace = _read_context(obj, binary)
    try:
        return _structure(obj, kind, trace, binary, session_id)
    except FieldError as exc:
        raise SdkError(str(exc), INVALID_MESSAGE, kind, trace) from None


# The fast path's view of an anchor_update in a binary frame, decoded and checked in C
# by msgspec (see packets._WirePosePacket): the WSMessage, then its data.
class _WireAnchorMessage(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["anchor_update"]
    # Base64, decoded by msgspec as strictly as b64.decode (tests/protocol/test_sdk.py).
    data: bytes
    timestamp: Annotated[int, msgspec.Meta(gt=0)]
    sessionId: str | None = None
    traceId: str | None = None


class _WireSdkPose(msgspec.Struct, forbid_unknown_fields=True):
    position: tuple[_Coordinate, _Coordinate, _Coordinate]
    rotation: tuple[float, float, float, float]
    # Seconds since 2001; an integer stays one, for the exact conversion below.
    timestamp: int | float


class _WireAnchor(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX_CHARS)]
    pose: _WireSdkPose
    # Read by orjson when there, as the full path reads it.
    metadata: msgspec.Raw = msgspec.Raw()


_decode_anchor_message: Final = msgspec.json.Decoder(_WireAnchorMessage).decode
# In every anchor_update but one that escapes a letter of its type (then the full path).
_ANCHOR_UPDATE: Final = b'"anchor_update"'
# How one starts when its keys come in WSMessage's declaration order, as Swift's
# JSONEncoder writes them since iOS 17; earlier ones write them in any order.
_ANCHOR_UPDATE_FIRST: Final = b'{"type":"anchor_update"'
_decode_anchor: Final = msgspec.json.Decoder(_WireAnchor).decode


def _valid_anchor_update(raw: bytes | str, session_id: str) -> AnchorUpdate | None:
    """A valid ``anchor_update`` in a binary frame, decoded and checked in one pass, or
    None: then the full path (``orjson`` and ``_structure``) says what is wrong.

    Nearly every message of the SDK is a pose; this names no fields, so nothing but a
    valid one may pass it. tests/protocol/test_sdk.py checks that the two agree on any
    input.
    """
    try:
        message = _decode_anchor_message(raw)
    except FAST_PATH_REFUSALS:
        return None
    named = message.sessionId
    trace = message.traceId
    if not (
        message.timestamp < _INT64_LIMIT
        and (named is None or named == session_id)
        and (trace is None or is_plain_id(trace))
    ):
        return None
    try:
        inner = _decode_anchor(message.data)
    except FAST_PATH_REFUSALS:
        return None
    metadata = None
    if inner.metadata:
        try:
            metadata = orjson.loads(memoryview(inner.metadata))
        except orjson.JSONDecodeError:
            return None
        if not (metadata is None or type(metadata) is dict):
            return None
    anchor_id = inner.id
    pose = inner.pose
    seconds = pose.timestamp
    a, b, c, d = rotation = pose.rotation
    if not (
        anchor_id.isprintable()
        and -_MAX_REFERENCE_SECONDS < seconds < _MAX_REFERENCE_SECONDS
        and NORM_SQ_MIN <= a * a + b * b + c * c + d * d <= NORM_SQ_MAX
    ):
        return None
    # As _reference_date_ms: scaled first, the offset added as an integer.
    ms: int = round(seconds * 1000) + REFERENCE_DATE_UNIX_MS
    if not 0 < ms < _INT64_LIMIT:
        return None
    x, y, z = pose.position
    return AnchorUpdate(
        session_id, anchor_id, x, y, z, rotation, ms, message.timestamp, trace, metadata
    )


def _read_context(obj: dict[str, Any], binary: bool) -> str | None:
    # The trace id goes back with the error reply whenever it is readable,
    # whatever else is wrong with the message.
    try:
        trace, _ = _field(obj, "traceId", "trace_id", "$.", not binary)
        if trace is MISSING or trace is None:
            return None
        return check_id(trace, "$.traceId")
    except FieldError:
        return None


def _structure(
    obj: dict[str, Any], kind: MessageKind, trace: str | None, binary: bool, session_id: str
) -> Message:
    timestamp = obj.get("timestamp", MISSING)
    if type(timestamp) is not int or not 0 < timestamp < _INT64_LIMIT:
        raise FieldError(_expected("$.timestamp", "an integer > 0 (Unix milliseconds)", timestamp))
    named, path = _field(obj, "sessionId", "session_id", "$.", not binary)
    if named is not MISSING and named is not None:
        if type(named) is not str:
            raise FieldError(_expected(path, "a string", named))
        if named != session_id:
            raise FieldError(
                f"{path}: names session {echo(named)}, but this connection streams session "
                f"{echo(session_id)} (the URL's session_id); "
                "send each session on its own connection"
            )
    if trace is None:
        # Absent, or invalid: _read_context could not tell which, and said neither.
        raw_trace, trace_path = _field(obj, "traceId", "trace_id", "$.", not binary)
        if raw_trace is not MISSING and raw_trace is not None:
            check_id(raw_trace, trace_path)
    if kind == "unknown":
        message_type = obj.get("type", MISSING)
        if type(message_type) is str:
            raise SdkError(
                f'$.type: unknown message type {echo(message_type)}; expected "anchor_update",'
                ' "mesh_update" or "ping"',
                UNKNOWN_TYPE,
                kind,
                trace,
            )
        raise FieldError(
            _expected("$.type", '"anchor_update", "mesh_update" or "ping"', message_type)
        )
    if kind == "ping":
        return Ping(session_id, timestamp, trace)
    data = _inner(obj.get("data", MISSING), binary)
    if kind == "anchor_update":
        return _anchor(data, session_id, timestamp, trace, binary)
    return _mesh(data, session_id, timestamp, trace, binary)


def _inner(data: Any, binary: bool) -> dict[str, Any]:
    if type(data) is dict and not binary:
        return data
    if type(data) is not str:
        if type(data) is dict:
            raise FieldError(
                "$.data: expected base64 text in a binary frame (how Swift's JSONEncoder "
                "writes Data); send an inline JSON object in a text frame"
            )
        what = "base64 text of a JSON object" + ("" if binary else ", or a JSON object")
        raise FieldError(_expected("$.data", what, data))
    decoded = _b64decode(data, "$.data")
    try:
        inner = orjson.loads(decoded)
    except orjson.JSONDecodeError as exc:
        raise FieldError(
            f"$.data: the base64 does not hold JSON ({clip(str(exc), 80)}); "
            "encode the update with JSONEncoder, then base64"
        ) from None
    if type(inner) is not dict:
        raise FieldError("$.data: expected base64 of a JSON object, got " + echo(inner))
    return inner


def _anchor(
    data: dict[str, Any], session_id: str, sent_at: int, trace: str | None, binary: bool
) -> AnchorUpdate:
    anchor_id = check_id(data.get("id", MISSING), "$.data.id")
    pose = data.get("pose", MISSING)
    if type(pose) is not dict:
        raise FieldError(_expected("$.data.pose", "an object", pose))
    position = pose.get("position", MISSING)
    if position is MISSING and not binary and "x" in pose:
        # STAG's pose: {"x", "y", "z", "rotation"}.
        x = check_coordinate(pose["x"], "$.data.pose.x")
        y = check_coordinate(pose.get("y", MISSING), "$.data.pose.y")
        z = check_coordinate(pose.get("z", MISSING), "$.data.pose.z")
    else:
        if type(position) is not list or len(position) != 3:
            if type(position) is list:
                raise FieldError(
                    f"$.data.pose.position: expected 3 numbers [x, y, z], got {len(position)}"
                )
            raise FieldError(_expected("$.data.pose.position", "an array of 3 numbers", position))
        x = check_coordinate(position[0], "$.data.pose.position[0]")
        y = check_coordinate(position[1], "$.data.pose.position[1]")
        z = check_coordinate(position[2], "$.data.pose.position[2]")
    rotation = check_rotation(pose.get("rotation", MISSING), "$.data.pose.rotation")
    seconds = pose.get("timestamp", MISSING)
    if seconds is MISSING and not binary:
        # STAG's pose has no time of its own: the message's is the pose's.
        timestamp = sent_at
    else:
        timestamp = _reference_date_ms(seconds, "$.data.pose.timestamp")
    metadata = data.get("metadata")
    if metadata is not None and type(metadata) is not dict:
        raise FieldError(_expected("$.data.metadata", "an object", metadata))
    return AnchorUpdate(
        session_id, anchor_id, x, y, z, rotation, timestamp, sent_at, trace, metadata
    )


def _reference_date_ms(seconds: Any, path: str) -> int:
    t = type(seconds)
    if (t is float or t is int) and -_MAX_REFERENCE_SECONDS < seconds < _MAX_REFERENCE_SECONDS:
        # Scaling first and adding the offset as an integer rounds once, not twice.
        ms: int = round(seconds * 1000) + REFERENCE_DATE_UNIX_MS
        if 0 < ms < _INT64_LIMIT:
            return ms
    raise FieldError(
        _expected(path, "seconds since 2001-01-01T00:00:00Z (a number, after 1970)", seconds)
    )


def _mesh(
    data: dict[str, Any], session_id: str, timestamp: int, trace: str | None, binary: bool
) -> MeshUpdate:
    snake = not binary
    mesh_id = check_id(data.get("id", MISSING), "$.data.id")
    anchor_value, path = _field(data, "anchorId", "anchor_id", "$.data.", snake)
    anchor_id = check_id(anchor_value, path)
    level, path = _field(data, "compressionLevel", "compression_level", "$.data.", snake)
    if type(level) is not int or not 0 <= level <= _MAX_COMPRESSION_LEVEL:
        raise FieldError(_expected(path, "an integer from 0 to 9", level))
    is_delta, path = _field(data, "isDelta", "is_delta", "$.data.", snake)
    if type(is_delta) is not bool:
        raise FieldError(_expected(path, "true or false", is_delta))
    base, base_path = _field(data, "baseMeshId", "base_mesh_id", "$.data.", snake)
    base_mesh_id = None if base is MISSING or base is None else check_id(base, base_path)
    if is_delta and base_mesh_id is None:
        raise FieldError(f"{base_path}: missing; a delta (isDelta true) names the mesh it changes")
    vertices_text = data.get("vertices", MISSING)
    if vertices_text == "":
        raise FieldError("$.data.vertices: empty, expected the compressed mesh as base64")
    vertices = _b64text(vertices_text, "$.data.vertices")
    faces_text = data.get("faces", "")
    faces = "" if faces_text is None else _b64text(faces_text, "$.data.faces")
    normals_text = data.get("normals")
    normals = None if normals_text is None else _b64text(normals_text, "$.data.normals")
    return MeshUpdate(
        session_id,
        mesh_id,
        anchor_id,
        vertices,
        faces,
        normals,
        level,
        is_delta,
        base_mesh_id,
        timestamp,
        trace,
    )


def _field(
    obj: dict[str, Any], camel: str, snake: str, prefix: str, snake_ok: bool
) -> tuple[Any, str]:
    """The value under ``camel`` (or, where allowed, ``snake``) and the path to name."""
    value = obj.get(camel, MISSING)
    if snake_ok:
        other = obj.get(snake, MISSING)
        if other is not MISSING:
            if value is not MISSING:
                raise FieldError(
                    f"{prefix}{camel} and {prefix}{snake}: the same field twice; send one"
                )
            return other, prefix + snake
    return value, prefix + camel


def _b64decode(text: Any, path: str) -> bytes:
    """Standard base64 (RFC 4648 section 4) with canonical padding, as Swift writes Data."""
    if type(text) is not str:
        raise FieldError(_expected(path, "base64 text", text))
    decoded = b64.decode(text)
    if decoded is None:
        raise FieldError(
            f"{path}: not standard base64; use the RFC 4648 alphabet (A-Z a-z 0-9 + /) "
            "with = padding and no line breaks"
        )
    return decoded


def _b64text(text: Any, path: str) -> str:
    """:func:`_b64decode`'s checks, and the text as the canonical encoding of its bytes.

    Standard base64 may set the unused low bits of its last character
    (``"AB=="`` and ``"AA=="`` both decode to one zero byte); what goes on is the
    canonical spelling, as if the bytes were encoded again. Only the last quantum
    can differ, so only it is encoded again."""
    decoded = _b64decode(text, path)
    checked: str = text  # _b64decode took only a str
    padding = len(checked) // 4 * 3 - len(decoded)
    if padding:
        tail = b64.encode(decoded[len(decoded) - 3 + padding :])
        if checked[-4:] != tail:
            checked = checked[:-4] + tail
    return checked


def _expected(path: str, expected: str, value: Any) -> str:
    if value is MISSING:
        return f"{path}: missing, expected {expected}"
    return f"{path}: expected {expected}, got {echo(value)}"


# --- replies -----------------------------------------------------------------------


def encode_pong(session_id: str, now_ms: int, trace_id: str | None = None) -> bytes:
    """The answer to a :class:`Ping`: the payload of a binary frame."""
    reply: dict[str, Any] = {"type": "pong", "sessionId": session_id, "timestamp": now_ms}
    if trace_id is not None:
        reply["traceId"] = trace_id
    return orjson.dumps(reply)


def encode_error(
    session_id: str, now_ms: int, code: str, message: str, trace_id: str | None = None
) -> bytes:
    """An error reply: the payload of a binary frame.

    ``data`` is base64 of ``{"code", "message"}``: the SDK decodes ``data`` as
    Swift ``Data`` and shows the app an error only when it holds a ``message``.
    """
    inner = orjson.dumps({"code": code, "message": message})
    reply: dict[str, Any] = {
        "type": "error",
        "sessionId": session_id,
        "timestamp": now_ms,
        "data": b64.encode(inner),
    }
    if trace_id is not None:
        reply["traceId"] = trace_id
    return orjson.dumps(reply)


# Where the SDK connects: it replaces its server URL's path with this one.
SDK_PATH: Final = "/api/v1/ws"


def session_from_query(query: str) -> str:
    """The session an SDK upgrade names in its URL (``?session_id=<id>``).

    Raises ``ValueError`` with the message for the 400 answer when there is none,
    several, or one that is not an id.
    """
    values = parse_qs(query, keep_blank_values=True).get("session_id", [])
    if not values:
        raise ValueError(
            f"{SDK_PATH} needs the session in the URL: {SDK_PATH}?session_id=<id> "
            "(the StreamKit SDK adds it)"
        )
    if len(values) > 1:
        raise ValueError(f"session_id is given {len(values)} times in the URL: give it once")
    try:
        return check_id(values[0], "session_id")
    except FieldError as exc:
        raise ValueError(f"{exc} (in the URL's query)") from None


class SdkDialect:
    """The SDK's dialect on one connection, whose session the upgrade's URL named.

    Every reply is a binary frame holding a ``WSMessage``: the SDK ignores text
    frames. It has no acknowledgements. ``wall_ms`` is the clock of the replies'
    ``timestamp`` (Unix milliseconds).
    """

    name = "sdk"
    mark_binary = True
    acknowledges = False

    def __init__(self, session_id: str, wall_ms: Callable[[], int]) -> None:
        self.session_id = session_id
        self._wall_ms = wall_ms

    def decode(self, message: bytes | Binary) -> AnchorUpdate | MeshUpdate | Reply:
        if isinstance(message, Binary):
            parsed = parse_message(message.payload, binary=True, session_id=self.session_id)
        else:
            parsed = parse_message(message, binary=False, session_id=self.session_id)
        if isinstance(parsed, Ping):
            pong = encode_pong(self.session_id, self._wall_ms(), parsed.trace_id)
            return Reply(binary_frame(pong))
        return parsed

    def error_frame(
        self, code: str, message: str, frame_number: int | None, suppressed: int
    ) -> bytes:
        if suppressed:
            message = f"{message} ({suppressed} earlier error replies were not sent)"
        return binary_frame(encode_error(self.session_id, self._wall_ms(), code, message))

    def ack_frame(self, session_id: str, frame_numbers: list[int]) -> bytes:
        raise NotImplementedError("the SDK dialect has no acknowledgements")
