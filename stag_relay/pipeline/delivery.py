"""Delivery: batches from the batcher to the STAG sender, through the spool when there is one.

Memory only (no ``delivery.spool_path``): each batch goes straight from the batcher to
a free sender slot (``ToSender``, no task between), the connections are acknowledged
when STAG accepts it, and a full pipeline blocks the batcher (backpressure). With a
spool: each batch is committed before anything else happens to it, its connections are
acknowledged right then, and the sender is fed from the spool in order, oldest first,
so a STAG outage fills the disk, not the clients' sockets. Delivered batches are
deleted; refused ones become dead letters.

A full or failing disk is a full spool (``SpoolFull``), never a crash: the batches being
committed stay in memory, unacknowledged, and ``delivery.when_full`` applies as for
``delivery.spool_max_bytes``; deliveries not yet recorded stay in memory too and are
written with the next commit. The spool gives its reserve back so they can be.

What happened to which batch is kept by a ``SendQueue``
(``stag_relay.protocol.sendqueue``); the tasks here only read and write the spool, wait
and hand over, and tell it what came of each. SQLite is only ever called from a worker
thread, one call at a time.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import attrs
import structlog
import trio

from stag_relay.pipeline.sender import Shipment
from stag_relay.pipeline.spool import (
    Spool,
    SpoolCorrupt,
    SpooledBatch,
    SpoolFull,
    disk_shortfall,
    open_spool,
    quarantine,
    reserve_size,
)
from stag_relay.protocol.events import Batch
from stag_relay.protocol.sendqueue import (
    Acks,
    FindVictims,
    Finished,
    Fits,
    MeshRef,
    ReadPage,
    RecordFirst,
    SendQueue,
    Taken,
    Wait,
    take,
)
from stag_relay.service.config import DeliveryConfig
from stag_relay.service.metrics import RelayMetrics

# How long a delivery may wait to be recorded with the next commit before it gets a
# write of its own. While batches flow that is never reached (a commit every few ms),
# so a record costs no extra thread hand-off; meanwhile a crash would resend the batch,
# with its batch id, which STAG's Idempotency-Key deduplicates.
TIDY_DELAY: Final = 0.1
# On a full disk with nothing delivered meanwhile, a commit is tried again this often:
# room may come from elsewhere (an operator, another program).
DISK_FULL_RETRY: Final = 1.0

# While the spool stays full with when_full: drop_oldest, every new batch pushes an old
# one out: a line per drop was hundreds a minute. The first drop is said at once, then
# what was dropped since, at most this often; relay_events_dropped_total counts each.
DROP_LOG_INTERVAL: Final = 10.0

log = structlog.get_logger("stag_relay.delivery")
T = TypeVar("T")


@attrs.define
class DropLog:
    """What ``drop_oldest`` dropped since its last log line, and whether to write one."""

    interval: float = DROP_LOG_INTERVAL
    batches: int = 0
    events: int = 0
    logged_at: float = -math.inf

    def dropped(self, batches: int, events: int, now: float) -> tuple[int, int] | None:
        """Count a drop at ``now``; the (batches, events) for a line when one is due."""
        self.batches += batches
        self.events += events
        if now - self.logged_at < self.interval:
            return None
        due = (self.batches, self.events)
        self.batches = self.events = 0
        self.logged_at = now
        return due


class MeshBases(Protocol):
    """What delivery tells the mesh pipeline: STAG now holds this mesh (a diff base)."""

    def delivered(self, session_id: str, anchor_id: str, event_id: str) -> None: ...


def send_acks(acks: Acks) -> None:
    for origin, (session_id, frames) in acks.items():
        origin.acknowledge(session_id, frames)


def forget_acks(acks: Acks, status: int = 0, answer: str = "") -> None:
    for origin, (_, frames) in acks.items():
        origin.forget(len(frames))


def report_meshes(meshes: MeshBases | None, refs: list[MeshRef]) -> None:
    # Only a mesh STAG accepted may become the base of a delta: anything refused,
    # dropped or lost is simply never reported, and its anchor's next update goes full.
    if meshes is not None:
        for ref in refs:
            meshes.delivered(*ref)


class ToSender:
    """Memory only, the batcher's outlet (``stag_relay.pipeline.batcher.BatchOutlet``):
    a batch becomes a shipment in the batcher's own task, and a free sender slot takes
    it from there.

    No task stands between them: under load each turn of the event loop holds many
    socket reads, and a batch that waited for a turn at every hand-off reached STAG
    that many turns late. While every slot is busy, ``send`` waits (backpressure).
    """

    def __init__(
        self, shipments: trio.MemorySendChannel[Shipment], ship: Callable[[Batch], Shipment]
    ) -> None:
        self._shipments = shipments
        self._ship = ship
        # Handed to a slot that may not have run since, so has not counted them yet.
        self._handed: list[Shipment] = []

    def send_nowait(self, batch: Batch) -> None:
        """Hand ``batch`` to a slot that waits, or raise ``trio.WouldBlock`` (nothing done)."""
        if not self._shipments.statistics().tasks_waiting_receive:
            raise trio.WouldBlock
        shipment = self._ship(batch)
        self._shipments.send_nowait(shipment)
        self._hand(shipment)

    async def send(self, batch: Batch) -> None:
        """Hand ``batch`` to the next free slot; if cancelled, no slot has it."""
        shipment = self._ship(batch)
        await self._shipments.send(shipment)
        self._hand(shipment)

    def held_events(self) -> int:
        """Events handed to a slot that has not taken them yet: until it runs, nobody
        else counts them (the relay's shutdown tally adds these)."""
        return sum(s.wire.count for s in self._handed if not s.taken)

    def _hand(self, shipment: Shipment) -> None:
        # At most stag.max_in_flight untaken at once: the slots that were waiting.
        self._handed = [s for s in self._handed if not s.taken]
        self._handed.append(shipment)

    def close(self) -> None:
        self._shipments.close()


class ToSpool:
    """With a spool, the batcher's outlet: the channel to delivery's ``_take``, counting
    what it handed over until ``_take`` has it in the send queue. A batch handed to a
    waiting ``_take`` is counted by neither the batcher nor the queue until ``_take``
    runs; the shutdown tally may run first (``Delivery.held_events`` adds these)."""

    def __init__(self, batches: trio.MemorySendChannel[Batch]) -> None:
        self._batches = batches
        # Handed over minus taken: negative for the moment between ``_take`` taking a
        # batch and ``send`` returning, while the batcher still counts it as outgoing.
        self.in_transit = 0

    def send_nowait(self, batch: Batch) -> None:
        self._batches.send_nowait(batch)
        self.in_transit += len(batch)

    async def send(self, batch: Batch) -> None:
        await self._batches.send(batch)
        self.in_transit += len(batch)

    def close(self) -> None:
        self._batches.close()


class Delivery:
    """The stage between the batcher and the sender; see the module docstring."""

    def __init__(self, config: DeliveryConfig, metrics: RelayMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self.spool: Spool | None = None
        # Set by the app when mesh diffs run: told which meshes STAG accepted.
        self.meshes: MeshBases | None = None
        # Every piece of bookkeeping; the tasks here only read, write, wait and hand over.
        self._queue = SendQueue(spool_max_bytes=config.spool_max_bytes, when_full=config.when_full)
        # With a spool, the batcher's outlet (spool_outlet).
        self._to_spool: ToSpool | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._changed = trio.Event()
        self._tidy_needed = trio.Event()
        self._drop_log = DropLog()

    @property
    def dead_letters(self) -> int:
        return self._queue.dead_letters

    @property
    def oldest_created(self) -> float | None:
        return self._queue.oldest_created

    async def _spool_call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)

    async def open(self, adopt: Sequence[Path] = ()) -> None:
        """Open the spool, if configured; a corrupt one is set aside and counted.

        ``adopt``: other spool files (of workers no longer running) whose batches move
        into this spool first, so changing ``server.workers`` loses nothing.
        """
        path = self._config.spool_path
        if not path:
            return
        spool, moved = await trio.to_thread.run_sync(open_spool, path)
        if moved is not None:
            self._set_aside(path, moved, "and started a fresh spool")
        self.spool = spool
        for other in adopt:
            try:
                batches, dead = await self._spool_call(spool.adopt, other)
            except sqlite3.OperationalError as exc:
                # Locked: a relay (or `stag-relay spool`) still has it open. Left where it
                # is, for the next start.
                log.error(
                    "cannot adopt another spool file now; left in place",
                    spool=path,
                    other=str(other),
                    problem=str(exc),
                )
                continue
            except SpoolCorrupt:
                moved = await trio.to_thread.run_sync(quarantine, other)
                self._set_aside(str(other), moved, "instead of adopting it")
                continue
            log.info(
                "adopted another spool file",
                spool=path,
                adopted=str(other),
                batches=batches,
                dead_letters=dead,
            )
        stats = await self._spool_call(spool.stats)
        self._queue.spool_figures(stats.oldest_created, stats.dead_letters)
        await self._check_disk_room(spool, stats.bytes)
        if stats.batches:
            # Everything already on disk is sent first, oldest first.
            first = await self._spool_call(spool.read_from, 0, 1)
            last = await self._spool_call(spool.last_seq)
            self._queue.restored(first[0].seq if first else None, last)
            log.info(
                "spool holds undelivered batches; sending them first",
                spool=path,
                batches=stats.batches,
                events=stats.events,
            )
        if stats.dead_letters:
            log.warning(
                "spool holds dead letters (batches STAG refused)",
                spool=path,
                dead_letters=stats.dead_letters,
                hint="stag-relay spool list-dead / requeue-dead",
            )

    async def _check_disk_room(self, spool: Spool, spool_bytes: int) -> None:
        """Warn when the file system cannot hold a full spool, then take the reserve."""
        free = await self._spool_call(spool.free_bytes)
        if free is None:
            return
        missing = disk_shortfall(free, spool_bytes, self._config.spool_max_bytes)
        if missing:
            log.warning(
                "the spool's file system has less free space than delivery.spool_max_bytes; "
                "when it fills, the spool is full (delivery.when_full applies) before "
                "delivery.spool_max_bytes is reached",
                spool=str(spool.path),
                free_bytes=free,
                spool_bytes=spool_bytes,
                spool_max_bytes=self._config.spool_max_bytes,
                fix=f"free {missing} bytes there, move delivery.spool_path to a larger file "
                f"system, or lower delivery.spool_max_bytes to {spool_bytes + free} or less",
            )
        reserve = reserve_size(free)
        held = await self._spool_call(spool.hold_reserve, reserve)
        if not spool.reserve_bytes:
            log.warning(
                "this file system cannot keep the spool's reserve file: on a full disk, "
                "recording deliveries may have to wait for room from elsewhere",
                spool=str(spool.path),
                reserve=str(spool.reserve_path),
            )
        elif not held:
            log.warning(
                "no room for the spool's reserve: the spool is full (new batches wait) until "
                "deliveries or an operator free room",
                spool=str(spool.path),
                reserve=str(spool.reserve_path),
                reserve_bytes=reserve,
                free_bytes=free,
            )

    def _set_aside(self, path: str, moved: Path, then: str) -> None:
        self._metrics.spool_corrupt.inc()
        log.error(
            f"spool file is corrupt or not ours; moved it aside {then}",
            spool=path,
            moved_to=str(moved),
        )

    async def close(self) -> None:
        if self.spool is not None:
            await self._spool_call(self.spool.close)

    def held_events(self) -> int:
        """Events that would be lost if the relay stopped now (not spooled, not sent)."""
        in_transit = self._to_spool.in_transit if self._to_spool is not None else 0
        return self._queue.holding + in_transit

    def spooled_events(self) -> int:
        """Events the spool file holds (what ``stag-relay spool stats`` counts), 0 without."""
        return self.spool.events if self.spool is not None else 0

    async def run(
        self, batches: trio.MemoryReceiveChannel[Batch], shipments: trio.MemorySendChannel[Shipment]
    ) -> None:
        """With a spool: move batches through it to the sender until ``batches`` is
        closed and all is handed on. (Memory only, the batcher hands batches to the
        sender itself, through ``outlet``.)"""
        spool = self.spool
        if spool is None:
            raise RuntimeError("Delivery.run needs a spool; without one, use outlet()")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit, batches, spool)
            nursery.start_soon(self._tidy, spool)
            await self._feed(shipments, spool)
            nursery.cancel_scope.cancel()

    def spool_outlet(self, batches: trio.MemorySendChannel[Batch]) -> ToSpool:
        """With a spool: where the batcher puts its batches (``run`` receives them)."""
        self._to_spool = ToSpool(batches)
        return self._to_spool

    # -- memory only ------------------------------------------------------------------

    def outlet(self, shipments: trio.MemorySendChannel[Shipment]) -> ToSender:
        """Memory only: where the batcher puts its batches, for the sender's slots."""
        return ToSender(shipments, self.ship)

    def ship(self, batch: Batch) -> Shipment:
        """Memory only: ``batch`` as the sender takes it, and what to do when it ends."""
        taken = take(batch)
        return Shipment(
            taken.wire,
            on_delivered=partial(self._delivered_from_memory, taken.acks, taken.meshes),
            on_rejected=partial(forget_acks, taken.acks),
        )

    def _delivered_from_memory(self, acks: Acks, refs: list[MeshRef]) -> None:
        send_acks(acks)
        report_meshes(self.meshes, refs)

    # -- with a spool -----------------------------------------------------------------

    async def _commit(self, batches: trio.MemoryReceiveChannel[Batch], spool: Spool) -> None:
        """Commit batches, acknowledge their connections, queue them for the sender.

        Batches that arrive while a commit runs (in its thread) wait in the queue and
        are committed together next, in one transaction: the batcher is not held up by
        each commit, and the spool costs one commit per group, not per batch.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take, batches)
            while True:
                while (pending := self._queue.commit_pending()) is False:
                    await self._wait_for_change()
                if pending is None:
                    break
                group = self._queue.next_group()
                self._wake()
                await self._commit_group(group, spool)
        self._queue.commits_done()
        self._wake()

    async def _take(self, batches: trio.MemoryReceiveChannel[Batch]) -> None:
        while True:
            # Bounded: beyond a group's worth the batcher waits (backpressure), holding
            # its batch and counting it. A batch is received only when the queue can
            # take it, so none waits here, where nothing would count it. Only this
            # task adds to the queue: may_take() stays true during the receive.
            while not self._queue.may_take():
                await self._wait_for_change()
            try:
                batch = await batches.receive()
            except trio.EndOfChannel:
                break
            if self._to_spool is not None:
                self._to_spool.in_transit -= len(batch)
            self._queue.arrived(batch)
            self._wake()
        self._queue.all_taken()
        self._wake()

    async def _commit_group(self, group: list[Taken], spool: Spool) -> None:
        created = time.time()
        rows = [(t.wire.batch_id, t.wire.count, t.wire.events, created) for t in group]
        size = sum(len(t.wire.events) for t in group)
        while True:
            try:
                await self._make_room(spool, size)
                # Deliveries recorded since the last write ride along in the same commit.
                seqs = await self._write(spool, rows)
            except SpoolFull:
                # Not committed, so not acknowledged: the group stays here, held (the
                # batcher waits behind it), until the disk takes it.
                self._queue.commit_refused()
                await self._wait_for_disk(spool)
                continue
            break
        for acks in self._queue.committed(group, seqs):
            send_acks(acks)
        self._wake()

    async def _make_room(self, spool: Spool, size: int) -> None:
        while True:
            step = self._queue.room_for(size, spool.bytes)
            if isinstance(step, Fits):
                return
            if isinstance(step, RecordFirst):
                await self._write(spool)
                continue
            if isinstance(step, FindVictims):
                found, victims = await self._find_victims(spool, step)
                if victims:
                    await self._drop(spool, victims)
                if found:
                    continue
            # block (or nothing droppable): wait for the sender to free room.
            await self._wait_for_change()

    async def _find_victims(
        self, spool: Spool, step: FindVictims
    ) -> tuple[list[SpooledBatch], list[SpooledBatch]]:
        """The oldest batches ``step`` allows, and those of them still droppable once
        the lookup (in a thread, while the sender goes on) is back."""
        try:
            found = await self._spool_call(spool.oldest, set(step.exclude), step.limit)
        except BaseException:
            self._queue.lookup_failed()
            raise
        return found, self._queue.choose_victims(found)

    async def _drop(self, spool: Spool, victims: list[SpooledBatch]) -> None:
        """Drop ``victims`` from the spool and count them (``SpoolFull``: none dropped)."""
        try:
            await self._spool_call(spool.delete, [v.seq for v in victims])
        except SpoolFull as exc:
            self._queue.drop_failed(victims)
            self._wake()
            await self._disk_full(spool, exc)
            raise
        except BaseException:
            self._queue.drop_failed(victims)
            raise
        dropped = self._queue.dropped(victims)
        # The feeder may wait for them to be decided.
        self._wake()
        self._metrics.events_dropped.labels(dropped.reason).inc(dropped.events)
        due = self._drop_log.dropped(dropped.batches, dropped.events, trio.current_time())
        if due is not None:
            batches, events = due
            log.warning(
                "spool full: dropped the oldest batches",
                batches=batches,
                events=events,
                note=f"one line per {DROP_LOG_INTERVAL:g} s at most, with what was dropped"
                " since the last; relay_events_dropped_total counts every one",
            )

    async def _wait_for_disk(self, spool: Spool) -> None:
        """After a commit failed on a full disk: free room the way ``when_full`` says,
        or wait for deliveries to, then let the commit be tried again."""
        if self._queue.tidy_owed:
            # The reserve was given back: room for the deliveries, whose rows then go
            # back to the file system.
            with contextlib.suppress(SpoolFull):
                await self._write(spool)
                await self._spool_call(spool.reclaim)
                return
        if self._config.when_full == "drop_oldest":
            with contextlib.suppress(SpoolFull):
                _, victims = await self._find_victims(spool, self._queue.find_victims())
                if victims:
                    await self._drop(spool, victims)
                    await self._spool_call(spool.reclaim)
                    return
        # block (or nothing to drop): deliveries, or room from elsewhere, will come.
        with trio.move_on_after(DISK_FULL_RETRY):
            await self._wait_for_change()

    async def _disk_full(self, spool: Spool, exc: SpoolFull) -> None:
        """A write failed on a full or failing disk: give the reserve back, and say so
        once per episode."""
        await self._spool_call(spool.reclaim)
        if not self._queue.disk_refused(trio.current_time()):
            return
        self._metrics.spool_disk_full.set(1)
        self._metrics.spool_disk_full_episodes.inc()
        log.error(
            "spool's disk is full or failing: the spool is full until deliveries free room",
            spool=str(exc.path),
            # When the write failed (the reserve, given back since, is not in it).
            free_bytes=exc.free_bytes,
            problem=exc.problem,
            when_full=self._config.when_full,
            fix="free space on that file system, or move delivery.spool_path to a larger one",
        )

    async def _maybe_disk_writable(self, spool: Spool) -> None:
        """End the full-disk episode when no commit waits, no write was refused for
        DISK_FULL_QUIET and the disk has room to spare; not with the first commit
        squeezed in: a disk that stays at the edge is one episode, logged once."""
        if not self._queue.episode_may_end(trio.current_time()):
            return
        # What deliveries freed goes back to the file system (and the reserve) first.
        await self._spool_call(spool.reclaim)
        room = await self._spool_call(spool.has_room)
        # Meanwhile another write may have ended the episode, or a commit been refused.
        if not room:
            return
        lasted = self._queue.disk_has_room(trio.current_time())
        if lasted is None:
            return
        log.info(
            "spool's disk takes writes again",
            spool=str(self._config.spool_path),
            full_for_seconds=round(lasted, 3),
        )
        self._metrics.spool_disk_full.set(0)

    async def _feed(self, shipments: trio.MemorySendChannel[Shipment], spool: Spool) -> None:
        """Hand spooled batches to the sender in order until nothing is left to send."""
        async with shipments:
            while True:
                step = self._queue.next_send()
                if isinstance(step, Finished):
                    return
                if isinstance(step, Wait):
                    await self._wait_for_change()
                    continue
                if isinstance(step, ReadPage):
                    await self._read_page(spool, step)
                    continue
                shipment = Shipment(
                    step.wire,
                    on_delivered=partial(self._delivered, step.seq),
                    on_rejected=partial(self._rejected, step.seq),
                )
                await shipments.send(shipment)

    async def _read_page(self, spool: Spool, step: ReadPage) -> None:
        try:
            page = await self._spool_call(spool.read_from, step.start, step.limit)
        except SpoolFull as exc:
            # A failing disk: the batches stay where they are; try again.
            await self._disk_full(spool, exc)
            with trio.move_on_after(DISK_FULL_RETRY):
                await self._wait_for_change()
            return
        self._queue.page_read(page)

    def _delivered(self, seq: int) -> None:
        report_meshes(self.meshes, self._queue.delivered(seq))
        self._tidy_needed.set()

    def _rejected(self, seq: int, status: int, answer: str) -> None:
        self._queue.rejected(seq, status, answer)
        self._tidy_needed.set()

    async def _tidy(self, spool: Spool) -> None:
        """Remove delivered batches and bury refused ones, many per transaction: with
        the next commit when one comes within TIDY_DELAY, else on their own."""
        while True:
            # During a full-disk episode, also wake now and then to see it end (and give
            # what deliveries freed back to the file system) when nothing else writes.
            with trio.move_on_after(
                DISK_FULL_RETRY if self._queue.disk_full_since is not None else math.inf
            ):
                await self._tidy_needed.wait()
            if not self._tidy_needed.is_set():
                await self._maybe_disk_writable(spool)
                continue
            self._tidy_needed = trio.Event()
            with trio.move_on_after(TIDY_DELAY):
                while self._queue.tidy_owed:
                    await self._wait_for_change()
            await self._flush_tidy(spool)

    async def settle(self) -> None:
        """After the sender has finished: record the last deliveries in the spool."""
        if self.spool is not None:
            await self._flush_tidy(self.spool)

    async def _flush_tidy(self, spool: Spool) -> None:
        if self._queue.tidy_owed:
            # On a full disk they stay in memory and go with the next write that works.
            with contextlib.suppress(SpoolFull):
                await self._write(spool)

    async def _write(
        self, spool: Spool, append: list[tuple[str, int, bytes, float]] | None = None
    ) -> list[int]:
        """One spool transaction: ``append`` these rows, and record every delivery and
        refusal reported since the last write. Returns the new rows' ``seq``s."""
        tidy = self._queue.start_write()
        try:
            written = await self._spool_call(
                partial(
                    spool.write,
                    append=append or (),
                    delete=tidy.delete,
                    bury=tidy.bury,
                    dead_letter_max_bytes=self._config.dead_letter_max_bytes,
                )
            )
        except SpoolFull as exc:
            self._queue.write_failed(tidy)
            await self._disk_full(spool, exc)
            raise
        except BaseException:
            # Cancelled while waiting for the thread: nothing was written, so it is all
            # still to be recorded (by ``settle``, at shutdown).
            self._queue.write_failed(tidy)
            raise
        self._queue.written(tidy, written.oldest_created, written.dead_letters)
        # Room was freed: a commit waiting on a full spool may go on.
        self._wake()
        await self._maybe_disk_writable(spool)
        return written.seqs

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()

    def status(self) -> dict[str, Any] | None:
        """Spool figures for /status and /metrics; ``None`` without a spool."""
        spool = self.spool
        if spool is None:
            return None
        return {
            "path": str(Path(spool.path)),
            "batches": spool.batches,
            "events": spool.events,
            "bytes": spool.bytes,
            "oldest_batch_age_seconds": (
                round(time.time() - self.oldest_created, 3) if self.oldest_created else 0.0
            ),
            "dead_letters": self.dead_letters,
        }
