"""workers.py: a worker's role, its spool files, and the one view of all workers."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from stag_relay.service.workers import (
    WorkerRole,
    check_port_free,
    combine_states,
    open_shared_listeners,
    orphan_spools,
    publish_state,
    read_states,
    spool_path_for,
    state_file,
)


def role(index: int, count: int, tmp_path: Path) -> WorkerRole:
    return WorkerRole(index, count, tmp_path)


def test_role_comes_from_the_supervisors_environment(tmp_path: Path) -> None:
    environ = {
        "STAG_RELAY_WORKER": "1/3",
        "STAG_RELAY_WORKER_DIR": str(tmp_path),
        "STAG_RELAY_SUPERVISOR_PID": "4242",
    }
    assert WorkerRole.from_environ(environ) == WorkerRole(1, 3, tmp_path, 4242)
    assert WorkerRole.from_environ({}) is None


@pytest.mark.parametrize("value", ["", "1", "3/3", "a/b", "-1/2", "1/2/3"])
def test_a_garbled_role_is_an_error_that_says_what_to_do(value: str, tmp_path: Path) -> None:
    environ = {"STAG_RELAY_WORKER": value, "STAG_RELAY_WORKER_DIR": str(tmp_path)}
    with pytest.raises(ValueError, match="STAG_RELAY_WORKER"):
        WorkerRole.from_environ(environ)


def test_each_worker_has_its_own_spool_file(tmp_path: Path) -> None:
    assert spool_path_for("/var/spool.db", role(2, 4, tmp_path)) == "/var/spool.db.2"
    assert spool_path_for("/var/spool.db", None) == "/var/spool.db"
    assert spool_path_for("", role(2, 4, tmp_path)) == ""


def touch(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).write_bytes(b"")


def test_orphan_spools_go_to_exactly_one_worker(tmp_path: Path) -> None:
    # A previous run with 5 workers, and before that a single process.
    touch(tmp_path, "s.db", "s.db.0", "s.db.1", "s.db.2", "s.db.3", "s.db.4")
    touch(tmp_path, "s.db.corrupt-20261126T000000", "s.db.0-wal", "other.db.7")
    path = str(tmp_path / "s.db")
    adopted = [orphan_spools(path, role(i, 2, tmp_path)) for i in range(2)]
    assert [[p.name for p in paths] for paths in adopted] == [
        ["s.db", "s.db.2", "s.db.4"],
        ["s.db.3"],
    ]
    # Back to one process: it takes every worker's file.
    assert [p.name for p in orphan_spools(path, None)] == [f"s.db.{k}" for k in range(5)]
    assert orphan_spools("", None) == []
    assert orphan_spools(str(tmp_path / "missing" / "s.db"), None) == []


def test_states_are_published_whole_and_read_in_index_order(tmp_path: Path) -> None:
    publish_state(tmp_path, state_file(1), {"index": 1, "pid": 11})
    publish_state(tmp_path, state_file(0), {"index": 0, "pid": 10})
    (tmp_path / state_file(2)).write_bytes(b"{half a fi")  # a writer died mid-write
    touch(tmp_path, "supervisor.json", "counter_1.db")
    assert read_states(tmp_path) == [{"index": 0, "pid": 10}, {"index": 1, "pid": 11}]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_threads_of_one_process_writing_a_state_at_once_each_land_whole(
    tmp_path: Path,
) -> None:
    # A worker's periodic write and its drain's write run in threads, and may overlap.
    failures: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            for n in range(200):
                publish_state(tmp_path, state_file(0), {"index": 0, "pid": writer, "n": n})
        except BaseException as exc:  # the thread's error, for the test to report
            failures.append(exc)

    publish_state(tmp_path, state_file(0), {"index": 0, "pid": -1, "n": -1})
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in writers:
        thread.start()
    while any(thread.is_alive() for thread in writers):
        # Never half a file: every read parses (read_states would skip it silently).
        json.loads((tmp_path / state_file(0)).read_bytes())
    for thread in writers:
        thread.join()
    assert failures == []
    assert json.loads((tmp_path / state_file(0)).read_bytes())["n"] == 199
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def state(index: int, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "index": index,
        "pid": 100 + index,
        "draining": False,
        "connections": 3,
        "sessions": 4,
        "events_in": 10,
        "channel_depth": 5,
        "channel_capacity": 1024,
        "stag": {
            "state": "reachable",
            "last_status": 200,
            "reachable": True,
            "last_success": 1000.0 + index,
            "last_failure": None,
            "consecutive_failures": 0,
            "events_sent": 7,
            "batches_sent": 2,
        },
        "spool": None,
    }
    base.update(changes)
    return base


def test_combined_status_totals_the_workers_and_lists_each() -> None:
    failing = {**state(1)["stag"], "state": "unreachable", "reachable": False, "last_failure": 5.0}
    failing["consecutive_failures"] = 3
    combined = combine_states([state(0), state(1, stag=failing, draining=True)])
    assert combined["connections"] == 6
    assert combined["channel_depth"] == 10
    assert combined["channel_capacity"] == 2048
    assert combined["draining"] is True
    assert combined["stag"]["reachable"] is False
    assert combined["stag"]["state"] == "unreachable"
    assert combined["stag"]["last_success"] == 1001.0
    assert combined["stag"]["last_failure"] == 5.0
    assert combined["stag"]["consecutive_failures"] == 3
    assert combined["stag"]["events_sent"] == 14
    assert combined["spool"] is None
    assert combined["workers"][1] == {
        "index": 1,
        "pid": 101,
        "draining": True,
        "connections": 3,
        "channel_depth": 5,
        "last_stag_success": 1001.0,
    }


def test_combined_status_before_any_worker_tried_stag() -> None:
    untried = {
        **state(0)["stag"],
        "state": "unknown",
        "last_status": None,
        "reachable": None,
        "last_success": None,
    }
    combined = combine_states([state(0, stag=untried), state(1, stag=untried)])
    assert combined["stag"]["reachable"] is None
    assert combined["stag"]["state"] == "unknown"
    assert combined["stag"]["last_status"] is None
    assert combined["stag"]["last_success"] is None


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (("unknown", "reachable", "unreachable", "misconfigured"), ("misconfigured", 404)),
        (("misconfigured", "unreachable", "reachable"), ("misconfigured", 404)),
        (("reachable", "unreachable", "unknown"), ("unreachable", 503)),
        (("reachable", "unknown"), ("reachable", 200)),
    ],
)
def test_combined_stag_state_is_the_worst_with_its_status(
    states: tuple[str, ...], expected: tuple[str, int]
) -> None:
    # A status that belongs to each state, so the combined one shows which worker it is from.
    status = {"unknown": None, "reachable": 200, "unreachable": 503, "misconfigured": 404}
    workers = [
        state(n, stag={**state(n)["stag"], "state": name, "last_status": status[name]})
        for n, name in enumerate(states)
    ]
    combined = combine_states(workers)["stag"]
    assert (combined["state"], combined["last_status"]) == expected


def test_combined_spools_add_up() -> None:
    def spool(n: int) -> dict[str, Any]:
        return {
            "path": f"s.db.{n}",
            "batches": n,
            "events": 10 * n,
            "bytes": 100 * n,
            "oldest_batch_age_seconds": float(n),
            "dead_letters": 1,
        }

    combined = combine_states([state(0, spool=spool(1)), state(1, spool=spool(2))])
    assert combined["spool"] == {
        "batches": 3,
        "events": 30,
        "bytes": 300,
        "dead_letters": 2,
        "oldest_batch_age_seconds": 2.0,
        "files": ["s.db.1", "s.db.2"],
    }


async def test_shared_listeners_take_the_same_port_and_both_accept() -> None:
    first = await open_shared_listeners("127.0.0.1", 0)
    port = first[0].socket.getsockname()[1]
    second = await open_shared_listeners("127.0.0.1", port)
    try:
        assert second[0].socket.getsockname()[1] == port
        # Anything not SO_REUSEPORT is refused, and the port check says it is in use.
        with pytest.raises(OSError):
            check_port_free("127.0.0.1", port)
    finally:
        for listener in first + second:
            await listener.aclose()
    assert check_port_free("127.0.0.1", port) == port
    assert check_port_free("127.0.0.1", 0) > 0
    await trio.lowlevel.checkpoint()


def test_a_workers_batches_are_its_share_of_batch_max_size(tmp_path: Path) -> None:
    from stag_relay.service.workers import worker_batch_size

    assert worker_batch_size(100, None) == 100
    assert worker_batch_size(100, role(0, 2, tmp_path)) == 50
    assert worker_batch_size(100, role(1, 3, tmp_path)) == 34
    assert worker_batch_size(5, role(0, 8, tmp_path)) == 1
