"""The spool file on its own: what goes in comes out, in order, and bad files are set aside."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.pipeline.spool import Spool, SpoolCorrupt, open_spool


def spool_at(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool.sqlite3")


def test_batches_come_back_in_order_with_their_ids(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    seqs = [spool.append(f"b{n}", n + 1, f"[{n}]".encode(), 1000.0 + n) for n in range(5)]
    assert seqs == sorted(seqs)
    rows = spool.read_from(0, 10)
    assert [(r.batch_id, r.count, r.events) for r in rows] == [
        (f"b{n}", n + 1, f"[{n}]".encode()) for n in range(5)
    ]
    assert [r.seq for r in spool.read_from(seqs[3], 10)] == seqs[3:]
    assert (spool.batches, spool.events, spool.bytes) == (5, 15, 15)
    assert spool.stats().oldest_created == 1000.0


def test_state_survives_reopening(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    first = spool.append("a", 2, b"[1,2]", 1.0)
    spool.append("b", 1, b"[3]", 2.0)
    spool.delete([first])
    spool.close()
    again = spool_at(tmp_path)
    assert [r.batch_id for r in again.read_from(0, 10)] == ["b"]
    assert (again.batches, again.events, again.bytes) == (1, 1, 3)
    # New rows never reuse a number: order holds across restarts and deletions.
    assert again.append("c", 1, b"[4]", 3.0) > again.last_seq() - 1 > first


def test_dead_letters_are_bounded_and_can_be_requeued(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    seqs = [spool.append(f"b{n}", 1, b"x" * 100, float(n)) for n in range(4)]
    for seq in seqs:
        spool.bury(seq, 400, "bad schema", max_bytes=250)
    dead = spool.dead_letters()
    # Only the newest two fit in 250 bytes.
    assert [d.batch_id for d in dead] == ["b2", "b3"]
    assert dead[0].status == 400 and dead[0].answer == "bad schema"
    assert spool.batches == 0
    assert spool.requeue_dead() == 2
    assert [r.batch_id for r in spool.read_from(0, 10)] == ["b2", "b3"]
    assert spool.dead_letters() == []


def test_one_write_records_deliveries_refusals_and_new_batches(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    delivered, refused, waiting = spool.append_many(
        [("a", 1, b"[1]", 1.0), ("b", 2, b"[2,3]", 2.0), ("c", 1, b"[4]", 3.0)]
    )
    written = spool.write(
        append=[("d", 3, b"[5,6,7]", 4.0)],
        delete=[delivered],
        bury=[(refused, 422, "no")],
        dead_letter_max_bytes=1000,
    )
    assert [r.batch_id for r in spool.read_from(0, 10)] == ["c", "d"]
    assert written.seqs == [spool.last_seq()] and written.seqs[0] > waiting
    assert (written.oldest_created, written.dead_letters) == (3.0, 1)
    assert (spool.batches, spool.events, spool.bytes) == (2, 4, 10)
    # Without refusals the dead-letter count carries over; an empty spool has no oldest.
    again = spool.write(delete=[waiting, *written.seqs])
    assert (again.seqs, again.oldest_created, again.dead_letters) == ([], None, 1)
    assert spool.requeue_dead() == 1
    assert spool.write().dead_letters == 0


def test_writes_larger_than_one_statement_keep_order_and_totals(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.append("first", 1, b"[0]", 0.5)
    rows = [(f"b{n}", 2, b"[%d,%d]" % (n, n), float(n)) for n in range(450)]
    seqs = spool.write(append=rows).seqs
    stored = spool.read_from(0, 1000)
    assert seqs == [batch.seq for batch in stored[1:]]
    assert [batch.batch_id for batch in stored[1:]] == [row[0] for row in rows]
    written = spool.write(delete=[stored[0].seq, *seqs[::2]])
    left = spool.read_from(0, 1000)
    assert [batch.seq for batch in left] == seqs[1::2]
    assert (spool.batches, spool.events) == (225, 450)
    assert spool.bytes == sum(len(batch.events) for batch in left)
    assert written.oldest_created == 1.0


def test_oldest_skips_what_is_being_sent(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    seqs = [spool.append(f"b{n}", 1, b"[]", float(n)) for n in range(5)]
    assert [b.seq for b in spool.oldest({seqs[0], seqs[1]}, limit=2)] == seqs[2:4]


def test_a_file_that_is_not_sqlite_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    path.write_bytes(b"certainly not a database" * 100)
    with pytest.raises(SpoolCorrupt, match=r"spool\.sqlite3"):
        Spool(path)
    spool, moved = open_spool(path)
    assert moved is not None and moved.name.startswith("spool.sqlite3.corrupt-")
    assert moved.read_bytes().startswith(b"certainly not")
    assert spool.stats().batches == 0


def test_another_programs_database_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (id INTEGER)")
    with pytest.raises(SpoolCorrupt, match="not a stag-relay spool"):
        Spool(path)
    _, moved = open_spool(path)
    assert moved is not None


def test_a_damaged_spool_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path)
    for n in range(200):
        spool.append(f"b{n}", 1, b"y" * 500, float(n))
    spool.close()
    data = bytearray(path.read_bytes())
    # Overwrite pages in the middle of the file: the header survives, the tree does not.
    data[8192:40960] = b"\xff" * (40960 - 8192)
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt):
        Spool(path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=50)), max_size=30))
def test_totals_match_the_rows(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[bool, bytes]]
) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool") / "s.sqlite3")
    live: dict[int, bytes] = {}
    for delete, payload in ops:
        if delete and live:
            seq = min(live)
            spool.delete([seq])
            del live[seq]
        else:
            live[spool.append("b", 1, payload, 0.0)] = payload
    assert (spool.batches, spool.events, spool.bytes) == (
        len(live),
        len(live),
        sum(map(len, live.values())),
    )
    assert [r.events for r in spool.read_from(0, 100)] == [live[k] for k in sorted(live)]
    spool.close()


def test_batches_committed_together_keep_their_order_and_totals(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    first = spool.append("a", 1, b"[1]", 1.0)
    seqs = spool.append_many([("b", 2, b"[2,3]", 2.0), ("c", 1, b"[4]", 3.0)])
    assert [first, *seqs] == sorted([first, *seqs])
    assert [r.batch_id for r in spool.read_from(0, 10)] == ["a", "b", "c"]
    assert (spool.batches, spool.events, spool.bytes) == (3, 4, 11)
