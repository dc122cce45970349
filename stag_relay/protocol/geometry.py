"""Mesh geometry: decode client Draco buffers, diff triangle sets exactly, hold what STAG has.

Pure: no trio, no I/O. It runs in the mesh worker processes
(:mod:`stag_relay.pipeline.meshworker`), and is the only module of the relay that imports numpy
and DracoPy: the relay process itself never loads it.

A mesh's value is its list of triangles, three float32 positions each, in the
order the decoder yields them. Two meshes are equal when their triangle
multisets are equal, each triangle compared up to rotation of its corners with
its orientation kept. Positions compare by their float32 bit patterns, so
``-0.0`` and ``0.0`` are different coordinates: STAG rebuilds bit-identical
geometry, and a client whose zeros flip sign costs a few resent triangles, never
a wrong mesh. (NaN and infinities are rejected before any comparison.)

For each (session, anchor) the relay holds the triangles STAG has, in STAG's
order, as canonical keys (:func:`canonical_keys`); a new mesh goes out as a full
mesh or as a delta against them (:class:`MeshStore`), and :func:`apply_mesh_diff`
is the recipe STAG follows to rebuild it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import attrs
import DracoPy
import numpy as np
import numpy.typing as npt

from stag_relay.protocol import b64
from stag_relay.protocol.mesh import (
    DEFAULT_MAX_FACES,
    DEFAULT_MAX_VERTICES,
    FACES_PATH,
    VERTICES_PATH,
    MeshError,
    MeshJob,
    MeshOutcome,
    MeshSettings,
)

Float32Array = npt.NDArray[np.float32]
UInt32Array = npt.NDArray[np.uint32]
IndexArray = npt.NDArray[np.intp]

# A delta goes out only when smaller than this share of
# the full encoding; a bigger one saves too little to be worth a chain STAG follows.
DELTA_RATIO: Final = 0.7
# Held bytes charged per anchor beyond its keys: the dict entry, the key strings,
# the array header. It also caps the number of held anchors (and the relay's
# mirror of them) at max_state_bytes / 1 KiB whatever the mesh sizes.
STATE_OVERHEAD: Final = 1024
# Lossless Draco stores each position as three raw float32s (measured: 12.0
# bytes per point for random, integer-valued and near-zero coordinates alike),
# so the added vertices alone give a lower bound on a delta's size without
# encoding it.
_POSITION_BYTES: Final = 12
# The corner rotations, as corner indices: rotation r starts at corner r.
_ROTATE_1: Final = [1, 2, 0]
_ROTATE_2: Final = [2, 0, 1]
# splitmix64-style mixing constants for the triangle hash (any odd constants
# with good bit dispersion would do; collisions are detected, not assumed away).
_MIX_1: Final = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2: Final = np.uint64(0x94D049BB133111EB)
_GOLDEN: Final = np.uint64(0x9E3779B97F4A7C15)
_SHIFT_32: Final = np.uint64(32)
_SHIFT_29: Final = np.uint64(29)


@attrs.frozen(slots=True, eq=False)
class DecodedMesh:
    """A checked mesh: finite float32 ``points`` (v, 3), ``faces`` (f, 3) indexing them.

    ``triangles`` (f, 3, 3) is the mesh's value: ``points[faces]``, in decoder order.
    A point cloud has no faces and no triangles.
    """

    points: Float32Array
    faces: UInt32Array
    triangles: Float32Array

    @property
    def vertex_count(self) -> int:
        return len(self.points)

    @property
    def face_count(self) -> int:
        return len(self.faces)


# --- decoding -------------------------------------------------------------------


def decode_mesh(
    vertices: str,
    faces: str = "",
    *,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    max_faces: int = DEFAULT_MAX_FACES,
) -> DecodedMesh:
    """Decode and check one mesh packet's ``vertices`` and ``faces`` (base64 Draco).

    The points of ``vertices`` (a Draco mesh or point cloud) are the positions.
    When ``faces`` is empty or identical to ``vertices`` the connectivity is the
    faces of the ``vertices`` mesh (none for a point cloud); otherwise it is the
    faces of the ``faces`` mesh, indexing the points of ``vertices``. What the
    decoder returns is checked, not trusted: bit-flipped buffers often decode,
    into other geometry. Raises :class:`MeshError`.
    """
    geometry = _decode_draco(vertices, VERTICES_PATH)
    points = _positions(geometry, VERTICES_PATH, max_vertices)
    if not faces or faces == vertices:
        connectivity = _connectivity(geometry, VERTICES_PATH, max_faces)
        faces_path = VERTICES_PATH
    else:
        face_geometry = _decode_draco(faces, FACES_PATH)
        # Its positions are not used, but they were decoded: bound them all the same.
        _positions(face_geometry, FACES_PATH, max_vertices, check_finite=False)
        connectivity = _connectivity(face_geometry, FACES_PATH, max_faces)
        faces_path = FACES_PATH
    if connectivity.size and int(connectivity.max()) >= len(points):
        bad = int(np.flatnonzero((connectivity >= len(points)).any(axis=1))[0])
        index = int(connectivity[bad].max())
        raise MeshError(
            f"{faces_path}: face {bad} refers to vertex {index}, out of range "
            f"(the vertices buffer holds {len(points)} vertices)"
        )
    return DecodedMesh(points, connectivity, points[connectivity])


def decode_job(job: MeshJob, *, max_vertices: int, max_faces: int) -> DecodedMesh:
    """Decode a job's mesh in its encoding: Draco, or the StreamKit SDK's buffer."""
    if job.encoding == "sdk":
        # Imported here: sdkmesh builds on this module's DecodedMesh.
        from stag_relay.protocol.sdkmesh import decode_sdk_mesh

        buffer = b64.decode(job.vertices)
        if buffer is None:
            raise MeshError("$.data.vertices: not valid base64")
        return decode_sdk_mesh(buffer, max_vertices=max_vertices, max_faces=max_faces)
    return decode_mesh(job.vertices, job.faces, max_vertices=max_vertices, max_faces=max_faces)


def _decode_draco(text: str, path: str) -> Any:
    data = b64.decode(text)
    if data is None:
        raise MeshError(f"{path}: not standard base64")
    if not data:
        raise MeshError(f"{path}: empty, expected Draco data")
    try:
        return DracoPy.decode(data)
    except DracoPy.FileTypeException:
        raise MeshError(f"{path}: not Draco data") from None
    except MemoryError:
        raise MeshError(f"{path}: Draco data too large to decode") from None
    except Exception as exc:  # DracoPy raises TypeError/ValueError for corrupt data
        raise MeshError(f"{path}: corrupt Draco data ({type(exc).__name__})") from None


def _positions(geometry: Any, path: str, limit: int, *, check_finite: bool = True) -> Float32Array:
    if geometry.points is None:  # seen from corrupt buffers: faces but no positions
        raise MeshError(f"{path}: Draco data without vertex positions")
    points = np.asarray(geometry.points)
    if points.size == 0:
        return np.zeros((0, 3), np.float32)
    if points.dtype != np.float32 or points.ndim != 2 or points.shape[1] != 3:
        raise MeshError(
            f"{path}: the decoder returned positions of shape {points.shape} and type "
            f"{points.dtype}, expected float32 triples"
        )
    if len(points) > limit:
        raise MeshError(
            f"{path}: {len(points):,} vertices, more than mesh.max_vertices ({limit:,})"
        )
    if check_finite:
        finite = np.isfinite(points)
        if not finite.all():
            bad = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise MeshError(f"{path}: non-finite coordinate in vertex {bad}")
    return np.ascontiguousarray(points)


def _connectivity(geometry: Any, path: str, limit: int) -> UInt32Array:
    if not isinstance(geometry, DracoPy.DracoMesh):  # a point cloud
        return np.zeros((0, 3), np.uint32)
    if geometry.faces is None:
        raise MeshError(f"{path}: Draco mesh without faces data")
    faces = np.asarray(geometry.faces)
    if faces.size == 0:
        return np.zeros((0, 3), np.uint32)
    if faces.dtype.kind not in "ui" or faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(
            f"{path}: the decoder returned faces of shape {faces.shape} and type "
            f"{faces.dtype}, expected index triples"
        )
    if len(faces) > limit:
        raise MeshError(f"{path}: {len(faces):,} faces, more than mesh.max_faces ({limit:,})")
    if faces.dtype.kind == "i" and int(faces.min()) < 0:
        bad = int(np.flatnonzero((faces < 0).any(axis=1))[0])
        raise MeshError(f"{path}: face {bad} has a negative vertex index")
    return np.ascontiguousarray(faces, dtype=np.uint32)


# --- triangle equality ------------------------------------------------------------


def canonical_keys(triangles: Float32Array) -> UInt32Array:
    """Each triangle as 9 uint32 (its coordinates' bit patterns), rotated to a canonical start.

    Of a triangle's three rotations (corners a b c, b c a, c a b) the key is the
    lexicographically smallest, comparing corners by their (x, y, z) bit patterns
    as unsigned integers. Two triangles are equal up to rotation, orientation
    kept, exactly when their keys are equal. Vectorised: a few milliseconds for
    40,000 triangles.
    """
    u = np.ascontiguousarray(triangles, dtype=np.float32).view(np.uint32).reshape(-1, 3, 3)
    # A corner as (hi, lo) = (x << 32 | y, z): corner order is then two integer compares.
    hi = (u[:, :, 0].astype(np.uint64) << _SHIFT_32) | u[:, :, 1]
    lo = u[:, :, 2]
    h0, h1, h2 = hi[:, 0], hi[:, 1], hi[:, 2]
    l0, l1, l2 = lo[:, 0], lo[:, 1], lo[:, 2]
    lt01, lt10 = _corner_less(h0, l0, h1, l1), _corner_less(h1, l1, h0, l0)
    lt12, lt21 = _corner_less(h1, l1, h2, l2), _corner_less(h2, l2, h1, l1)
    lt02, lt20 = _corner_less(h0, l0, h2, l2), _corner_less(h2, l2, h0, l0)
    eq01, eq12, eq20 = ~(lt01 | lt10), ~(lt12 | lt21), ~(lt02 | lt20)
    # Rotations R0 = (c0, c1, c2), R1 = (c1, c2, c0), R2 = (c2, c0, c1), compared
    # corner by corner; equal corners (degenerate triangles) fall to the next one.
    r1_lt_r0 = lt10 | (eq01 & (lt21 | (eq12 & lt02)))
    r2_lt_r0 = lt20 | (eq20 & (lt01 | (eq01 & lt12)))
    r2_lt_r1 = lt21 | (eq12 & (lt02 | (eq20 & lt10)))
    use_2 = np.where(r1_lt_r0, r2_lt_r1, r2_lt_r0)
    use_1 = r1_lt_r0 & ~use_2
    keys = u.copy()
    keys[use_1] = u[use_1][:, _ROTATE_1]
    keys[use_2] = u[use_2][:, _ROTATE_2]
    return keys.reshape(-1, 9)


def _corner_less(
    ha: npt.NDArray[np.uint64],
    la: UInt32Array,
    hb: npt.NDArray[np.uint64],
    lb: UInt32Array,
) -> npt.NDArray[np.bool_]:
    result: npt.NDArray[np.bool_] = (ha < hb) | ((ha == hb) & (la < lb))
    return result


def triangles_equal(a: Float32Array, b: Float32Array) -> bool:
    """Whether two triangle lists are equal meshes: same multiset up to corner rotation."""
    if len(a) != len(b):
        return False
    ka, kb = canonical_keys(a), canonical_keys(b)
    return bool(np.array_equal(ka[np.lexsort(ka.T[::-1])], kb[np.lexsort(kb.T[::-1])]))


def _row_hashes(keys: UInt32Array) -> npt.NDArray[np.uint64]:
    """A 64-bit hash per key row; equal rows hash equal, and unequal ones almost never do."""
    k = keys.astype(np.uint64)
    h = k[:, 8] * _GOLDEN
    for j in range(0, 8, 2):
        h ^= k[:, j] | (k[:, j + 1] << _SHIFT_32)
        h *= _MIX_1
        h ^= h >> _SHIFT_29
    h *= _MIX_2
    h ^= h >> _SHIFT_32
    return h


@attrs.frozen(slots=True, eq=False)
class TriangleDiff:
    """How to turn a base triangle list into a new one, multiset-wise.

    ``removed``: ascending indices into the base; ``added``: ascending indices into
    the new list. Base without removed, then new[added], equals new as a mesh.
    """

    removed: IndexArray
    added: IndexArray


def diff_keys(
    base: UInt32Array, new: UInt32Array, sort_key: npt.NDArray[Any] | None = None
) -> TriangleDiff:
    """The multiset difference between two canonical key lists.

    Of equal triangles the first occurrences in the base are kept and the first
    occurrences in the new list count as already there; the rest are removed or
    added. Rows are grouped by sorting a 64-bit hash, checked exactly against
    the rows themselves; a collision falls back to an exact (slower) sort.
    ``sort_key`` replaces the hash, for tests of that fallback.
    """
    n = len(base)
    keys = np.concatenate([base, new])
    total = len(keys)
    if total == 0:
        empty = np.zeros(0, np.intp)
        return TriangleDiff(empty, empty)
    grouped = _group(keys, _row_hashes(keys) if sort_key is None else sort_key)
    if grouped is None:
        # A hash collision (or a test's degenerate sort key): group exactly.
        exact = np.unique(_void_rows(keys), return_inverse=True)[1].reshape(-1)
        grouped = _group(keys, exact)
        assert grouped is not None  # distinct group ids cannot collide
    order, starts = grouped
    size = np.diff(np.append(starts, total))
    group = np.repeat(np.arange(len(starts)), size)
    is_base = order < n
    in_base = np.add.reduceat(is_base.astype(np.intp), starts)
    in_new = size - in_base
    # The sort is stable and base rows come first, so within a group the base
    # occurrences precede the new ones, each in their own order.
    rank = np.arange(total) - starts[group]
    drop = is_base & (rank >= in_new[group])
    add = ~is_base & (rank - in_base[group] >= in_base[group])
    removed = np.sort(order[drop])
    added = np.sort(order[add] - n)
    return TriangleDiff(removed.astype(np.intp), added.astype(np.intp))


def _group(keys: UInt32Array, sort_key: npt.NDArray[Any]) -> tuple[IndexArray, IndexArray] | None:
    """Stable order by ``sort_key`` and the group starts in it, or None on a collision."""
    order = np.argsort(sort_key, kind="stable")
    sorted_key = sort_key[order]
    boundary = np.empty(len(order), bool)
    boundary[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=boundary[1:])
    sorted_rows = keys[order]
    same_rows = (sorted_rows[1:] == sorted_rows[:-1]).all(axis=1)
    # Within a run of equal sort keys every row must equal its neighbour.
    if np.any(~boundary[1:] & ~same_rows):
        return None
    return order, np.flatnonzero(boundary)


def _void_rows(keys: UInt32Array) -> npt.NDArray[np.void]:
    rows = np.ascontiguousarray(keys)
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)


# --- the wire form of a delta ---------------------------------------------------------


def encode_removed(indices: npt.NDArray[Any]) -> str:
    """``removed_faces``: base64 of the indices as little-endian uint32 ("" for none)."""
    return b64.encode(np.asarray(indices, dtype="<u4").tobytes())


def decode_removed(text: str) -> UInt32Array:
    data = b64.decode(text)
    if data is None:
        raise MeshError("removed_faces: not standard base64")
    if len(data) % 4:
        raise MeshError(f"removed_faces: {len(data)} bytes, not a whole number of uint32")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def encode_added(mesh: DecodedMesh, rows: IndexArray) -> str | None:
    """``added``: the triangles ``mesh.faces[rows]`` as lossless, order-preserving Draco.

    "" when there are none. The buffer is decoded again and compared bit for bit
    (positions, triangle order and corner order): None if Draco did not give
    back exactly those triangles, and the caller sends a full mesh instead.
    """
    if len(rows) == 0:
        return ""
    used, connectivity = _renumber(mesh.faces[rows])
    return _encode_triangles(mesh.points[used], connectivity, mesh.triangles[rows])


def _renumber(faces: UInt32Array) -> tuple[UInt32Array, UInt32Array]:
    """The vertices ``faces`` use (ascending), and the faces renumbered to index only those."""
    used, renumbered = np.unique(faces, return_inverse=True)
    return used, renumbered.reshape(-1, 3).astype(np.uint32)


def _encode_triangles(
    points: Float32Array, connectivity: UInt32Array, expected: Float32Array
) -> str | None:
    try:
        data = DracoPy.encode(points, connectivity, quantization_bits=0, preserve_order=True)
        check = DracoPy.decode(data)
    except Exception:  # EncodingFailedException and friends: fall back to a full mesh
        return None
    if not isinstance(check, DracoPy.DracoMesh):
        return None
    got_points = np.asarray(check.points)
    got_faces = np.asarray(check.faces)
    if (
        got_points.dtype != np.float32
        or got_points.ndim != 2
        or got_points.shape[1:] != (3,)
        or got_faces.shape != connectivity.shape
        or int(got_faces.max()) >= len(got_points)
    ):
        return None
    got = got_points[got_faces]
    if not np.array_equal(got.view(np.uint32), expected.view(np.uint32)):
        return None
    return b64.encode(data)


def _b64_length(raw_bytes: int) -> int:
    return 4 * ((raw_bytes + 2) // 3)


# --- the recipe STAG follows ------------------------------------------------------------


def apply_mesh_diff(
    base_triangles: Float32Array | None,
    diff: Mapping[str, Any],
    *,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    max_faces: int = DEFAULT_MAX_FACES,
) -> Float32Array:
    """Apply one mesh update, as sent to STAG (a ``meshes[]`` item), to an anchor's mesh.

    This is the reconstruction STAG follows; it returns the anchor's new
    triangles, shape (n, 3, 3) float32, in the order later deltas index.

    - ``is_delta`` false (full): the result is the mesh of ``vertices_delta`` and
      ``faces_delta``, decoded as the relay decodes a client packet
      (:func:`decode_mesh`): triangle i is ``points[faces[i]]``. ``base_triangles``
      is ignored and may be None.
    - ``is_delta`` true: ``base_triangles`` must be the mesh STAG built for the
      update whose ``event_id`` equals ``base_event_id`` (STAG checks that; a
      delta on any other base must be refused). ``removed_faces`` is base64 of
      little-endian uint32, strictly ascending indices into the base triangles;
      ``added`` is base64 Draco (a mesh; "" for none). The result is the base
      triangles without the removed ones, in their order, followed by the added
      Draco mesh's triangles ``points[faces[i]]`` in decoded order.

    Either way ``face_count``, when present, must equal the result's length.
    Raises :class:`MeshError` for an update that does not apply.
    """
    if not diff.get("is_delta"):
        mesh = decode_mesh(
            str(diff["vertices_delta"]),
            str(diff.get("faces_delta") or ""),
            max_vertices=max_vertices,
            max_faces=max_faces,
        )
        result = mesh.triangles
    else:
        if base_triangles is None:
            raise MeshError("a delta needs the base mesh it was computed against")
        base = np.asarray(base_triangles, dtype=np.float32).reshape(-1, 3, 3)
        removed = decode_removed(str(diff.get("removed_faces") or ""))
        if len(removed) and (int(removed[-1]) >= len(base) or np.any(removed[1:] <= removed[:-1])):
            raise MeshError("removed_faces: indices must be ascending and within the base")
        kept = np.delete(base, removed.astype(np.intp), axis=0)
        added_text = str(diff.get("added") or "")
        if added_text:
            added = decode_mesh(added_text, max_vertices=max_vertices, max_faces=max_faces)
            if added.face_count == 0:
                raise MeshError("added: a Draco mesh without faces")
            result = np.concatenate([kept, added.triangles])
        else:
            result = kept
    count = diff.get("face_count")
    if count is not None and count != len(result):
        raise MeshError(f"face_count is {count}, but the rebuilt mesh has {len(result)} faces")
    return result


# --- what the relay holds per anchor ---------------------------------------------------------


@attrs.define(slots=True, eq=False)
class _HeldMesh:
    event_id: str
    keys: UInt32Array  # canonical, in STAG's order
    deltas: int  # deltas sent since the last full mesh
    nbytes: int


class MeshStore:
    """The mesh STAG holds for each (session, anchor), within a byte budget.

    Least recently updated anchors are evicted first when the budget is
    exceeded; an evicted anchor's next update goes out full.
    """

    def __init__(self, settings: MeshSettings, max_bytes: int | None = None) -> None:
        self.settings = settings
        self.max_bytes = settings.max_state_bytes if max_bytes is None else max_bytes
        self.nbytes = 0
        self._held: OrderedDict[tuple[str, str], _HeldMesh] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def held_keys(self, session_id: str, anchor_id: str) -> UInt32Array | None:
        """The canonical keys held for an anchor, in STAG's order (for checks and tests)."""
        held = self._held.get((session_id, anchor_id))
        return None if held is None else held.keys

    def update(self, job: MeshJob) -> MeshOutcome:
        """Decode ``job``'s mesh, choose full or delta, and hold the result as the new base."""
        settings = self.settings
        started = time.perf_counter()
        try:
            mesh = decode_job(job, max_vertices=settings.max_vertices, max_faces=settings.max_faces)
        except MeshError as exc:
            return self._invalid(job, exc.message, time.perf_counter() - started)
        except MemoryError:
            # The worker's address-space limit (init_worker) turned a decompression
            # bomb into this; Draco raises it as such, numpy too.
            return self._invalid(job, f"{VERTICES_PATH}: too large to decode", 0.0)
        decode_seconds = time.perf_counter() - started
        key = (job.session_id, job.anchor_id)
        # The old base is replaced whatever this update turns out to be.
        base = self._held.pop(key, None)
        if base is not None:
            self.nbytes -= base.nbytes
        try:
            return self._replace(job, mesh, base, decode_seconds)
        except MemoryError:
            # The base is gone already: the next update of this anchor goes full.
            return MeshOutcome(
                error="$.data.mesh: too large to process",
                decode_seconds=decode_seconds,
                state_bytes=self.nbytes,
            )

    def _invalid(self, job: MeshJob, message: str, decode_seconds: float) -> MeshOutcome:
        """An invalid mesh changes nothing: the anchor keeps its base."""
        return MeshOutcome(
            error=message,
            decode_seconds=decode_seconds,
            held=(job.session_id, job.anchor_id) in self._held,
            state_bytes=self.nbytes,
        )

    def _replace(
        self, job: MeshJob, mesh: DecodedMesh, base: _HeldMesh | None, decode_seconds: float
    ) -> MeshOutcome:
        settings = self.settings
        key = (job.session_id, job.anchor_id)
        keys = canonical_keys(mesh.triangles)
        delta = None
        if (
            base is not None
            and job.base_event_id is not None
            and base.event_id == job.base_event_id
            and base.deltas + 1 < settings.keyframe_interval
        ):
            full_size = len(job.vertices) + len(job.faces)
            delta = _plan_delta(base.keys, mesh, keys, DELTA_RATIO * full_size)
        if delta is None:
            held = _HeldMesh(job.event_id, keys, 0, keys.nbytes + STATE_OVERHEAD)
            verdict_delta = False
            removed_text = added_text = ""
        else:
            assert base is not None  # a delta is only planned against a base
            removed, added, removed_text, added_text = delta
            new_keys = np.concatenate([np.delete(base.keys, removed, axis=0), keys[added]])
            held = _HeldMesh(
                job.event_id, new_keys, base.deltas + 1, new_keys.nbytes + STATE_OVERHEAD
            )
            verdict_delta = True
        evicted = self._hold(key, held)
        return MeshOutcome(
            is_delta=verdict_delta,
            removed_faces=removed_text,
            added=added_text,
            vertex_count=mesh.vertex_count,
            face_count=mesh.face_count,
            decode_seconds=decode_seconds,
            held=key in self._held,
            evicted=evicted,
            state_bytes=self.nbytes,
        )

    def _hold(self, key: tuple[str, str], held: _HeldMesh) -> tuple[tuple[str, str], ...]:
        if held.nbytes > self.max_bytes:
            # Bigger than the whole budget: its next update goes full, nothing else is lost.
            return ()
        evicted = []
        while self.nbytes + held.nbytes > self.max_bytes:
            old_key, old = self._held.popitem(last=False)
            self.nbytes -= old.nbytes
            evicted.append(old_key)
        self._held[key] = held
        self.nbytes += held.nbytes
        return tuple(evicted)


def _plan_delta(
    base_keys: UInt32Array, mesh: DecodedMesh, keys: UInt32Array, limit: float
) -> tuple[IndexArray, IndexArray, str, str] | None:
    """The delta from ``base_keys`` to ``mesh``, or None when it is not smaller than ``limit``."""
    diff = diff_keys(base_keys, keys)
    removed_size = _b64_length(4 * len(diff.removed))
    if removed_size >= limit:
        return None
    added_text = ""
    if len(diff.added):
        used, connectivity = _renumber(mesh.faces[diff.added])
        if removed_size + _b64_length(_POSITION_BYTES * len(used)) >= limit:
            return None  # cannot win: skip the encoding
        encoded = _encode_triangles(mesh.points[used], connectivity, mesh.triangles[diff.added])
        if encoded is None or removed_size + len(encoded) >= limit:
            return None
        added_text = encoded
    return diff.removed, diff.added, encode_removed(diff.removed), added_text
