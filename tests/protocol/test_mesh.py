"""Mesh geometry: decoding and its checks, triangle equality, exact diffs, the held state.

Every buffer here is real Draco from DracoPy. Decoding of fuzzed (bit-flipped)
buffers is tested through worker processes in tests/pipeline/test_meshpool.py: some of them
make Draco allocate without bound, which must not happen in the test process.
"""

from __future__ import annotations

import base64
from collections import Counter
from typing import Any

import DracoPy
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stag_relay.protocol.events import MeshUpdate
from stag_relay.protocol.geometry import (
    STATE_OVERHEAD,
    DecodedMesh,
    MeshStore,
    apply_mesh_diff,
    canonical_keys,
    decode_mesh,
    decode_removed,
    diff_keys,
    encode_added,
    encode_removed,
    triangles_equal,
)
from stag_relay.protocol.mesh import MeshError, MeshJob, MeshOutcome, MeshSettings

Points = npt.NDArray[np.float32]
Faces = npt.NDArray[np.uint32]

# Client encodings the relay must accept. "ordered" and "split" keep the client's
# order exactly; "lossless" (edgebreaker) reorders faces and rotates corners;
# "quantized" moves every vertex onto a grid fitted to the mesh's bounding box.
ENCODINGS = ("ordered", "identical", "lossless", "quantized", "split")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(points: Points, faces: Faces, how: str = "ordered") -> tuple[str, str]:
    """A packet's (vertices, faces) base64 for a mesh, as a client would build it."""
    if len(faces) == 0:
        cloud = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
        return cloud, ""
    ordered = b64(DracoPy.encode(points, faces, quantization_bits=0, preserve_order=True))
    if how == "identical":
        return ordered, ordered
    if how == "split":
        cloud = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
        return cloud, ordered
    if how in ("lossless", "quantized"):
        options: dict[str, Any] = {"quantization_bits": 0} if how == "lossless" else {}
        try:
            return b64(DracoPy.encode(points, faces, **options)), ""
        except DracoPy.EncodingFailedException:  # e.g. every triangle degenerate
            return ordered, ""
    return ordered, ""


def random_points(rng: np.random.Generator, n: int) -> Points:
    # Not on any grid: float32 noise at room scale.
    return (rng.normal(size=(n, 3)) * 2.5).astype(np.float32)


def full_json(vertices: str, faces: str, outcome: MeshOutcome) -> dict[str, Any]:
    update = MeshUpdate(
        "a",
        False,
        vertices,
        faces,
        vertex_count=outcome.vertex_count,
        face_count=outcome.face_count,
    )
    return update.to_json()


def update_json(
    vertices: str, faces: str, outcome: MeshOutcome, base: str | None
) -> dict[str, Any]:
    if not outcome.is_delta:
        return full_json(vertices, faces, outcome)
    return MeshUpdate(
        "a",
        True,
        vertex_count=outcome.vertex_count,
        face_count=outcome.face_count,
        base_event_id=base,
        removed_faces=outcome.removed_faces,
        added=outcome.added,
    ).to_json()


def job(event: str, base: str | None, vertices: str, faces: str = "", anchor: str = "a") -> MeshJob:
    return MeshJob("s", anchor, event, base, vertices, faces)


def grid_patch(cols: int, rows: int = 12, seed: int = 0) -> tuple[Points, Faces]:
    """A scanned surface patch: jittered vertices, two triangles per cell."""
    rng = np.random.default_rng(seed)
    xs, ys = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1), indexing="ij")
    jitter = rng.uniform(-0.3, 0.3, size=(400, rows + 1, 2))[: cols + 1]
    x = (xs + jitter[..., 0]) * 0.05
    y = (ys + jitter[..., 1]) * 0.05
    z = 0.1 * np.sin(3.1 * x) + 0.05 * np.cos(4.7 * y + x)
    points = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    index = np.arange((cols + 1) * (rows + 1)).reshape(cols + 1, rows + 1)
    a, b = index[:-1, :-1].ravel(), index[1:, :-1].ravel()
    c, d = index[1:, 1:].ravel(), index[:-1, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)]).astype(np.uint32)
    return points, faces


# --- decoding ---------------------------------------------------------------------


def test_decode_lossless_ordered_mesh_gives_back_exactly_its_triangles() -> None:
    rng = np.random.default_rng(1)
    points = random_points(rng, 40)
    faces = rng.integers(0, 40, size=(60, 3)).astype(np.uint32)
    mesh = decode_mesh(*encode(points, faces))
    assert mesh.vertex_count == 40
    assert mesh.face_count == 60
    assert mesh.triangles.dtype == np.float32
    assert mesh.triangles.shape == (60, 3, 3)
    assert np.array_equal(mesh.triangles.view(np.uint32), points[faces].view(np.uint32))


@pytest.mark.parametrize("how", ["ordered", "identical", "split"])
def test_faces_empty_identical_or_separate_give_the_same_mesh(how: str) -> None:
    rng = np.random.default_rng(2)
    points = random_points(rng, 30)
    faces = rng.integers(0, 30, size=(25, 3)).astype(np.uint32)
    mesh = decode_mesh(*encode(points, faces, how))
    assert np.array_equal(mesh.triangles, points[faces])


def test_a_point_cloud_has_vertices_and_no_triangles() -> None:
    points = random_points(np.random.default_rng(3), 12)
    mesh = decode_mesh(b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True)))
    assert (mesh.vertex_count, mesh.face_count) == (12, 0)
    assert mesh.triangles.shape == (0, 3, 3)


def test_separate_faces_index_the_vertices_buffer_not_their_own_points() -> None:
    points = random_points(np.random.default_rng(4), 6)
    faces = np.array([[0, 1, 2], [3, 4, 5]], np.uint32)
    # The faces buffer's own positions are placeholders; only its faces count.
    dummy = np.full((6, 3), np.nan, np.float32)
    vertices = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
    face_buffer = b64(DracoPy.encode(dummy, faces, quantization_bits=0, preserve_order=True))
    mesh = decode_mesh(vertices, face_buffer)
    assert np.array_equal(mesh.triangles, points[faces])


@pytest.mark.parametrize(
    ("vertices", "message"),
    [
        ("not base64!", "$.data.mesh.vertices: not standard base64"),
        ("AAA", "$.data.mesh.vertices: not standard base64"),
        ("é", "$.data.mesh.vertices: not standard base64"),
        ("", "$.data.mesh.vertices: empty"),
        (b64(b"hello, world"), "$.data.mesh.vertices: not Draco data"),
        (b64(b'{"vertices": [1, 2, 3]}'), "$.data.mesh.vertices: not Draco data"),
    ],
)
def test_not_draco_is_invalid(vertices: str, message: str) -> None:
    with pytest.raises(MeshError) as info:
        decode_mesh(vertices)
    assert info.value.message.startswith(message)


def test_bad_faces_buffer_is_named_in_the_error() -> None:
    points = random_points(np.random.default_rng(5), 5)
    vertices = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
    with pytest.raises(MeshError, match=r"^\$\.data\.mesh\.faces: not Draco data"):
        decode_mesh(vertices, b64(b"garbage!"))


def test_every_truncation_is_an_error_or_a_checked_mesh() -> None:
    rng = np.random.default_rng(6)
    points = random_points(rng, 20)
    faces = rng.integers(0, 20, size=(30, 3)).astype(np.uint32)
    for how in ("ordered", "lossless", "quantized"):
        data = base64.b64decode(encode(points, faces, how)[0])
        for cut in range(len(data)):
            try:
                mesh = decode_mesh(b64(data[:cut]))
            except MeshError as exc:
                assert exc.message.startswith("$.data.mesh.vertices: ")
            else:
                assert_checked(mesh)


def assert_checked(mesh: DecodedMesh) -> None:
    """What decode_mesh promises about anything it returns."""
    assert mesh.points.dtype == np.float32
    assert mesh.points.ndim == 2
    assert mesh.points.shape[1] == 3
    assert np.isfinite(mesh.points).all()
    assert mesh.faces.dtype == np.uint32
    assert mesh.faces.shape == (mesh.face_count, 3)
    assert mesh.faces.size == 0 or int(mesh.faces.max()) < mesh.vertex_count
    assert mesh.triangles.shape == (mesh.face_count, 3, 3)


def test_face_index_out_of_range_is_invalid() -> None:
    points = random_points(np.random.default_rng(7), 5)
    vertices = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
    faces = np.array([[0, 1, 2], [1, 2, 9]], np.uint32)
    face_buffer = b64(
        DracoPy.encode(
            np.zeros((10, 3), np.float32), faces, quantization_bits=0, preserve_order=True
        )
    )
    with pytest.raises(MeshError) as info:
        decode_mesh(vertices, face_buffer)
    assert info.value.message == (
        "$.data.mesh.faces: face 1 refers to vertex 9, out of range "
        "(the vertices buffer holds 5 vertices)"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinate_is_invalid(bad: float) -> None:
    points = random_points(np.random.default_rng(8), 6)
    points[4, 1] = bad
    faces = np.array([[0, 1, 2], [3, 4, 5]], np.uint32)
    with pytest.raises(
        MeshError, match=r"^\$\.data\.mesh\.vertices: non-finite coordinate in vertex 4$"
    ):
        decode_mesh(*encode(points, faces))


def test_vertex_and_face_limits() -> None:
    rng = np.random.default_rng(9)
    points = random_points(rng, 10)
    faces = rng.integers(0, 10, size=(5, 3)).astype(np.uint32)
    vertices, _ = encode(points, faces)
    assert decode_mesh(vertices, max_vertices=10, max_faces=5).face_count == 5
    with pytest.raises(
        MeshError, match=r"vertices: 10 vertices, more than mesh.max_vertices \(9\)"
    ):
        decode_mesh(vertices, max_vertices=9)
    with pytest.raises(MeshError, match=r"vertices: 5 faces, more than mesh.max_faces \(4\)"):
        decode_mesh(vertices, max_faces=4)
    cloud, face_buffer = encode(points, faces, "split")
    with pytest.raises(MeshError, match=r"^\$\.data\.mesh\.faces: 5 faces, more than"):
        decode_mesh(cloud, face_buffer, max_faces=4)


# --- triangle equality ---------------------------------------------------------------

# Few distinct values, so that equal corners (degenerate triangles) are common.
corner_values = st.sampled_from([0.0, -0.0, 1.0, -1.5, 2.25, 1e-40, 3e38])
triangles_strategy = st.lists(
    st.lists(st.lists(corner_values, min_size=3, max_size=3), min_size=3, max_size=3),
    min_size=0,
    max_size=30,
).map(lambda t: np.array(t, np.float32).reshape(-1, 3, 3))


def reference_key(triangle: npt.NDArray[np.float32]) -> tuple[int, ...]:
    bits = triangle.astype(np.float32).view(np.uint32).reshape(9)
    return min(tuple(int(v) for v in np.roll(bits, -3 * r)) for r in range(3))


@settings(max_examples=150)
@given(triangles_strategy)
def test_canonical_key_is_the_smallest_rotation(triangles: npt.NDArray[np.float32]) -> None:
    keys = canonical_keys(triangles)
    assert keys.shape == (len(triangles), 9)
    for key, triangle in zip(keys, triangles, strict=True):
        assert tuple(int(v) for v in key) == reference_key(triangle)


@settings(max_examples=100)
@given(triangles_strategy, st.randoms(use_true_random=False))
def test_rotated_and_shuffled_triangles_are_the_same_mesh(
    triangles: npt.NDArray[np.float32], random: Any
) -> None:
    rotated = np.array([np.roll(t, -random.randrange(3), axis=0) for t in triangles], np.float32)
    rotated = rotated.reshape(-1, 3, 3)[random.sample(range(len(triangles)), len(triangles))]
    assert triangles_equal(triangles, rotated)


def test_orientation_and_signed_zero_and_multiplicity_matter() -> None:
    t = np.array([[[0, 0, 0], [1, 0, 0], [0, 1, 0]]], np.float32)
    assert triangles_equal(t, t[:, [1, 2, 0]])
    assert not triangles_equal(t, t[:, [0, 2, 1]])  # flipped
    negative_zero = t.copy()
    negative_zero[0, 0, 0] = -0.0
    assert not triangles_equal(t, negative_zero)
    assert not triangles_equal(np.concatenate([t, t]), np.concatenate([t, t[:, [0, 2, 1]]]))


# --- diffs ---------------------------------------------------------------------------


def counts(keys: npt.NDArray[np.uint32]) -> Counter[bytes]:
    return Counter(row.tobytes() for row in keys)


@settings(max_examples=200)
@given(triangles_strategy, triangles_strategy, st.booleans())
def test_diff_is_the_multiset_difference(
    base_triangles: npt.NDArray[np.float32], new_triangles: npt.NDArray[np.float32], collide: bool
) -> None:
    base, new = canonical_keys(base_triangles), canonical_keys(new_triangles)
    # A constant sort key makes every row collide: the exact fallback must agree.
    sort_key = np.zeros(len(base) + len(new), np.uint64) if collide else None
    diff = diff_keys(base, new, sort_key)
    assert np.all(np.diff(diff.removed) > 0)
    assert np.all(np.diff(diff.added) > 0)
    kept = np.delete(base, diff.removed, axis=0)
    assert counts(np.concatenate([kept, new[diff.added]])) == counts(new)
    # Minimal: nothing is both removed and added.
    assert len(diff.removed) == sum((counts(base) - counts(new)).values())
    assert len(diff.added) == sum((counts(new) - counts(base)).values())


def test_diff_keeps_first_occurrences() -> None:
    a, b = np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32) * 2
    base = canonical_keys(np.array([a, b, a, a], np.float32))
    new = canonical_keys(np.array([a, b, b], np.float32))
    diff = diff_keys(base, new)
    assert diff.removed.tolist() == [2, 3]
    assert diff.added.tolist() == [2]


def test_removed_faces_wire_format() -> None:
    assert encode_removed(np.array([], np.intp)) == ""
    text = encode_removed(np.array([1, 256, 2**32 - 1]))
    assert base64.b64decode(text) == bytes([1, 0, 0, 0, 0, 1, 0, 0, 255, 255, 255, 255])
    assert decode_removed(text).tolist() == [1, 256, 2**32 - 1]


def test_added_round_trips_bit_exactly_in_order() -> None:
    rng = np.random.default_rng(10)
    points = random_points(rng, 50)
    points[3] = [-0.0, 0.0, -0.0]
    points[4] = [1e-42, -3e38, 1.5e-45]  # subnormals, near the float32 limit
    points[5] = points[6]  # equal positions under two indices
    faces = rng.integers(0, 50, size=(80, 3)).astype(np.uint32)
    faces[7] = [3, 3, 4]  # degenerate
    faces[9] = faces[8]  # duplicate
    faces[10] = faces[8][[1, 2, 0]]  # the same, rotated
    mesh = decode_mesh(*encode(points, faces))
    rows = np.arange(3, 70, dtype=np.intp)
    text = encode_added(mesh, rows)
    assert text is not None
    back = decode_mesh(text)
    assert np.array_equal(back.triangles.view(np.uint32), mesh.triangles[rows].view(np.uint32))
    assert encode_added(mesh, np.array([], np.intp)) == ""


# --- the recipe STAG follows -------------------------------------------------------------


def test_apply_refuses_what_does_not_apply() -> None:
    points, faces = grid_patch(3)
    vertices, _ = encode(points, faces)
    base = decode_mesh(vertices).triangles
    delta = {"is_delta": True, "removed_faces": "", "added": "", "face_count": len(base)}
    assert triangles_equal(apply_mesh_diff(base, delta), base)
    with pytest.raises(MeshError, match="needs the base"):
        apply_mesh_diff(None, delta)
    with pytest.raises(MeshError, match="ascending"):
        apply_mesh_diff(base, {**delta, "removed_faces": encode_removed(np.array([2, 1]))})
    with pytest.raises(MeshError, match="within the base"):
        apply_mesh_diff(base, {**delta, "removed_faces": encode_removed(np.array([len(base)]))})
    with pytest.raises(MeshError, match="face_count"):
        apply_mesh_diff(base, {**delta, "face_count": 1})
    cloud = b64(DracoPy.encode(points, quantization_bits=0, preserve_order=True))
    with pytest.raises(MeshError, match="without faces"):
        apply_mesh_diff(base, {**delta, "added": cloud, "face_count": None})
    with pytest.raises(MeshError, match="removed_faces: not standard base64"):
        apply_mesh_diff(base, {**delta, "removed_faces": "AAA"})
    with pytest.raises(MeshError, match="whole number"):
        apply_mesh_diff(base, {**delta, "removed_faces": "AAA="})


def test_update_json_shapes() -> None:
    full = MeshUpdate("anc", False, "VkVS", "RkFD", vertex_count=3, face_count=1)
    assert full.to_json() == {
        "anchor_id": "anc",
        "is_delta": False,
        "vertices_delta": "VkVS",
        "faces_delta": "RkFD",
        "vertex_count": 3,
        "face_count": 1,
    }
    assert full.payload_chars == 8
    delta = MeshUpdate(
        "anc",
        True,
        vertex_count=4,
        face_count=2,
        base_event_id="e1",
        removed_faces="AQAAAA==",
        added="RFJB",
    )
    assert delta.to_json() == {
        "anchor_id": "anc",
        "is_delta": True,
        "base_event_id": "e1",
        "removed_faces": "AQAAAA==",
        "added": "RFJB",
        "vertex_count": 4,
        "face_count": 2,
    }
    assert delta.payload_chars == 12


# --- the property: STAG rebuilds every mesh -------------------------------------------------

STEPS = ("grow", "shrink", "retessellate", "rotate", "flip", "duplicate", "cloud", "same", "zeros")


def next_mesh(
    step: str, points: Points, faces: Faces, rng: np.random.Generator
) -> tuple[Points, Faces]:
    n = len(faces)
    if step == "grow":
        extra = random_points(rng, int(rng.integers(1, 30)))
        points = np.concatenate([points, extra])
        count = int(rng.integers(1, 40))
        # New triangles use new and old vertices, as a growing scan does.
        new = rng.integers(0, len(points), size=(count, 3)).astype(np.uint32)
        new[:, 0] = rng.integers(len(points) - len(extra), len(points), size=count)
        return points, np.concatenate([faces, new])
    if step == "shrink" and n:
        keep = rng.random(n) > rng.uniform(0.05, 0.6)
        return points, faces[keep]
    if step == "retessellate":
        start = int(rng.integers(0, n + 1))
        stop = int(rng.integers(start, n + 1))
        extra = random_points(rng, int(rng.integers(1, 20)))
        points = np.concatenate([points, extra])
        patch = rng.integers(0, len(points), size=(int(rng.integers(0, 30)), 3)).astype(np.uint32)
        return points, np.concatenate([faces[:start], patch, faces[stop:]])
    if step == "rotate":
        shift = rng.integers(0, 3, size=n)
        rotated = np.array([np.roll(f, -s) for f, s in zip(faces, shift, strict=True)], np.uint32)
        return points, rotated.reshape(-1, 3)[rng.permutation(n)]
    if step == "flip" and n:
        flipped = faces.copy()
        chosen = rng.random(n) < 0.3
        flipped[chosen] = flipped[chosen][:, [0, 2, 1]]
        return points, flipped
    if step == "duplicate" and n:
        return points, np.concatenate([faces, faces[rng.integers(0, n, size=5)]])
    if step == "cloud":
        return points, np.zeros((0, 3), np.uint32)
    if step == "zeros":
        points = points.copy()
        chosen = rng.random(points.shape) < 0.1
        points[chosen] = rng.choice(np.array([0.0, -0.0], np.float32), size=int(chosen.sum()))
        return points, faces
    return points, faces


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=8),
    encodings=st.lists(st.sampled_from(ENCODINGS), min_size=9, max_size=9),
)
def test_applying_every_diff_rebuilds_every_mesh(
    seed: int, steps: list[str], encodings: list[str]
) -> None:
    rng = np.random.default_rng(seed)
    points = random_points(rng, int(rng.integers(3, 40)))
    faces = rng.integers(0, len(points), size=(int(rng.integers(0, 60)), 3)).astype(np.uint32)
    store = MeshStore(MeshSettings(keyframe_interval=1000))
    stag: npt.NDArray[np.float32] | None = None
    previous: DecodedMesh | None = None
    for i, step in enumerate(["start", *steps]):
        points, faces = next_mesh(step, points, faces, rng)
        vertices, face_buffer = encode(points, faces, encodings[i])
        base = f"e{i - 1}" if i else None
        outcome = store.update(job(f"e{i}", base, vertices, face_buffer))
        assert outcome.error is None
        expected = decode_mesh(vertices, face_buffer)
        stag = apply_mesh_diff(stag, update_json(vertices, face_buffer, outcome, base))
        assert triangles_equal(stag, expected.triangles)
        assert outcome.face_count == expected.face_count
        assert outcome.vertex_count == expected.vertex_count
        # The relay's base is STAG's mesh, in STAG's order, for the next delta's indices.
        held = store.held_keys("s", "a")
        assert held is not None
        assert np.array_equal(held, canonical_keys(stag))
        if (
            outcome.is_delta
            and previous is not None
            and triangles_equal(previous.triangles, expected.triangles)
        ):
            assert (outcome.removed_faces, outcome.added) == ("", "")
        previous = expected


def test_a_growing_scan_goes_out_as_small_deltas() -> None:
    store = MeshStore(MeshSettings())
    stag = None
    sizes = []
    for i, cols in enumerate(range(20, 30)):
        vertices, faces = encode(*grid_patch(cols), "lossless")
        outcome = store.update(job(f"e{i}", f"e{i - 1}" if i else None, vertices, faces))
        assert outcome.is_delta == (i > 0)
        stag = apply_mesh_diff(stag, update_json(vertices, faces, outcome, f"e{i - 1}"))
        assert triangles_equal(stag, decode_mesh(vertices).triangles)
        if i:
            sizes.append((len(outcome.removed_faces) + len(outcome.added)) / len(vertices))
    assert max(sizes) < 0.3


# --- full or delta, and the budget -------------------------------------------------------------


def test_full_without_base_or_with_another_base() -> None:
    store = MeshStore(MeshSettings())
    v1, _ = encode(*grid_patch(10))
    v2, _ = encode(*grid_patch(11))
    assert not store.update(job("e1", None, v1)).is_delta
    assert not store.update(job("e2", None, v2)).is_delta  # the sender has not confirmed e1
    assert not store.update(job("e3", "e1", v1)).is_delta  # the held base is e2
    assert store.update(job("e4", "e3", v2)).is_delta


def test_resending_the_same_mesh_is_an_empty_delta() -> None:
    store = MeshStore(MeshSettings())
    vertices, _ = encode(*grid_patch(10), "lossless")
    store.update(job("e1", None, vertices))
    outcome = store.update(job("e2", "e1", vertices))
    assert (outcome.is_delta, outcome.removed_faces, outcome.added) == (True, "", "")


def test_a_delta_not_smaller_than_seven_tenths_of_full_goes_full() -> None:
    store = MeshStore(MeshSettings())
    v1, _ = encode(*grid_patch(10, seed=1))
    v2, _ = encode(*grid_patch(10, seed=2))  # every vertex moved
    store.update(job("e1", None, v1))
    outcome = store.update(job("e2", "e1", v2))
    assert not outcome.is_delta
    assert outcome.held


def test_a_full_mesh_every_keyframe_interval_updates() -> None:
    store = MeshStore(MeshSettings(keyframe_interval=3))
    kinds = []
    for i in range(8):
        vertices, _ = encode(*grid_patch(10 + i))
        outcome = store.update(job(f"e{i}", f"e{i - 1}" if i else None, vertices))
        kinds.append("delta" if outcome.is_delta else "full")
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta", "full", "delta"]


def test_an_invalid_mesh_keeps_the_base() -> None:
    store = MeshStore(MeshSettings())
    v1, _ = encode(*grid_patch(10))
    v2, _ = encode(*grid_patch(11))
    store.update(job("e1", None, v1))
    bad = store.update(job("e2", "e1", b64(b"not draco")))
    assert bad.error == "$.data.mesh.vertices: not Draco data"
    assert bad.held
    assert store.update(job("e3", "e1", v2)).is_delta


def test_least_recently_updated_anchor_is_evicted_first() -> None:
    vertices, _ = encode(*grid_patch(10))
    one_anchor = canonical_keys(decode_mesh(vertices).triangles).nbytes + STATE_OVERHEAD
    store = MeshStore(MeshSettings(), max_bytes=2 * one_anchor)
    assert store.update(job("a1", None, vertices, anchor="a")).evicted == ()
    assert store.update(job("b1", None, vertices, anchor="b")).evicted == ()
    assert store.update(job("a2", "a1", vertices, anchor="a")).is_delta  # a is now the newest
    outcome = store.update(job("c1", None, vertices, anchor="c"))
    assert outcome.evicted == (("s", "b"),)
    assert outcome.state_bytes == store.nbytes == 2 * one_anchor
    assert ("s", "b") not in store
    assert not store.update(job("b2", "b1", vertices, anchor="b")).is_delta  # evicted: full


def test_a_mesh_larger_than_the_budget_is_not_held() -> None:
    vertices, _ = encode(*grid_patch(10))
    store = MeshStore(MeshSettings(), max_bytes=STATE_OVERHEAD)
    outcome = store.update(job("e1", None, vertices))
    assert (outcome.is_delta, outcome.held, outcome.evicted) == (False, False, ())
    assert len(store) == 0
    assert not store.update(job("e2", "e1", vertices)).is_delta
