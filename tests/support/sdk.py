"""The StreamKit SDK's wire format, as its Swift code writes it, for the tests.

Derived from the sources at these commits (citations are path:line there):
  SDK         tabularxr/streamkit          dfead86054851de3c7fb6a6f67d7e687db6fd40d
  Foundation  swiftlang/swift-foundation   767ff1c2e3a55385f44ccf28a83f21f3571cf3ea
    Sources/FoundationEssentials/JSON/JSONEncoder.swift (JE), JSON/JSONWriter.swift (JW)
  STAGs       tabularxr/stag 12f3dc11b2043756794a3d86022d0d1f6f37803b,
              tabularxr/Stag 1960bdc252a2bfd5b73ca4865879d38479688673

How the bytes come about:
  * Every message is a binary frame (StreamingClient.swift:152-155) holding
    ``JSONEncoder().encode(WSMessage)``: ``{"type","sessionId","data","timestamp","traceId"}``
    (DataModels.swift:119-133), nil optionals omitted. Plain JSONEncoder (JE:378-385): compact,
    keys NOT sorted (dictionary order, random per process: the fixtures use declaration order,
    so parse them, never compare), "/" escaped as "\\/" (JW:129), Data as standard base64
    (JE:1236-1237), Date as Double seconds since 2001-01-01 (JE:381), floats as Swift's
    shortest ``description`` minus a trailing ".0" (JE:759-762).
  * ``data`` is base64 of the inner JSON: AnchorUpdate (DataModels.swift:135-139; pose encoded
    as position [x,y,z], rotation [ix,iy,iz,r], timestamp, DataModels.swift:37-42) or
    MeshUpdate (DataModels.swift:141-150; camelCase keys, faces always "").
  * A mesh buffer is ``u32 vertexCount | u32 indexCount | vertexCount*3 f32 | indexCount u32``,
    little-endian (CompressionEngine.swift:21-42), compressed with COMPRESSION_ZLIB (raw
    DEFLATE) and wrapped in a hand-built gzip member (CompressionExtensions.swift:94-123):
    header 1f 8b 08 00 00000000 00 ff, deflate, CRC32 LE, ISIZE LE.
  * A delta's ``vertices`` is the same gzip of the MeshDelta JSON (StreamKit.swift:217-229),
    with ``isDelta`` true and ``baseMeshId`` equal to ``id``.

The checked-in constants (ANCHOR_UPDATE ...) were printed once by this emulation;
tests/protocol/test_sdk.py checks the emulation still reproduces them.
"""

from __future__ import annotations

import base64
import decimal
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

# --- Swift JSONEncoder emulation (compact, insertion order, "/" escaped) --------------------


class F32(float):
    """A value the SDK holds as a Swift Float (SIMD3<Float>, simd_quatf)."""


class F64(float):
    """A value the SDK holds as a Swift Double (Date)."""


def _positional(text: str) -> str:
    s = format(decimal.Decimal(text), "f")
    if "." not in s:
        s += ".0"
    return s[:-2] if s.endswith(".0") else s


def swift_float_description(x: float) -> str:
    """Swift ``Float.description`` minus a trailing ".0" (JE:759-762), for 1e-4 <= |x| < 2**24."""
    f32 = struct.unpack("<f", struct.pack("<f", x))[0]
    if f32 == 0:
        return "-0" if math.copysign(1.0, f32) < 0 else "0"
    if not 1e-4 <= abs(f32) < 2.0**24:
        raise NotImplementedError("Swift prints an exponent here")
    for digits in range(1, 10):
        s = f"{f32:.{digits}g}"
        if struct.unpack("<f", struct.pack("<f", float(s)))[0] == f32:
            break
    return _positional(s)


def swift_double_description(x: float) -> str:
    """Swift ``Double.description`` minus a trailing ".0", for 1e-4 <= |x| < 2**53."""
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    if not 1e-4 <= abs(x) < 2.0**53:
        raise NotImplementedError("Swift prints an exponent here")
    return _positional(repr(x))


def _swift_string(s: str) -> str:
    """JW:95-160: escapes " \\ / \\b \\f \\n \\r \\t, other C0 controls as \\u00xx."""
    escapes = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f"}
    escapes |= {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = ['"']
    for ch in s:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def swift_json(value: Any) -> bytes:
    """Serialize like a default ``JSONEncoder()``, keys in dict insertion order.

    Floats must be tagged F32 or F64; ``bytes`` are Swift ``Data`` (base64 text).
    """

    def enc(v: Any) -> str:
        if v is None:
            return "null"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if isinstance(v, F32):
            return swift_float_description(v)
        if isinstance(v, F64):
            return swift_double_description(v)
        if isinstance(v, float):
            raise TypeError("tag floats as F32 or F64")
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return _swift_string(v)
        if isinstance(v, bytes):
            return _swift_string(base64.b64encode(v).decode("ascii"))
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(enc(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ",".join(_swift_string(k) + ":" + enc(x) for k, x in v.items()) + "}"
        raise TypeError(type(v))

    return enc(value).encode("utf-8")


# --- the SDK's compression ------------------------------------------------------------------


def raw_deflate(raw: bytes) -> bytes:
    """COMPRESSION_ZLIB: raw DEFLATE (RFC 1951), level 5, as Apple documents it."""
    c = zlib.compressobj(5, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(raw) + c.flush()


def sdk_compress(raw: bytes) -> bytes:
    """CompressionEngine.compress: raw DEFLATE in the SDK's hand-built gzip member."""
    if not raw:
        return raw  # CompressionExtensions.swift:48: empty data is returned as is
    header = bytes([0x1F, 0x8B, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xFF])
    trailer = struct.pack("<II", zlib.crc32(raw) & 0xFFFFFFFF, len(raw) & 0xFFFFFFFF)
    return header + raw_deflate(raw) + trailer


def zlib_wrap(raw: bytes) -> bytes:
    """The zlib container (RFC 1950), which other encoders use."""
    return zlib.compress(raw, 5)


def mesh_buffer(vertices: Iterable[Sequence[float]], indices: Sequence[int]) -> bytes:
    """CompressionEngine.compressMesh's buffer, before compression."""
    points = list(vertices)
    out = struct.pack("<II", len(points), len(indices))
    out += b"".join(struct.pack("<fff", *p) for p in points)
    return out + struct.pack(f"<{len(indices)}I", *indices)


# --- building messages ----------------------------------------------------------------------

UNIX_TO_REFERENCE = 978307200  # seconds from 1970-01-01 to 2001-01-01

SESSION_ID = "9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14"
ANCHOR_ID = "3B8E5C1A-7F24-4B9D-A0E6-51C7D2F84A9B"
MESH_ID = "C4D7A2E9-1B5F-4E36-8A0C-97F3B6E1D258"
TRACE_IDS = (
    "0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D",
    "1B2C3D4E-5F6A-4B7C-9D8E-0F1A2B3C4D5E",
    "2C3D4E5F-6A7B-4C8D-8E9F-1A2B3C4D5E6F",
)


def wsmessage(
    type: str,
    data: bytes | None = None,
    *,
    timestamp: int,
    session_id: str | None = SESSION_ID,
    trace_id: str | None = None,
) -> bytes:
    """A WSMessage as the SDK sends it; ``data`` is the inner JSON (base64-wrapped here)."""
    message: dict[str, Any] = {"type": type}
    if session_id is not None:
        message["sessionId"] = session_id
    if data is not None:
        message["data"] = data
    message["timestamp"] = timestamp
    if trace_id is not None:
        message["traceId"] = trace_id
    return swift_json(message)


def anchor_inner(
    position: Sequence[float],
    rotation: Sequence[float],
    unix_seconds: float,
    anchor_id: str = ANCHOR_ID,
) -> bytes:
    """An AnchorUpdate's JSON (metadata is always nil in the SDK: omitted)."""
    return swift_json(
        {
            "id": anchor_id,
            "pose": {
                "position": [F32(v) for v in position],
                "rotation": [F32(v) for v in rotation],
                "timestamp": F64(unix_seconds - UNIX_TO_REFERENCE),
            },
        }
    )


def mesh_inner(
    vertices: bytes,
    *,
    mesh_id: str = MESH_ID,
    anchor_id: str = ANCHOR_ID,
    normals: bytes | None = None,
    compression_level: int = 5,
    is_delta: bool = False,
) -> bytes:
    """A MeshUpdate's JSON; ``vertices`` and ``normals`` are the compressed bytes."""
    inner: dict[str, Any] = {
        "id": mesh_id,
        "anchorId": anchor_id,
        "vertices": vertices,
        "faces": "",
    }
    if normals is not None:
        inner["normals"] = normals
    inner["compressionLevel"] = compression_level
    inner["isDelta"] = is_delta
    if is_delta:
        inner["baseMeshId"] = mesh_id
    return swift_json(inner)


def text_message(type: str, data: Any, *, timestamp: int, session_id: str = SESSION_ID) -> str:
    """A text frame as STAG's Go WSMessage writes it: snake_case keys, data inline."""
    message: dict[str, Any] = {"type": type, "session_id": session_id, "timestamp": timestamp}
    if data is not None:
        message["data"] = data
    return orjson.dumps(message).decode()


# --- fixtures: the emulation's output, checked in -------------------------------------------

POSE_UNIX_SECONDS = 1733450000.125
POSE_POSITION = (0.25, 1.5, -0.75)
POSE_ROTATION = (0.0, 0.38268343, 0.0, 0.9238795)

MESH_V1_VERTICES = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 0.0, 1.0)]
MESH_V1_FACES = [0, 1, 2, 0, 2, 3]
MESH_V1_NORMALS = [(0.0, 1.0, 0.0)] * 4
MESH_V1_BUFFER = mesh_buffer(MESH_V1_VERTICES, MESH_V1_FACES)

# MeshDelta (MeshDiffer.swift:271-282) of MESH_V1 plus vertex (0.5, 0, 1.5) and triangle [3,2,4].
MESH_DELTA_JSON = swift_json(
    {
        "id": MESH_ID,
        "baseMeshId": MESH_ID,
        "addedVertices": [4],
        "removedVertices": [],
        "faces": [3, 2, 4],
        "compressionRatio": F64(0.25),
        "modifiedVerticesIndices": [],
        "modifiedVerticesOldIndices": [],
    }
)

ANCHOR_UPDATE = (
    b'{"type":"anchor_update","sessionId":"9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14","'
    b'data":"eyJpZCI6IjNCOEU1QzFBLTdGMjQtNEI5RC1BMEU2LTUxQzdEMkY4NEE5QiIsInBvc2UiO'
    b"nsicG9zaXRpb24iOlswLjI1LDEuNSwtMC43NV0sInJvdGF0aW9uIjpbMCwwLjM4MjY4MzQzLDAsM"
    b'C45MjM4Nzk1XSwidGltZXN0YW1wIjo3NTUxNDI4MDAuMTI1fX0=","timestamp":17334500001'
    b'27,"traceId":"0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"}'
)

MESH_UPDATE_FULL = (
    b'{"type":"mesh_update","sessionId":"9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14","da'
    b'ta":"eyJpZCI6IkM0RDdBMkU5LTFCNUYtNEUzNi04QTBDLTk3RjNCNkUxRDI1OCIsImFuY2hvckl'
    b"kIjoiM0I4RTVDMUEtN0YyNC00QjlELUEwRTYtNTFDN0QyRjg0QTlCIiwidmVydGljZXMiOiJINHN"
    b"JQUFBQUFBQUFcLzJOaFlHQmdZMEFIRGZhWWJFd3hSaUJtZ29xQWFHWWdCZ0I1MDN2UFVBQUFBQT0"
    b"9IiwiZmFjZXMiOiIiLCJub3JtYWxzIjoiSDRzSUFBQUFBQUFBXC8yTmdBSUVHZXdZNHdNOEdBUG9"
    b'oYmcwd0FBQUEiLCJjb21wcmVzc2lvbkxldmVsIjo1LCJpc0RlbHRhIjpmYWxzZX0=","timestam'
    b'p":1733450000231,"traceId":"1B2C3D4E-5F6A-4B7C-9D8E-0F1A2B3C4D5E"}'
)

MESH_UPDATE_DELTA = (
    b'{"type":"mesh_update","sessionId":"9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14","da'
    b'ta":"eyJpZCI6IkM0RDdBMkU5LTFCNUYtNEUzNi04QTBDLTk3RjNCNkUxRDI1OCIsImFuY2hvckl'
    b"kIjoiM0I4RTVDMUEtN0YyNC00QjlELUEwRTYtNTFDN0QyRjg0QTlCIiwidmVydGljZXMiOiJINHN"
    b"JQUFBQUFBQUFcLzZ0V3lreFJzbEp5Tm5FeGR6Unl0ZFExZERKMTB6VnhOVGJUdFhBMGNOYTFOSGN"
    b"6ZGpKek5YUXhNclZRMGxGS1NpeE85VTB0enZBa1FVOWlTa3BxU2xocVVVbG1jbXF4a2xXMFNheU9"
    b"VbEZxYm40WmlpaFFNQzBSd2pUV01kSUJLVXJPenkwb1NpMHV6c3pQQzBvc3ljeFhzakxRTXpMVlV"
    b"jck5UOGxNeTBUbzlzeExRUmlDTHVtZms0SWtYd3NBYjJraldlOEFBQUE9IiwiZmFjZXMiOiIiLCJ"
    b"jb21wcmVzc2lvbkxldmVsIjo1LCJpc0RlbHRhIjp0cnVlLCJiYXNlTWVzaElkIjoiQzREN0EyRTk"
    b'tMUI1Ri00RTM2LThBMEMtOTdGM0I2RTFEMjU4In0=","timestamp":1733450000335,"traceI'
    b'd":"2C3D4E5F-6A7B-4C8D-8E9F-1A2B3C4D5E6F"}'
)

PING = (
    b'{"type":"ping","sessionId":"9F1C2B7E-4D3A-4E8B-9C61-2A5B7D0E3F14","timestamp":1733450030127}'
)

MESH_V1_VERTICES_GZ = bytes.fromhex(
    "1f8b08000000000000ff63616060606340070df6986c4c31462066828a80686620060079d37bcf50000000"
)

MESH_V1_NORMALS_GZ = bytes.fromhex("1f8b08000000000000ff63600081067b0638c0cf0600fa216e0d30000000")


def emulated_fixtures() -> dict[str, bytes]:
    """The checked-in fixtures as the emulation above produces them now."""
    normals = sdk_compress(b"".join(struct.pack("<fff", *n) for n in MESH_V1_NORMALS))
    return {
        "ANCHOR_UPDATE": wsmessage(
            "anchor_update",
            anchor_inner(POSE_POSITION, POSE_ROTATION, POSE_UNIX_SECONDS),
            timestamp=1733450000127,
            trace_id=TRACE_IDS[0],
        ),
        "MESH_UPDATE_FULL": wsmessage(
            "mesh_update",
            mesh_inner(sdk_compress(MESH_V1_BUFFER), normals=normals),
            timestamp=1733450000231,
            trace_id=TRACE_IDS[1],
        ),
        "MESH_UPDATE_DELTA": wsmessage(
            "mesh_update",
            mesh_inner(sdk_compress(MESH_DELTA_JSON), is_delta=True),
            timestamp=1733450000335,
            trace_id=TRACE_IDS[2],
        ),
        "PING": wsmessage("ping", timestamp=1733450030127),
        "MESH_V1_VERTICES_GZ": sdk_compress(MESH_V1_BUFFER),
        "MESH_V1_NORMALS_GZ": normals,
    }


# --- STAG's answers (Go encoding/json; gin.H keys sorted) -----------------------------------

EVENT_ID = "5E0F3A9C-2B71-4C84-9D36-E8A1B2C3D4F5"


def stag_lower_200(event_id: str, processed: int) -> bytes:
    """tabularxr/stag handlers/ingest.go:64-70: IngestResponse in struct order."""
    return orjson.dumps({"success": True, "event_id": event_id, "processed": processed})


def stag_v2_200(event_id: str, anchors: int, meshes: int) -> bytes:
    """tabularxr/Stag handlers/ingest.go:77-82: gin.H, so keys sorted."""
    return orjson.dumps(
        {
            "anchors_count": anchors,
            "event_id": event_id,
            "meshes_count": meshes,
            "message": "Event ingested successfully",
        }
    )
