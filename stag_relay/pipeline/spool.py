"""The spool: an SQLite file that holds every batch from before its first send until
STAG accepts it, and the batches STAG refused (dead letters).

Plain blocking code: the relay calls it from one worker thread at a time (see
``delivery.py``), and the ``stag-relay spool`` commands call it directly.

The rules it keeps:

- a batch is committed (WAL, ``synchronous=NORMAL``: durable when the process dies,
  which is what a crash or ``kill -9`` is) before it is first sent or acknowledged;
- rows leave in ``seq`` order, oldest first, and keep their ``batch_id`` for life, so
  STAG's ``Idempotency-Key`` deduplicates a batch delivered just before a crash;
- a file that is not ours, or corrupt, is never read nor silently replaced: opening
  it raises ``SpoolCorrupt`` and ``open_spool`` moves it aside;
- a full or failing disk (``SQLITE_FULL``, an I/O error, ``ENOSPC``) is a full spool:
  the write is rolled back whole, the totals are untouched and ``SpoolFull`` says so.
  The relay holds a reserve file beside the spool so that, then, it can still record
  deliveries and give the freed pages back to the file system (``reclaim``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import attrs

# "STAG" in ASCII: marks the file as ours (PRAGMA application_id).
APPLICATION_ID: Final = 0x53544147
SCHEMA_VERSION: Final = 1

T = TypeVar("T")

# SQLite's primary result codes (the low byte of an extended code) that mean the disk
# is full or failing: https://www.sqlite.org/rescode.html
SQLITE_IOERR: Final = 10
SQLITE_FULL: Final = 13
# OSErrors that mean the same, from the reserve file.
DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})

# The reserve: room given back to the file system on a full disk so the spool can still
# record deliveries and fold its WAL into the file. At most 64 MiB, a sixteenth of the
# free space at start on a small file system.
RESERVE_MAX: Final = 64 * 1024**2
RESERVE_MIN: Final = 256 * 1024
# The WAL is checkpointed every 8192 pages (32 MiB) at most, and never past half the
# reserve: the reserve must hold what a checkpoint adds to the file.
CHECKPOINT_PAGES_MAX: Final = 8192

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    created REAL NOT NULL,
    count INTEGER NOT NULL,
    events BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    created REAL NOT NULL,
    failed REAL NOT NULL,
    count INTEGER NOT NULL,
    status INTEGER NOT NULL,
    answer TEXT NOT NULL,
    events BLOB NOT NULL
);
"""


class SpoolCorrupt(Exception):
    """The file is not a stag-relay spool, or it is damaged."""


class SpoolFull(Exception):
    """The disk under the spool is full or failing; the write was rolled back whole."""

    def __init__(self, path: Path, free_bytes: int | None, problem: str) -> None:
        super().__init__(f"{path}: {problem} (free: {free_bytes} bytes)")
        self.path = path
        self.free_bytes = free_bytes
        self.problem = problem


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means the disk is full or failing (the spool is then full)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in (SQLITE_FULL, SQLITE_IOERR)
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def reserve_size(free_bytes: int) -> int:
    """The reserve for a file system with ``free_bytes`` free at start."""
    return max(RESERVE_MIN, min(RESERVE_MAX, free_bytes // 16))


def checkpoint_pages(reserve: int, page_size: int) -> int:
    """WAL pages between checkpoints: a checkpoint grows the file by at most that."""
    return max(16, min(CHECKPOINT_PAGES_MAX, reserve // page_size // 2))


def disk_shortfall(free_bytes: int, spool_bytes: int, max_bytes: int) -> int:
    """How far the file system is from holding a spool of ``max_bytes`` (0: it can),
    given ``free_bytes`` free and ``spool_bytes`` already in the spool."""
    return max(0, max_bytes - spool_bytes - free_bytes)


@attrs.frozen
class SpooledBatch:
    seq: int
    batch_id: str
    created: float
    count: int
    # The events as one JSON array, exactly as they go to STAG.
    events: bytes


@attrs.frozen
class DeadLetter:
    seq: int
    batch_id: str
    created: float
    failed: float
    count: int
    status: int
    answer: str
    size: int


@attrs.frozen
class Written:
    """What ``Spool.write`` did: the new batches' ``seq``s, and the spool after it."""

    seqs: list[int]
    oldest_created: float | None
    dead_letters: int


@attrs.frozen
class SpoolStats:
    batches: int
    events: int
    bytes: int
    oldest_created: float | None
    dead_letters: int
    dead_letter_events: int
    dead_letter_bytes: int


class Spool:
    """One spool file. Not thread-safe: one caller at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.reserve_path = self.path.with_name(self.path.name + "-reserve")
        # Bytes of the reserve this spool keeps (0: none, as for `stag-relay spool`).
        self._reserve = 0
        self._reserve_held = False
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._check_and_prepare()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise SpoolCorrupt(f"{self.path}: {exc}") from exc
        # Totals kept in memory: the hot path asks "is it full?" per batch.
        self.batches, self.events, self.bytes = self._totals("batches")
        self._dead_letters = self._totals("dead_letters")[0]

    def _check_and_prepare(self) -> None:
        db = self._db
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if app_id == 0 and not tables:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Freed pages can go back to the file system (``reclaim``); only settable
            # before the first table.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        elif app_id != APPLICATION_ID:
            raise sqlite3.DatabaseError("not a stag-relay spool (foreign SQLite database)")
        else:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"spool schema version {version} is not supported")
            (check,) = db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        db.execute("PRAGMA journal_mode = WAL")
        # Durable against the process dying (the WAL is written before commit returns);
        # FULL would also survive power loss, at an fsync per commit.
        db.execute("PRAGMA synchronous = NORMAL")
        # A checkpoint (writing the WAL back, with an fsync) every 8192 pages (32 MiB),
        # not SQLite's 1000: at tens of thousands of events a second the default
        # checkpointed several times a second, a cost the flood benchmark shows
        # (docs/performance.md). The WAL file stays near 32 MiB.
        db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES_MAX}")
        # Deleting a row must not rewrite every freed page (the default on some builds):
        # on a full disk the WAL has no room for that, and deletions must still commit.
        db.execute("PRAGMA secure_delete = FAST")
        db.executescript(_SCHEMA)
        (vacuums,) = db.execute("PRAGMA auto_vacuum").fetchone()
        if (
            vacuums != 2
            and not db.execute(
                "SELECT 1 FROM batches UNION ALL SELECT 1 FROM dead_letters LIMIT 1"
            ).fetchone()
        ):
            # A spool from before ``reclaim``, empty: cheap to convert now. Another
            # process using the file (busy) is no damage: converted at a later start.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            with contextlib.suppress(sqlite3.OperationalError):
                db.execute("VACUUM")

    def _totals(self, table: str) -> tuple[int, int, int]:
        row = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(LENGTH(events)), 0) "
            f"FROM {table}"
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (it does on SQLITE_FULL at commit).
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _disk_full_is_spool_full(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if is_disk_full(exc):
                raise SpoolFull(self.path, self.free_bytes(), str(exc)) from exc
            raise

    def append(self, batch_id: str, count: int, events: bytes, created: float) -> int:
        """Commit one batch; return its ``seq``."""
        return self.append_many([(batch_id, count, events, created)])[0]

    def append_many(self, rows: list[tuple[str, int, bytes, float]]) -> list[int]:
        """Commit (batch_id, count, events, created) rows in one transaction, in order;
        return their ``seq``s."""
        return self.write(append=rows).seqs

    def delete(self, seqs: list[int]) -> None:
        """Forget delivered (or dropped) batches."""
        if seqs:
            self.write(delete=seqs)

    def bury(self, seq: int, status: int, answer: str, max_bytes: int) -> None:
        """Move a batch STAG refused to the dead letters, keeping them under ``max_bytes``."""
        self.write(bury=[(seq, status, answer)], dead_letter_max_bytes=max_bytes)

    def write(
        self,
        *,
        append: Sequence[tuple[str, int, bytes, float]] = (),
        delete: Sequence[int] = (),
        bury: Sequence[tuple[int, int, str]] = (),
        dead_letter_max_bytes: int | None = None,
    ) -> Written:
        """One transaction: forget ``delete``d batches, move ``bury`` (seq, status, answer)
        to the dead letters (kept under ``dead_letter_max_bytes``, if given), commit ``append``
        (batch_id, count, events, created) rows in order. Returns their ``seq``s and what
        the relay shows about the spool afterwards.

        One call, one commit and a fixed number of statements for all of it is what keeps
        the spool's cost small: the relay calls this from a thread, each call is a thread
        hand-off, and each statement gives the GIL up and waits to take it back from the
        event loop.
        """
        if append and not self._refill_reserve():
            # New batches only while the reserve is held: without it, a full disk could
            # not even record the deliveries that would make room again.
            raise SpoolFull(
                self.path,
                self.free_bytes(),
                f"no room to hold the reserve ({self.reserve_path}, {self._reserve} bytes) "
                "beside new batches",
            )
        seqs: list[int] = []
        # Totals change only once the transaction has committed: a rolled-back write
        # (a full disk) leaves them as the file is.
        batches = events_delta = size_delta = 0
        with self._disk_full_is_spool_full(), self._transaction() as db:
            for chunk in _chunks(delete):
                gone = _in(len(chunk))
                n, events, size = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(LENGTH(events)), 0) "
                    f"FROM batches WHERE seq IN {gone}",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM batches WHERE seq IN {gone}", chunk)
                batches -= n
                events_delta -= events
                size_delta -= size
            for seq, status, answer in bury:
                moved = self._bury_row(db, seq, status, answer, dead_letter_max_bytes)
                if moved is not None:
                    batches -= 1
                    events_delta -= moved[0]
                    size_delta -= moved[1]
            for rows in _chunks(append):
                cursor = db.execute(
                    "INSERT INTO batches (batch_id, created, count, events) VALUES "
                    + ", ".join(["(?, ?, ?, ?)"] * len(rows)),
                    [v for batch_id, n, events, at in rows for v in (batch_id, at, n, events)],
                )
                # One statement, one writer: AUTOINCREMENT numbered its rows in a row.
                assert cursor.lastrowid is not None
                seqs.extend(range(cursor.lastrowid - len(rows) + 1, cursor.lastrowid + 1))
                batches += len(rows)
                events_delta += sum(n for _, n, _, _ in rows)
                size_delta += sum(len(events) for _, _, events, _ in rows)
            (oldest,) = db.execute("SELECT MIN(created) FROM batches").fetchone()
            dead = self._dead_letters
            if bury:
                (dead,) = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        self.batches += batches
        self.events += events_delta
        self.bytes += size_delta
        self._dead_letters = dead
        return Written(seqs, oldest, self._dead_letters)

    def _bury_row(
        self, db: sqlite3.Connection, seq: int, status: int, answer: str, max_bytes: int | None
    ) -> tuple[int, int] | None:
        """Move one batch to the dead letters; returns its (events, bytes), if it was there."""
        row = db.execute(
            "DELETE FROM batches WHERE seq = ? RETURNING batch_id, created, count, events",
            (seq,),
        ).fetchone()
        if row is None:
            return None
        db.execute(
            "INSERT INTO dead_letters (batch_id, created, failed, count, status, answer, "
            "events) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row[0], row[1], time.time(), row[2], status, answer, row[3]),
        )
        moved = (int(row[2]), len(row[3]))
        if max_bytes is None:
            return moved
        # Oldest dead letters go first when the table outgrows its bound.
        (total,) = db.execute(
            "SELECT COALESCE(SUM(LENGTH(events)), 0) FROM dead_letters"
        ).fetchone()
        while total > max_bytes:
            oldest = db.execute(
                "DELETE FROM dead_letters WHERE seq = (SELECT MIN(seq) FROM dead_letters) "
                "RETURNING LENGTH(events)"
            ).fetchone()
            if oldest is None:
                break
            total -= int(oldest[0])
        return moved

    def read_from(self, seq: int, limit: int) -> list[SpooledBatch]:
        """Up to ``limit`` batches with ``seq`` at least ``seq``, oldest first."""
        with self._disk_full_is_spool_full():
            rows = self._db.execute(
                "SELECT seq, batch_id, created, count, events FROM batches "
                "WHERE seq >= ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [SpooledBatch(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def last_seq(self) -> int:
        """The newest batch's ``seq`` (0 when empty); new batches always get a larger one."""
        (seq,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM batches").fetchone()
        return int(seq)

    def oldest(self, exclude: set[int], limit: int = 64) -> list[SpooledBatch]:
        """The oldest batches not in ``exclude`` (those being sent right now)."""
        found: list[SpooledBatch] = []
        start = 0
        while len(found) < limit:
            page = self.read_from(start, limit + len(exclude))
            if not page:
                break
            found.extend(b for b in page if b.seq not in exclude)
            start = page[-1].seq + 1
        return found[:limit]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute(
            "SELECT seq, batch_id, created, failed, count, status, answer, LENGTH(events) "
            "FROM dead_letters ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def requeue_dead(self) -> int:
        """Put every dead letter back in line (at the end), same batch ids; return how many."""
        with self._disk_full_is_spool_full(), self._transaction() as db:
            rows = db.execute(
                "DELETE FROM dead_letters RETURNING batch_id, created, count, events"
            ).fetchall()
            for batch_id, created, count, events in sorted(rows, key=lambda r: r[1]):
                db.execute(
                    "INSERT INTO batches (batch_id, created, count, events) VALUES (?, ?, ?, ?)",
                    (batch_id, created, count, events),
                )
        self.batches, self.events, self.bytes = self._totals("batches")
        self._dead_letters = 0
        return len(rows)

    def adopt(self, other: Path) -> tuple[int, int]:
        """Move every batch and dead letter of the spool file ``other`` into this one,
        oldest first, batch ids kept, in one transaction; then delete ``other``.

        Returns (batches, dead letters) moved. Raises ``SpoolCorrupt`` when ``other`` is
        not a good spool (it is left where it is). A crash between the commit and the
        delete leaves the batches in both files: sent twice with the same batch id,
        which STAG's ``Idempotency-Key`` deduplicates, rather than lost.
        """
        # Opening checks that the file is ours and whole, and closing folds in its WAL.
        Spool(other).close()
        self._db.execute("ATTACH DATABASE ? AS orphan", (os.fspath(other),))
        try:
            with self._transaction() as db:
                batches = db.execute(
                    "INSERT INTO batches (batch_id, created, count, events) "
                    "SELECT batch_id, created, count, events FROM orphan.batches ORDER BY seq"
                ).rowcount
                dead = db.execute(
                    "INSERT INTO dead_letters "
                    "(batch_id, created, failed, count, status, answer, events) "
                    "SELECT batch_id, created, failed, count, status, answer, events "
                    "FROM orphan.dead_letters ORDER BY seq"
                ).rowcount
        finally:
            self._db.execute("DETACH DATABASE orphan")
        for side in ("", "-wal", "-shm", "-reserve"):
            with contextlib.suppress(FileNotFoundError):
                other.with_name(other.name + side).unlink()
        self.batches, self.events, self.bytes = self._totals("batches")
        self._dead_letters = self._totals("dead_letters")[0]
        return batches, dead

    def free_bytes(self) -> int | None:
        """Bytes free for us on the spool's file system (``None``: cannot tell)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def hold_reserve(self, size: int) -> bool:
        """Keep ``size`` bytes allocated beside the spool (``<path>-reserve``), to give
        back on a full disk, and checkpoint the WAL often enough that the reserve holds
        what a checkpoint adds to the file. False when there is no room for it now."""
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        self._db.execute(f"PRAGMA wal_autocheckpoint = {checkpoint_pages(size, page_size)}")
        self._reserve = size
        return self._refill_reserve()

    def _refill_reserve(self) -> bool:
        """Hold the reserve if it is not held; whether it is held now."""
        if not self._reserve or self._reserve_held:
            return True
        with contextlib.suppress(OSError):
            if self.reserve_path.stat().st_size >= self._reserve:
                self._reserve_held = True
                return True
        free = self.free_bytes()
        if free is None:
            # Cannot tell (statvfs failed): hold nothing back on a guess.
            return True
        # Only with room to spare: the reserve must not be what fills the disk.
        if free < 2 * self._reserve:
            return False
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve)
            finally:
                os.close(fd)
        except OSError as exc:
            self._release_reserve()
            if is_disk_full(exc):
                return False
            # This file system cannot keep one (not a matter of room): do without.
            self._reserve = 0
            return True
        self._reserve_held = True
        return True

    @property
    def reserve_bytes(self) -> int:
        """The reserve this spool keeps (0: none)."""
        return self._reserve

    def _release_reserve(self) -> None:
        self._reserve_held = False
        with contextlib.suppress(FileNotFoundError):
            self.reserve_path.unlink()

    def has_room(self) -> bool:
        """Whether the reserve is held with as much again free (or free space is unknown)."""
        if not self._refill_reserve():
            return False
        free = self.free_bytes()
        return free is None or free >= max(self._reserve, RESERVE_MIN)

    def reclaim(self) -> int | None:
        """On a full disk: give the reserve back, fold the WAL into the file and empty
        it, hand the pages of deleted batches back to the file system, then hold the
        reserve again if there is room. Returns the free bytes after. Never raises for
        a full disk: whatever could not be done now is tried again next time."""
        self._release_reserve()
        self._checkpoint()
        (vacuums,) = self._db.execute("PRAGMA auto_vacuum").fetchone()
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        # In steps the WAL (and the reserve) can hold: moving a page writes it again.
        step = max(16, max(self._reserve, RESERVE_MIN) // page_size // 4)
        while vacuums == 2:
            (free_pages,) = self._db.execute("PRAGMA freelist_count").fetchone()
            if not free_pages:
                break
            try:
                self._db.execute(f"PRAGMA incremental_vacuum({step})").fetchall()
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                break
            if not self._checkpoint():
                break
        self._refill_reserve()
        return self.free_bytes()

    def _checkpoint(self) -> bool:
        """Fold the WAL into the file and truncate it; False when that could not finish."""
        try:
            (busy, _, _) = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            return False
        return not busy

    def set_max_pages(self, pages: int) -> None:
        """SQLite's hard limit on the file's pages: a write past it fails like a full
        disk. For tests that need a full disk without making one."""
        self._db.execute(f"PRAGMA max_page_count = {int(pages)}")

    def stats(self) -> SpoolStats:
        (oldest,) = self._db.execute("SELECT MIN(created) FROM batches").fetchone()
        dead, dead_events, dead_bytes = self._totals("dead_letters")
        return SpoolStats(
            self.batches, self.events, self.bytes, oldest, dead, dead_events, dead_bytes
        )

    def close(self) -> None:
        # The reserve stays: the next start on a full disk still has it.
        self._db.close()


def quarantine(path: Path) -> Path:
    """Move a spool file (and its WAL files) aside as ``<path>.corrupt-<time>``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    path.rename(target)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target


def open_spool(path: str | os.PathLike[str]) -> tuple[Spool, Path | None]:
    """Open the spool at ``path``; a corrupt or foreign file is moved aside first.

    Returns the spool and, when a file was set aside, where it went.
    """
    spool_path = Path(path)
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Spool(spool_path), None
    except SpoolCorrupt:
        moved = quarantine(spool_path)
        return Spool(spool_path), moved


# Rows per statement: SQLite allows 32,766 parameters (999 before 3.32); 4 per row.
_CHUNK: Final = 200


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _in(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"
