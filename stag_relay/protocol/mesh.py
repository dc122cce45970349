"""Mesh packets as the relay sees them, and the entry points of its mesh worker processes.

What the relay process needs of meshes (:class:`MeshError`, :class:`MeshSettings`,
the job and verdict that cross to a worker) without numpy or DracoPy, which only
the workers import: a pose-only relay never loads them. The geometry itself
(decoding, diffing, the store of what STAG holds) is :mod:`stag_relay.protocol.geometry`;
:func:`init_worker` and :func:`run_job` run in the workers (see ``meshwork``).
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from stag_relay.protocol.geometry import MeshStore

VERTICES_PATH: Final = "$.data.mesh.vertices"
FACES_PATH: Final = "$.data.mesh.faces"

# The defaults. A million vertices is a building-scale scan; more from
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


@attrs.frozen(slots=True)
class MeshVerdict:
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


# --- the worker process side ---------------------------------------------------------------

# Address space a worker may map beyond what it holds at start, besides its share
# of the state budget. The largest job measured (2,000,000 faces diffed against a
# base as large) peaked at 0.7 GB; the rest is margin. With the limit, a Draco
# header that claims billions of points fails at once with MemoryError (an
# invalid packet) instead of growing until the kernel's OOM killer picks a
# process to kill, perhaps the relay itself. Fuzzing showed both: without the
# limit, single-byte header changes got the fuzzing process killed on a 24 GB host.
WORKER_MEMORY_HEADROOM: Final = 2 * 1024**3

_worker_store: MeshStore | None = None


def init_worker(settings: MeshSettings, max_bytes: int) -> None:
    """Run once in each worker process: its store holds ``max_bytes`` of the budget.

    Also caps the process's address space (on Linux), so a decompression bomb
    becomes a MemoryError in this worker.
    """
    # numpy and DracoPy load here, in the worker, before its memory is capped.
    from stag_relay.protocol.geometry import MeshStore

    global _worker_store
    _worker_store = MeshStore(settings, max_bytes)
    _limit_address_space(WORKER_MEMORY_HEADROOM + max_bytes)
    # systemd, timeout(1) and a terminal's Ctrl-C signal the whole process group; the
    # relay drains and then stops its workers itself, and needs them until then.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _limit_address_space(headroom: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return  # not Linux: no limit, the job timeout still applies
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_job(job: MeshJob) -> MeshVerdict:
    """The worker's entry point: update this process's store with ``job``."""
    if _worker_store is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _worker_store.update(job)


def worker_pid() -> int:
    """A no-op job: starts a worker (importing this module) and names its process."""
    return os.getpid()
