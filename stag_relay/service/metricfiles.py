"""prometheus-client's multiprocess files, kept few: a dead worker's counters are
folded into one archive file per kind.

Every worker process writes its metric values to files named for its pid in the
shared directory, and every scrape reads all of them. A dead worker's live gauges
leave with it (``mark_process_dead``), but its counters and histograms must stay in
the totals. Keeping its files would do that, but a relay restarting a crashing worker
for a day would make each scrape read thousands of them; so the supervisor adds a
dead worker's values into ``counter_archive.db`` / ``histogram_archive.db`` and
removes its files.

The rule that keeps the totals right: a scrape holds a shared lock on ``LOCK_FILE``
while it reads the files, and folding holds it exclusively, so no scrape sees a dead
worker's values twice (archived and not yet removed) or not at all (a counter going
down, which Prometheus takes for a reset).

And a scrape skips a file that a starting process has created but not yet sized:
prometheus-client's own collector fails the whole scrape on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

LOCK_FILE: Final = ".metrics.lock"
# The kinds whose values outlive their process; gauges are live* and go with it.
_KEPT_KINDS: Final = ("counter", "histogram")
# The header of a metric file (bytes used, padding), which prometheus-client reads first.
_HEADER_BYTES: Final = 8


class FileCollector(MultiProcessCollector):
    """prometheus-client's collector over the shared directory, without the files still
    being created.

    A process creates its file empty and sizes it a moment later (``MmapedDict``: open,
    then truncate to 64 KiB). A scrape that read it in between failed as a whole
    (``struct.error``), so /metrics and /status failed, on every worker, while a
    worker started (a restart under load, say). An empty file holds no values yet,
    and files only grow, so one seen sized reads whole.
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(None, path=str(directory))  # type: ignore[no-untyped-call]
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in self._directory.glob("*.db"):
            try:
                if path.stat().st_size >= _HEADER_BYTES:
                    files.append(os.fspath(path))
            except FileNotFoundError:
                # A dead process's live gauges, removed since the listing: not counted.
                continue
        merged: Iterable[Metric] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


@contextlib.contextmanager
def _locked(directory: Path, mode: int) -> Iterator[None]:
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, mode)
        yield


def reading(directory: Path | None) -> contextlib.AbstractContextManager[None]:
    """Hold while reading the files for a scrape (nothing to hold with one process)."""
    if directory is None:
        return contextlib.nullcontext()
    return _locked(directory, fcntl.LOCK_SH)


def fold_dead_process(directory: Path, pid: int) -> int:
    """Add process ``pid``'s counter and histogram values into the archive files and
    remove its files; returns how many files went. Call once ``pid`` has exited."""
    folded = 0
    with _locked(directory, fcntl.LOCK_EX):
        for kind in _KEPT_KINDS:
            dead = directory / f"{kind}_{pid}.db"
            if not dead.exists():
                continue
            values = MmapedDict.read_all_values_from_file(str(dead))  # type: ignore[no-untyped-call]
            archive = MmapedDict(str(directory / f"{kind}_archive.db"))  # type: ignore[no-untyped-call]
            try:
                for key, value, timestamp, _ in values:
                    total = archive.read_value(key)[0] + value  # type: ignore[no-untyped-call]
                    archive.write_value(key, total, timestamp)  # type: ignore[no-untyped-call]
            finally:
                archive.close()  # type: ignore[no-untyped-call]
            dead.unlink()
            folded += 1
    return folded
