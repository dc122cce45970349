"""The entry points of the mesh worker processes: set a worker up, run one job in it.

These run in the trio-parallel workers that :mod:`stag_relay.pipeline.meshpool`
starts; the relay process only names them. Importing this module loads no
numpy or DracoPy: :func:`init_worker` imports the geometry, in the worker.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Final

from stag_relay.protocol.mesh import VERTICES_PATH, MeshError, MeshJob, MeshOutcome, MeshSettings

if TYPE_CHECKING:
    from stag_relay.protocol.geometry import MeshStore

# Address space a worker may map beyond what it holds at start, besides its share
# of the state budget. The largest job measured (2,000,000 faces diffed against a
# base as large) peaked at 0.7 GB; the rest is margin. With the limit, a Draco
# header that claims billions of points fails at once with MemoryError (an
# invalid packet) instead of growing until the kernel's OOM killer picks a
# process to kill, perhaps the relay itself. Fuzzing showed both: without the
# limit, single-byte header changes got the fuzzing process killed on a 24 GB host.
WORKER_MEMORY_HEADROOM: Final = 2 * 1024**3

# How much lower than the relay's a worker's CPU priority is (os.nice). Poses wait
# behind whatever runs on the relay's CPU, and a mesh takes milliseconds of CPU in a
# worker: at 10 the kernel gives the relay's event loop the CPU about ten times
# sooner than a busy worker (CFS weights 1024 against 110), so decoding meshes
# costs poses little latency; a worker still has every idle CPU to itself.
WORKER_NICENESS: Final = 10

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
    os.nice(WORKER_NICENESS)


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


def run_job(job: MeshJob) -> MeshOutcome:
    """The worker's entry point: update this process's store with ``job``."""
    if _worker_store is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _worker_store.update(job)


def check_job(job: MeshJob) -> MeshOutcome:
    """The worker's entry point when meshes always go full (``stag.format:
    spatial-event``): decode and check ``job``'s mesh in its encoding, with the limits
    :func:`run_job` applies, and nothing else. No diff, and no base held: none would
    ever be used."""
    if _worker_store is None:
        raise RuntimeError("init_worker() has not run in this process")
    from stag_relay.protocol.geometry import decode_job  # loaded by init_worker

    settings = _worker_store.settings
    started = time.perf_counter()
    try:
        mesh = decode_job(job, max_vertices=settings.max_vertices, max_faces=settings.max_faces)
    except MeshError as exc:
        return MeshOutcome(error=exc.message, decode_seconds=time.perf_counter() - started)
    except MemoryError:
        # The address-space limit (init_worker) turned a decompression bomb into this.
        return MeshOutcome(error=f"{VERTICES_PATH}: too large to decode")
    return MeshOutcome(
        vertex_count=mesh.vertex_count,
        face_count=mesh.face_count,
        decode_seconds=time.perf_counter() - started,
    )


def worker_pid() -> int:
    """A no-op job: starts a worker (importing this module) and names its process."""
    return os.getpid()
