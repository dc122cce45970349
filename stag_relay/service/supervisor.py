"""The supervisor: with ``server.workers`` above 1, the process that runs the workers.

    supervisor: signals, systemd, restarts; no sockets of the relay's own
      ├── worker 0: python -m stag_relay (a whole relay, SO_REUSEPORT on server.port)
      └── worker 1: ...

The rules it keeps:

- every worker runs the configuration the supervisor checked at start (a file in the
  shared directory, not relay.yaml again): a restarted worker is like the others;
  SIGHUP applies new log settings to all of them, as to a single process;
- the workers notify it as systemd would be notified (``$NOTIFY_SOCKET`` is a socket
  of the supervisor's, one per worker), and it tells systemd ``READY=1`` only once
  every worker has said it listens;
- SIGTERM, SIGINT and SIGHUP are forwarded to every worker, as far as a worker can
  take them yet (before its READY it has no handlers: SIGHUP waits for it, SIGINT
  becomes SIGTERM); a second SIGINT kills the workers and the supervisor exits 130;
- a worker that dies while the relay runs is started again after ``RestartBackoff``
  and counted, and so is one whose event loop stops answering for
  ``server.worker_timeout``; one that dies before the relay was ever ready fails the
  start, with its exit status (a port in use, say), after the others are stopped;
- it exits 0 only when every worker running at the stop drained and exited 0, and it
  removes the shared directory (multiprocess metrics, worker states) on the way out.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio
from prometheus_client import CollectorRegistry, multiprocess

from stag_relay.service import metricfiles
from stag_relay.service.config import Config
from stag_relay.service.systemd import Notifier, StatusSnapshot, run_watchdog
from stag_relay.service.workers import (
    DIRECTORY_ENV,
    SUPERVISOR_ENV,
    SUPERVISOR_FILE,
    WORKER_ENV,
    publish_state,
    state_file,
)

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
# 128 + SIGINT: what a shell reports for a process stopped by Ctrl-C.
EXIT_INTERRUPTED: Final = 130
# After the workers were told to stop: their own shutdown_timeout, plus time to stop
# their mesh worker processes and exit. Past it they are killed and the exit is 1.
_EXIT_GRACE: Final = 15.0
# A worker that takes longer than this to answer a SIGHUP is reported as not reloaded.
_RELOAD_TIMEOUT: Final = 10.0
# Variables of systemd's that are the supervisor's alone: a worker that saw them would
# notify systemd directly (refused under NotifyAccess=main) or feed its watchdog.
_SYSTEMD_ONLY: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")

log = structlog.get_logger("stag_relay.supervisor")


@attrs.define
class RestartBackoff:
    """How long to wait before starting a dead worker again. Pure.

    Doubles from ``initial`` to ``maximum`` while a worker keeps dying, so a crash loop
    costs little CPU and fills the log slowly; a worker that ran ``healthy_after`` had
    recovered, and its next crash starts again from ``initial``.
    """

    # Short enough that a one-off crash costs its clients one reconnect, not minutes.
    initial: float = 0.5
    # A worker that cannot start (a disk full, a bug at start) is retried twice a minute.
    maximum: float = 30.0
    healthy_after: float = 60.0
    _next: float = attrs.field(init=False, default=math.nan)

    def delay(self, ran_for: float) -> float:
        """The wait before the next start of a worker that ran ``ran_for`` seconds."""
        if math.isnan(self._next) or ran_for >= self.healthy_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


@attrs.define(eq=False)
class _Slot:
    """One worker index: the process in it now, and what that process told us."""

    index: int
    # An abstract socket (no file, no path length limit) the worker notifies.
    notify: str
    process: trio.Process | None = None
    started_at: float = 0.0
    # Set by the current process's READY=1: it listens and handles its signals.
    ready: trio.Event = attrs.Factory(trio.Event)
    # READY=1 messages from this slot's processes, all of them: a reload waits for one more.
    readies: int = 0
    # A SIGHUP came before the process could handle it: sent once it is ready.
    reload_pending: bool = False
    # When the worker last proved its event loop runs (READY or WATCHDOG, monotonic).
    last_heard: float = 0.0
    # When the current process said STOPPING=1 (monotonic): it drains, then exits.
    stopping_since: float | None = None
    # How the slot ended, once it has: 0 when it stopped cleanly.
    exit_status: int | None = None
    backoff: RestartBackoff = attrs.Factory(RestartBackoff)


def worker_environment(
    environ: Mapping[str, str],
    *,
    index: int,
    count: int,
    directory: Path,
    notify: str,
    watchdog: float,
) -> dict[str, str]:
    """The environment of worker ``index``: ours, without systemd's variables and
    without RELAY_* settings (the worker reads the configuration the supervisor checked)."""
    env = {
        k: v for k, v in environ.items() if k not in _SYSTEMD_ONLY and not k.startswith("RELAY_")
    }
    env[WORKER_ENV] = f"{index}/{count}"
    env[DIRECTORY_ENV] = str(directory)
    env[SUPERVISOR_ENV] = str(os.getpid())
    # Read by prometheus-client when the worker imports it.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    env["NOTIFY_SOCKET"] = notify
    # The worker's own watchdog task keeps us informed, as it would keep systemd.
    env["WATCHDOG_USEC"] = str(round(watchdog * 1_000_000))
    return env


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def write_config(path: Path, config: Config) -> None:
    """The configuration every worker runs, as a document ``load_config`` reads (JSON is
    YAML). Secrets included: the file is the supervisor's own (0600, in a 0700 directory)."""
    temporary = path.with_name(f".{path.name}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(attrs.asdict(config), file)
    os.replace(temporary, path)


# (status text for systemd, the new configuration or None when it is invalid)
Reload = Callable[[], tuple[str, Config | None]]


class Supervisor:
    """Runs ``config.server.workers`` worker relays; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        reload: Reload | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.count = config.server.workers
        self.notifier = notifier if notifier is not None else Notifier()
        self._reload = reload
        self._environ = dict(os.environ if environ is None else environ)
        self.directory = Path(tempfile.mkdtemp(prefix="stag-relay-workers-"))
        self.config_path = self.directory / "config.json"
        write_config(self.config_path, config)
        self.command = [sys.executable, "-m", "stag_relay", "--config", str(self.config_path)]
        token = secrets.token_hex(4)
        self.slots = [_Slot(i, f"@stag-relay-{os.getpid()}-{token}-{i}") for i in range(self.count)]
        self.restarts = 0
        self.stopping = False
        self.interrupted = False
        # The exit status of a worker that failed the start, which becomes ours.
        self.start_failure: int | None = None
        self._changed = trio.Event()
        self._stop = trio.Event()
        self._reloading = trio.CancelScope()
        self._publish()

    async def run(self) -> int:
        """Run until every worker has exited; the exit status for the process."""
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async with trio.open_nursery() as nursery:
                    async with trio.open_nursery() as workers:
                        for slot in self.slots:
                            workers.start_soon(self._keep_running, slot)
                        nursery.start_soon(self._watch_signals, sigs, nursery)
                        nursery.start_soon(self._announce_ready)
                        nursery.start_soon(run_watchdog, self.notifier, self.status_snapshot)
                    nursery.cancel_scope.cancel()
        finally:
            self.notifier.close()
            shutil.rmtree(self.directory, ignore_errors=True)
        return self.exit_status()

    def exit_status(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.start_failure is not None:
            return self.start_failure if self.start_failure > 0 else EXIT_FAILURE
        clean = all(slot.exit_status == 0 for slot in self.slots)
        return EXIT_OK if clean else EXIT_FAILURE

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every worker (they drain) and start no more."""
        self.stopping = True
        self._stop.set()
        self._reloading.cancel()
        for slot in self.slots:
            if slot.process is None:
                # Waiting to be restarted: nothing runs there, nothing can be lost.
                slot.exit_status = 0
        self._signal_all(signum)

    def status_snapshot(self) -> StatusSnapshot:
        """The whole relay's counts for systemd's STATUS line, from the workers' metric
        files (they keep counting across a worker's restart)."""
        registry = CollectorRegistry()
        registry.register(metricfiles.FileCollector(self.directory))
        total: dict[str, float] = {}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "relay_packets_total" and sample.labels.get("status") != "ok":
                    continue
                total[sample.name] = total.get(sample.name, 0.0) + sample.value
        return StatusSnapshot(
            connections=int(total.get("relay_connections_active", 0)),
            events_received=int(total.get("relay_packets_total", 0)),
            events_sent=int(total.get("relay_events_sent_total", 0)),
            draining=self.stopping,
        )

    # -- one worker index ---------------------------------------------------------

    async def _keep_running(self, slot: _Slot) -> None:
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as inbox:
            await inbox.bind(b"\0" + slot.notify[1:].encode())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, slot, inbox)
                while not self.stopping:
                    status, ran_for = await self._run_once(slot)
                    if self.stopping:
                        break
                    if not self._ever_ready():
                        log.error(
                            "worker failed to start; stopping the others",
                            worker=slot.index,
                            exit=describe_exit(status),
                        )
                        self.start_failure = status
                        self.stop()
                        break
                    self.restarts += 1
                    self._publish()
                    delay = slot.backoff.delay(ran_for)
                    log.error(
                        "worker exited unexpectedly; starting it again",
                        worker=slot.index,
                        exit=describe_exit(status),
                        after_seconds=delay,
                        worker_restarts=self.restarts,
                    )
                    with trio.move_on_after(delay):
                        await self._stop.wait()
                nursery.cancel_scope.cancel()

    async def _run_once(self, slot: _Slot) -> tuple[int, float]:
        """Start the worker in ``slot`` and wait for it to exit: its status and run time."""
        env = worker_environment(
            self._environ,
            index=slot.index,
            count=self.count,
            directory=self.directory,
            notify=slot.notify,
            watchdog=self.config.server.worker_timeout,
        )
        slot.ready = trio.Event()
        slot.reload_pending = False
        slot.stopping_since = None
        slot.started_at = time.monotonic()
        # A process group of its own: a Ctrl-C in a terminal reaches the supervisor
        # alone, which forwards it once (twice would make a worker exit at once).
        process = await trio.lowlevel.open_process(self.command, env=env, process_group=0)
        slot.process = process
        slot.exit_status = None
        if self.stopping:
            # The stop came while the process was being started: it was not signalled.
            self._signal(slot, signal.SIGTERM)
        log.info("worker started", worker=slot.index, pid=process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._kill_if_hung, slot, process)
                status = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            # Cancelled only when the supervisor itself is torn down: leave nothing behind.
            if process.returncode is None:
                process.kill()
        slot.process = None
        # Its live gauges leave with it; its counters stay in the totals.
        multiprocess.mark_process_dead(process.pid, str(self.directory))  # type: ignore[no-untyped-call]
        try:
            metricfiles.fold_dead_process(self.directory, process.pid)
        except (OSError, RuntimeError) as exc:
            # Its files then stay where they are, still counted: only scrapes get slower.
            log.warning(
                "cannot fold a dead worker's metric files", pid=process.pid, problem=str(exc)
            )
        (self.directory / state_file(slot.index)).unlink(missing_ok=True)
        # Stopping: a clean exit, or a process told to stop before it could drain
        # anything (no READY yet: it had accepted no client).
        clean = status == 0 or (not slot.ready.is_set() and status == -signal.SIGTERM)
        slot.exit_status = 0 if self.stopping and clean else status
        self._wake()
        log.info("worker exited", worker=slot.index, pid=process.pid, exit=describe_exit(status))
        return status, time.monotonic() - slot.started_at

    async def _kill_if_hung(self, slot: _Slot, process: trio.Process) -> None:
        """Kill the worker once it has been silent for ``server.worker_timeout`` after
        its READY (start-up, with a large spool to adopt, may take longer); once it
        said STOPPING, once it has stopped for longer than its drain may take."""
        timeout = self.config.server.worker_timeout
        await slot.ready.wait()
        while True:
            now = time.monotonic()
            if slot.stopping_since is not None:
                # Its keep-alives end with its drain, before it has stopped its mesh
                # processes and closed its spool: silence is no sign of a hang now. The
                # bound is the one a stop ordered by the supervisor has.
                deadline = slot.stopping_since + self.config.server.shutdown_timeout + _EXIT_GRACE
            else:
                deadline = slot.last_heard + timeout
            if now > deadline:
                break
            await trio.sleep(deadline - now + 0.01)
        if slot.stopping_since is not None:
            log.error("worker did not exit in time; killing it", worker=slot.index, pid=process.pid)
        else:
            log.error(
                "worker stopped answering; killing it",
                worker=slot.index,
                pid=process.pid,
                silent_seconds=round(now - slot.last_heard, 1),
            )
        process.kill()

    async def _listen(self, slot: _Slot, inbox: trio.socket.SocketType) -> None:
        """What the worker in ``slot`` notifies, in systemd's ``KEY=VALUE`` lines."""
        while True:
            datagram = await inbox.recv(4096)
            fields = dict(
                line.split("=", 1)
                for line in datagram.decode(errors="replace").splitlines()
                if "=" in line
            )
            if "WATCHDOG" in fields or "READY" in fields:
                slot.last_heard = time.monotonic()
            if fields.get("STOPPING") == "1" and slot.stopping_since is None:
                slot.stopping_since = time.monotonic()
            if fields.get("READY") == "1":
                slot.ready.set()
                slot.readies += 1
                if slot.reload_pending:
                    slot.reload_pending = False
                    self._signal(slot, signal.SIGHUP)
                self._wake()

    # -- the whole relay ----------------------------------------------------------

    def _ever_ready(self) -> bool:
        return all(slot.readies > 0 for slot in self.slots)

    async def _announce_ready(self) -> None:
        while not all(slot.ready.is_set() for slot in self.slots):
            if self.stopping:
                return
            await self._changed.wait()
        pids = [slot.process.pid for slot in self.slots if slot.process is not None]
        port = self.config.server.port
        log.info("relay ready", workers=self.count, pids=pids, port=port)
        self.notifier.ready(f"{self.count} workers listening on port {port}")

    async def _watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                if not self.stopping:
                    # Its own task: a worker slow to confirm must not hold up a SIGTERM.
                    self._reloading.cancel()
                    self._reloading = trio.CancelScope()
                    nursery.start_soon(self._reload_all, self._reloading)
                continue
            if not self.stopping:
                log.info("signal received, draining", signal=signal.Signals(signum).name)
                self.notifier.stopping(f"draining {self.count} workers")
                self.stop(signum)
                # Bounded: workers that outlive their own shutdown_timeout are killed.
                nursery.start_soon(self._kill_after_grace)
            elif signum == signal.SIGINT:
                log.warning("second interrupt, stopping the workers at once")
                self.interrupted = True
                self._signal_all(signal.SIGKILL)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(self.config.server.shutdown_timeout + _EXIT_GRACE)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("worker did not exit in time; killing it", worker=slot.index)
                slot.process.kill()

    async def _reload_all(self, scope: trio.CancelScope) -> None:
        with scope:
            self.notifier.reloading()
            status = "configuration reloaded"
            if self._reload is not None:
                status, new = self._reload()
                if new is not None:
                    # Only what applies while running changes; the rest would make the
                    # workers differ (a restarted one would run the new settings).
                    self.config = attrs.evolve(self.config, log=new.log)
                    write_config(self.config_path, self.config)
            before = {slot.index: slot.readies for slot in self.slots}
            self._signal_all(signal.SIGHUP)
            with trio.move_on_after(_RELOAD_TIMEOUT):
                while any(slot.readies <= before[slot.index] for slot in self.slots):
                    await self._changed.wait()
            late = [slot.index for slot in self.slots if slot.readies <= before[slot.index]]
            if late:
                log.warning("workers did not confirm the reload", workers=late)
            self.notifier.ready(f"{status} in {self.count - len(late)} of {self.count} workers")

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            self._signal(slot, signum)

    def _signal(self, slot: _Slot, signum: int) -> None:
        """Send ``signum`` to the slot's process, as far as it can take it yet: before its
        READY it has no handlers, so SIGHUP waits for it and SIGINT becomes SIGTERM
        (which ends it quietly; it has accepted no client)."""
        process = slot.process
        if process is None or process.returncode is not None:
            return
        if not slot.ready.is_set():
            if signum == signal.SIGHUP:
                slot.reload_pending = True
                return
            if signum == signal.SIGINT:
                signum = signal.SIGTERM
        process.send_signal(signum)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _publish(self) -> None:
        publish_state(
            self.directory,
            SUPERVISOR_FILE,
            {"pid": os.getpid(), "workers": self.count, "worker_restarts": self.restarts},
        )
