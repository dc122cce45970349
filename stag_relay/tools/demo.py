"""Demo: a relay, a local STAG stand-in and a load generator, with one live table.

``stag-relay demo`` shows the whole pipeline on a fresh machine, with nothing to
set up: it starts ``stag-relay sink`` (in this process), a relay delivering to
it (``python -m stag_relay`` as a child process, configured through the
environment like any deployment) and ``stag-relay loadgen`` streaming to the
relay (another child), then shows packets in, events out, latency and the
relay's queue depth while they run. It ends by itself after ``--duration``,
once everything sent has arrived or a grace period has passed, and says
whether anything was lost.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import attrs
import httpx
import orjson
import trio

from stag_relay.service.config import duration_argument
from stag_relay.tools.sink import LatencyHistogram, Ledger, Sink, SinkSettings

DEFAULT_DURATION: Final = 10.0
DEFAULT_CONNECTIONS: Final = 10
DEFAULT_RATE: Final = 60.0
# After the load generator stops: how long events still on their way may take
# (the relay's default batch.timeout is 100 ms and a retry can take seconds).
DRAIN_GRACE: Final = 10.0
# The relay logs "relay listening" within a second on a warm machine; a cold
# start (first import of everything) on a slow one takes a few.
START_TIMEOUT: Final = 30.0
# Lines of the relay's log kept to show when something goes wrong (and searched for
# the port: the relay logs a handful of lines before it listens).
_LOG_TAIL: Final = 50
_REFRESH: Final = 0.5


@attrs.define
class _View:
    """What the table shows; updated by the tasks that watch each process."""

    started: float = attrs.field(factory=time.monotonic)
    phase: str = "starting"
    loadgen: dict[str, Any] = attrs.field(factory=dict)
    loadgen_summary: dict[str, Any] | None = None
    status: dict[str, Any] = attrs.field(factory=dict)
    relay_log: deque[str] = attrs.field(factory=lambda: deque(maxlen=_LOG_TAIL))
    # (monotonic time, packets sent, packets in, events out) a few refreshes back.
    history: deque[tuple[float, int, int, int]] = attrs.field(factory=lambda: deque(maxlen=4))
    window: LatencyHistogram = attrs.field(factory=LatencyHistogram)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-d",
        "--duration",
        type=duration_argument,
        default=DEFAULT_DURATION,
        help=f"how long the load generator streams (default {DEFAULT_DURATION:g}s)",
    )
    parser.add_argument(
        "-c",
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help=f"client connections (default {DEFAULT_CONNECTIONS})",
    )
    parser.add_argument(
        "-r",
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"pose packets per second per connection, 0 for as fast as possible "
        f"(default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--mesh-triangles",
        type=int,
        default=0,
        metavar="N",
        help="also stream a growing N-triangle Draco mesh per connection, once a second",
    )
    parser.add_argument(
        "--dialect",
        choices=("streamkit", "sdk"),
        default="streamkit",
        help="what the clients speak: the relay's own packets (default) or the StreamKit "
        "iOS SDK's messages",
    )
    parser.add_argument(
        "--format",
        dest="stag_format",
        choices=("batch", "spatial-event"),
        default="batch",
        help="what the relay sends STAG (stag.format), and the stand-in reads: batches "
        "(default) or one SpatialEvent per request, as the public STAGs ingest",
    )
    parser.add_argument(
        "--batch-size", type=int, help="the relay's batch.max_size (default: its own)"
    )
    parser.add_argument(
        "--batch-timeout", help="the relay's batch.timeout, e.g. 50ms (default: its own)"
    )


def run(args: argparse.Namespace) -> int:
    """0 when every packet sent reached the stand-in and every process ended cleanly."""
    from rich.console import Console

    console = Console()
    try:
        return trio.run(_demo, args, console)
    except KeyboardInterrupt:
        return 130


async def _demo(args: argparse.Namespace, console: Any) -> int:
    from rich.live import Live

    view = _View()
    sink = Sink(SinkSettings(host="127.0.0.1", port=0, wire_format=args.stag_format))
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        relay = await nursery.start(_run_relay, args, sink.url, view)
        port = await _relay_port(relay, view)
        if port is None:
            console.print("[red]the relay did not start[/red]; its last log lines:")
            console.print("\n".join(view.relay_log), markup=False, highlight=False)
            nursery.cancel_scope.cancel()
            return 1
        base = f"http://127.0.0.1:{port}"
        with Live(_table(args, view, sink.ledger), console=console, auto_refresh=False) as live:
            async with httpx.AsyncClient(base_url=base, timeout=5.0) as http:
                view.phase = "streaming"
                loadgen = await nursery.start(_run_loadgen, args, port, view)
                nursery.start_soon(_refresh, live, args, view, sink.ledger, http)
                await loadgen.wait()
                view.phase = "draining"
                await _wait_delivered(view, sink.ledger, http)
                view.phase = "stopping the relay"
                relay.terminate()
                with trio.move_on_after(DRAIN_GRACE + 5):
                    await relay.wait()
                if relay.returncode is None:
                    relay.kill()
                view.phase = "done"
                await _poll(view, http)
                live.update(_table(args, view, sink.ledger), refresh=True)
        nursery.cancel_scope.cancel()
    return _verdict(console, view, sink.ledger, loadgen.returncode, relay.returncode)


async def _run_relay(
    args: argparse.Namespace,
    stag_url: str,
    view: _View,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_SERVER_HOST="127.0.0.1",
        RELAY_SERVER_PORT="0",
        RELAY_STAG_URL=stag_url,
        RELAY_STAG_FORMAT=args.stag_format,
        RELAY_LOG_FORMAT="json",
    )
    if args.batch_size is not None:
        env["RELAY_BATCH_MAX_SIZE"] = str(args.batch_size)
    if args.batch_timeout is not None:
        env["RELAY_BATCH_TIMEOUT"] = args.batch_timeout
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            _start_process, [sys.executable, "-m", "stag_relay"], env, "stderr"
        )
        task_status.started(proc)
        assert proc.stderr is not None
        async for line in _lines(proc.stderr):
            view.relay_log.append(line.decode(errors="replace"))


async def _relay_port(relay: trio.Process, view: _View) -> int | None:
    """The port from the relay's "relay listening" log line (None if it never came)."""
    with trio.move_on_after(START_TIMEOUT):
        while relay.returncode is None:
            for line in list(view.relay_log):
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("event") == "relay listening":
                    ports = record.get("ports") or []
                    return int(ports[0]) if ports else None
            await trio.sleep(0.05)
    return None


async def _run_loadgen(
    args: argparse.Namespace,
    port: int,
    view: _View,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    command = [
        sys.executable,
        "-m",
        "stag_relay.tools.loadgen",
        f"ws://127.0.0.1:{port}/ws/streamkit",
        "--connections",
        str(args.connections),
        "--rate",
        str(args.rate),
        "--duration",
        f"{args.duration}s",
        "--dialect",
        args.dialect,
        "--progress",
        "jsonl",
        "--session-prefix",
        f"demo-{os.getpid()}-{time.time_ns() % 10**6}",
    ]
    if args.mesh_triangles:
        command += ["--mesh-triangles", str(args.mesh_triangles)]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(_start_process, command, None, "stdout")
        task_status.started(proc)
        assert proc.stdout is not None
        async for line in _lines(proc.stdout):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                if record.get("event") == "done":
                    view.loadgen_summary = record
                view.loadgen = record


async def _start_process(
    command: list[str],
    env: dict[str, str] | None,
    pipe: str,
    *,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``command`` with ``pipe`` ("stdout" or "stderr") readable; the other output
    is discarded. Cancelled: the process is terminated (then killed)."""
    streams: dict[str, Any] = {
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        pipe: subprocess.PIPE,
    }
    await trio.run_process(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
        task_status=task_status,
        **streams,
    )


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            if buffer:
                yield buffer
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line


async def _poll(view: _View, http: httpx.AsyncClient) -> None:
    try:
        response = await http.get("/status")
        view.status = response.json()
    except (httpx.HTTPError, ValueError):
        pass  # stopped or stopping: keep the last answer


async def _refresh(
    live: Any, args: argparse.Namespace, view: _View, ledger: Ledger, http: httpx.AsyncClient
) -> None:
    while True:
        await _poll(view, http)
        view.window = ledger.take_window()
        view.history.append((time.monotonic(), _sent(view), _packets_in(view), ledger.events))
        live.update(_table(args, view, ledger), refresh=True)
        await trio.sleep(_REFRESH)


async def _wait_delivered(view: _View, ledger: Ledger, http: httpx.AsyncClient) -> None:
    """Until the stand-in has every event the relay accepted (or the grace is over)."""
    with trio.move_on_after(DRAIN_GRACE):
        while True:
            await _poll(view, http)
            accepted = _packets(view, "ok")
            if accepted >= _sent(view) and ledger.events >= accepted:
                return
            await trio.sleep(0.1)


def _sent(view: _View) -> int:
    summary = view.loadgen_summary
    if summary is not None:
        return int(summary.get("sent", 0))
    return int(view.loadgen.get("sent", 0))


def _packets(view: _View, status: str) -> int:
    packets = view.status.get("packets", {})
    return sum(int(by_status.get(status, 0)) for by_status in packets.values())


def _packets_in(view: _View) -> int:
    packets = view.status.get("packets", {})
    return sum(int(n) for by_status in packets.values() for n in by_status.values())


def _table(args: argparse.Namespace, view: _View, ledger: Ledger) -> Any:
    from rich.table import Table

    def rate(index: int) -> str:
        if len(view.history) < 2:
            return ""
        first, last = view.history[0], view.history[-1]
        dt = last[0] - first[0]
        return f"{(last[index] - first[index]) / dt:,.0f}/s" if dt > 0 else ""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    elapsed = time.monotonic() - view.started
    mesh = f" + a {args.mesh_triangles:,}-triangle mesh/s" if args.mesh_triangles else ""
    rate_text = "as fast as possible" if args.rate == 0 else f"{args.rate:g} Hz"
    table = Table(
        title=f"stag-relay demo: {args.connections} connections x {rate_text}{mesh}, "
        f"{args.duration:g}s",
        caption=f"{view.phase}, {elapsed:.1f}s",
    )
    table.add_column("")
    table.add_column("total", justify="right")
    table.add_column("rate", justify="right")
    status = view.status
    # The load generator reports its own rate, once a second.
    sent_rate = view.loadgen.get("rate") if view.loadgen_summary is None else None
    table.add_row(
        "packets sent (loadgen)", f"{_sent(view):,}", f"{sent_rate:,.0f}/s" if sent_rate else ""
    )
    table.add_row("packets in (relay)", f"{_packets_in(view):,}", rate(2))
    table.add_row("events out (sink)", f"{ledger.events:,}", rate(3))
    window = view.window
    overall = ledger.latency
    table.add_row(
        "latency p50 / p99",
        f"{ms(overall.percentile(50))} / {ms(overall.percentile(99))}",
        f"last {_REFRESH:g}s: {ms(window.percentile(50))} / {ms(window.percentile(99))}",
    )
    channel = status.get("channel", {})
    table.add_row(
        "relay queue depth", f"{channel.get('depth', '-')} / {channel.get('capacity', '-')}", ""
    )
    mean = ledger.events / ledger.batches if ledger.batches else 0.0
    table.add_row("batches to STAG", f"{ledger.batches:,}", f"mean {mean:.1f} events")
    stag = status.get("stag", {})
    reachable = {True: "reachable", False: "unreachable", None: "not tried yet"}
    shown = reachable.get(stag.get("reachable"), "-")
    if stag.get("state") == "misconfigured":
        shown = f"misconfigured (HTTP {stag.get('last_status')})"
    table.add_row("STAG (the sink)", shown, "")
    errors = int((view.loadgen_summary or view.loadgen).get("errors", 0))
    if errors:
        table.add_row("error replies", f"{errors:,}", "")
    return table


def _verdict(
    console: Any,
    view: _View,
    ledger: Ledger,
    loadgen_code: int | None,
    relay_code: int | None,
) -> int:
    if not console.is_terminal:
        console.line()  # the table printed last leaves the cursor at the end of its line
    sent = _sent(view)
    lost = sent - ledger.events
    problems = []
    if view.loadgen_summary is None:
        problems.append("the load generator did not finish")
    if lost > 0:
        problems.append(f"{lost:,} of {sent:,} packets did not reach the stand-in")
    if ledger.events > sent:
        problems.append(f"the stand-in got {ledger.events - sent:,} events more than were sent")
    if loadgen_code != 0:
        problems.append(f"the load generator exited with status {loadgen_code}")
    if relay_code != 0:
        problems.append(f"the relay exited with status {relay_code}")
    if problems:
        for problem in problems:
            console.print(f"[red]{problem}[/red]")
        console.print("the relay's last log lines:")
        console.print("\n".join(view.relay_log), markup=False, highlight=False)
        return 1
    p99 = ledger.latency.percentile(99)
    console.print(
        f"[green]every one of the {sent:,} packets sent arrived as an event[/green]"
        + (f"; latency p99 {p99:.1f} ms" if p99 is not None else "")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stag-relay demo", description=(__doc__ or "").strip().splitlines()[0]
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
