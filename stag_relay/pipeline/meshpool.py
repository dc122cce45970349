"""The mesh pipeline: decode and diff mesh packets in worker processes, off the Trio thread.

Decoding and diffing a large Draco mesh takes milliseconds; pose packets must
not wait behind that, and upstream Draco has open fuzzer-found crashes while
clients are not trusted. So every mesh is decoded and diffed in a trio-parallel
worker process (entry points in :mod:`stag_relay.pipeline.meshworker`), and a
worker that dies (or runs past ``JOB_TIMEOUT``) costs that packet an error reply
and a metric, never the relay.

The worker processes start with the first mesh packet, all of them at once, not
with the relay: a relay that only ever sees poses runs no worker, and never loads
numpy or DracoPy (they load in the workers, see :mod:`stag_relay.protocol.geometry`). Only
the first mesh waits for them.

What crosses the process boundary: only the packet's base64 text goes in and
the update's text (or an error) comes out. The mesh each anchor's deltas are
computed against stays in the worker that computes them: the anchors are
sharded over ``mesh.workers`` single-worker contexts by a hash of (session,
anchor), and each worker keeps its shard's :class:`~stag_relay.protocol.geometry.MeshStore`
with its share of ``mesh.max_state_bytes``. Shipping a base to a worker with
each job would cost about as much as the decode and diff themselves, and the
pickling half of it on the Trio thread (docs/performance.md). A worker lost to
a crash takes its shard's bases with it; those anchors simply go full on their
next update.

Ordering: each shard runs one job at a time, in the order :meth:`process` was
called (``trio.Lock`` is fair and is the first thing :meth:`process` awaits),
so the packets of one anchor are diffed in order even when several are
submitted at once.

STAG never receives a delta whose base it lacks: a delta is only computed
against a base whose event STAG has accepted, as the sender reports
(:meth:`MeshPipeline.delivered`). An event that was rejected or dropped, or is
still on its way, is not reported, so its anchor's next update goes full. This
holds however batches are reordered, retried, spooled or dropped on the way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final

import attrs
import structlog
import trio
import trio_parallel  # type: ignore[import-untyped]

from stag_relay.pipeline.meshworker import check_job, init_worker, run_job, worker_pid
from stag_relay.protocol.events import MeshUpdate
from stag_relay.protocol.mesh import MeshError, MeshJob, MeshOutcome, MeshSettings
from stag_relay.protocol.packets import MeshData
from stag_relay.service.metrics import MeshMetrics

# The largest mesh the default limits allow (2,000,000 faces) took 3.2 s to
# decode, diff and encode against a base as large on the development machine;
# past 10 s a decoder is stuck on hostile data (fuzzed headers made some decodes
# run 1 s even under the workers' memory cap), not working.
JOB_TIMEOUT: Final = 10.0
# Workers exit at once when asked (they only wait on their pipe); past this
# they are killed rather than hold up the relay's shutdown.
GRACE_PERIOD: Final = 5.0

log = structlog.get_logger("stag_relay.meshpool")

AnchorKey = tuple[str, str]


@attrs.define(slots=True, eq=False)
class _HeldBase:
    """The relay's record of a base a worker holds: its event, and whether STAG has it."""

    event_id: str
    delivered: bool = False


class _Shard:
    """One worker process and the anchors hashed to it."""

    def __init__(self, context: trio_parallel.WorkerContext) -> None:
        self.context = context
        self.lock = trio.Lock()
        # run_sync would otherwise share the process-wide default limiter.
        self.limiter = trio.CapacityLimiter(1)
        # Mirrors which bases the worker holds (it reports evictions).
        self.held: dict[AnchorKey, _HeldBase] = {}
        self.state_bytes = 0


class MeshPipeline:
    """Turns mesh packets into full or delta updates; open one with :func:`open_mesh_pipeline`."""

    def __init__(
        self,
        shards: list[_Shard],
        metrics: MeshMetrics,
        job_timeout: float,
        work: Callable[[MeshJob], MeshOutcome],
    ) -> None:
        self._shards = shards
        self._metrics = metrics
        self._job_timeout = job_timeout
        self._work = work
        self._started = False
        self._starting = trio.Lock()

    @property
    def started(self) -> bool:
        """Whether the worker processes have been started (by the first mesh)."""
        return self._started

    async def process(self, session_id: str, event_id: str, mesh: MeshData) -> MeshUpdate:
        """The update to send STAG for one accepted mesh packet (its event is ``event_id``).

        Raises :class:`MeshError` for a mesh that is invalid (the anchor keeps
        its base) or that its worker could not process (the worker's bases are
        lost: those anchors go full next). Packets of one anchor are processed
        in call order. Report the update's delivery with :meth:`delivered`.
        """
        key = (session_id, mesh.anchor_id)
        shard = self._shard(key)
        self._metrics.bytes_in.inc(len(mesh.vertices) + len(mesh.faces))
        # The first checkpoint: the lock queues callers in call order.
        async with shard.lock:
            await self._start()
            held = shard.held.get(key)
            base = held.event_id if held is not None and held.delivered else None
            job = MeshJob(
                session_id,
                mesh.anchor_id,
                event_id,
                base,
                mesh.vertices,
                mesh.faces,
                mesh.encoding,
            )
            outcome = await self._run(shard, job)
            shard.state_bytes = outcome.state_bytes
            self._metrics.state_bytes.set(sum(s.state_bytes for s in self._shards))
            self._metrics.decode_seconds.observe(outcome.decode_seconds)
            for evicted in outcome.evicted:
                shard.held.pop(evicted, None)
            if not outcome.held:
                shard.held.pop(key, None)
            if outcome.error is not None:
                # Invalid data leaves the base as it was (held); a job that ran out
                # of memory midway lost it (not held).
                raise MeshError(outcome.error)
            if outcome.held:
                shard.held[key] = _HeldBase(event_id)
        if outcome.is_delta:
            update = MeshUpdate(
                mesh.anchor_id,
                True,
                vertex_count=outcome.vertex_count,
                face_count=outcome.face_count,
                base_event_id=base,
                removed_faces=outcome.removed_faces,
                added=outcome.added,
            )
        else:
            update = MeshUpdate(
                mesh.anchor_id,
                False,
                mesh.vertices,
                mesh.faces,
                vertex_count=outcome.vertex_count,
                face_count=outcome.face_count,
            )
        self._metrics.updates.labels("delta" if update.is_delta else "full").inc()
        self._metrics.bytes_out.inc(update.payload_chars)
        return update

    def delivered(self, session_id: str, anchor_id: str, event_id: str) -> None:
        """STAG accepted the mesh of ``event_id``: it may now be the base of deltas.

        Call it for every mesh of every batch STAG answers 2xx (delivery keeps
        :func:`stag_relay.pipeline.delivery.mesh_refs` of each batch for this);
        never for a batch that was refused or dropped.
        """
        key = (session_id, anchor_id)
        held = self._shard(key).held.get(key)
        if held is not None and held.event_id == event_id:
            held.delivered = True

    async def _start(self) -> None:
        """Start every shard's worker, once: the first mesh's callers wait for it."""
        if self._started:
            return
        # Callers of several shards may arrive together: one starts them all, the
        # others wait here and find them started.
        async with self._starting:
            if self._started:
                return
            log.info("starting mesh workers", workers=len(self._shards))
            failures: list[str] = []
            async with trio.open_nursery() as nursery:
                for shard in self._shards:
                    nursery.start_soon(_start_worker, shard, failures)
            if failures:
                # Seen when numpy or DracoPy cannot load in a worker. The next mesh
                # tries again; the caller counts this one as not processed.
                self._metrics.worker_failures.labels("crash").inc(len(failures))
                log.error(
                    "mesh workers cannot start",
                    errors=failures,
                    fix="check that numpy and DracoPy import: python -c 'import DracoPy'",
                )
                raise MeshError("$.data.mesh: the mesh decoder could not start")
            self._started = True

    def _shard(self, key: AnchorKey) -> _Shard:
        return self._shards[hash(key) % len(self._shards)]

    async def _run(self, shard: _Shard, job: MeshJob) -> MeshOutcome:
        try:
            with trio.move_on_after(self._job_timeout):
                outcome: MeshOutcome = await shard.context.run_sync(
                    self._work, job, kill_on_cancel=True, limiter=shard.limiter
                )
                return outcome
        except trio_parallel.BrokenWorkerError:
            self._lose(shard, "crash")
            log.warning("mesh worker died decoding a packet", anchor_id=job.anchor_id)
            raise MeshError("$.data.mesh: the Draco decoder crashed on this data") from None
        except Exception:
            # A bug in the job; the worker survives but this anchor's base may not.
            self._metrics.worker_failures.labels("error").inc()
            shard.held.pop((job.session_id, job.anchor_id), None)
            log.exception("mesh job failed", anchor_id=job.anchor_id)
            raise MeshError("$.data.mesh: internal error while processing the mesh") from None
        except BaseException:
            # Cancelled from outside: kill_on_cancel has killed the worker.
            self._lose(shard, None)
            raise
        self._lose(shard, "timeout")
        log.warning("mesh worker killed after the job timeout", timeout=self._job_timeout)
        raise MeshError(f"$.data.mesh: decoding took longer than {self._job_timeout:g}s")

    def _lose(self, shard: _Shard, reason: str | None) -> None:
        """The shard's worker is gone, and every base it held with it."""
        shard.held.clear()
        shard.state_bytes = 0
        self._metrics.state_bytes.set(sum(s.state_bytes for s in self._shards))
        if reason is not None:
            self._metrics.worker_failures.labels(reason).inc()


@asynccontextmanager
async def open_mesh_pipeline(
    settings: MeshSettings,
    *,
    workers: int,
    metrics: MeshMetrics,
    job_timeout: float = JOB_TIMEOUT,
    deltas: bool = True,
    work: Callable[[MeshJob], MeshOutcome] | None = None,
) -> AsyncIterator[MeshPipeline]:
    """Yield the pipeline of ``workers`` worker processes; they start with the first mesh.

    On exit, after the caller has finished with the pipeline, the workers (if any
    were started) are stopped. Without ``deltas`` every update goes full: the workers
    only decode and check each mesh (``stag.format: spatial-event``, whose STAGs know
    no relay deltas). ``work`` is the job function run in the workers: a module-level
    function (workers import it by name); unset,
    :func:`stag_relay.pipeline.meshworker.run_job` or, without ``deltas``,
    :func:`~stag_relay.pipeline.meshworker.check_job`; in tests, a wrapper around them.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if work is None:
        work = run_job if deltas else check_job
    init = functools.partial(init_worker, settings, settings.max_state_bytes // workers)
    async with AsyncExitStack() as stack:
        # A context starts no process until its first job.
        shards = [
            _Shard(await stack.enter_async_context(_worker_context(init))) for _ in range(workers)
        ]
        yield MeshPipeline(shards, metrics, job_timeout, work)


async def _start_worker(shard: _Shard, failures: list[str]) -> None:
    # Not under shard.lock: the caller that starts the workers holds its own shard's.
    try:
        await shard.context.run_sync(worker_pid, limiter=shard.limiter)
    except trio_parallel.BrokenWorkerError as exc:
        failures.append(str(exc))


@asynccontextmanager
async def _worker_context(init: Callable[[], None]) -> AsyncIterator[trio_parallel.WorkerContext]:
    try:
        async with trio_parallel.open_worker_context(
            idle_timeout=math.inf, init=init, grace_period=GRACE_PERIOD
        ) as context:
            yield context
    except trio_parallel.BrokenWorkerError:
        # Raised on exit for a worker that had died while idle or would not
        # stop: nothing is left to lose, and shutdown must go on.
        log.warning("a mesh worker did not exit cleanly")
