"""Decode the StreamKit SDK's mesh buffer, for the mesh workers.

Pure: no trio, no I/O. Like :mod:`stag_relay.protocol.geometry` it imports numpy
and runs only in the mesh worker processes.

A full SDK mesh's ``vertices`` is a compressed buffer of
``u32 vertexCount, u32 indexCount, vertexCount x 3 float32, indexCount u32``, all
little-endian, the indices a triangle list. The SDK deflates it with Apple's
COMPRESSION_ZLIB (raw DEFLATE) and wraps that in a gzip member; other encoders
may send raw DEFLATE or the zlib container. The three are told apart by their
first bytes. Inflation stops at the most a mesh within ``mesh.max_vertices`` and
``mesh.max_faces`` can take, so a small bomb costs no more memory than the
largest acceptable mesh. Everything decoded is checked, not trusted, and every
failure is a :class:`~stag_relay.protocol.mesh.MeshError` naming the JSON path.

The result is the same :class:`~stag_relay.protocol.geometry.DecodedMesh` the
Draco decoder yields, so the diff code takes either. An SDK delta
(``isDelta``) is never decoded: it carries no coordinates to check.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import numpy as np

from stag_relay.protocol.geometry import DecodedMesh
from stag_relay.protocol.mesh import DEFAULT_MAX_FACES, DEFAULT_MAX_VERTICES, MeshError

# The inner JSON path of an SDK mesh update's buffer.
SDK_VERTICES_PATH: Final = "$.data.vertices"

_HEADER: Final = struct.Struct("<II")
_GZIP_MAGIC: Final = b"\x1f\x8b"
# zlib's window bits: 16 + 15 reads a gzip member, 15 a zlib stream, -15 raw DEFLATE.
_GZIP_WBITS: Final = 31
_ZLIB_WBITS: Final = 15
_RAW_WBITS: Final = -15


def max_inflated_size(max_vertices: int, max_faces: int) -> int:
    """The largest buffer a mesh within the limits can take: the header, the arrays."""
    return _HEADER.size + 12 * max_vertices + 12 * max_faces


def container(data: bytes) -> str:
    """``"gzip"``, ``"zlib"`` or ``"raw"``: which DEFLATE container ``data`` starts with.

    A raw DEFLATE stream cannot start with the gzip magic (its first block would
    have the reserved type 3). A zlib header is two bytes whose big-endian value
    is a multiple of 31, with method 8 and a window of at most 32 KiB; a raw
    stream can start so too, so a failed zlib read is retried as raw.
    """
    if data[:2] == _GZIP_MAGIC:
        return "gzip"
    if (
        len(data) >= 2
        and data[0] & 0x0F == 8
        and data[0] >> 4 <= 7
        and (data[0] << 8 | data[1]) % 31 == 0
    ):
        return "zlib"
    return "raw"


def inflate(data: bytes, limit: int, path: str = SDK_VERTICES_PATH) -> bytes:
    """Decompress raw DEFLATE, zlib or gzip ``data`` (by its header) to at most ``limit`` bytes.

    Raises :class:`MeshError` for an empty, corrupt, truncated or oversized
    stream, and for bytes after its end.
    """
    if not data:
        raise MeshError(f"{path}: empty, expected a compressed mesh buffer")
    kind = container(data)
    if kind == "zlib":
        try:
            return _inflate(data, _ZLIB_WBITS, limit, path, "zlib")
        except MeshError as zlib_error:
            # Perhaps a raw stream whose first bytes look like a zlib header; if
            # not, what the zlib reading found is the answer.
            try:
                return _inflate(data, _RAW_WBITS, limit, path, "raw DEFLATE")
            except MeshError:
                raise zlib_error from None
    if kind == "gzip":
        return _inflate(data, _GZIP_WBITS, limit, path, "gzip")
    return _inflate(data, _RAW_WBITS, limit, path, "raw DEFLATE")


def _inflate(data: bytes, wbits: int, limit: int, path: str, name: str) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        # One byte over the limit tells "exactly at" from "beyond".
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MeshError(f"{path}: corrupt {name} data ({exc})") from None
    if len(out) > limit:
        raise MeshError(
            f"{path}: inflates to more than {limit:,} bytes, the most a mesh within "
            "mesh.max_vertices and mesh.max_faces takes"
        )
    if not inflater.eof:
        raise MeshError(f"{path}: truncated {name} data (the stream does not end)")
    if inflater.unused_data:
        raise MeshError(
            f"{path}: {len(inflater.unused_data):,} bytes after the end of the {name} stream"
        )
    return out


def decode_sdk_mesh(
    vertices: bytes,
    *,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    max_faces: int = DEFAULT_MAX_FACES,
    path: str = SDK_VERTICES_PATH,
) -> DecodedMesh:
    """Inflate and check a full SDK mesh's ``vertices`` (the bytes after base64)."""
    buffer = inflate(vertices, max_inflated_size(max_vertices, max_faces), path)
    return parse_mesh_buffer(buffer, max_vertices=max_vertices, max_faces=max_faces, path=path)


def parse_mesh_buffer(
    buffer: bytes,
    *,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    max_faces: int = DEFAULT_MAX_FACES,
    path: str = SDK_VERTICES_PATH,
) -> DecodedMesh:
    """Check an inflated SDK mesh buffer and return its mesh."""
    if len(buffer) < _HEADER.size:
        raise MeshError(
            f"{path}: {len(buffer)} bytes inflated, too short for the 8-byte header "
            "(u32 vertexCount, u32 indexCount)"
        )
    vertex_count, index_count = _HEADER.unpack_from(buffer)
    if vertex_count > max_vertices:
        raise MeshError(
            f"{path}: {vertex_count:,} vertices, more than mesh.max_vertices ({max_vertices:,})"
        )
    if index_count % 3:
        raise MeshError(
            f"{path}: indexCount {index_count:,} is not a multiple of 3 (a triangle list)"
        )
    if index_count // 3 > max_faces:
        raise MeshError(
            f"{path}: {index_count // 3:,} faces, more than mesh.max_faces ({max_faces:,})"
        )
    expected = _HEADER.size + 12 * vertex_count + 4 * index_count
    if len(buffer) != expected:
        raise MeshError(
            f"{path}: {len(buffer):,} bytes inflated, but the header's {vertex_count:,} "
            f"vertices and {index_count:,} indices take {expected:,}"
        )
    points = np.frombuffer(buffer, "<f4", 3 * vertex_count, _HEADER.size).reshape(-1, 3)
    finite = np.isfinite(points)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise MeshError(f"{path}: non-finite coordinate in vertex {bad}")
    offset = _HEADER.size + 12 * vertex_count
    faces = np.frombuffer(buffer, "<u4", index_count, offset).reshape(-1, 3)
    if faces.size and int(faces.max()) >= vertex_count:
        bad = int(np.flatnonzero((faces >= vertex_count).any(axis=1))[0])
        raise MeshError(
            f"{path}: face {bad} refers to vertex {int(faces[bad].max())}, out of range "
            f"(the buffer holds {vertex_count:,} vertices)"
        )
    # Native-order, writable copies, like the Draco decoder's arrays.
    points = points.astype(np.float32)
    faces = faces.astype(np.uint32)
    return DecodedMesh(points, faces, points[faces])
