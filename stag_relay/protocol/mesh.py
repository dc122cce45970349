"""Mesh values as the relay process sees them: settings, errors, and what crosses to a worker.

Pure: no I/O, no trio, and no numpy or DracoPy, which only the mesh worker
processes import: a pose-only relay never loads them. The geometry itself
(decoding, diffing, the store of what STAG holds) is :mod:`stag_relay.protocol.geometry`;
the workers' entry points are :mod:`stag_relay.pipeline.meshworker`.
"""

from __future__ import annotations

from typing import Final

import attrs

VERTICES_PATH: Final = "$.data.mesh.vertices"
FACES_PATH: Final = "$.data.mesh.faces"

# A million vertices is a building-scale scan; more from
# one anchor is a client bug or an attack, and bounds what a worker allocates.
DEFAULT_MAX_VERTICES: Final = 1_000_000
DEFAULT_MAX_FACES: Final = 2_000_000
# A full mesh at least every 30 updates bounds how long a STAG that lost an
# anchor's state (its own restart) rebuilds from deltas it cannot apply.
DEFAULT_KEYFRAME_INTERVAL: Final = 30
# 256 MiB holds about 180 anchors of 40,000 triangles (36 bytes of key each).
DEFAULT_MAX_STATE_BYTES: Final = 256 * 1024 * 1024


class MeshError(ValueError):
    """Geometry the relay cannot accept; ``message`` names the JSON path of the culprit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@attrs.frozen(slots=True)
class MeshSettings:
    """The ``mesh.*`` configuration keys the geometry code needs."""

    max_vertices: int = DEFAULT_MAX_VERTICES
    max_faces: int = DEFAULT_MAX_FACES
    keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES


@attrs.frozen(slots=True)
class MeshJob:
    """One mesh packet to turn into an update, with the base the relay may build on.

    ``base_event_id`` is the event whose mesh STAG is known to hold for this
    anchor, or None when no delta may be sent.
    """

    session_id: str
    anchor_id: str
    event_id: str
    base_event_id: str | None
    vertices: str
    faces: str
    # "draco" (base64 Draco) or "sdk" (base64 of the StreamKit SDK's mesh buffer).
    encoding: str = "draco"


@attrs.frozen(slots=True)
class MeshOutcome:
    """What became of a :class:`MeshJob`.

    ``error`` is set for an invalid mesh (nothing else changed). Otherwise
    ``is_delta`` tells which form to send: full carries the client's buffers (not
    repeated here), delta ``removed_faces`` and ``added``. ``held`` says whether
    the new mesh is now held as this anchor's base; ``evicted`` lists the anchors
    whose bases were dropped to stay within the byte budget.
    """

    error: str | None = None
    is_delta: bool = False
    removed_faces: str = ""
    added: str = ""
    vertex_count: int = 0
    face_count: int = 0
    decode_seconds: float = 0.0
    held: bool = False
    evicted: tuple[tuple[str, str], ...] = ()
    state_bytes: int = 0
