"""prometheus-client's multiprocess files, kept few: a dead worker's counters are
folded into one archive file per kind.

Every worker process writes its metric values to files named for its pid in the
shared directory, and every scrape reads all of them. A dead worker's live gauges
leave with it (``mark_process_dead``), but its counters and histograms must stay in
the totals, so its files stayed too: a relay restarting a crashing worker for a day
would make each scrape read thousands of files. The supervisor now adds a dead
worker's values into ``counter_archive.db`` / ``histogram_archive.db`` and removes
its files.

The rule that keeps the totals right: a scrape holds a shared lock on ``LOCK_FILE``
while it reads the files, and folding holds it exclusively, so no scrape sees a dead
worker's values twice (archived and not yet removed) or not at all (a counter going
down, which Prometheus takes for a reset).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from prometheus_client.mmap_dict import MmapedDict

LOCK_FILE: Final = ".metrics.lock"
# The kinds whose values outlive their process; gauges are live* and go with it.
_KEPT_KINDS: Final = ("counter", "histogram")


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
