"""A full or failing disk under the spool: a full spool, rolled back whole, never lost
state; deliveries still recorded; room given back to the file system."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from stag_relay.pipeline.delivery import Delivery
from stag_relay.pipeline.spool import (
    _SCHEMA,
    APPLICATION_ID,
    CHECKPOINT_PAGES_MAX,
    RESERVE_MAX,
    RESERVE_MIN,
    SCHEMA_VERSION,
    Spool,
    SpoolFull,
    checkpoint_pages,
    disk_shortfall,
    is_disk_full,
    reserve_size,
)
from stag_relay.service.config import DeliveryConfig
from stag_relay.service.metrics import RelayMetrics
from tests.support.smalldisk import free_bytes, small_file_system

BLOB = os.urandom(3000)


def fill(spool: Spool, tag: str) -> tuple[list[int], SpoolFull]:
    """Append groups of batches until the disk refuses one; check it left nothing behind."""
    seqs: list[int] = []
    for n in range(100_000):
        before = (spool.batches, spool.events, spool.bytes)
        rows_before = [b.seq for b in spool.read_from(0, 10**6)]
        try:
            seqs += spool.append_many([(f"{tag}{n}-{k}", 5, BLOB, 1.0) for k in range(4)])
        except SpoolFull as exc:
            # Rolled back whole: no row of the group, totals as the file says.
            assert [b.seq for b in spool.read_from(0, 10**6)] == rows_before
            assert (spool.batches, spool.events, spool.bytes) == before
            assert spool.stats().batches == before[0]
            assert spool.stats().events == before[1]
            return seqs, exc
    raise AssertionError("the disk never filled up")


def test_a_write_past_max_page_count_is_spool_full_and_changes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3")
    spool.append("first", 5, BLOB, 1.0)
    spool.set_max_pages(60)
    seqs, full = fill(spool, "a")
    assert seqs, "some batches fit before the limit"
    assert isinstance(full.__cause__, sqlite3.OperationalError)
    assert full.path == spool.path and "full" in full.problem
    # Deliveries are recorded on the full spool, and their room is used again.
    spool.delete(seqs[: len(seqs) // 2])
    assert spool.append_many([("again", 5, BLOB, 2.0)])
    # A refusal moves a batch within the file: recordable too.
    spool.bury(seqs[-1], 400, "bad", max_bytes=10**6)
    assert spool.stats().dead_letters == 1
    spool.close()
    again = Spool(tmp_path / "s.sqlite3")
    assert (again.batches, again.events, again.bytes) == again._totals("batches")
    again.close()


def test_a_mixed_write_that_fails_keeps_its_deletions_undone_too(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3")
    spool.set_max_pages(40)
    seqs, _ = fill(spool, "a")
    stats = spool.stats()
    # One transaction: a deletion freeing far less than a large append needs.
    with pytest.raises(SpoolFull):
        spool.write(append=[("big", 1, os.urandom(200_000), 3.0)], delete=seqs[:1])
    assert spool.stats() == stats
    assert spool.read_from(0, 1)[0].seq == seqs[0]
    assert (spool.batches, spool.events, spool.bytes) == (stats.batches, stats.events, stats.bytes)


def test_a_full_file_system_records_deliveries_and_gets_its_room_back(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "disk", 4 * 1024**2) as disk:
        spool = Spool(disk / "s.sqlite3")
        assert spool.hold_reserve(reserve_size(free_bytes(disk)))
        assert spool.reserve_path.stat().st_size == reserve_size(4 * 1024**2)
        try:
            for round_ in range(3):
                _, full = fill(spool, f"r{round_}")
                assert full.free_bytes is not None and full.free_bytes < 64 * 1024
                held = [b.seq for b in spool.read_from(0, 10**6)]
                # The reserve goes back to the file system: room to record deliveries.
                spool.reclaim()
                assert not spool.reserve_path.exists()
                # New batches wait until it is held again: a disk filled without it
                # could not record the deliveries that free it.
                with pytest.raises(SpoolFull, match="reserve"):
                    spool.append_many([("early", 5, BLOB, 2.0)])
                spool.delete(held[: len(held) // 2])
                # The deleted batches' pages go back to the file system.
                free = spool.reclaim()
                assert free is not None and free > 1024**2
                assert spool.reserve_path.exists(), "the reserve is held again"
                assert spool.batches == len(held) - len(held) // 2
                assert spool.append_many([(f"after{round_}", 5, BLOB, 2.0)])
        finally:
            spool.close()


def test_only_full_or_failing_disks_count_as_full(tmp_path: Path) -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EIO, "Input/output error"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    db = sqlite3.connect(tmp_path / "x.sqlite3")
    with pytest.raises(sqlite3.OperationalError) as missing:
        db.execute("SELECT * FROM nowhere")
    assert not is_disk_full(missing.value)
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(100_000),))
    assert is_disk_full(full.value)
    db.close()


@given(st.integers(0, 2**50), st.integers(0, 2**40), st.integers(1, 2**45))
def test_the_shortfall_is_what_a_full_spool_would_lack(
    free: int, spool_bytes: int, max_bytes: int
) -> None:
    missing = disk_shortfall(free, spool_bytes, max_bytes)
    assert missing >= 0
    assert (missing == 0) == (free + spool_bytes >= max_bytes)
    if missing:
        assert free + spool_bytes + missing == max_bytes


@given(st.integers(0, 2**50), st.sampled_from([512, 1024, 4096, 65536]))
def test_the_reserve_holds_what_a_checkpoint_adds(free: int, page_size: int) -> None:
    reserve = reserve_size(free)
    assert RESERVE_MIN <= reserve <= RESERVE_MAX
    pages = checkpoint_pages(reserve, page_size)
    assert 16 <= pages <= CHECKPOINT_PAGES_MAX
    if reserve // page_size >= 32:
        assert pages * page_size * 2 <= reserve


def start_warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        line for line in logs if "less free space than delivery.spool_max_bytes" in line["event"]
    ]


async def test_a_file_system_smaller_than_spool_max_bytes_is_warned_about_at_start(
    tmp_path: Path,
) -> None:
    spool_max = 2 * free_bytes(tmp_path) + 10**9
    delivery = Delivery(
        DeliveryConfig(spool_path=str(tmp_path / "s.sqlite3"), spool_max_bytes=spool_max),
        RelayMetrics(),
    )
    with capture_logs() as logs:
        await delivery.open()
    await delivery.close()
    [warning] = start_warnings(logs)
    assert warning["log_level"] == "warning"
    assert warning["spool"] == str(tmp_path / "s.sqlite3")
    assert warning["spool_max_bytes"] == spool_max
    assert 0 < warning["free_bytes"] < spool_max
    assert f"lower delivery.spool_max_bytes to {warning['free_bytes']} or less" in warning["fix"]


async def test_no_warning_when_the_spool_fits_and_the_reserve_is_taken(tmp_path: Path) -> None:
    delivery = Delivery(
        DeliveryConfig(spool_path=str(tmp_path / "s.sqlite3"), spool_max_bytes=1024**2),
        RelayMetrics(),
    )
    with capture_logs() as logs:
        await delivery.open()
    await delivery.close()
    assert start_warnings(logs) == []
    # Its size follows the free space at start (which other programs change meanwhile).
    assert RESERVE_MIN <= (tmp_path / "s.sqlite3-reserve").stat().st_size <= RESERVE_MAX


def legacy_spool(path: Path, rows: int) -> None:
    """A spool as the relay made them before ``reclaim``: no auto_vacuum."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    db.executescript(_SCHEMA)
    for n in range(rows):
        db.execute(
            "INSERT INTO batches (batch_id, created, count, events) VALUES (?, 0, 1, x'5b315d')",
            (f"old{n}",),
        )
    db.commit()
    db.close()


def auto_vacuum(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        (mode,) = db.execute("PRAGMA auto_vacuum").fetchone()
        return int(mode)
    finally:
        db.close()


def test_an_empty_spool_from_before_is_converted_a_full_one_kept_as_it_is(
    tmp_path: Path,
) -> None:
    empty, full = tmp_path / "empty.sqlite3", tmp_path / "full.sqlite3"
    legacy_spool(empty, 0)
    legacy_spool(full, 3)
    assert auto_vacuum(empty) == auto_vacuum(full) == 0
    Spool(empty).close()
    spool = Spool(full)
    assert [b.batch_id for b in spool.read_from(0, 10)] == ["old0", "old1", "old2"]
    # Without auto_vacuum, reclaim has no pages to hand back, and still works.
    spool.delete([b.seq for b in spool.read_from(0, 10)])
    assert spool.reclaim() is not None
    spool.close()
    assert auto_vacuum(empty) == 2
    assert auto_vacuum(full) == 0
