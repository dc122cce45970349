"""Folding a dead worker's metric files: the totals a scrape shows do not move."""

from __future__ import annotations

import fcntl
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from stag_relay.service import metricfiles


def write(directory: Path, name: str, values: dict[tuple[str, str, str], float]) -> None:
    """A process's file as prometheus-client writes it: (metric, sample, status) -> value."""
    file = MmapedDict(str(directory / name))
    for (metric, sample, status), value in values.items():
        key = mmap_key(metric, sample, ["status"], [status], "help")
        file.write_value(key, value, 0.0)
    file.close()


def totals(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    files = sorted(str(f) for f in directory.glob("*.db"))
    merged: Any = MultiProcessCollector.merge(files, accumulate=True)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in merged
        for sample in family.samples
    }


def test_folding_keeps_every_total_and_leaves_one_file_per_kind(tmp_path: Path) -> None:
    for pid, n in ((101, 1.0), (102, 10.0), (103, 100.0)):
        write(
            tmp_path,
            f"counter_{pid}.db",
            {
                ("relay_packets", "relay_packets_total", "ok"): n,
                ("relay_packets", "relay_packets_total", f"only-{pid}"): 1.0,
            },
        )
        write(
            tmp_path,
            f"histogram_{pid}.db",
            {("relay_batch_size", "relay_batch_size_bucket", "ok"): n},
        )
    write(tmp_path, "gauge_livesum_103.db", {("relay_connections", "relay_connections", "ok"): 7.0})
    before = totals(tmp_path)
    assert before[("relay_packets_total", (("status", "ok"),))] == 111.0

    assert metricfiles.fold_dead_process(tmp_path, 101) == 2
    assert totals(tmp_path) == before
    assert metricfiles.fold_dead_process(tmp_path, 102) == 2
    assert totals(tmp_path) == before
    # Nothing of a process that left no files; a live process's gauges are not touched.
    assert metricfiles.fold_dead_process(tmp_path, 999) == 0
    assert sorted(p.name for p in tmp_path.glob("*.db")) == [
        "counter_103.db",
        "counter_archive.db",
        "gauge_livesum_103.db",
        "histogram_103.db",
        "histogram_archive.db",
    ]
    assert totals(tmp_path) == before


def exclusive_is_free(directory: Path) -> bool:
    """Whether a folder could take the lock now (another open file: flock locks are per
    open file, so this conflicts with a lock held in this very process)."""
    with open(directory / metricfiles.LOCK_FILE, "a") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_a_scrape_keeps_folding_out_while_it_reads(tmp_path: Path) -> None:
    with metricfiles.reading(tmp_path):
        assert not exclusive_is_free(tmp_path)
        # Scrapes do not exclude each other.
        with metricfiles.reading(tmp_path):
            pass
    assert exclusive_is_free(tmp_path)
    # One process alone has no directory and nothing to lock.
    with metricfiles.reading(None):
        pass


def collected(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metricfiles.FileCollector(directory).collect()
        for sample in family.samples
    }


def test_a_scrape_skips_the_file_of_a_process_that_is_creating_it(tmp_path: Path) -> None:
    write(tmp_path, "counter_101.db", {("relay_packets", "relay_packets_total", "ok"): 5.0})
    # What a starting process has for a moment: its file created, not yet sized.
    (tmp_path / "counter_102.db").touch()
    # prometheus-client's collector fails the whole scrape on it...
    with pytest.raises(struct.error):
        totals(tmp_path)
    # ...ours reads every file that holds values, and the empty one once it is sized.
    assert collected(tmp_path) == {("relay_packets_total", (("status", "ok"),)): 5.0}
    write(tmp_path, "counter_102.db", {("relay_packets", "relay_packets_total", "ok"): 2.0})
    assert collected(tmp_path) == {("relay_packets_total", (("status", "ok"),)): 7.0}
