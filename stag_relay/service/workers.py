"""Worker processes, from the worker's side: who it is, its files, and the others.

With ``server.workers`` above 1 the supervisor (``supervisor.py``) starts N copies of
the relay, each a whole pipeline listening on the same port with ``SO_REUSEPORT``. A
worker learns its place from the environment the supervisor gives it:

- ``STAG_RELAY_WORKER`` = ``"<index>/<count>"``;
- ``STAG_RELAY_WORKER_DIR``: a directory the supervisor created fresh for this run,
  which is also ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's per-process files).

The rules the workers keep, so that operators see one relay:

- each worker writes its state to ``worker-<index>.json`` there, every
  ``STATE_INTERVAL`` and at once when it starts to drain (so that it is never more
  than ``STATE_MAX_AGE`` old); any worker answers
  ``/status`` and ``/health`` from all of them (the supervisor writes
  ``supervisor.json`` and removes a dead worker's file);
- each worker has its own spool file, ``<spool_path>.<index>``; at start it adopts
  the files no worker of this run owns (other indexes, or the single process's
  ``<spool_path>``), so changing the number of workers loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import trio

WORKER_ENV: Final = "STAG_RELAY_WORKER"
DIRECTORY_ENV: Final = "STAG_RELAY_WORKER_DIR"
SUPERVISOR_ENV: Final = "STAG_RELAY_SUPERVISOR_PID"
# How old another worker's figures in /status may be (the README promises a second).
STATE_MAX_AGE: Final = 1.0
# How often each worker writes them: twice per STATE_MAX_AGE, so that a write delayed
# by a busy event loop or a slow thread start still lands within it. A small file.
STATE_INTERVAL: Final = STATE_MAX_AGE / 2
# The kernel's default somaxconn; what trio.open_tcp_listeners uses too.
_BACKLOG: Final = 4096
_WORKER_RE: Final = re.compile(r"([0-9]+)/([0-9]+)")
_STATE_RE: Final = re.compile(r"worker-([0-9]+)\.json")
SUPERVISOR_FILE: Final = "supervisor.json"


@attrs.frozen
class WorkerRole:
    """This process's place among the workers."""

    index: int
    count: int
    directory: Path
    # The supervisor's pid: a worker whose parent is another has been orphaned.
    supervisor_pid: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerRole | None:
        """The role the supervisor gave this process; None when run on its own."""
        value = environ.get(WORKER_ENV)
        if value is None:
            return None
        match = _WORKER_RE.fullmatch(value)
        directory = environ.get(DIRECTORY_ENV, "")
        if match is None or not directory:
            raise ValueError(
                f"{WORKER_ENV}={value!r} with {DIRECTORY_ENV}={directory!r}: these are set "
                "by the supervisor for its workers; unset them to run the relay yourself"
            )
        index, count = int(match[1]), int(match[2])
        if not 0 <= index < count:
            raise ValueError(f"{WORKER_ENV}={value!r}: index must be below the count")
        supervisor = environ.get(SUPERVISOR_ENV, "0")
        return cls(index, count, Path(directory), int(supervisor) if supervisor.isdigit() else 0)


# --- spool files ---------------------------------------------------------------


def spool_path_for(path: str, role: WorkerRole | None) -> str:
    """The spool file of this process: ``path`` alone, or ``<path>.<index>`` for a worker."""
    if not path or role is None:
        return path
    return f"{path}.{role.index}"


def orphan_spools(path: str, role: WorkerRole | None) -> list[Path]:
    """Spool files beside ``path`` that no process of this run owns and this one adopts.

    Worker ``i`` of ``n`` adopts ``<path>.<k>`` for every ``k >= n`` with ``k % n == i``,
    and worker 0 adopts ``<path>`` itself; a single process adopts every ``<path>.<k>``.
    The sets are disjoint, so no two workers touch the same file.
    """
    if not path:
        return []
    base = Path(path)
    suffix = re.compile(re.escape(base.name) + r"\.([0-9]+)")
    try:
        names = os.listdir(base.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = suffix.fullmatch(name)
        if match is None:
            continue
        k = int(match[1])
        if role is None or (k >= role.count and k % role.count == role.index):
            found.append((k, base.with_name(name)))
    orphans = [p for _, p in sorted(found)]
    if role is not None and role.index == 0 and base.exists():
        orphans.insert(0, base)
    return orphans


def worker_batch_size(max_size: int, role: WorkerRole | None) -> int:
    """A worker's batches hold ``batch.max_size / workers`` events (rounded up).

    Each worker sees 1/N of the traffic: with whole batches its batches would take N
    times longer to fill (the latency of a batch's first event) while STAG got as many
    requests as before. With 1/N batches the relay, seen from STAG and the clients,
    batches as one process does at the same load: the same fill time, the same
    requests per second, and a lower p99 (docs/performance.md).
    """
    if role is None:
        return max_size
    return max(1, -(-max_size // role.count))


# --- shared state --------------------------------------------------------------


def publish_state(directory: Path, name: str, state: Mapping[str, Any]) -> None:
    """Write ``state`` as ``<directory>/<name>`` so readers never see half a file."""
    target = directory / name
    # Per thread as well as per process: two writers sharing the temporary file would
    # move each other's half-written file into place.
    temporary = directory / f".{name}.{os.getpid()}.{threading.get_ident()}"
    temporary.write_bytes(json.dumps(state).encode())
    os.replace(temporary, target)


def state_file(index: int) -> str:
    return f"worker-{index}.json"


def read_states(directory: Path) -> list[dict[str, Any]]:
    """Every worker's last published state, by index (unreadable files are skipped:
    a worker being replaced has none for a moment)."""
    states = []
    for entry in sorted(directory.iterdir()):
        if _STATE_RE.fullmatch(entry.name) is None:
            continue
        with contextlib.suppress(OSError, ValueError):
            states.append(json.loads(entry.read_bytes()))
    states.sort(key=lambda state: int(state.get("index", 0)))
    return states


def read_supervisor(directory: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((directory / SUPERVISOR_FILE).read_bytes())
        if isinstance(data, dict):
            return data
    return {}


# --- the supervisor ------------------------------------------------------------

# How soon a worker notices that its supervisor is gone (killed with SIGKILL, say).
_PARENT_CHECK_INTERVAL: Final = 1.0


async def drain_when_orphaned(supervisor: int, drain: Callable[[], None]) -> None:
    """Call ``drain`` once ``supervisor``, which started this process, is gone (at once
    if it died while this worker was starting).

    A worker must not outlive it: nobody would forward signals to it or restart its
    siblings, and it would keep the port. (PR_SET_PDEATHSIG would fire when the
    *thread* that started the process ends, and trio starts processes from threads
    it retires when idle, so the worker watches its parent id instead.)
    """
    while True:
        if os.getppid() != supervisor:
            drain()
            return
        await trio.sleep(_PARENT_CHECK_INTERVAL)


def leave_orphaned(role: WorkerRole) -> None:
    """An orphaned worker's last act, once drained: its state file goes, and the last
    worker out removes the shared directory, which its killed supervisor could not."""
    with contextlib.suppress(OSError), open(role.directory / ".leaving", "a") as lock:
        # One at a time: two workers leaving together would each see the other's file.
        fcntl.flock(lock, fcntl.LOCK_EX)
        (role.directory / state_file(role.index)).unlink(missing_ok=True)
        if not any(_STATE_RE.fullmatch(entry.name) for entry in role.directory.iterdir()):
            shutil.rmtree(role.directory, ignore_errors=True)


# --- listening -----------------------------------------------------------------


async def open_shared_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` with ``SO_REUSEPORT``: every worker binds the same
    port and the kernel spreads new connections across them (it does not set it)."""
    infos = await trio.socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = trio.socket.socket(family, kind, proto)
            except OSError as exc:
                # As trio does: a family the kernel lacks (IPv6 disabled) is skipped.
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # As trio does: one socket per family, not a dual-stack v6 one.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address family to listen on for {host!r}")
    return listeners


def check_port_free(host: str, port: int) -> int:
    """Bind ``port`` on every address of ``host`` without ``SO_REUSEPORT`` and let go:
    raises OSError (address in use) when anything holds it, including another relay
    that would otherwise share it silently. Port 0 becomes a free port, returned."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    # Bound all at once, as the workers will, so a v4 and a v6 socket can share a port.
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            held.append(sock)
            # As every listener does: connections in TIME_WAIT from a previous run do
            # not hold the port, a listener does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(held) > 1:
                address = (address[0], held[0].getsockname()[1], *address[2:])
            sock.bind(address)
        if not held:
            raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
        chosen: int = held[0].getsockname()[1]
        return chosen
    finally:
        for sock in held:
            sock.close()


# --- one view of all workers ---------------------------------------------------


def _latest(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


# StagSender.state() values, from the least to the most in need of attention.
_STAG_STATES: Final = ("unknown", "reachable", "unreachable", "misconfigured")


def combine_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the workers' states for ``/status``, and the list of workers.

    A state is what ``Relay.worker_state`` returns. Counts add up; for STAG, the
    latest success and failure and the longest failure streak are shown, STAG is
    reachable only when every worker that tried reached it, and its state is the worst
    of the workers' (with the last status of a worker in that state).
    """
    stags = [state["stag"] for state in states]
    worst = max(stags, key=lambda s: _STAG_STATES.index(s["state"]))
    reachable = [s["reachable"] for s in stags if s["reachable"] is not None]
    spools = [state["spool"] for state in states if state["spool"] is not None]
    spool = None
    if spools:
        spool = {
            key: sum(s[key] for s in spools)
            for key in ("batches", "events", "bytes", "dead_letters")
        }
        spool["oldest_batch_age_seconds"] = max(s["oldest_batch_age_seconds"] for s in spools)
        spool["files"] = [s["path"] for s in spools]
    return {
        "connections": sum(state["connections"] for state in states),
        "sessions": sum(state["sessions"] for state in states),
        "channel_depth": sum(state["channel_depth"] for state in states),
        "channel_capacity": sum(state["channel_capacity"] for state in states),
        "draining": any(state["draining"] for state in states),
        "stag": {
            "state": worst["state"],
            "last_status": worst["last_status"],
            "reachable": all(reachable) if reachable else None,
            "last_success": _latest([s["last_success"] for s in stags]),
            "last_failure": _latest([s["last_failure"] for s in stags]),
            "consecutive_failures": max(s["consecutive_failures"] for s in stags),
            "events_sent": sum(s["events_sent"] for s in stags),
            "batches_sent": sum(s["batches_sent"] for s in stags),
        },
        "spool": spool,
        "workers": [
            {
                "index": state["index"],
                "pid": state["pid"],
                "draining": state["draining"],
                "connections": state["connections"],
                "channel_depth": state["channel_depth"],
                "last_stag_success": state["stag"]["last_success"],
            }
            for state in states
        ],
    }
