"""The benchmark: the relay against this stack's own ceiling, on this machine, in one run.

    nox -s bench                        # or: python tests/benchmark/bench.py
    python tests/benchmark/bench.py --repeats 5 --only flood,paced --output results.json

Not part of the test suite (pytest collects ``test_*.py`` only from the testpaths
in pyproject.toml). Each workload is repeated (``--repeats``, at least 3 for
the figures in docs/performance.md) and the medians are reported, because this
machine is small and shared; every relay figure is set beside the bare
trio-websocket server's (tests/benchmark/bare_server.py) measured with the same
client in the same repeat, bare first, so slow drift hits both alike. Where a target
is a ratio of two servers' CPU or throughput, one of them runs on both sides of the
other in each repeat and counts as the mean of its two runs: the Trio floor around
the relay (paced), the relay around the spooled relay and the ``--baseline`` tree
around all of them (flood).

1. flood: 20 connections x 5,000 pose packets as fast as possible, batch.max_size
   100. Relay: events delivered per second (first packet sent to last event at the
   stand-in) with nothing lost; bare: messages read per second (first sent to
   every close handshake done, which the server answers only after reading what
   came before). Target: relay / bare >= 0.8.
2. paced: 200 connections x 60 Hz for 10 s, batch.max_size 100, batch.timeout
   50ms. p50/p99 from each packet's timestamp to its arrival at the stand-in
   (timestamps are whole milliseconds, floored: up to 1 ms is added). CPU of the
   relay process per event against the bare server's CPU per message (from
   /proc/<pid>/stat, between all connections being open and the last arrival), and
   against the Trio floor's (tests/benchmark/floor_server.py: the same handshake,
   then reads discarded). Targets: p99 <= 20 ms, CPU per event <= 1.5 x bare and
   <= 1.5 x the floor.
3. idle: 3,000 connections open and quiet. RSS growth of the server process per
   connection. Target <= 32 KiB (bare ~21 KiB).
4. mesh beside pose: 20 connections x 60 Hz poses for 10 s, with and without a
   growing 40,000-triangle Draco mesh per connection per second: pose p99 beside
   meshes against pose-only, and mesh characters out (at the stand-in) / in (sent).
   Skipped when DracoPy is missing; ``MESH_RELAY_ENV`` is the hook for the mesh
   pipeline's settings.

5. dialects: 200 connections x 30 Hz poses for 10 s, each with a 2,000-triangle mesh
   every 4 s, batch.max_size 50, once in the relay's own dialect and once in the
   StreamKit SDK's (``loadgen --dialect sdk``), after one client's second of packets
   has started the mesh workers: CPU of the relay's process tree per event, SDK over
   seed, and pose p99. Targets: <= 1.2 x and <= 20 ms.

6. backpressure (only with ``--only backpressure``: minutes): 1,000 connections at
   10 Hz for 120 s while the stand-in takes 2 s per request (batches of 100, so STAG
   takes 200 events a second: full backpressure). The relay's RSS at its highest
   against the same relay holding 1,000 idle connections. Target <= 64 MiB more.

Keeping the client and the stand-in from distorting the figures on 2 cores: the
server under test (relay or bare) is pinned to CPU 0 and everything else (the
load generator, the stand-in, this script) to the other CPUs (``--no-pin`` to
turn it off; the mesh workload is never pinned, since the mesh pipeline may use
worker processes); the stand-in and the load generator are separate processes;
the load generator encodes its frames itself (2-4 us a packet, see
stag_relay/tools/loadgen.py) and the stand-in only parses batches.

Results go to a JSON file (``--output``, default bench-results.json) and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
PYTHON: Final = sys.executable
BARE_SERVER: Final = str(Path(__file__).with_name("bare_server.py"))
FLOOR_SERVER: Final = str(Path(__file__).with_name("floor_server.py"))

# The workloads the relay is measured under.
FLOOD_CONNECTIONS: Final = 20
FLOOD_PACKETS: Final = 5000
PACED_CONNECTIONS: Final = 200
PACED_RATE: Final = 60.0
PACED_SECONDS: Final = 10.0
IDLE_CONNECTIONS: Final = 3000
MESH_CONNECTIONS: Final = 20
MESH_TRIANGLES: Final = 40_000
BATCH_MAX_SIZE: Final = 100
# A flood is what websocket.max_packets_per_second (240 by default) exists to slow
# down; the flood measures the pipeline, so the limit is lifted far above what it sends.
FLOOD_PACKET_RATE_LIMIT: Final = "10000000"
PACED_BATCH_TIMEOUT: Final = "50ms"
# What the relay must achieve under them (docs/performance.md).
TARGET_FLOOD_RATIO: Final = 0.8
TARGET_P99_MS: Final = 20.0
TARGET_CPU_RATIO: Final = 1.5
TARGET_RSS_PER_CONNECTION: Final = 32 * 1024
# 1,000 clients under full backpressure hold no more than this over 1,000 idle ones.
TARGET_BACKPRESSURE_GROWTH_MIB: Final = 64
BACKPRESSURE_CONNECTIONS: Final = 1000
BACKPRESSURE_SECONDS: Final = 120.0
# A spool may cost at most this share of the memory-only flood throughput.
TARGET_SPOOL_COST: Final = 0.25
# Relay settings for the mesh workload, beyond the batch settings (the mesh
# pipeline's keys, e.g. RELAY_MESH_WORKERS, once it has them).
MESH_RELAY_ENV: dict[str, str] = {}
# ``--baseline DIR``: another checkout whose relay runs beside this one in every repeat
# of flood, paced and idle, with the same load generator and stand-in (this tree's).
BASELINE: Path | None = None
# Within this share of the baseline counts as "the same" (a refactoring's budget).
TARGET_BASELINE_SHARE: Final = 0.05
# How long after "all connected" the idle servers settle before RSS is read.
IDLE_SETTLE: Final = 2.0
# Generous: a loaded 2-core machine can be ten times slower than a quiet one.
TIMEOUT: Final = 300.0
# No event arriving for this long while some are missing: they are lost (the
# relay retries STAG within stag.retry_max, 10 s by default).
STALL: Final = 30.0


# --- processes --------------------------------------------------------------------


# Every child started, so that an interrupted run leaves none behind.
_CHILDREN: list[Child] = []
# The CPUs this process may use before it pins itself to the client's CPUs: where a
# child that is not pinned runs. Children inherit the parent's mask, so a child
# started without one would share the client's CPUs instead of floating.
_ALL_CPUS: Final = frozenset(os.sched_getaffinity(0))


class Child:
    """A child process whose stdout and stderr lines are collected by threads."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _CHILDREN.append(self)
        # Right after the exec: the interpreter has no other thread yet, and
        # threads and processes started later inherit the mask.
        os.sched_setaffinity(self.proc.pid, cpus or _ALL_CPUS)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            assert stream is not None
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[str], Any], *, stderr: bool = False, timeout: float = TIMEOUT
    ) -> Any:
        """The first truthy ``predicate(line)`` on stdout (or stderr)."""
        lines = self.stderr if stderr else self.stdout
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in lines[seen:]:
                    found = predicate(line)
                    if found:
                        return found
                seen = len(lines)
                if self.proc.poll() is not None and seen == len(lines):
                    # Drain what the reader threads still hold.
                    self._cond.wait(0.2)
                    if seen == len(lines):
                        break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        raise RuntimeError(f"{self.name}: expected output never came\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        with self._cond:
            return "\n".join(["-- stdout", *self.stdout[-n:], "-- stderr", *self.stderr[-n:]])

    def cpu_seconds(self) -> float:
        """User + system CPU so far of the process and its live descendants (a relay
        with workers: the supervisor and every worker)."""
        total = 0
        for pid in _tree(self.proc.pid):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no VmRSS")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.name} did not stop on SIGTERM\n{self.tail()}") from None

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
    return found


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


class Pinning:
    """Which CPUs the server under test gets, and which everything else gets."""

    def __init__(self, enabled: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cpus) >= 2
        self.server: set[int] | None = {cpus[0]} if self.enabled else None
        self.others: set[int] | None = set(cpus[1:]) if self.enabled else None

    @classmethod
    def shared(cls) -> Pinning:
        """Every process on every CPU: for worker processes, which need all of them."""
        pin = cls(False)
        pin.server = pin.others = set(os.sched_getaffinity(0)) | set(range(os.cpu_count() or 1))
        return pin

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return f"server on CPU {sorted(self.server or ())}, client and stand-in on CPUs " + str(
            sorted(self.others or ())
        )


def start_sink(pin: Pinning, *options: str) -> tuple[Child, str]:
    sink = Child(
        "sink",
        [PYTHON, "-m", "stag_relay.tools.sink", "--port", "0", "--quiet", *options],
        cpus=pin.others,
    )
    url = sink.wait_for(
        lambda line: (m := re.search(r"listening on (http://\S+?)/ingest", line)) and m.group(1),
        stderr=True,
        timeout=60,
    )
    return sink, url


def start_relay(
    stag_url: str, cpus: set[int] | None, *, baseline: bool = False, **settings: str
) -> tuple[Child, int]:
    """This tree's relay, or with ``baseline`` the one in BASELINE: ``python -m`` puts the
    working directory first on sys.path, so the relay runs from the checkout it starts in."""
    env = {
        "RELAY_SERVER_HOST": "127.0.0.1",
        "RELAY_SERVER_PORT": "0",
        "RELAY_STAG_URL": stag_url,
        "RELAY_LOG_FORMAT": "json",
        # The relay under test must not pick up a relay.yaml from the working tree.
        "RELAY_CONFIG": os.devnull,
        **settings,
    }
    source = BASELINE if baseline and BASELINE is not None else ROOT
    relay = Child("relay", [PYTHON, "-m", "stag_relay"], env=env, cpus=cpus, cwd=source)

    def listening(line: str) -> int | None:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "relay listening":
                return int(record["ports"][0])
        return None

    return relay, relay.wait_for(listening, stderr=True, timeout=60)


def start_bare(pin: Pinning, script: str = BARE_SERVER) -> tuple[Child, int]:
    """The bare trio-websocket server, or another ``script`` that says ``listening <port>``."""
    bare = Child("bare", [PYTHON, script], cpus=pin.server)
    port = bare.wait_for(lambda line: line.startswith("listening ") and int(line.split()[1]))
    return bare, port


class Loadgen:
    """``stag-relay loadgen`` as a child, reporting JSON lines."""

    def __init__(self, port: int, pin: Pinning, *options: str) -> None:
        argv = [
            PYTHON,
            "-m",
            "stag_relay.tools.loadgen",
            f"ws://127.0.0.1:{port}/ws/streamkit",
            "--progress",
            "jsonl",
            *options,
        ]
        self.child = Child("loadgen", argv, cpus=pin.others)

    def connected(self) -> dict[str, Any]:
        record: dict[str, Any] = self.child.wait_for(_json_event("connected"))
        return record

    def done(self) -> dict[str, Any]:
        summary: dict[str, Any] = self.child.wait_for(_json_event("done"))
        self.child.wait()
        return summary


def _json_event(name: str) -> Callable[[str], dict[str, Any] | None]:
    def match(line: str) -> dict[str, Any] | None:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == name:
                return record
        return None

    return match


def wait_for_events(sink_url: str, expected: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The stand-in's stats once it has ``expected`` events, or once none has arrived
    for ``STALL`` seconds (something was lost), or after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    while True:
        stats: dict[str, Any] = http_json(f"{sink_url}/stats")
        now = time.monotonic()
        if stats["events"] != last_count:
            last_count, last_change = stats["events"], now
        if stats["events"] >= expected or now > deadline or now - last_change > STALL:
            return stats
        time.sleep(0.05)


@contextlib.contextmanager
def relay_with_sink(
    pin: Pinning, *, pin_relay: bool = True, baseline: bool = False, **settings: str
) -> Iterator[tuple[Child, int, Child, str]]:
    sink, sink_url = start_sink(pin)
    relay: Child | None = None
    try:
        relay, port = start_relay(
            sink_url, pin.server if pin_relay else None, baseline=baseline, **settings
        )
        yield relay, port, sink, sink_url
        code = relay.stop()
        if code != 0:
            raise RuntimeError(f"relay exited with status {code}\n{relay.tail()}")
    finally:
        if relay is not None and relay.proc.poll() is None:
            relay.proc.kill()
        sink.stop()


def packets_ok(status: dict[str, Any]) -> int:
    return sum(int(by_status.get("ok", 0)) for by_status in status["packets"].values())


def packets_not_ok(status: dict[str, Any]) -> int:
    return sum(
        int(n)
        for by_status in status["packets"].values()
        for key, n in by_status.items()
        if key != "ok"
    )


# --- workloads --------------------------------------------------------------------


FLOOD_OPTIONS: Final = (
    *("--connections", str(FLOOD_CONNECTIONS)),
    *("--rate", "0", "--count", str(FLOOD_PACKETS)),
)
PACED_OPTIONS: Final = [
    *("--connections", str(PACED_CONNECTIONS), "--rate", f"{PACED_RATE:g}"),
    *("--duration", f"{PACED_SECONDS:g}s"),
]
# The SDK's dialect beside the seed one: 200 clients streaming poses at 30 Hz, each
# with a mesh every 4 s (an ARKit scene mesh updates every few seconds).
DIALECT_CONNECTIONS: Final = 200
DIALECT_RATE: Final = 30.0
DIALECT_MESH_TRIANGLES: Final = 2000
DIALECT_MESH_RATE: Final = "0.25"
# At 6,000 poses a second a batch of 100 takes 17 ms to fill, most of a 20 ms p99 by
# itself; batches of 50 fill in 8 ms, as the paced workload's 100 do at 12,000 a second.
DIALECT_BATCH_MAX_SIZE: Final = 50
DIALECT_WARM_UP: Final = (
    *("--connections", "1", "--rate", "10", "--duration", "1s"),
    *("--mesh-triangles", str(DIALECT_MESH_TRIANGLES), "--mesh-rate", "2"),
)
TARGET_SDK_CPU_RATIO: Final = 1.2
# One worker against two, on this 2-core machine.
WORKER_COUNTS: Final = (1, 2)


def flood(pin: Pinning) -> dict[str, Any]:
    options = FLOOD_OPTIONS
    total = FLOOD_CONNECTIONS * FLOOD_PACKETS

    bare, port = start_bare(pin)
    try:
        cpu0 = bare.cpu_seconds()
        summary = Loadgen(port, pin, *options).done()
        bare_cpu = bare.cpu_seconds() - cpu0
    finally:
        bare.stop()
    bare_rate = summary["read_rate"]
    result: dict[str, Any] = {
        "bare": {
            "messages": summary["sent"],
            "messages_per_second": round(bare_rate, 1),
            "cpu_us_per_message": round(bare_cpu / summary["sent"] * 1e6, 2),
            "client_cpu_us_per_message": _client_cpu(summary),
        }
    }

    # Each comparison is with runs on both sides (_bracket): the relay's two runs are
    # on both sides of the spooled one, 82a2669's two (with --baseline) of all three.
    if BASELINE is not None:
        baseline_before, _ = _relay_flood(pin, options, baseline=True)
    relay_before, status_before = _relay_flood(pin, options)
    # The same flood into a relay with a spool (the spool's cost): every
    # batch is then committed to SQLite before it is sent, and deleted after.
    with tempfile.TemporaryDirectory(prefix="stag-bench-spool-") as spool_dir:
        spooled, _ = _relay_flood(
            pin, options, RELAY_DELIVERY_SPOOL_PATH=str(Path(spool_dir) / "spool.sqlite3")
        )
    relay_after, status_after = _relay_flood(pin, options)
    result["relay"] = _bracket(relay_before, relay_after, "events_per_second", "cpu_us_per_event")
    result["relay_spool"] = spooled
    memory_rate = result["relay"]["events_per_second"]
    result["ratio"] = round(memory_rate / bare_rate, 3) if bare_rate else None
    result["spool_cost"] = (
        round(1 - spooled["events_per_second"] / memory_rate, 3) if memory_rate else None
    )
    result["nothing_lost"] = (
        all(
            run["events_delivered"] == run["sent"] == total
            and run["packets_not_ok"] == 0
            and run["error_replies"] == 0
            for run in (relay_before, relay_after)
        )
        and packets_ok(status_before) == packets_ok(status_after) == total
        and spooled["lost"] == 0
    )
    if BASELINE is not None:
        baseline_after, _ = _relay_flood(pin, options, baseline=True)
        result["baseline"] = _bracket(
            baseline_before, baseline_after, "events_per_second", "cpu_us_per_event"
        )
        result["vs_baseline"] = _versus(
            result["relay"], result["baseline"], "events_per_second", "cpu_us_per_event"
        )
        result["nothing_lost"] = result["nothing_lost"] and result["baseline"]["lost"] == 0
    return result


# What _bracket adds up over its two runs, where a run has them.
_COUNTS: Final = ("messages", "sent", "events_delivered", "lost", "packets_not_ok", "error_replies")


def _bracket(before: dict[str, Any], after: dict[str, Any], *figures: str) -> dict[str, Any]:
    """Two runs of one server on both sides of what it is compared with: ``figures`` are
    their mean, the counts their sum, and both runs are kept.

    On a shared host the CPU a message costs drifts from one run to the next; a
    figure measured only on one side leaves the ratio to that drift, one on both
    sides cancels a steady drift.
    """
    merged = {figure: round((before[figure] + after[figure]) / 2, 2) for figure in figures}
    merged.update({key: before[key] + after[key] for key in _COUNTS if key in before})
    return {**merged, "before": before, "after": after}


def _versus(relay: dict[str, Any], baseline: dict[str, Any], *figures: str) -> dict[str, Any]:
    """This tree's figures over the baseline's, figure by figure."""
    return {
        figure: round(relay[figure] / baseline[figure], 3) if baseline.get(figure) else None
        for figure in figures
    }


def _relay_flood(
    pin: Pinning, options: tuple[str, ...], *, baseline: bool = False, **env: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The flood through a relay (``env`` on top of its settings): figures and /status."""
    settings = {
        "RELAY_BATCH_MAX_SIZE": str(BATCH_MAX_SIZE),
        "RELAY_WEBSOCKET_MAX_PACKETS_PER_SECOND": FLOOD_PACKET_RATE_LIMIT,
        **env,
    }
    with relay_with_sink(pin, pin_relay=True, baseline=baseline, **settings) as (
        relay,
        port,
        _,
        sink_url,
    ):
        cpu0 = relay.cpu_seconds()
        summary = Loadgen(port, pin, *options).done()
        stats = wait_for_events(sink_url, summary["sent"])
        relay_cpu = relay.cpu_seconds() - cpu0
        status = http_json(f"http://127.0.0.1:{port}/status")
    events = stats["events"]
    span = stats["last_arrival_at"] - summary["started_at"] if events else 0.0
    relay_rate = events / span if span > 0 else 0.0
    figures = {
        "sent": summary["sent"],
        "events_delivered": events,
        "lost": summary["sent"] - events,
        "packets_not_ok": packets_not_ok(status),
        "error_replies": summary["errors"],
        "max_batch": stats["batch_size"]["max"],
        "events_per_second": round(relay_rate, 1),
        "cpu_us_per_event": round(relay_cpu / max(events, 1) * 1e6, 2),
        "client_cpu_us_per_message": _client_cpu(summary),
    }
    return figures, status


def _paced_server(pin: Pinning, script: str, options: list[str]) -> dict[str, Any]:
    """The paced load against a server that discards what it reads: its CPU per message."""
    server, port = start_bare(pin, script)
    try:
        loadgen = Loadgen(port, pin, *options)
        loadgen.connected()
        cpu0 = server.cpu_seconds()
        summary = loadgen.done()
        cpu = server.cpu_seconds() - cpu0
    finally:
        server.stop()
    return {
        "messages": summary["sent"],
        "cpu_us_per_message": round(cpu / summary["sent"] * 1e6, 2),
        "client_max_lag_ms": round(summary["max_lag_ms"], 2),
    }


def paced(pin: Pinning) -> dict[str, Any]:
    options = PACED_OPTIONS

    # The bare trio-websocket server, and the Trio floor (a handshake, then reads
    # discarded): what the stack costs with a WebSocket library, and without one.
    # The floor runs on both sides of the relay (_bracket says why).
    result: dict[str, Any] = {"bare": _paced_server(pin, BARE_SERVER, options)}
    floor_before = _paced_server(pin, FLOOR_SERVER, options)
    result["relay"] = _relay_paced(pin, options)
    floor_after = _paced_server(pin, FLOOR_SERVER, options)
    result["floor"] = _bracket(floor_before, floor_after, "cpu_us_per_message")
    bare_per_message = result["bare"]["cpu_us_per_message"] / 1e6
    floor_per_message = result["floor"]["cpu_us_per_message"] / 1e6
    relay_per_event = result["relay"]["cpu_us_per_event"] / 1e6
    result["cpu_ratio"] = round(relay_per_event / bare_per_message, 3)
    result["floor_cpu_ratio"] = (
        round(relay_per_event / floor_per_message, 3) if floor_per_message else None
    )
    result["nothing_lost"] = result["relay"]["lost"] == 0 and result["relay"]["error_replies"] == 0
    if BASELINE is not None:
        result["baseline"] = _relay_paced(pin, options, baseline=True)
        result["vs_baseline"] = _versus(
            result["relay"], result["baseline"], "cpu_us_per_event", "latency_p99_ms"
        )
        result["nothing_lost"] = result["nothing_lost"] and result["baseline"]["lost"] == 0
    return result


def _relay_paced(
    pin: Pinning, options: list[str], *, baseline: bool = False, **env: str
) -> dict[str, Any]:
    """The paced load through a relay (``env`` on top of its settings)."""
    settings = {
        "RELAY_BATCH_MAX_SIZE": str(BATCH_MAX_SIZE),
        "RELAY_BATCH_TIMEOUT": PACED_BATCH_TIMEOUT,
        **env,
    }
    with relay_with_sink(pin, pin_relay=True, baseline=baseline, **settings) as (
        relay,
        port,
        _,
        sink_url,
    ):
        loadgen = Loadgen(port, pin, *options)
        loadgen.connected()
        cpu0 = relay.cpu_seconds()
        summary = loadgen.done()
        stats = wait_for_events(sink_url, summary["sent"])
        relay_cpu = relay.cpu_seconds() - cpu0
    events = stats["events"]
    latency = stats["latency_ms"]
    return {
        "sent": summary["sent"],
        "events_delivered": events,
        "lost": summary["sent"] - events,
        "error_replies": summary["errors"],
        "latency_p50_ms": latency["p50"],
        "latency_p99_ms": latency["p99"],
        "latency_max_ms": latency["max"],
        "relay_latency_p99_ms": stats["relay_latency_ms"]["p99"],
        "cpu_us_per_event": round(relay_cpu / max(events, 1) * 1e6, 2),
        "client_max_lag_ms": round(summary["max_lag_ms"], 2),
        "mean_batch": stats["batch_size"]["mean"],
    }


def workers(pin: Pinning) -> dict[str, Any]:
    """The flood and the paced load through 1 and through 2 worker processes.

    Nothing is pinned (two workers need both CPUs, which the client and the stand-in
    share with them); CPU is the whole relay's, supervisor and workers.
    """
    shared = Pinning.shared() if pin.enabled else pin
    result: dict[str, Any] = {}
    for count in WORKER_COUNTS:
        flood_figures, _ = _relay_flood(shared, FLOOD_OPTIONS, RELAY_SERVER_WORKERS=str(count))
        result[f"workers_{count}"] = {
            "flood": flood_figures,
            "paced": _relay_paced(shared, PACED_OPTIONS, RELAY_SERVER_WORKERS=str(count)),
        }
    one, two = (result[f"workers_{count}"] for count in WORKER_COUNTS)
    base = one["flood"]["events_per_second"]
    result["flood_speedup"] = round(two["flood"]["events_per_second"] / base, 3) if base else None
    result["nothing_lost"] = all(
        result[f"workers_{count}"][load]["lost"] == 0
        for count in WORKER_COUNTS
        for load in ("flood", "paced")
    )
    return result


def idle(pin: Pinning, connections: int) -> dict[str, Any]:
    hold = IDLE_SETTLE + 3.0
    options = ("--connections", str(connections), "--count", "0", "--duration", f"{hold:g}s")

    def measure(server: Child, port: int, status_url: str | None) -> dict[str, Any]:
        time.sleep(0.5)
        base = server.rss_bytes()
        loadgen = Loadgen(port, pin, *options)
        connected = loadgen.connected()
        time.sleep(IDLE_SETTLE)
        rss = server.rss_bytes()
        active = http_json(status_url)["connections"]["active"] if status_url else None
        summary = loadgen.done()
        return {
            "connections": connected["connections"],
            "server_active_connections": active,
            "rss_base_mib": round(base / 2**20, 1),
            "rss_open_mib": round(rss / 2**20, 1),
            "rss_per_connection_kib": round((rss - base) / connections / 1024, 2),
            "connect_seconds": round(summary["connect_seconds"], 2),
            "connect_failures": summary["connect_failures"],
        }

    bare, port = start_bare(pin)
    try:
        result: dict[str, Any] = {"bare": measure(bare, port, None)}
    finally:
        bare.stop()
    with relay_with_sink(pin) as (relay, port, _, _):
        result["relay"] = measure(relay, port, f"http://127.0.0.1:{port}/status")
    result["ratio"] = round(
        result["relay"]["rss_per_connection_kib"] / result["bare"]["rss_per_connection_kib"], 3
    )
    if BASELINE is not None:
        with relay_with_sink(pin, baseline=True) as (relay, port, _, _):
            result["baseline"] = measure(relay, port, f"http://127.0.0.1:{port}/status")
    return result


def backpressure(pin: Pinning, connections: int, seconds: float) -> dict[str, Any]:
    """The relay's RSS with ``connections`` clients at 10 Hz while STAG takes 2 s per
    request (full backpressure), against the same relay with as many idle clients."""
    sink, sink_url = start_sink(pin, "--delay", "2s")
    relay: Child | None = None
    try:
        relay, port = start_relay(sink_url, pin.server, RELAY_BATCH_MAX_SIZE="100")
        status_url = f"http://127.0.0.1:{port}/status"
        idle = Loadgen(
            port,
            pin,
            "--connections",
            str(connections),
            "--count",
            "0",
            "--duration",
            f"{IDLE_SETTLE + 3:g}s",
        )
        idle.connected()
        time.sleep(IDLE_SETTLE)
        rss_idle = relay.rss_bytes()
        idle.done()
        pressed = Loadgen(
            port,
            pin,
            "--connections",
            str(connections),
            "--rate",
            "10",
            "--duration",
            f"{seconds:g}s",
        )
        pressed.connected()
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(5.0)
            samples.append(relay.rss_bytes())
        depth = http_json(status_url)["channel"]
        pressed.done()
        relay.stop()
    finally:
        if relay is not None and relay.proc.poll() is None:
            relay.proc.kill()
        sink.stop()
    return {
        "connections": connections,
        "seconds": seconds,
        "rss_idle_mib": round(rss_idle / 2**20, 1),
        "rss_pressed_max_mib": round(max(samples) / 2**20, 1),
        "rss_pressed_last_mib": round(samples[-1] / 2**20, 1),
        "rss_growth_mib": round((max(samples) - rss_idle) / 2**20, 1),
        "channel_at_end": depth,
    }


def mesh(pin: Pinning, connections: int) -> dict[str, Any]:
    options = [
        *("--connections", str(connections), "--rate", f"{PACED_RATE:g}"),
        *("--duration", f"{PACED_SECONDS:g}s"),
    ]
    settings = {
        "RELAY_BATCH_MAX_SIZE": str(BATCH_MAX_SIZE),
        "RELAY_BATCH_TIMEOUT": PACED_BATCH_TIMEOUT,
        **MESH_RELAY_ENV,
    }
    result: dict[str, Any] = {}
    for name, extra in (
        ("pose_only", ()),
        ("with_mesh", ("--mesh-triangles", str(MESH_TRIANGLES), "--mesh-rate", "1")),
    ):
        with relay_with_sink(pin, pin_relay=False, **settings) as (_, port, _, sink_url):
            summary = Loadgen(port, pin, *options, *extra).done()
            stats = wait_for_events(sink_url, summary["sent"])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                metrics = r.read().decode()
        pose = stats["latency_ms_by_type"].get("pose", {})
        result[name] = {
            "sent": summary["sent"],
            "mesh_sent": summary["mesh_sent"],
            "events_delivered": stats["events"],
            "lost": summary["sent"] - stats["events"],
            "error_replies": summary["errors"],
            "error_samples": summary["error_samples"],
            "pose_p50_ms": pose.get("p50"),
            "pose_p99_ms": pose.get("p99"),
            "mesh_chars_in": summary["mesh_chars"],
            "mesh_chars_out": stats["mesh_chars"],
        }
        result["relay_sends_mesh_diffs"] = "relay_mesh_updates_total" in metrics
    with_mesh, pose_only = result["with_mesh"], result["pose_only"]
    if with_mesh["mesh_chars_in"]:
        result["mesh_out_over_in"] = round(
            with_mesh["mesh_chars_out"] / with_mesh["mesh_chars_in"], 3
        )
    if with_mesh["pose_p99_ms"] and pose_only["pose_p99_ms"]:
        result["pose_p99_ratio"] = round(with_mesh["pose_p99_ms"] / pose_only["pose_p99_ms"], 3)
    return result


def dialects(pin: Pinning) -> dict[str, Any]:
    """The same paced load in the relay's own dialect and in the StreamKit SDK's: CPU
    per event (the relay's whole process tree: meshes are checked in workers) and
    pose p99, side by side in one repeat."""
    options = [
        *("--connections", str(DIALECT_CONNECTIONS), "--rate", f"{DIALECT_RATE:g}"),
        *("--duration", f"{PACED_SECONDS:g}s"),
        *("--mesh-triangles", str(DIALECT_MESH_TRIANGLES), "--mesh-rate", DIALECT_MESH_RATE),
    ]
    settings = {
        "RELAY_BATCH_MAX_SIZE": str(DIALECT_BATCH_MAX_SIZE),
        "RELAY_BATCH_TIMEOUT": PACED_BATCH_TIMEOUT,
    }
    result: dict[str, Any] = {}
    for dialect in ("streamkit", "sdk"):
        with relay_with_sink(pin, pin_relay=False, **settings) as (relay, port, _, sink_url):
            # The mesh workers start with a relay's first mesh, about a second during
            # which that connection waits: a relay's first second, not its steady state.
            # One client's few packets start them; their dozen events do not move a p99
            # of 60,000.
            warm = Loadgen(port, pin, *DIALECT_WARM_UP, "--dialect", dialect).done()
            wait_for_events(sink_url, warm["sent"])
            loadgen = Loadgen(port, pin, *options, "--dialect", dialect)
            loadgen.connected()
            cpu0 = relay.cpu_seconds()
            summary = loadgen.done()
            stats = wait_for_events(sink_url, warm["sent"] + summary["sent"])
            relay_cpu = relay.cpu_seconds() - cpu0
        pose = stats["latency_ms_by_type"].get("pose", {})
        events = stats["events"] - warm["sent"]
        result[dialect] = {
            "sent": summary["sent"],
            "mesh_sent": summary["mesh_sent"],
            "events_delivered": events,
            "lost": summary["sent"] - events,
            "error_replies": summary["errors"] + warm["errors"],
            "cpu_us_per_event": round(relay_cpu / max(events, 1) * 1e6, 2),
            "pose_p99_ms": pose.get("p99"),
        }
    seed, sdk = result["streamkit"], result["sdk"]
    if seed["cpu_us_per_event"]:
        result["sdk_cpu_ratio"] = round(sdk["cpu_us_per_event"] / seed["cpu_us_per_event"], 3)
    result["nothing_lost"] = all(
        result[d]["lost"] == 0 and result[d]["error_replies"] == 0 for d in ("streamkit", "sdk")
    )
    return result


def _client_cpu(summary: dict[str, Any]) -> float:
    return round(float(summary["client_cpu_seconds"]) / max(int(summary["sent"]), 1) * 1e6, 2)


# --- aggregation and report ---------------------------------------------------------


def median_of(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.append(value)
    if not values:
        return None
    median = statistics.median(values)
    if all(isinstance(v, int) for v in values) and median == int(median):
        return int(median)
    return round(median, 3)


MEDIANS: Final[dict[str, list[tuple[str, ...]]]] = {
    "flood": [
        ("bare", "messages_per_second"),
        ("relay", "events_per_second"),
        ("ratio",),
        ("bare", "cpu_us_per_message"),
        ("relay", "cpu_us_per_event"),
        ("relay", "lost"),
        ("relay_spool", "events_per_second"),
        ("spool_cost",),
        ("baseline", "events_per_second"),
        ("baseline", "cpu_us_per_event"),
        ("vs_baseline", "events_per_second"),
        ("vs_baseline", "cpu_us_per_event"),
    ],
    "paced": [
        ("relay", "latency_p50_ms"),
        ("relay", "latency_p99_ms"),
        ("relay", "relay_latency_p99_ms"),
        ("bare", "cpu_us_per_message"),
        ("floor", "cpu_us_per_message"),
        ("relay", "cpu_us_per_event"),
        ("cpu_ratio",),
        ("floor_cpu_ratio",),
        ("relay", "lost"),
        ("baseline", "latency_p99_ms"),
        ("baseline", "cpu_us_per_event"),
        ("vs_baseline", "cpu_us_per_event"),
        ("vs_baseline", "latency_p99_ms"),
    ],
    "backpressure": [
        ("rss_idle_mib",),
        ("rss_pressed_max_mib",),
        ("rss_growth_mib",),
    ],
    "idle": [
        ("bare", "rss_per_connection_kib"),
        ("relay", "rss_per_connection_kib"),
        ("ratio",),
        ("baseline", "rss_per_connection_kib"),
    ],
    "workers": [
        *(
            (f"workers_{count}", load, figure)
            for count in WORKER_COUNTS
            for load, figure in (
                ("flood", "events_per_second"),
                ("flood", "cpu_us_per_event"),
                ("paced", "latency_p50_ms"),
                ("paced", "latency_p99_ms"),
                ("paced", "cpu_us_per_event"),
                ("paced", "lost"),
            )
        ),
        ("flood_speedup",),
    ],
    "dialects": [
        ("streamkit", "cpu_us_per_event"),
        ("sdk", "cpu_us_per_event"),
        ("sdk_cpu_ratio",),
        ("streamkit", "pose_p99_ms"),
        ("sdk", "pose_p99_ms"),
        ("sdk", "lost"),
    ],
    "mesh": [
        ("pose_only", "pose_p99_ms"),
        ("with_mesh", "pose_p99_ms"),
        ("pose_p99_ratio",),
        ("mesh_out_over_in",),
    ],
}


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {".".join(path): median_of(runs, *path) for path in MEDIANS[name]}


def targets(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(name: str, measured: float | None, target: str, met: bool | None) -> None:
        rows.append({"target": name, "goal": target, "measured": measured, "met": met})

    if "flood" in workloads:
        f = workloads["flood"]
        ratio = f["median"]["ratio"]
        lost = all(run["nothing_lost"] for run in f["runs"])
        add(
            "flood relay / bare",
            ratio,
            f">= {TARGET_FLOOD_RATIO}",
            None if ratio is None else ratio >= TARGET_FLOOD_RATIO and lost,
        )
        add("flood: nothing lost (every repeat)", None, "yes", lost)
        cost = f["median"]["spool_cost"]
        add(
            "flood: the spool's throughput cost",
            cost,
            f"<= {TARGET_SPOOL_COST}",
            None if cost is None else cost <= TARGET_SPOOL_COST,
        )
    if "paced" in workloads:
        p = workloads["paced"]["median"]
        p99 = p["relay.latency_p99_ms"]
        add(
            "paced p99 latency (ms)",
            p99,
            f"<= {TARGET_P99_MS:g}",
            None if p99 is None else p99 <= TARGET_P99_MS,
        )
        cpu = p["cpu_ratio"]
        add(
            "paced CPU per event / bare's per message",
            cpu,
            f"<= {TARGET_CPU_RATIO}",
            None if cpu is None else cpu <= TARGET_CPU_RATIO,
        )
        floor = p["floor_cpu_ratio"]
        add(
            "paced CPU per event / Trio floor's per message",
            floor,
            f"<= {TARGET_CPU_RATIO}",
            None if floor is None else floor <= TARGET_CPU_RATIO,
        )
    share = TARGET_BASELINE_SHARE
    for workload, figure, better in (
        ("flood", "events_per_second", "higher"),
        ("flood", "cpu_us_per_event", "lower"),
        ("paced", "cpu_us_per_event", "lower"),
    ):
        if workload not in workloads:
            continue
        versus = workloads[workload]["median"].get(f"vs_baseline.{figure}")
        if versus is None:
            continue
        goal = f">= {1 - share:g}" if better == "higher" else f"<= {1 + share:g}"
        met = versus >= 1 - share if better == "higher" else versus <= 1 + share
        add(f"{workload} {figure}: this tree / baseline", versus, goal, met)
    if "dialects" in workloads and "median" in workloads["dialects"]:
        d = workloads["dialects"]
        ratio = d["median"]["sdk_cpu_ratio"]
        lost = all(run["nothing_lost"] for run in d["runs"])
        add(
            "SDK dialect: CPU per event / seed dialect's",
            ratio,
            f"<= {TARGET_SDK_CPU_RATIO}",
            None if ratio is None else ratio <= TARGET_SDK_CPU_RATIO and lost,
        )
        p99 = d["median"]["sdk.pose_p99_ms"]
        add(
            "SDK dialect: pose p99 (ms)",
            p99,
            f"<= {TARGET_P99_MS:g}",
            None if p99 is None else p99 <= TARGET_P99_MS,
        )
    if "mesh" in workloads and "median" in workloads["mesh"]:
        m = workloads["mesh"]["median"]
        ratio = m["pose_p99_ratio"]
        add(
            "mesh: pose p99 beside meshes / pose-only",
            ratio,
            "<= 2",
            None if ratio is None else ratio <= 2,
        )
        out_in = m["mesh_out_over_in"]
        add(
            "mesh: characters out / in", out_in, "<= 0.3", None if out_in is None else out_in <= 0.3
        )
    if "workers" in workloads:
        w = workloads["workers"]
        p99 = w["median"]["workers_2.paced.latency_p99_ms"]
        lost = all(run["nothing_lost"] for run in w["runs"])
        add(
            "2 workers: paced p99 latency (ms), nothing lost",
            p99,
            f"<= {TARGET_P99_MS:g}",
            None if p99 is None else p99 <= TARGET_P99_MS and lost,
        )
    if "backpressure" in workloads:
        growth = workloads["backpressure"]["median"]["rss_growth_mib"]
        add(
            "backpressure: RSS over the same relay with idle clients (MiB)",
            growth,
            f"<= {TARGET_BACKPRESSURE_GROWTH_MIB}",
            None if growth is None else growth <= TARGET_BACKPRESSURE_GROWTH_MIB,
        )
    if "idle" in workloads:
        rss = workloads["idle"]["median"]["relay.rss_per_connection_kib"]
        add(
            "idle RSS per connection (KiB)",
            rss,
            f"<= {TARGET_RSS_PER_CONNECTION // 1024}",
            None if rss is None else rss <= TARGET_RSS_PER_CONNECTION / 1024,
        )
    return rows


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if changed:
            commit += " (with uncommitted changes)"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "load_average_at_start": os.getloadavg(),
    }


def _checkout(path: Path) -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {"path": str(path), "commit": commit}


def print_report(results: dict[str, Any]) -> None:
    workloads = results["workloads"]
    lines = [
        f"stag-relay benchmark, {results['date']}, {results['machine']['cpu_model']}, "
        f"{results['machine']['nproc']} CPUs, Python {results['machine']['python']}",
        f"medians of {results['repeats']} repeats; pinning: {results['pinning']}",
        *(
            [f"baseline: {results['baseline']['path']} at {results['baseline']['commit']}"]
            if results.get("baseline")
            else []
        ),
        "",
    ]
    for name, data in workloads.items():
        if "skipped" in data:
            lines.append(f"{name}: skipped ({data['skipped']})")
            continue
        lines.append(f"{name}:")
        for key, value in data["median"].items():
            per_run = [_dig(run, key) for run in data["runs"]]
            lines.append(f"  {key:<36} {_fmt(value):>12}   runs: {', '.join(map(_fmt, per_run))}")
    lines.append("")
    lines.append("targets:")
    for row in results["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "-"}[row["met"]]
        lines.append(
            f"  {row['target']:<44} {_fmt(row['measured']):>10}  goal {row['goal']:<8} {verdict}"
        )
    print("\n".join(lines))


def _dig(run: dict[str, Any], dotted: str) -> Any:
    value: Any = run
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


# --- main -------------------------------------------------------------------------


def main() -> int:
    # SIGTERM (nohup runs, CI timeouts) unwinds like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _main()
    finally:
        for child in _CHILDREN:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repeats per workload (3)")
    parser.add_argument(
        "--only",
        default="flood,paced,idle,mesh,dialects,workers",
        help="workloads to run, comma-separated",
    )
    parser.add_argument("--idle-connections", type=int, default=IDLE_CONNECTIONS)
    parser.add_argument(
        "--mesh-connections",
        type=int,
        default=MESH_CONNECTIONS,
        help=f"connections of the mesh workload, each with a mesh a second ({MESH_CONNECTIONS})",
    )
    parser.add_argument("--backpressure-connections", type=int, default=BACKPRESSURE_CONNECTIONS)
    parser.add_argument(
        "--backpressure-seconds",
        type=float,
        default=BACKPRESSURE_SECONDS,
        help="how long the backpressure workload holds its clients under backpressure "
        f"({BACKPRESSURE_SECONDS:g}; not in the default --only, it takes minutes)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another commit (e.g. a git worktree) whose relay runs beside this "
        "tree's in every repeat of flood, paced and idle",
    )
    parser.add_argument("--output", default="bench-results.json", help="JSON results file")
    args = parser.parse_args()

    # Thousands of sockets in the load generator and in the server; children inherit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle_connections * 2 + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(
            resource.RLIMIT_NOFILE,
            (hard if hard == resource.RLIM_INFINITY else min(need, hard), hard),
        )
    global BASELINE
    if args.baseline is not None:
        if not (args.baseline / "stag_relay" / "__main__.py").is_file():
            parser.error(f"--baseline {args.baseline}: no stag_relay/__main__.py there")
        BASELINE = args.baseline.resolve()
    pin = Pinning(not args.no_pin)
    if pin.others:
        os.sched_setaffinity(0, pin.others)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "repeats": args.repeats,
        "pinning": pin.describe(),
        "baseline": None if BASELINE is None else _checkout(BASELINE),
        "workloads": {},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "flood": lambda: flood(pin),
        "paced": lambda: paced(pin),
        "idle": lambda: idle(pin, args.idle_connections),
        "mesh": lambda: mesh(pin, args.mesh_connections),
        "dialects": lambda: dialects(pin),
        "workers": lambda: workers(pin),
        "backpressure": lambda: backpressure(
            pin, args.backpressure_connections, args.backpressure_seconds
        ),
    }
    for name in chosen:
        if name not in runners:
            parser.error(
                f"unknown workload {name!r} "
                "(flood, paced, idle, mesh, dialects, workers, backpressure)"
            )
        if name in ("mesh", "dialects"):
            try:
                import DracoPy  # noqa: F401
            except ImportError:
                results["workloads"][name] = {"skipped": "DracoPy is not installed"}
                print(f"{name}: skipped, DracoPy is not installed", flush=True)
                continue
        runs = []
        for repeat in range(1, args.repeats + 1):
            started = time.monotonic()
            print(f"{name}: repeat {repeat}/{args.repeats} ...", end=" ", flush=True)
            run = runners[name]()
            runs.append(run)
            print(f"{time.monotonic() - started:.0f}s", flush=True)
        results["workloads"][name] = {"runs": runs, "median": summarise(name, runs)}
        # Partial results survive a later failure.
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["targets"] = targets(results["workloads"])
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print()
    print_report(results)
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
