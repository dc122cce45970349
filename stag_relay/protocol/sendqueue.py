"""Delivery's bookkeeping as one pure object: which batches wait, which are in flight,
what the spool holds and owes, and what a full spool or disk does to them.

``SendQueue`` does no I/O and calls no clock: the shell (``stag_relay.pipeline.delivery``)
does the SQLite work in threads, waits, and tells the queue what happened; each method is
named for that event and returns what the shell must do next (rows to write, seqs to
delete, a batch to hand the sender, acknowledgements to send, batches dropped and why).

Memory only, a batch goes straight to the sender and its connections are acknowledged
when STAG accepts it. With a spool, a batch is committed before anything else happens to
it, its connections are acknowledged then, and the sender is fed in ``seq`` order from a
window in memory, then from disk once the window is full (``spill_from``).

Every method runs between two awaits of the shell, so the queue's state is consistent at
each of them; what the shell learns from a thread (victims chosen on disk, a page read)
may be stale by the time it comes back, and the queue checks it against what happened
meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final, Protocol, TypeVar

import attrs

from stag_relay.protocol.events import Batch, Origin, WireBatch, to_wire

# Committed batches kept in memory for the sender, so a healthy STAG never makes the
# relay read back what it just wrote; beyond this the sender reads from disk.
MEMORY_WINDOW_BYTES: Final = 16 * 1024 * 1024
# Batches read from disk at a time when catching up on a backlog.
READ_PAGE: Final = 64
# Batches that may wait, taken from the batcher, while a commit runs; they are
# committed together next. A few hundred KiB held outside the spool at most.
COMMIT_GROUP: Final = 16
# Oldest batches looked up at a time when a full spool drops some.
DROP_PAGE: Final = 16
# A full-disk episode ends once the disk has room to spare and no write was refused for
# this long: a disk that hovers at the edge while a backlog drains is one episode.
DISK_FULL_QUIET: Final = 5.0

WHEN_FULL: Final = ("block", "drop_oldest")

Acks = dict[Origin, tuple[str, list[int]]]
# (session id, anchor id, event id) of a mesh: what the mesh pipeline is told STAG holds.
MeshRef = tuple[str, str, str]


def group_acks(batch: Batch) -> Acks:
    """Frame numbers per connection that asked for acknowledgements."""
    acks: Acks = {}
    for event in batch.events:
        origin = event.origin
        if origin is not None:
            entry = acks.get(origin)
            if entry is None:
                acks[origin] = (event.session_id, [event.frame_number])
            else:
                entry[1].append(event.frame_number)
    return acks


def batch_meshes(batch: Batch) -> list[MeshRef]:
    """(session, anchor, event id) of every mesh in ``batch``."""
    return [(e.session_id, m.anchor_id, e.event_id) for e in batch.events for m in e.meshes]


class StoredBatch(Protocol):
    """A batch as the spool gives it back (``SpooledBatch``)."""

    @property
    def seq(self) -> int: ...

    @property
    def batch_id(self) -> str: ...

    @property
    def count(self) -> int: ...

    @property
    def events(self) -> bytes: ...


S = TypeVar("S", bound=StoredBatch)


@attrs.frozen
class Taken:
    """A batch taken from the batcher: its wire form, and what its acceptance owes."""

    wire: WireBatch
    events: int
    acks: Acks
    meshes: list[MeshRef]


@attrs.frozen
class Send:
    """Hand this batch to the sender (``seq`` 0 without a spool)."""

    seq: int
    wire: WireBatch


@attrs.frozen
class ReadPage:
    """Read up to ``limit`` batches from ``start`` on from the spool, then ``page_read``."""

    start: int
    limit: int


@attrs.frozen
class Wait:
    """Nothing to do until something changes."""


@attrs.frozen
class Finished:
    """Everything taken has been handed to the sender."""


FeedStep = Send | ReadPage | Wait | Finished


@attrs.frozen
class Tidy:
    """Deliveries and refusals to record in the spool, in one write with any new rows."""

    delete: list[int]
    bury: list[tuple[int, int, str]]

    def __bool__(self) -> bool:
        return bool(self.delete or self.bury)


@attrs.frozen
class Fits:
    """The group fits the spool: write it."""


@attrs.frozen
class RecordFirst:
    """Record the deliveries owed (a write of their own): that may make the room."""


@attrs.frozen
class FindVictims:
    """``drop_oldest``: look up the oldest batches on disk, except ``exclude``, then
    ``choose_victims``."""

    exclude: frozenset[int]
    limit: int


@attrs.frozen
class WaitForRoom:
    """``block`` (or nothing droppable): wait for the sender to free room."""


RoomStep = Fits | RecordFirst | FindVictims | WaitForRoom


@attrs.frozen
class Dropped:
    """Batches dropped from the spool: count them as events lost for ``reason``."""

    batches: int
    events: int
    reason: str


class SendQueue:
    """Delivery's state, for one relay: see the module docstring.

    ``spool_max_bytes`` and ``when_full`` are ``delivery.spool_max_bytes`` and
    ``delivery.when_full``; the others are here so that tests can make them small.
    """

    def __init__(
        self,
        *,
        spool_max_bytes: int,
        when_full: str,
        window_bytes: int = MEMORY_WINDOW_BYTES,
        commit_group: int = COMMIT_GROUP,
        read_page: int = READ_PAGE,
        disk_full_quiet: float = DISK_FULL_QUIET,
    ) -> None:
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {when_full!r}")
        self.spool_max_bytes = spool_max_bytes
        self.when_full = when_full
        self._window_max = window_bytes
        self._commit_group = commit_group
        self._read_page = read_page
        self._quiet = disk_full_quiet
        # Events taken from the batcher and neither spooled nor handed to the sender.
        self.holding = 0
        # Taken, waiting for the next commit (bounded by commit_group).
        self._arrived: deque[Taken] = deque()
        self._taken_all = False
        # Commits may still add batches for the sender.
        self._committing = True
        # The sender's queue: committed batches in memory, then on disk from spill_from.
        self._window: deque[tuple[int, WireBatch]] = deque()
        self._window_bytes = 0
        self._spill_from: int | None = None
        self._last_seq = 0
        # The newest seq when the page being read was asked for.
        self._read_upto = 0
        self._meshes: dict[int, list[MeshRef]] = {}
        self._in_flight: set[int] = set()
        # Chosen to be dropped, their deletion under way: not to be sent meanwhile.
        self._dropping: set[int] = set()
        # Dropped from the spool while in the window: skipped when their turn comes.
        self._dropped: set[int] = set()
        # Delivered / refused, not yet recorded; and those being recorded right now (a
        # commit and a tidy-up may each have started a write).
        self._to_delete: list[int] = []
        self._buried: list[tuple[int, int, str]] = []
        self._recording: list[Tidy] = []
        # While victims are looked up on disk: every seq the sender took or finished
        # meanwhile. None when no lookup runs.
        self._touched: set[int] | None = None
        # What the spool holds, as its last write said.
        self.dead_letters = 0
        self.oldest_created: float | None = None
        # Since when (the shell's clock) the spool's disk is full; None while it takes
        # writes. A commit refused by a full disk is being tried again.
        self.disk_full_since: float | None = None
        self.commit_retrying = False
        self._last_refusal = 0.0

    # -- memory only ------------------------------------------------------------------

    # -- with a spool: start ----------------------------------------------------------

    def restored(self, first_seq: int | None, last_seq: int) -> None:
        """The spool held batches at start (``first_seq`` the oldest): send them first."""
        self._spill_from = first_seq
        self._last_seq = last_seq

    def spool_figures(self, oldest_created: float | None, dead_letters: int) -> None:
        """What the spool held at start, or after a write."""
        self.oldest_created = oldest_created
        self.dead_letters = dead_letters

    # -- with a spool: taking and committing ------------------------------------------

    def may_take(self) -> bool:
        """Room for one more batch before the next commit (else the batcher waits)."""
        return len(self._arrived) < self._commit_group

    def arrived(self, batch: Batch) -> None:
        """A batch was taken from the batcher."""
        self._arrived.append(take(batch))
        self.holding += len(batch)

    def all_taken(self) -> None:
        """The batcher is done: commit what is here, then stop."""
        self._taken_all = True

    def commit_pending(self) -> bool | None:
        """True: a group waits to be committed; False: wait; None: no more commits."""
        if self._arrived:
            return True
        return None if self._taken_all else False

    def next_group(self) -> list[Taken]:
        """The oldest waiting batches, as many as fit a quarter of the spool (at least
        one): room for a group must be possible while batches are in flight."""
        cap = self.spool_max_bytes // 4
        group: list[Taken] = []
        size = 0
        while self._arrived:
            wire = self._arrived[0].wire
            if group and size + len(wire.events) > cap:
                break
            group.append(self._arrived.popleft())
            size += len(wire.events)
        return group

    def room_for(self, size: int, spool_bytes: int) -> RoomStep:
        """How to make room for ``size`` bytes in a spool of ``spool_bytes``."""
        # An empty spool takes any batch, however large: otherwise it could never move.
        if not spool_bytes or spool_bytes + size <= self.spool_max_bytes:
            return Fits()
        if self._to_delete or self._buried:
            # Delivered batches still on disk: forgetting them may make the room.
            return RecordFirst()
        if self.when_full == "drop_oldest":
            return self.find_victims()
        return WaitForRoom()

    def find_victims(self) -> FindVictims:
        """A lookup of the oldest batches begins: they may be dropped."""
        self._touched = set()
        return FindVictims(frozenset(self._busy()), DROP_PAGE)

    def choose_victims(self, found: Sequence[S]) -> list[S]:
        """The lookup came back: those of ``found`` still the spool's to drop; delete
        them, then ``dropped`` (or ``drop_failed``). Until then none of them is sent.

        While it ran the sender may have taken some, or finished with them (and their
        deletion may be under way): those are not the spool's to drop, nor to count as
        lost.
        """
        busy = self._busy()
        busy.update(self._touched or ())
        self._touched = None
        victims = [v for v in found if v.seq not in busy]
        self._dropping.update(v.seq for v in victims)
        return victims

    def lookup_failed(self) -> None:
        """The lookup did not come back (a failing disk): nothing chosen."""
        self._touched = None

    def drop_failed(self, victims: Iterable[StoredBatch]) -> None:
        """The victims' deletion failed: they are the sender's again."""
        self._dropping.difference_update(v.seq for v in victims)

    def dropped(self, victims: Iterable[StoredBatch]) -> Dropped:
        """``victims`` were deleted from the spool to make room."""
        batches = events = 0
        for victim in victims:
            self._dropping.discard(victim.seq)
            self._dropped.add(victim.seq)
            self._meshes.pop(victim.seq, None)
            batches += 1
            events += victim.count
        return Dropped(batches, events, "spool_full")

    def commit_refused(self) -> None:
        """The group's write failed on a full disk: it stays here, held, unacknowledged."""
        self.commit_retrying = True

    def committed(self, group: Sequence[Taken], seqs: Sequence[int]) -> list[Acks]:
        """``group`` is in the spool as ``seqs``: queue it for the sender; returns the
        acknowledgements owed, one per batch, in order."""
        self.commit_retrying = False
        self.holding -= sum(taken.events for taken in group)
        acks: list[Acks] = []
        for taken, seq in zip(group, seqs, strict=True):
            acks.append(taken.acks)
            if taken.meshes:
                self._meshes[seq] = taken.meshes
            self._last_seq = seq
            if self._spill_from is None and self._window_bytes < self._window_max:
                self._window.append((seq, taken.wire))
                self._window_bytes += len(taken.wire.events)
            elif self._spill_from is None:
                self._spill_from = seq
        return acks

    def commits_done(self) -> None:
        """No more commits: once the sender has had everything, feeding ends."""
        self._committing = False

    # -- with a spool: feeding the sender ---------------------------------------------

    def next_send(self) -> FeedStep:
        """What the feeder does next; a ``Send``'s batch is in flight from now."""
        while self._window:
            if self._window[0][0] in self._dropping:
                # Its deletion decides: skipped once dropped, sent if that fails.
                return Wait()
            seq, wire = self._window.popleft()
            self._window_bytes -= len(wire.events)
            if seq not in self._dropped:
                self._in_flight.add(seq)
                self._touch(seq)
                return Send(seq, wire)
            self._dropped.discard(seq)
        if self._spill_from is not None:
            self._read_upto = self._last_seq
            return ReadPage(self._spill_from, self._read_page)
        # Nothing left in memory or on disk to skip: forget what was dropped.
        self._dropped.clear()
        return Wait() if self._committing else Finished()

    def page_read(self, page: Sequence[StoredBatch]) -> None:
        """The page asked for by ``ReadPage`` (oldest first; empty: nothing there)."""
        if page:
            self._window.extend((b.seq, WireBatch(b.batch_id, b.count, b.events)) for b in page)
            self._window_bytes += sum(len(b.events) for b in page)
            self._spill_from = page[-1].seq + 1
        elif self._last_seq > self._read_upto:
            # Nothing there when it was read, but batches were committed (to disk, as
            # the window was closed) after it was asked for: they come next.
            self._spill_from = self._read_upto + 1
        else:
            self._spill_from = None
        if self._spill_from is not None and self._spill_from > self._last_seq:
            # Caught up with the disk: new batches may stay in memory again.
            self._spill_from = None

    def delivered(self, seq: int) -> list[MeshRef]:
        """STAG accepted ``seq``: its row is to be deleted. Returns its meshes, now bases."""
        self._in_flight.discard(seq)
        self._touch(seq)
        self._to_delete.append(seq)
        return self._meshes.pop(seq, [])

    def rejected(self, seq: int, status: int, answer: str) -> None:
        """STAG refused ``seq`` for good: it becomes a dead letter."""
        self._meshes.pop(seq, None)
        self._in_flight.discard(seq)
        self._touch(seq)
        self._buried.append((seq, status, answer))

    # -- with a spool: recording deliveries -------------------------------------------

    @property
    def tidy_owed(self) -> bool:
        """Deliveries or refusals wait to be recorded."""
        return bool(self._to_delete or self._buried)

    def start_write(self) -> Tidy:
        """A spool write begins: it records everything owed so far."""
        tidy = Tidy(self._to_delete, self._buried)
        self._to_delete, self._buried = [], []
        self._recording.append(tidy)
        return tidy

    def write_failed(self, tidy: Tidy) -> None:
        """Rolled back (or never run): still to be recorded, before any reported since."""
        self._recording = [t for t in self._recording if t is not tidy]
        self._to_delete[:0] = tidy.delete
        self._buried[:0] = tidy.bury

    def written(self, tidy: Tidy, oldest_created: float | None, dead_letters: int) -> None:
        """The write that ``start_write`` returned ``tidy`` for committed."""
        self._recording = [t for t in self._recording if t is not tidy]
        self.spool_figures(oldest_created, dead_letters)

    # -- the spool's disk -------------------------------------------------------------

    def disk_refused(self, now: float) -> bool:
        """A write failed on a full or failing disk; True when that starts an episode."""
        self._last_refusal = now
        if self.disk_full_since is not None:
            return False
        self.disk_full_since = now
        return True

    def episode_may_end(self, now: float) -> bool:
        """Worth checking the disk for room: in an episode, no commit waits, and no write
        was refused for ``disk_full_quiet``."""
        if self.disk_full_since is None or self.commit_retrying:
            return False
        return now - self._last_refusal >= self._quiet

    def disk_has_room(self, now: float) -> float | None:
        """The disk has room to spare: the episode ends, unless meanwhile it did or a
        commit was refused. Returns how long it lasted when it ends."""
        since = self.disk_full_since
        if since is None or self.commit_retrying:
            return None
        self.disk_full_since = None
        return now - since

    # ---------------------------------------------------------------------------------

    def _busy(self) -> set[int]:
        """Batches on disk that are not the spool's to drop: in flight, or finished and
        not yet recorded (or being recorded)."""
        busy = {*self._in_flight, *self._to_delete, *(seq for seq, _, _ in self._buried)}
        for tidy in self._recording:
            busy.update(tidy.delete)
            busy.update(seq for seq, _, _ in tidy.bury)
        return busy

    def _touch(self, seq: int) -> None:
        if self._touched is not None:
            self._touched.add(seq)


def take(batch: Batch) -> Taken:
    """What delivery needs of ``batch``: its wire form, acks and meshes (memory only: all
    of it; with a spool, ``arrived`` takes it)."""
    return Taken(to_wire(batch), len(batch), group_acks(batch), batch_meshes(batch))
