"""``stag-relay sink`` on the command line: options, the live display, the summary."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from stag_relay.service.config import duration_argument
from stag_relay.tools.sink.ledger import (
    DEFAULT_INGEST_PATH,
    SPATIAL_EVENT_PATH,
    WIRE_FORMATS,
    FailurePlan,
    LatencyHistogram,
    Ledger,
)
from stag_relay.tools.sink.server import DEFAULT_HOST, DEFAULT_PORT, Sink, SinkSettings


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 for any (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--format",
        dest="wire_format",
        choices=sorted(WIRE_FORMATS),
        default="batch",
        help="batch: the relay's batches (stag.format batch, the default); spatial-event: "
        "one SpatialEvent per request, read and answered as the public STAGs "
        "(tabularxr/stag, tabularxr/Stag) do",
    )
    parser.add_argument(
        "--ingest-path",
        help=f"path batches are POSTed to (default {DEFAULT_INGEST_PATH}; "
        f"{SPATIAL_EVENT_PATH} with --format spatial-event)",
    )
    parser.add_argument(
        "--fail", type=int, metavar="STATUS", help="answer this status (e.g. 503) on a schedule"
    )
    parser.add_argument(
        "--for",
        dest="fail_for",
        type=duration_argument,
        metavar="DURATION",
        help="... for this long (default: until stopped)",
    )
    parser.add_argument(
        "--after",
        dest="fail_after",
        type=duration_argument,
        default=0.0,
        metavar="DURATION",
        help="... starting this long after start (default 0s)",
    )
    parser.add_argument(
        "--every",
        dest="fail_every",
        type=duration_argument,
        metavar="DURATION",
        help="... and again every DURATION",
    )
    parser.add_argument(
        "--retry-after", metavar="SECONDS", help="send Retry-After with the failures"
    )
    parser.add_argument("--api-key", help="require this X-API-Key (401 otherwise)")
    parser.add_argument(
        "--delay", type=duration_argument, default=0.0, help="wait this long before each answer"
    )
    parser.add_argument(
        "--max-events",
        type=int,
        metavar="N",
        help="answer 413 to a batch of more than N events (the relay splits it)",
    )
    parser.add_argument("--duration", type=duration_argument, help="stop after this long")
    parser.add_argument(
        "--json", metavar="PATH", help="write the summary as JSON to PATH ('-': stdout)"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live display (the summary still prints)"
    )


def settings_from_args(args: argparse.Namespace) -> SinkSettings:
    failures: tuple[FailurePlan, ...] = ()
    if args.fail is not None:
        failures = (
            FailurePlan(
                status=args.fail,
                after=args.fail_after,
                duration=args.fail_for,
                every=args.fail_every,
                retry_after=args.retry_after,
            ),
        )
    elif args.fail_for is not None or args.fail_every is not None:
        raise ValueError("--for and --every need --fail STATUS")
    return SinkSettings(
        host=args.host,
        port=args.port,
        ingest_path=args.ingest_path,
        wire_format=args.wire_format,
        failures=failures,
        api_key=args.api_key,
        delay=args.delay,
        max_events=args.max_events,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"stag-relay sink: {exc}", file=sys.stderr)
        return 2
    sink = Sink(settings)
    live = not args.quiet and sys.stdout.isatty()
    try:
        trio.run(_serve, sink, args.duration, live)
    except OSError as exc:
        print(
            f"stag-relay sink: cannot listen on {settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    summary = sink.ledger.summary()
    if args.json == "-":
        print(json.dumps(summary, indent=2))
    else:
        if args.json:
            with open(args.json, "w") as out:
                json.dump(summary, out, indent=2)
        print_summary(summary, sys.stdout)
    return 0


async def _serve(sink: Sink, duration: float | None, live: bool) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            # On stderr, always, and plain: a script that started it with --port 0
            # reads the port from this line.
            print(
                f"sink listening on {sink.url}{sink.ledger.ingest_path}",
                file=sys.stderr,
                flush=True,
            )
            if live:
                nursery.start_soon(_show_live, sink.ledger)

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if duration is not None:
                await trio.sleep(duration)
                nursery.cancel_scope.cancel()


async def _show_live(ledger: Ledger) -> None:
    from rich.live import Live

    last_events, last_time = ledger.events, time.monotonic()
    window = LatencyHistogram()
    with Live(live_line(ledger, 0.0, window), auto_refresh=False, transient=True) as live:
        while True:
            await trio.sleep(1.0)
            now = time.monotonic()
            rate = (ledger.events - last_events) / (now - last_time)
            last_events, last_time = ledger.events, now
            window = ledger.take_window()
            live.update(live_line(ledger, rate, window), refresh=True)


def live_line(ledger: Ledger, rate: float, window: LatencyHistogram) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    sizes = ledger.batch_sizes
    mean = ledger.events / ledger.batches if ledger.batches else 0.0
    line = (
        f"sink  events {ledger.events:>10,} ({rate:>8,.0f}/s)  batches {ledger.batches:>8,} "
        f"(mean {mean:.1f}, max {max(sizes) if sizes else 0})  latency ms p50 "
        f"{ms(window.percentile(50))} p99 {ms(window.percentile(99))}  "
        f"duplicates {ledger.duplicate_batches:,}"
    )
    plan = ledger.failing()
    if plan is not None:
        left = plan.remaining(time.time() - ledger.started_at)
        until = f" for {left:.1f}s more" if left is not None else ""
        line += f"  FAILING {plan.status}{until}"
    return line


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    lat, relay, size = summary["latency_ms"], summary["relay_latency_ms"], summary["batch_size"]
    rate = summary["events_per_second"]
    by_type = ", ".join(f"{n:,} {t}" for t, n in summary["events_by_type"].items()) or "none"
    lines = [
        "sink summary",
        f"  events     {summary['events']:,} ({by_type})"
        + (f", {rate:,.0f}/s while arriving" if rate else ""),
        f"  batches    {summary['batches']:,} (size min {size['min']}, mean {size['mean']}, "
        f"max {size['max']}), {summary['duplicate_batches']:,} duplicates",
        f"  requests   {summary['requests']:,}: {summary['failed_requests']:,} answered with a "
        f"scheduled failure, {summary['bad_requests']:,} bad",
        f"  latency    client timestamp to arrival: p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms",
        f"             relay received_at to arrival: p50 {relay['p50']} ms, p99 {relay['p99']} ms",
    ]
    out.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from stag_relay.tools import sink

    parser = argparse.ArgumentParser(
        prog="stag-relay sink", description=(sink.__doc__ or "").strip().splitlines()[0]
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))
