"""server.workers: the supervisor's life from outside, as operators and systemd drive it.

Signals at awkward moments (while workers start, restart, reload or drain), a worker
that keeps dying, what /metrics and /status show once a worker has died, spool files
of a larger previous run, TLS, whole log lines, and the shared directory at exit.

Some tests hold a worker in its start-up, before it has installed its signal handlers:
a ``sitecustomize`` module on ``PYTHONPATH`` (which the supervisor passes on to its
workers) keeps each *worker* process waiting while the gate file is absent. That is
the window a real worker spends importing its modules, made as long as the test needs
instead of a few hundred milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme
from websockets.exceptions import InvalidStatus
from websockets.protocol import State
from websockets.sync.client import connect

from stag_relay.pipeline.spool import Spool
from tests.support.clients import connect_relay, pose_packet, stream_poses
from tests.support.relays import RelayProcess
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until
from tests.support.workerprocs import (
    gone,
    metric,
    open_on_both_workers,
    start_workers,
    status,
)

# --- helpers -------------------------------------------------------------------


def logged(relay: RelayProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The relay's log lines for ``event`` whose fields include ``fields``."""
    return [
        line
        for line in list(relay.lines)
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
    ]


def supervisor_logged(relay: RelayProcess, event: str) -> list[dict[str, Any]]:
    """Lines of the supervisor itself: a worker's lines all carry ``worker``."""
    return [line for line in logged(relay, event) if "worker" not in line]


def wait_logged(relay: RelayProcess, event: str, count: int = 1, **fields: Any) -> dict[str, Any]:
    """The ``count``-th line for ``event`` with ``fields``, once it is there."""
    poll_until(lambda: len(logged(relay, event, **fields)) >= count)
    return logged(relay, event, **fields)[count - 1]


def wait_ready(relay: RelayProcess) -> None:
    """Until the supervisor says every worker listens (or the relay has exited).

    Polls ``proc.poll()``: ``RelayProcess.wait_for_log`` can miss an exit that comes
    with the end of stderr, and then waits its whole timeout.
    """
    poll_until(lambda: supervisor_logged(relay, "relay ready") or relay.proc.poll() is not None)
    assert supervisor_logged(relay, "relay ready"), "".join(relay.raw)


def shared_directory(worker_pid: int) -> Path:
    """The supervisor's directory for this run, as it told the worker."""
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    values = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    return Path(os.fsdecode(values[b"STAG_RELAY_WORKER_DIR"]))


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def worker_pids(port: int) -> dict[int, int]:
    """index -> pid of the workers /status lists."""
    return {w["index"]: w["pid"] for w in status(port)["workers"]}


def no_tracebacks(relay: RelayProcess) -> None:
    assert "Traceback" not in "".join(relay.raw), "".join(relay.raw)


_GATE_MODULE = """\
import os, sys, time
_gate = os.environ.get("STAG_TEST_WORKER_GATE")
if (
    _gate
    and os.environ.get("STAG_RELAY_WORKER")
    and sys.orig_argv[1:3] == ["-m", "stag_relay"]
):
    while not os.path.exists(_gate):
        time.sleep(0.01)
"""


@attrs.define
class StartGate:
    """While closed, a worker that starts waits before it runs any of the relay's code."""

    directory: Path
    # Workers a test left waiting behind the gate: killed at teardown, not let through
    # (one whose supervisor is gone would never stop; see the test about that).
    held: list[int] = attrs.Factory(list)

    @property
    def file(self) -> Path:
        return self.directory / "open"

    def env(self) -> dict[str, str]:
        paths = [str(self.directory), os.environ.get("PYTHONPATH", "")]
        return {
            "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "STAG_TEST_WORKER_GATE": str(self.file),
        }

    def holds(self, pid: int) -> bool:
        """Whether ``pid`` is still a process started behind this gate (not a reused pid)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return f"STAG_TEST_WORKER_GATE={self.file}".encode() in environ.split(b"\0")

    def open(self) -> None:
        self.file.touch()

    def close(self) -> None:
        self.file.unlink(missing_ok=True)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[StartGate]:
    directory = tmp_path / "gate"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(_GATE_MODULE)
    start_gate = StartGate(directory)
    start_gate.open()
    try:
        yield start_gate
    finally:
        for pid in start_gate.held:
            if not gone(pid) and start_gate.holds(pid):
                os.kill(pid, signal.SIGKILL)
        start_gate.open()


def start_held(stag: StagServer, gate: StartGate, **env: str) -> tuple[RelayProcess, list[int]]:
    """Workers started behind the closed gate: the relay and the waiting workers' pids."""
    gate.close()
    relay = start_workers(stag, 2, **gate.env(), **env)
    started = [wait_logged(relay, "worker started", worker=i)["pid"] for i in (0, 1)]
    gate.held.extend(started)
    return relay, started


def restart_held(relay: RelayProcess, gate: StartGate, port: int) -> tuple[int, int]:
    """Kill worker 0 while the gate is closed: its pid, and its replacement's (waiting)."""
    victim = worker_pids(port)[0]
    gate.close()
    os.kill(victim, signal.SIGKILL)
    replacement: int = wait_logged(relay, "worker started", 2, worker=0)["pid"]
    gate.held.append(replacement)
    return victim, replacement


# --- signals while workers start -------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_while_the_workers_start_exits_0(
    stag: StagServer, gate: StartGate, signum: signal.Signals
) -> None:
    # Ctrl-C or `systemctl stop` right after the start: the workers have not listened
    # yet, nothing was received, nothing can be lost.
    relay, waiting = start_held(stag, gate)
    try:
        directory = shared_directory(waiting[0])
        relay.proc.send_signal(signum)
        assert relay.wait() == 0, "".join(relay.raw)
    finally:
        relay.kill()
    no_tracebacks(relay)
    assert not directory.exists()


def test_sighup_while_the_workers_start_does_not_fail_the_start(
    stag: StagServer, gate: StartGate
) -> None:
    # A reload (logrotate's `kill -HUP`, `systemctl reload`) that comes while the
    # workers start: they read the configuration as they start anyway.
    relay, _ = start_held(stag, gate)
    try:
        relay.proc.send_signal(signal.SIGHUP)
        wait_logged(relay, "configuration reloaded")
        gate.open()
        wait_ready(relay)
        assert logged(relay, "worker exited") == [], logged(relay, "worker exited")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0, "".join(relay.raw)
    finally:
        relay.kill()


# --- signals while a worker restarts ---------------------------------------------


def test_sigterm_while_a_worker_restarts_exits_0(stag: StagServer, gate: StartGate) -> None:
    relay = start_workers(stag, 2, **gate.env())
    try:
        wait_ready(relay)
        restart_held(relay, gate, relay.port())
        relay.proc.send_signal(signal.SIGTERM)
        # The replacement had not listened: stopping it loses nothing, and the
        # other worker drained; the crash before was counted as a restart.
        assert relay.wait() == 0, "".join(relay.raw)
    finally:
        relay.kill()


def test_sighup_while_a_worker_restarts_does_not_kill_the_replacement(
    stag: StagServer, gate: StartGate
) -> None:
    relay = start_workers(stag, 2, **gate.env())
    try:
        wait_ready(relay)
        port = relay.port()
        victim, replacement = restart_held(relay, gate, port)
        relay.proc.send_signal(signal.SIGHUP)
        wait_logged(relay, "configuration reloaded")
        gate.open()
        poll_until(lambda: worker_pids(port).get(0, victim) != victim)
        assert worker_pids(port)[0] == replacement
        exits = [line["exit"] for line in logged(relay, "worker exited", worker=0)]
        assert exits == ["killed by SIGKILL"]
        assert status(port)["worker_restarts"] == 1
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


def test_a_worker_that_starts_after_its_supervisor_died_does_not_outlive_it(
    stag: StagServer, gate: StartGate
) -> None:
    relay = start_workers(stag, 2, **gate.env())
    try:
        wait_ready(relay)
        _, replacement = restart_held(relay, gate, relay.port())
    finally:
        relay.kill()
    # Its supervisor is gone before it runs: nobody would signal or restart it, and
    # it would hold the port for good. (It checks its parent every second.)
    gate.open()
    poll_until(lambda: gone(replacement), limit=15)


# --- interrupts ------------------------------------------------------------------


def start_in_a_session(
    monkeypatch: pytest.MonkeyPatch, stag: StagServer, **env: str
) -> RelayProcess:
    """As a shell starts a foreground job: the relay leads a process group of its own,
    which a terminal's Ctrl-C signals as a whole."""
    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "Popen", partial(subprocess.Popen, start_new_session=True))
        return start_workers(stag, 2, **env)


def test_one_ctrl_c_in_a_terminal_drains_every_worker_and_exits_0(
    stag: StagServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = start_in_a_session(monkeypatch, stag)
    try:
        wait_ready(relay)
        port = relay.port()
        stream_poses(port, "before-ctrl-c", 100)
        stag.wait_for_events(100)
        # The terminal signals the whole foreground process group: the supervisor,
        # which forwards it, and each worker too. That is one interrupt, not two.
        os.killpg(relay.proc.pid, signal.SIGINT)
        assert relay.wait() == 0, "".join(relay.raw)
    finally:
        relay.kill()
    assert logged(relay, "second interrupt, exiting at once") == []


def all_draining(directory: Path) -> bool:
    states = [json.loads((directory / f"worker-{i}.json").read_bytes()) for i in (0, 1)]
    return all(state["draining"] for state in states)


def test_a_second_sigint_stops_draining_workers_at_once_with_130(stag: StagServer) -> None:
    # STAG refuses everything: both workers hold events and would drain for 60 s.
    stag.reject_all(503)
    relay = start_workers(stag, RELAY_SERVER_SHUTDOWN_TIMEOUT="60s", RELAY_BATCH_MAX_SIZE="1")
    try:
        with ExitStack() as stack:
            wait_ready(relay)
            port = relay.port()
            open_on_both_workers(port, stack, "stuck")
            directory = shared_directory(worker_pids(port)[0])
            relay.proc.send_signal(signal.SIGINT)
            # Each worker publishes its state at once when it starts to drain.
            poll_until(partial(all_draining, directory))
            relay.proc.send_signal(signal.SIGINT)
            assert relay.wait() == 130
    finally:
        relay.kill()
    assert logged(relay, "shutdown complete") == []
    assert not directory.exists()
    no_tracebacks(relay)


# --- reloads ---------------------------------------------------------------------


def test_sigterm_is_not_held_up_by_a_reload_waiting_for_a_worker(stag: StagServer) -> None:
    relay = start_workers(stag)
    stopped: int | None = None
    try:
        wait_ready(relay)
        port = relay.port()
        stopped = worker_pids(port)[1]
        # A worker that cannot confirm the reload (busy, stopped, restarting)...
        os.kill(stopped, signal.SIGSTOP)
        relay.proc.send_signal(signal.SIGHUP)
        wait_logged(relay, "configuration reloaded", worker=0)
        # ...must not keep `systemctl stop` (or a second Ctrl-C) waiting on it.
        relay.proc.send_signal(signal.SIGTERM)
        wait_logged(relay, "signal received, draining", worker=0)
        events = [line.get("event") for line in relay.lines if "worker" not in line]
        assert "workers did not confirm the reload" not in events
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        relay.kill()


def test_sighup_applies_a_new_log_level_in_every_worker(stag: StagServer, tmp_path: Path) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text("log:\n  level: info\n")
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_SERVER_WORKERS": "2",
            "RELAY_STAG_URL": stag.url,
            "RELAY_AUTH_API_KEYS": "the-key",
        },
        ("--config", str(config)),
    )

    def refuse_one(port: int) -> None:
        # No key: the upgrade is refused, which the worker logs at debug level.
        with pytest.raises(InvalidStatus):
            connect_relay(port).close()

    try:
        wait_ready(relay)
        port = relay.port()
        for _ in range(10):
            refuse_one(port)
        config.write_text("log:\n  level: debug\n")
        relay.proc.send_signal(signal.SIGHUP)
        for index in (0, 1):
            wait_logged(relay, "configuration reloaded", worker=index, log_level="debug")
        # Before the reload, at info, nothing of the sort was logged.
        assert logged(relay, "upgrade refused") == []
        for _ in range(200):
            refuse_one(port)
            if {line["worker"] for line in logged(relay, "upgrade refused")} == {0, 1}:
                break
        else:
            raise AssertionError("200 refused upgrades, debug lines from one worker only")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


# --- crashes ---------------------------------------------------------------------


def test_a_worker_that_keeps_dying_is_restarted_later_each_time(stag: StagServer) -> None:
    relay = start_workers(stag)
    try:
        wait_ready(relay)
        port = relay.port()
        for crash in (1, 2, 3):
            victim = worker_pids(port)[0]
            os.kill(victim, signal.SIGKILL)
            wait_logged(relay, "worker exited unexpectedly; starting it again", crash)
            # The other worker serves while this one waits for its restart.
            stream_poses(port, f"after-crash-{crash}", 20)
            stag.wait_for_events(20 * crash)
            poll_until(lambda: worker_pids(port).get(0, victim) != victim)  # noqa: B023
        restarts = logged(relay, "worker exited unexpectedly; starting it again")
        assert [line["worker_restarts"] for line in restarts] == [1, 2, 3]
        # It ran for moments each time, so each wait is twice the one before.
        assert [line["after_seconds"] for line in restarts] == [0.5, 1.0, 2.0]
        assert status(port)["worker_restarts"] == 3
        assert metric(port, "relay_worker_restarts_total") == 3
        assert len(stag.events()) == len(set(stag.event_ids())) == 60
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


_SLOW_EXIT_MODULE = """\
import atexit, os, sys, time
if os.environ.get("STAG_RELAY_WORKER") and sys.orig_argv[1:3] == ["-m", "stag_relay"]:
    atexit.register(time.sleep, float(os.environ["STAG_TEST_WORKER_EXIT_SECONDS"]))
"""


def test_a_worker_still_exiting_after_its_drain_is_not_killed_as_hung(
    stag: StagServer, tmp_path: Path
) -> None:
    # After its drain a worker stops its mesh processes and closes its spool, with no
    # keep-alives any more: under load that took longer than a 1 s worker_timeout, and
    # the supervisor killed it and exited 1. A sitecustomize module (passed on to the
    # workers through PYTHONPATH) makes that last step take three worker_timeouts.
    directory = tmp_path / "slow-exit"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(_SLOW_EXIT_MODULE)
    paths = [str(directory), os.environ.get("PYTHONPATH", "")]
    relay = start_workers(
        stag,
        RELAY_SERVER_WORKER_TIMEOUT="1s",
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        STAG_TEST_WORKER_EXIT_SECONDS="3",
    )
    try:
        wait_ready(relay)
        stream_poses(relay.port(), "before-the-stop", 20)
        stag.wait_for_events(20)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0, "".join(relay.raw)
    finally:
        relay.kill()
    assert logged(relay, "worker stopped answering; killing it") == []
    assert len(logged(relay, "worker exited", exit="exit status 0")) == 2
    no_tracebacks(relay)


def connections_listed(port: int, count: int) -> bool:
    return bool(sum(w["connections"] for w in status(port)["workers"]) == count)


def all_sent(port: int) -> bool:
    listed = status(port)["workers"]
    return all(w["last_stag_success"] and w["channel_depth"] == 0 for w in listed)


def test_a_dead_workers_counts_stay_in_the_totals_and_its_gauges_leave(
    stag: StagServer,
) -> None:
    relay = start_workers(stag, RELAY_WEBSOCKET_BUFFER_SIZE="100")
    try:
        wait_ready(relay)
        port = relay.port()
        with ExitStack() as stack:
            clients = open_on_both_workers(port, stack, "held")
            held = len(clients)
            stag.wait_for_events(held)
            poll_until(partial(connections_listed, port, held))
            doc = status(port)
            # Every worker listed, for operators: pid, connections, channel
            # depth and last STAG success (each sent its connection's event).
            assert [w["index"] for w in doc["workers"]] == [0, 1]
            assert {w["pid"] for w in doc["workers"]} == children(relay.proc.pid)
            assert doc["connections"]["active"] == held
            # (Other workers' figures are up to a second old: poll.)
            poll_until(partial(all_sent, port))
            victim = next(w for w in doc["workers"] if w["index"] == 0)
            directory = shared_directory(victim["pid"])

            os.kill(victim["pid"], signal.SIGKILL)
            # Once it is gone (a connection the kernel had queued for it is reset).
            wait_logged(relay, "worker exited", pid=victim["pid"])
            # Its metric files were folded into the archives (scrapes read few files).
            assert list(directory.glob(f"*_{victim['pid']}.db")) == []
            assert (directory / "counter_archive.db").exists()

            # Its open connections no longer count (its clients see them end); what
            # it received and sent does.
            def only_survivors_counted() -> bool:
                dropped = sum(ws.state is State.CLOSED for ws in clients)
                return dropped > 0 and metric(port, "relay_connections_active") == held - dropped

            poll_until(only_survivors_counted)
            assert metric(port, "relay_events_sent_total") == held
            assert (
                metric(
                    port,
                    "relay_packets_total",
                    {"type": "pose", "status": "ok", "dialect": "streamkit"},
                )
                == held
            )
            poll_until(lambda: worker_pids(port).get(0, victim["pid"]) != victim["pid"])
        # The replacement counts its own channel once, the dead worker's is gone.
        assert metric(port, "relay_channel_capacity") == 200
        stream_poses(port, "after", 100)
        total = held + 100
        stag.wait_for_events(total)
        poll_until(lambda: metric(port, "relay_events_sent_total") == total)
        assert (
            metric(
                port,
                "relay_packets_total",
                {"type": "pose", "status": "ok", "dialect": "streamkit"},
            )
            == total
        )
        # Histograms add up over every worker that ever ran, the dead one included.
        assert metric(port, "relay_batch_size_sum") == total
        assert metric(port, "relay_batch_size_count") == metric(port, "relay_batches_sent_total")
        assert metric(port, "relay_batches_sent_total") == len(stag.batches())
        assert status(port)["events"]["sent"] == total
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()
    assert not directory.exists()


# --- spool files of another run ---------------------------------------------------


def events_json(ids: list[str]) -> bytes:
    return json.dumps(
        [{"event_id": i, "type": "pose", "session_id": "orphan"} for i in ids]
    ).encode()


def test_workers_adopt_higher_indexes_including_their_wal_and_set_a_corrupt_one_aside(
    stag: StagServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.sqlite3"
    # A previous run had 4 workers. Worker 2 died with its last batches only in the
    # WAL (copied while it was open: what a crash leaves); worker 3's file is damaged.
    writer = Spool(tmp_path / "crashed")
    ids = [f"orphan-{n}" for n in range(6)]
    for n in range(3):
        writer.append(f"batch-{n}", 2, events_json(ids[2 * n : 2 * n + 2]), 1.0e9 + n)
    wal = tmp_path / "crashed-wal"
    assert wal.stat().st_size > 0
    shutil.copy(tmp_path / "crashed", spool.with_name("spool.sqlite3.2"))
    shutil.copy(wal, spool.with_name("spool.sqlite3.2-wal"))
    writer.close()
    spool.with_name("spool.sqlite3.3").write_bytes(b"this is not a spool " * 500)

    relay = start_workers(stag, RELAY_DELIVERY_SPOOL_PATH=str(spool))
    try:
        wait_ready(relay)
        port = relay.port()
        stag.wait_for_events(6)
        adopted = wait_logged(relay, "adopted another spool file", worker=0)
        assert adopted["batches"] == 3
        assert metric(port, "relay_spool_corrupt_total") == 1
        stream_poses(port, "new", 10)
        stag.wait_for_events(16)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()
    assert sorted(stag.event_ids()[:6]) == ids
    assert len(stag.event_ids()) == len(set(stag.event_ids())) == 16
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("spool.sqlite3."))
    # Worker 2's file (and its WAL) moved in whole and went; worker 3's was set aside.
    corrupt = [n for n in names if ".corrupt-" in n]
    assert len(corrupt) == 1 and corrupt[0].startswith("spool.sqlite3.3.corrupt-"), names
    assert not any(n.startswith("spool.sqlite3.2") or n == "spool.sqlite3.3" for n in names)


# --- TLS -------------------------------------------------------------------------


def test_wss_reaches_both_workers_and_sighup_reloads_the_certificate_in_each(
    stag: StagServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    relay = start_workers(stag, RELAY_SERVER_TLS_CERT=str(cert), RELAY_SERVER_TLS_KEY=str(key))

    def https_status(port: int) -> dict[str, Any]:
        url = f"https://127.0.0.1:{port}/status"
        with urllib.request.urlopen(url, context=client, timeout=30) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def https_connections_by_worker(port: int, count: int) -> list[int] | None:
        # As workerprocs.connections_by_worker: the other worker's figure is up to a
        # second old, so only figures that add up to every connection are read.
        listed = [w["connections"] for w in https_status(port)["workers"]]
        return listed if len(listed) == 2 and sum(listed) == count else None

    try:
        wait_ready(relay)
        port = relay.port()
        with ExitStack() as stack:
            opened = 0
            while True:
                ws = stack.enter_context(
                    connect(f"wss://127.0.0.1:{port}/ws/streamkit", ssl=client, open_timeout=30)
                )
                opened += 1
                ws.send(pose_packet(f"tls-{opened}", 1))
                if all(poll_until(partial(https_connections_by_worker, port, opened))):
                    break
                assert opened < 200, "200 connections, all on one worker"
        stag.wait_for_events(opened)
        # A renewed certificate: each worker holds its own TLS context and reloads it.
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        relay.proc.send_signal(signal.SIGHUP)
        for index in (0, 1):
            wait_logged(relay, "TLS certificate reloaded", worker=index)
        # New handshakes work with the reloaded contexts.
        poll_until(lambda: https_status(port)["connections"]["active"] == 0)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()


# --- logs ------------------------------------------------------------------------


def test_log_lines_stay_whole_when_the_workers_log_at_once(stag: StagServer) -> None:
    # Workers share the supervisor's stderr: a line written in two pieces can be cut
    # in half by another worker's line, and the log shipper then drops both.
    relay = start_workers(stag, RELAY_LOG_LEVEL="debug", RELAY_AUTH_API_KEYS="the-key")
    try:
        wait_ready(relay)
        port = relay.port()

        def refuse(count: int) -> None:
            for _ in range(count):
                with pytest.raises(InvalidStatus):
                    connect_relay(port).close()

        threads = [threading.Thread(target=refuse, args=(150,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()
    broken = []
    for line in relay.raw:
        try:
            parsed = json.loads(line)
        except ValueError:
            broken.append(line)
            continue
        if not isinstance(parsed, dict):
            broken.append(line)
    assert broken == [], f"{len(broken)} of {len(relay.raw)} lines broken: {broken[:3]}"
