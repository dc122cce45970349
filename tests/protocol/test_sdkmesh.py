"""decode_sdk_mesh: the SDK's compressed mesh buffer, every container, every lie, bombs."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable

import DracoPy
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.geometry import decode_mesh, triangles_equal
from stag_relay.protocol.mesh import MeshError
from stag_relay.protocol.sdkmesh import (
    container,
    decode_sdk_mesh,
    inflate,
    max_inflated_size,
    parse_mesh_buffer,
)
from tests.support.sdk import (
    MESH_V1_BUFFER,
    MESH_V1_FACES,
    MESH_V1_VERTICES,
    MESH_V1_VERTICES_GZ,
    mesh_buffer,
    raw_deflate,
    sdk_compress,
    zlib_wrap,
)

CONTAINERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": sdk_compress,
    "zlib": zlib_wrap,
    "raw": raw_deflate,
}


def _refused(data: bytes, message: str, **limits: int) -> None:
    with pytest.raises(MeshError) as info:
        decode_sdk_mesh(data, **limits)
    assert info.value.message.startswith(message), info.value.message


def test_the_sdk_fixture_decodes_to_its_mesh() -> None:
    mesh = decode_sdk_mesh(MESH_V1_VERTICES_GZ)
    assert mesh.points.tolist() == [list(v) for v in MESH_V1_VERTICES]
    assert mesh.faces.tolist() == [MESH_V1_FACES[:3], MESH_V1_FACES[3:]]
    assert mesh.points.dtype == np.float32 and mesh.faces.dtype == np.uint32
    assert mesh.triangles.shape == (2, 3, 3)
    assert (mesh.vertex_count, mesh.face_count) == (4, 2)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_each_container_is_told_by_its_header(name: str) -> None:
    data = CONTAINERS[name](MESH_V1_BUFFER)
    assert container(data) == name
    assert inflate(data, 1000) == MESH_V1_BUFFER


def test_a_gzip_member_with_a_file_name_reads_too() -> None:
    # Python's gzip writes the FNAME field the SDK's hand-built header leaves out.
    import gzip
    import io

    out = io.BytesIO()
    with gzip.GzipFile("mesh.bin", "wb", fileobj=out) as file:
        file.write(MESH_V1_BUFFER)
    assert inflate(out.getvalue(), 1000) == MESH_V1_BUFFER


def test_a_raw_stream_that_looks_like_a_zlib_header_still_reads() -> None:
    # A stored, non-final raw block of one byte: 0x78 0x01 is also a valid zlib
    # header (0x7801 % 31 == 0). The zlib read fails; the raw read succeeds.
    raw = b"\x78\x01\x00\xfe\xffA" + raw_deflate(b"BC")
    assert container(raw) == "zlib"
    assert inflate(raw, 100) == b"ABC"


def test_the_same_mesh_decodes_as_draco_does() -> None:
    # The diff code takes either: same points, faces, triangles.
    points = np.array(MESH_V1_VERTICES, np.float32)
    faces = np.array(MESH_V1_FACES, np.uint32).reshape(-1, 3)
    draco = DracoPy.encode(points, faces, quantization_bits=0, preserve_order=True)
    from_draco = decode_mesh(base64.b64encode(draco).decode())
    from_sdk = decode_sdk_mesh(MESH_V1_VERTICES_GZ)
    assert triangles_equal(from_draco.triangles, from_sdk.triangles)


_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def _meshes(draw: st.DrawFn) -> tuple[list[tuple[float, float, float]], list[int]]:
    points = draw(st.lists(st.tuples(_f32, _f32, _f32), max_size=40))
    if not points:
        return points, []
    triangles = draw(st.lists(st.integers(0, len(points) - 1), max_size=60))
    return points, triangles[: len(triangles) // 3 * 3]


@given(_meshes(), st.sampled_from(sorted(CONTAINERS)))
def test_any_mesh_encoded_decodes_equal(
    mesh: tuple[list[tuple[float, float, float]], list[int]], name: str
) -> None:
    points, indices = mesh
    decoded = decode_sdk_mesh(CONTAINERS[name](mesh_buffer(points, indices)))
    assert decoded.points.tobytes() == struct.pack(f"<{3 * len(points)}f", *sum(points, ()))
    assert decoded.faces.ravel().tolist() == indices
    assert np.array_equal(decoded.triangles, decoded.points[decoded.faces])


# --- lies, corruption, bombs ---------------------------------------------------------------------


def _buffer(vertex_count: int, index_count: int, body: bytes) -> bytes:
    return sdk_compress(struct.pack("<II", vertex_count, index_count) + body)


_TRIANGLE = struct.pack("<9f", 0, 0, 0, 1, 0, 0, 0, 1, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "$.data.vertices: empty, expected a compressed mesh buffer"),
        (MESH_V1_VERTICES_GZ[:10] + b"\xff" * 8, "$.data.vertices: corrupt gzip data"),
        (MESH_V1_VERTICES_GZ[:-12], "$.data.vertices: truncated gzip data"),
        (MESH_V1_VERTICES_GZ + b"\x00", "$.data.vertices: 1 bytes after the end of the gzip"),
        (MESH_V1_VERTICES_GZ + MESH_V1_VERTICES_GZ, "$.data.vertices: 43 bytes after the end"),
        (b"\xff\xff\xff", "$.data.vertices: corrupt raw DEFLATE data"),
        (sdk_compress(b"\x01\x00\x00"), "$.data.vertices: 3 bytes inflated, too short"),
        (
            _buffer(3, 4, _TRIANGLE + bytes(16)),
            "$.data.vertices: indexCount 4 is not a multiple of 3",
        ),
        (
            _buffer(3, 3, _TRIANGLE + struct.pack("<3I", 0, 1, 2) + b"\x00"),
            "$.data.vertices: 57 bytes inflated, but the header's 3 vertices and 3 indices take 56",
        ),
        (
            _buffer(4, 3, _TRIANGLE + struct.pack("<3I", 0, 1, 2)),
            "$.data.vertices: 56 bytes inflated, but the header's 4 vertices and 3 indices take 68",
        ),
        (
            _buffer(3, 3, _TRIANGLE + struct.pack("<3I", 0, 1, 3)),
            "$.data.vertices: face 0 refers to vertex 3, out of range (the buffer holds 3",
        ),
        (
            _buffer(3, 0, struct.pack("<9f", 0, 0, 0, 1, float("nan"), 0, 0, 1, 0)),
            "$.data.vertices: non-finite coordinate in vertex 1",
        ),
        (
            _buffer(3, 0, struct.pack("<9f", 0, 0, 0, 1, 0, 0, 0, 1, float("-inf"))),
            "$.data.vertices: non-finite coordinate in vertex 2",
        ),
        (
            _buffer(2**32 - 1, 0, b""),
            "$.data.vertices: 4,294,967,295 vertices, more than mesh.max_vertices (1,000,000)",
        ),
    ],
)
def test_bad_buffers_are_refused_with_the_path(data: bytes, message: str) -> None:
    _refused(data, message)


def test_the_limits_are_the_mesh_settings() -> None:
    mesh = _buffer(3, 3, _TRIANGLE + struct.pack("<3I", 0, 1, 2))
    decode_sdk_mesh(mesh, max_vertices=3, max_faces=1)
    # A small limit caps inflation too: the buffer's size is refused before its counts.
    _refused(mesh, "$.data.vertices: inflates to more than", max_vertices=2, max_faces=1)
    _refused(mesh, "$.data.vertices: inflates to more than", max_vertices=3, max_faces=0)
    buffer = zlib.decompress(mesh, 31)
    with pytest.raises(MeshError, match=r"3 vertices, more than mesh.max_vertices \(2\)"):
        parse_mesh_buffer(buffer, max_vertices=2)
    with pytest.raises(MeshError, match=r"1 faces, more than mesh.max_faces \(0\)"):
        parse_mesh_buffer(buffer, max_faces=0)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_an_inflate_bomb_is_refused_at_the_limit(name: str) -> None:
    # 64 MiB of zeros in 64 KiB: more than a mesh within the defaults can take.
    bomb = CONTAINERS[name](bytes(64 * 1024**2))
    assert len(bomb) < 100 * 1024
    _refused(bomb, "$.data.vertices: inflates to more than 36,000,008 bytes")


def test_the_inflate_limit_is_exact() -> None:
    assert max_inflated_size(1_000_000, 2_000_000) == 36_000_008
    data = raw_deflate(bytes(100))
    assert inflate(data, 100) == bytes(100)
    with pytest.raises(MeshError, match="inflates to more than 99 bytes"):
        inflate(data, 99)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_mesh_error(data: bytes) -> None:
    try:
        decode_sdk_mesh(data)
    except MeshError as exc:
        assert exc.message.startswith("$.data.vertices: ")


@given(st.sampled_from(sorted(CONTAINERS)), st.data())
def test_any_damaged_buffer_decodes_or_raises_mesh_error(name: str, data: st.DataObject) -> None:
    compressed = bytearray(CONTAINERS[name](MESH_V1_BUFFER))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(compressed) - 1))
        compressed[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(compressed)))
    try:
        decode_sdk_mesh(bytes(compressed[:cut]), max_vertices=100, max_faces=100)
    except MeshError as exc:
        assert exc.message.startswith("$.data.vertices: ")


@given(st.binary(max_size=120), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_any_header_over_any_body_decodes_or_raises_mesh_error(
    body: bytes, vertex_count: int, index_count: int
) -> None:
    buffer = struct.pack("<II", vertex_count, index_count) + body
    try:
        mesh = parse_mesh_buffer(buffer, max_vertices=1000, max_faces=1000)
    except MeshError:
        return
    assert mesh.vertex_count == vertex_count and mesh.face_count * 3 == index_count
