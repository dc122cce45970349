"""SendQueue: delivery's bookkeeping, driven with values the way the Trio shell drives it.

The tests play the shell: they keep the spool as a dict of rows, do what each answer
says (write, delete, read, hand over) and report back, in whatever order the shell's
tasks and threads could.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from stag_relay.protocol.events import Batch, Event, MeshUpdate
from stag_relay.protocol.sendqueue import (
    Dropped,
    FeedStep,
    FindVictims,
    Finished,
    Fits,
    ReadPage,
    RecordFirst,
    Send,
    SendQueue,
    Taken,
    Tidy,
    Wait,
    WaitForRoom,
    take,
)


class Client:
    """A connection that asked for acknowledgements (only its identity matters here)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        raise AssertionError("the queue only says whom to acknowledge")

    def forget(self, count: int) -> None:
        raise AssertionError("the queue only says whom to acknowledge")

    def __repr__(self) -> str:
        return f"Client({self.name})"


@attrs.frozen
class Row:
    """A spool row, as ``Spool.read_from`` and ``Spool.oldest`` give it."""

    seq: int
    batch_id: str
    count: int
    events: bytes


def make_batch(
    batch_id: str, events: int, client: Client | None = None, mesh: bool = False
) -> Batch:
    return Batch(
        batch_id,
        tuple(
            Event(
                event_id=f"{batch_id}-e{n}",
                session_id="s1",
                frame_number=n,
                timestamp=1_634_567_890_000 + n,
                received_at=1_634_567_890_001 + n,
                type="mesh" if mesh else "pose",
                anchors=(),
                meshes=(MeshUpdate("a1", is_delta=False),) if mesh else (),
                origin=client,
            )
            for n in range(events)
        ),
    )


class Disk:
    """The spool's rows, as the shell's threads would leave them."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.dead: dict[int, tuple[int, str]] = {}
        self._seqs = itertools.count(1)

    @property
    def bytes(self) -> int:
        return sum(len(r.events) for r in self.rows.values())

    def write(self, tidy: Tidy, group: Sequence[Taken] = ()) -> list[int]:
        for seq in tidy.delete:
            self.rows.pop(seq, None)
        for seq, status, answer in tidy.bury:
            if self.rows.pop(seq, None) is not None:
                self.dead[seq] = (status, answer)
        seqs = []
        for taken in group:
            seq = next(self._seqs)
            self.rows[seq] = Row(seq, taken.wire.batch_id, taken.wire.count, taken.wire.events)
            seqs.append(seq)
        return seqs

    def read_from(self, start: int, limit: int) -> list[Row]:
        return [self.rows[s] for s in sorted(self.rows) if s >= start][:limit]

    def oldest(self, exclude: frozenset[int], limit: int) -> list[Row]:
        return [self.rows[s] for s in sorted(self.rows) if s not in exclude][:limit]

    def figures(self) -> tuple[float | None, int]:
        return (1.0 if self.rows else None), len(self.dead)


def spooled(queue: SendQueue, disk: Disk, *batches: Batch) -> list[int]:
    """Take ``batches`` and commit them, whatever the spool's bound; their seqs."""
    seqs: list[int] = []
    for batch in batches:
        queue.arrived(batch)
    while queue.commit_pending():
        group = queue.next_group()
        tidy = queue.start_write()
        seqs += disk.write(tidy, group)
        queue.written(tidy, *disk.figures())
        queue.committed(group, seqs[-len(group) :])
    return seqs


def sent_seq(step: FeedStep) -> int:
    assert isinstance(step, Send), step
    return step.seq


# -- memory only -----------------------------------------------------------------------


def test_a_taken_batch_owes_its_acks_to_each_connection() -> None:
    alice, bob = Client("alice"), Client("bob")
    batch = make_batch("b1", 3, alice)
    batch = Batch("b1", batch.events + make_batch("b1x", 1, bob).events)
    taken = take(batch)
    assert taken.wire.batch_id == "b1" and taken.wire.count == 4
    assert taken.acks == {alice: ("s1", [0, 1, 2]), bob: ("s1", [0])}


def test_an_unknown_when_full_is_refused() -> None:
    with pytest.raises(ValueError, match="when_full"):
        SendQueue(spool_max_bytes=1000, when_full="shrug")


# -- with a spool ----------------------------------------------------------------------


def test_a_batch_is_acknowledged_once_committed_and_sent_in_order() -> None:
    queue, disk = SendQueue(spool_max_bytes=10_000, when_full="block"), Disk()
    clients = [Client(f"c{n}") for n in range(3)]
    for n, client in enumerate(clients):
        queue.arrived(make_batch(f"b{n}", 2, client))
    assert queue.holding == 6
    assert queue.commit_pending() is True
    group = queue.next_group()
    assert [t.wire.batch_id for t in group] == ["b0", "b1", "b2"]
    tidy = queue.start_write()
    assert not tidy
    seqs = disk.write(tidy, group)
    queue.written(tidy, *disk.figures())
    acks = queue.committed(group, seqs)
    assert acks == [{c: ("s1", [0, 1])} for c in clients]
    assert queue.holding == 0
    sent = [queue.next_send() for _ in range(3)]
    assert [s.seq for s in sent if isinstance(s, Send)] == seqs
    assert queue.next_send() == Wait()
    queue.commits_done()
    assert queue.next_send() == Finished()


def test_taking_stops_at_a_group_and_a_group_stops_at_a_quarter_of_the_spool() -> None:
    batch = make_batch("probe", 1)
    size = len(take(batch).wire.events)
    queue = SendQueue(spool_max_bytes=4 * (2 * size + 1), when_full="block", commit_group=5)
    for n in range(5):
        assert queue.may_take()
        queue.arrived(make_batch(f"b{n:04}", 1))
    assert not queue.may_take()
    assert [len(queue.next_group()) for _ in range(3)] == [2, 2, 1]
    assert queue.commit_pending() is False
    queue.all_taken()
    assert queue.commit_pending() is None


def test_one_batch_larger_than_the_spool_still_fits_an_empty_spool() -> None:
    queue = SendQueue(spool_max_bytes=10, when_full="block")
    queue.arrived(make_batch("big", 5))
    [taken] = queue.next_group()
    assert queue.room_for(len(taken.wire.events), 0) == Fits()
    assert queue.room_for(len(taken.wire.events), 1) == WaitForRoom()


def test_beyond_the_memory_window_the_sender_reads_pages_from_disk() -> None:
    queue, disk = SendQueue(spool_max_bytes=10**6, when_full="block", window_bytes=1), Disk()
    seqs = spooled(queue, disk, *(make_batch(f"b{n}", 1) for n in range(5)))
    # The first fills the window; the others wait on disk.
    assert queue.next_send() == Send(seqs[0], take(make_batch("b0", 1)).wire)
    step = queue.next_send()
    assert step == ReadPage(seqs[1], 64)
    queue.page_read(disk.read_from(step.start, 2))
    got = [queue.next_send(), queue.next_send()]
    assert [s.seq for s in got if isinstance(s, Send)] == seqs[1:3]
    step = queue.next_send()
    assert isinstance(step, ReadPage) and step.start == seqs[3]
    queue.page_read(disk.read_from(step.start, 64))
    assert [sent_seq(queue.next_send()) for _ in range(2)] == seqs[3:]
    # Caught up with the disk: a new batch stays in memory again.
    assert queue.next_send() == Wait()


def test_deliveries_and_refusals_are_recorded_with_the_next_write_or_put_back() -> None:
    queue, disk = SendQueue(spool_max_bytes=10**6, when_full="block"), Disk()
    mesh = make_batch("m", 1, mesh=True)
    seqs = spooled(queue, disk, make_batch("a", 1), mesh, make_batch("c", 1))
    for _ in seqs:
        queue.next_send()
    assert queue.delivered(seqs[1]) == [("s1", "a1", "m-e0")]
    queue.rejected(seqs[0], 400, "bad")
    assert queue.tidy_owed
    first = queue.start_write()
    assert first == Tidy([seqs[1]], [(seqs[0], 400, "bad")])
    assert not queue.tidy_owed
    queue.delivered(seqs[2])
    # The write fails (a full disk): it is owed again, before what came since.
    queue.write_failed(first)
    assert queue.start_write() == Tidy([seqs[1], seqs[2]], [(seqs[0], 400, "bad")])


def test_a_full_spool_records_deliveries_first_then_blocks_or_looks_for_victims() -> None:
    for when_full, last in (("block", WaitForRoom()), ("drop_oldest", None)):
        queue, disk = SendQueue(spool_max_bytes=1, when_full=when_full), Disk()
        seqs = spooled(queue, disk, make_batch("a", 1), make_batch("b", 1))
        assert queue.next_send() == Send(seqs[0], take(make_batch("a", 1)).wire)
        queue.delivered(seqs[0])
        assert queue.room_for(100, disk.bytes) == RecordFirst()
        tidy = queue.start_write()
        disk.write(tidy)
        queue.written(tidy, *disk.figures())
        step = queue.room_for(100, disk.bytes)
        if last is not None:
            assert step == last
        else:
            assert step == FindVictims(frozenset(), 16)


def test_drop_oldest_spares_what_the_sender_took_or_finished_during_the_lookup() -> None:
    """The interleaving of 1c4dc95: victims are chosen in a thread while the sender goes
    on; a batch it took, or STAG accepted or refused meanwhile (recorded or not yet), is
    neither deleted nor counted as dropped."""
    queue, disk = SendQueue(spool_max_bytes=1, when_full="drop_oldest"), Disk()
    seqs = spooled(queue, disk, *(make_batch(f"b{n}", n + 1) for n in range(6)))
    s1, s2, s3, s4, s5, s6 = seqs
    assert queue.next_send() == Send(s1, take(make_batch("b0", 1)).wire)
    # The spool is full: the commit task looks for the oldest batches not in flight.
    step = queue.room_for(10, disk.bytes)
    assert step == FindVictims(frozenset({s1}), 16)
    found = disk.oldest(step.exclude, step.limit)
    assert [r.seq for r in found] == [s2, s3, s4, s5, s6]
    # Meanwhile, on the event loop: the sender takes s2, s3 and s4; STAG accepts s3,
    # whose deletion is being written, and refuses s4.
    for _ in range(3):
        queue.next_send()
    queue.delivered(s3)
    recording = queue.start_write()
    queue.rejected(s4, 422, "no")
    # The lookup comes back: only what nobody touched is dropped.
    victims = queue.choose_victims(found)
    assert [v.seq for v in victims] == [s5, s6]
    # The deletion of s3 lands (with the victims' deletion still to come).
    disk.write(recording)
    queue.written(recording, *disk.figures())
    disk.write(Tidy([v.seq for v in victims], []))
    assert queue.dropped(victims) == Dropped(2, 5 + 6, "spool_full")
    # The dropped ones are not sent; nothing else is left.
    queue.commits_done()
    assert queue.next_send() == Finished()


def test_a_batch_chosen_as_a_victim_is_not_sent_while_its_deletion_runs() -> None:
    queue, disk = SendQueue(spool_max_bytes=1, when_full="drop_oldest"), Disk()
    s1, s2 = spooled(queue, disk, make_batch("a", 1), make_batch("b", 2))
    step = queue.room_for(10, disk.bytes)
    assert isinstance(step, FindVictims)
    victims = queue.choose_victims(disk.oldest(step.exclude, step.limit))
    assert [v.seq for v in victims] == [s1, s2]
    # Its deletion runs in a thread: the sender must not take it meanwhile.
    assert queue.next_send() == Wait()
    # The disk refuses the deletion: the sender gets them after all, none dropped.
    queue.drop_failed(victims)
    assert [sent_seq(queue.next_send()) for _ in range(2)] == [s1, s2]


def test_a_dropped_batch_is_skipped_when_its_turn_comes() -> None:
    queue, disk = SendQueue(spool_max_bytes=1, when_full="drop_oldest"), Disk()
    _, s2 = spooled(queue, disk, make_batch("a", 1), make_batch("b", 2))
    step = queue.find_victims()
    victims = queue.choose_victims(disk.oldest(step.exclude, 1))
    assert queue.dropped(victims) == Dropped(1, 1, "spool_full")
    assert sent_seq(queue.next_send()) == s2


def test_a_finished_batch_is_not_looked_up_as_a_victim_even_once_recorded() -> None:
    queue, disk = SendQueue(spool_max_bytes=1, when_full="drop_oldest"), Disk()
    s1, s2, s3 = spooled(queue, disk, *(make_batch(f"b{n}", 1) for n in range(3)))
    for _ in range(2):
        queue.next_send()
    queue.rejected(s1, 400, "no")
    recording = queue.start_write()
    queue.delivered(s2)
    step = queue.find_victims()
    assert step.exclude == {s1, s2}
    found = disk.oldest(step.exclude, step.limit)
    # The refusal is written while the lookup runs: s1 is no longer "owed", and was
    # never found.
    disk.write(recording)
    queue.written(recording, *disk.figures())
    assert [v.seq for v in queue.choose_victims(found)] == [s3]


def test_a_batch_committed_behind_an_empty_read_is_read_next() -> None:
    queue, disk = SendQueue(spool_max_bytes=10**6, when_full="block", window_bytes=1), Disk()
    s1, s2 = spooled(queue, disk, make_batch("a", 1), make_batch("b", 1))
    assert sent_seq(queue.next_send()) == s1
    step = queue.next_send()
    assert step == ReadPage(s2, 64)
    # s2 is dropped before the read, and a new batch is committed (to disk) after it.
    victims = queue.choose_victims(disk.oldest(queue.find_victims().exclude, 16))
    assert [v.seq for v in victims] == [s2]
    disk.write(Tidy([s2], []))
    queue.dropped(victims)
    page = disk.read_from(step.start, step.limit)
    [s3] = spooled(queue, disk, make_batch("c", 1))
    queue.page_read(page)
    step = queue.next_send()
    assert step == ReadPage(s3, 64)
    queue.page_read(disk.read_from(step.start, step.limit))
    assert sent_seq(queue.next_send()) == s3


def test_a_full_disk_is_one_episode_until_quiet_with_no_commit_waiting() -> None:
    queue = SendQueue(spool_max_bytes=1000, when_full="block", disk_full_quiet=5.0)
    assert not queue.episode_may_end(100.0)
    assert queue.disk_refused(10.0) is True
    assert queue.disk_refused(12.0) is False
    assert queue.disk_full_since == 10.0
    assert not queue.episode_may_end(16.9)
    assert queue.episode_may_end(17.0)
    queue.commit_refused()
    assert not queue.episode_may_end(30.0)
    assert queue.disk_has_room(30.0) is None
    queue.committed([], [])
    assert queue.episode_may_end(30.0)
    assert queue.disk_has_room(31.5) == 21.5
    assert queue.disk_full_since is None
    assert queue.disk_has_room(32.0) is None


# -- every interleaving ------------------------------------------------------------------


# A pose event is about 150 bytes of JSON: a few batches fill the spool.
SPOOL_MAX = 900


class DeliveryMachine(RuleBasedStateMachine):
    """The shell's tasks (take, commit, feed, tidy) and the sender's answers, interleaved
    at every await; each task has at most one spool call under way, whose result is
    computed when it starts and reported when it ends (the worst case for staleness)."""

    @initialize(when_full=st.sampled_from(["block", "drop_oldest"]))
    def start(self, when_full: str) -> None:
        self.queue = SendQueue(
            spool_max_bytes=SPOOL_MAX,
            when_full=when_full,
            window_bytes=300,
            commit_group=3,
            read_page=2,
        )
        self.disk = Disk()
        self.names = itertools.count()
        self.sizes: dict[str, int] = {}
        self.clients: dict[str, Client] = {}
        self.taken_all = False
        self.uncommitted: dict[str, int] = {}
        self.acked: set[str] = set()
        self.sent: set[str] = set()
        self.in_flight: set[int] = set()
        self.accepted: set[str] = set()
        self.refused: set[str] = set()
        self.dropped: set[str] = set()
        self.dropped_events = 0
        self.batch_of: dict[int, str] = {}
        # The commit task: its group, and the spool call it waits for.
        self.group: list[Taken] | None = None
        self.commit_write: Tidy | None = None
        self.commit_rows: list[Taken] = []
        self.lookup: list[Row] | None = None
        self.deleting: list[Row] | None = None
        # The tidy task's write, and the feeder's read.
        self.tidy_write: Tidy | None = None
        self.read: list[Row] | None = None

    # -- the batcher and the commit task ------------------------------------------

    @precondition(lambda self: not self.taken_all and self.queue.may_take())
    @rule(events=st.integers(1, 3), mesh=st.booleans())
    def batch_arrives(self, events: int, mesh: bool) -> None:
        name = f"b{next(self.names)}"
        self.clients[name] = Client(name)
        self.queue.arrived(make_batch(name, events, self.clients[name], mesh))
        self.sizes[name] = events
        self.uncommitted[name] = events

    # Late, so that most runs fill the spool first (the teardown closes it anyway).
    @precondition(lambda self: not self.taken_all and len(self.sizes) >= 12)
    @rule()
    def batcher_closes(self) -> None:
        self.taken_all = True
        self.queue.all_taken()

    @precondition(lambda self: self.group is None and self.queue.commit_pending() is True)
    @rule()
    def group_taken(self) -> None:
        self.group = self.queue.next_group()
        assert self.group

    def _commit_idle(self) -> bool:
        return self.group is not None and not (
            self.commit_write is not None or self.lookup is not None or self.deleting is not None
        )

    @precondition(_commit_idle)
    @rule()
    def room_asked(self) -> None:
        assert self.group is not None
        size = sum(len(t.wire.events) for t in self.group)
        step = self.queue.room_for(size, self.disk.bytes)
        if isinstance(step, Fits):
            self.commit_write, self.commit_rows = self.queue.start_write(), self.group
        elif isinstance(step, RecordFirst):
            self.commit_write, self.commit_rows = self.queue.start_write(), []
        elif isinstance(step, FindVictims):
            # Neither those in flight nor those finished may be dropped.
            assert frozenset(self.in_flight) <= step.exclude
            assert {self.batch_of[seq] for seq in step.exclude} <= self.sent
            self.lookup = self.disk.oldest(step.exclude, step.limit)
        else:
            assert step == WaitForRoom() and self.queue.when_full == "block"

    @precondition(lambda self: self.commit_write is not None)
    @rule(ok=st.booleans())
    def commit_write_ends(self, ok: bool) -> None:
        tidy, rows, self.commit_write = self.commit_write, self.commit_rows, None
        assert tidy is not None
        if not ok:
            # A full disk: rolled back; the group waits here, unacknowledged.
            self.queue.write_failed(tidy)
            if rows:
                self.queue.commit_refused()
            return
        seqs = self._write(tidy, rows)
        if not rows:
            return
        acks = self.queue.committed(rows, seqs)
        for taken, seq, owed in zip(rows, seqs, acks, strict=True):
            name = taken.wire.batch_id
            # Acknowledged once, and only once it is on disk.
            assert self.disk.rows[seq].batch_id == name
            assert owed == {self.clients[name]: ("s1", list(range(self.sizes[name])))}
            assert name not in self.acked
            self.acked.add(name)
            self.batch_of[seq] = name
            del self.uncommitted[name]
        self.group = None

    @precondition(lambda self: self.lookup is not None)
    @rule(ok=st.booleans())
    def lookup_ends(self, ok: bool = True) -> None:
        found, self.lookup = self.lookup, None
        assert found is not None
        if not ok:
            self.queue.lookup_failed()
            return
        victims = self.queue.choose_victims(found)
        if victims:
            self.deleting = victims

    @precondition(lambda self: self.deleting is not None)
    @rule(ok=st.booleans())
    def drop_ends(self, ok: bool) -> None:
        victims, self.deleting = self.deleting, None
        assert victims is not None
        if not ok:
            self.queue.drop_failed(victims)
            return
        for victim in victims:
            # Never a batch the sender had, nor one already gone.
            assert victim.batch_id not in self.sent
            assert victim.seq in self.disk.rows
            del self.disk.rows[victim.seq]
            self.dropped.add(victim.batch_id)
        dropped = self.queue.dropped(victims)
        assert dropped.reason == "spool_full"
        assert dropped.batches == len(victims)
        assert dropped.events == sum(self.sizes[v.batch_id] for v in victims)
        self.dropped_events += dropped.events

    @precondition(lambda self: self.taken_all and self.group is None)
    @rule()
    def commits_end(self) -> None:
        if self.queue.commit_pending() is None:
            self.queue.commits_done()

    # -- the feeder and the sender --------------------------------------------------

    @precondition(lambda self: self.read is None)
    @rule()
    def feeder_asks(self) -> None:
        step = self.queue.next_send()
        if isinstance(step, Send):
            name = self.batch_of[step.seq]
            assert step.wire.batch_id == name
            assert name not in self.sent, "sent twice"
            assert name not in self.dropped, "sent after being dropped"
            assert step.seq in self.disk.rows
            self.sent.add(name)
            self.in_flight.add(step.seq)
        elif isinstance(step, ReadPage):
            assert step.limit == 2
            self.read = self.disk.read_from(step.start, step.limit)

    @precondition(lambda self: self.read is not None)
    @rule()
    def read_ends(self) -> None:
        page, self.read = self.read, None
        assert page is not None
        self.queue.page_read(page)

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data(), accept=st.booleans())
    def stag_answers(self, data: st.DataObject, accept: bool) -> None:
        seq = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.in_flight.discard(seq)
        if accept:
            self.accepted.add(self.batch_of[seq])
            self.queue.delivered(seq)
        else:
            self.refused.add(self.batch_of[seq])
            self.queue.rejected(seq, 400, "refused")

    # -- the tidy task --------------------------------------------------------------

    @precondition(lambda self: self.tidy_write is None and self.queue.tidy_owed)
    @rule()
    def tidy_starts(self) -> None:
        self.tidy_write = self.queue.start_write()

    @precondition(lambda self: self.tidy_write is not None)
    @rule(ok=st.booleans())
    def tidy_ends(self, ok: bool) -> None:
        tidy, self.tidy_write = self.tidy_write, None
        assert tidy is not None
        if ok:
            self._write(tidy, [])
        else:
            self.queue.write_failed(tidy)

    def _write(self, tidy: Tidy, rows: list[Taken]) -> list[int]:
        for seq in tidy.delete:
            assert self.batch_of[seq] in self.accepted
        for seq, _, _ in tidy.bury:
            assert self.batch_of[seq] in self.refused
        seqs = self.disk.write(tidy, rows)
        self.queue.written(tidy, *self.disk.figures())
        return seqs

    # -- what always holds ----------------------------------------------------------

    @invariant()
    def every_batch_is_in_exactly_one_place(self) -> None:
        on_disk = {r.batch_id for r in self.disk.rows.values()}
        for name in self.sizes:
            places = [
                name in self.uncommitted,
                name in on_disk and name not in self.sent,
                name in self.sent and name not in self.accepted | self.refused,
                name in self.accepted,
                name in self.refused,
                name in self.dropped,
            ]
            assert places.count(True) == 1, (name, places)

    @invariant()
    def held_events_are_those_not_yet_committed(self) -> None:
        assert self.queue.holding == sum(self.uncommitted.values())

    @invariant()
    def the_spool_stays_within_its_bound(self) -> None:
        # A group fits a quarter of the spool; more only when it went into an empty one.
        assert self.disk.bytes <= SPOOL_MAX or len(self.disk.rows) <= 3

    def teardown(self) -> None:
        """Then the disk works and STAG accepts everything: all of it ends somewhere."""
        if not hasattr(self, "queue"):
            return
        if not self.taken_all:
            self.batcher_closes()
        for _ in range(10_000):
            if self.commit_write is not None:
                self.commit_write_ends(ok=True)
            if self.lookup is not None:
                self.lookup_ends()
            if self.deleting is not None:
                self.drop_ends(ok=True)
            if self.tidy_write is not None:
                self.tidy_ends(ok=True)
            if self.read is not None:
                self.read_ends()
            for seq in sorted(self.in_flight):
                self.in_flight.discard(seq)
                self.accepted.add(self.batch_of[seq])
                self.queue.delivered(seq)
            if self.queue.tidy_owed:
                self.tidy_starts()
                continue
            if self.group is None and self.queue.commit_pending() is True:
                self.group_taken()
            if self._commit_idle():
                self.room_asked()
            if self.group is None and self.queue.commit_pending() is None:
                self.queue.commits_done()
            step = self.queue.next_send()
            if isinstance(step, Finished) and self.group is None:
                break
            if isinstance(step, Send):
                name = self.batch_of[step.seq]
                assert name not in self.sent and name not in self.dropped
                self.sent.add(name)
                self.in_flight.add(step.seq)
            elif isinstance(step, ReadPage):
                self.read = self.disk.read_from(step.start, step.limit)
        else:
            raise AssertionError("delivery never finished")
        assert not self.uncommitted
        assert set(self.sizes) == self.accepted | self.refused | self.dropped
        assert self.acked == set(self.sizes)
        assert not self.disk.rows
        assert {self.batch_of[s] for s in self.disk.dead} == self.refused
        if self.queue.when_full == "block":
            assert not self.dropped


TestDelivery = DeliveryMachine.TestCase
TestDelivery.settings = settings(max_examples=300, stateful_step_count=100, deadline=None)
