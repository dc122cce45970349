"""CPU per request of the STAG client (stag_relay.pipeline.httpclient) against httpx, in isolation.

Posts the same batches of pose events to the STAG stand-in (the sink, through
tests/support/stag_server.py, in a child process, so its CPU is not counted) and
reports the client process's CPU time (user + system) per request and per event, for
each client, in alternating rounds so slow drift of a shared machine hits both. Run it
under the benchmark lock:

    flock /tmp/bench.lock python tests/benchmark/ingest_bench.py --requests 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from stag_relay.pipeline.httpclient import IngestClient
from stag_relay.protocol.events import Anchor, AnchorPose, Batch, Event, to_wire

ROOT = Path(__file__).resolve().parents[2]
_SERVER = """
import sys, time
from tests.support.stag_server import StagServer
with StagServer() as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def batch_body(n: int, size: int) -> bytes:
    events = tuple(
        Event(
            event_id=f"00000000-0000-5000-8000-{n * size + i:012d}",
            session_id=f"session-{i % 20}",
            frame_number=n,
            timestamp=1_700_000_000_000 + n,
            received_at=1_700_000_000_002 + n,
            type="pose",
            anchors=(
                Anchor(
                    "anchor_0123456789abcdef0123456789abcdef",
                    AnchorPose(
                        1.25, -0.5, 3.75, (0.0, 0.0, 0.7071067811865476, 0.7071067811865476)
                    ),
                    1_700_000_000_000 + n,
                ),
            ),
            meshes=(),
        )
        for i in range(size)
    )
    return to_wire(Batch(f"bench-{n}", events)).body("bench-relay", 1_700_000_000_000)


def cpu() -> float:
    t = os.times()
    return t.user + t.system


async def with_ingest(url: str, bodies: list[bytes], slots: int) -> None:
    async with IngestClient(
        url + "/ingest",
        headers=[("content-type", "application/json"), ("user-agent", "bench")],
        timeout=10.0,
    ) as client:
        await _fan_out(
            bodies,
            slots,
            lambda n, body: client.post(body, headers=(("idempotency-key", f"k{n}"),)),
        )


async def with_httpx(url: str, bodies: list[bytes], slots: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    async with httpx.AsyncClient(
        headers={"Content-Type": "application/json", "User-Agent": "bench"},
        timeout=httpx.Timeout(10.0),
        limits=limits,
    ) as client:

        async def post(n: int, body: bytes) -> object:
            response = await client.post(
                url + "/ingest", content=body, headers={"Idempotency-Key": f"k{n}"}
            )
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}")
            return response

        await _fan_out(bodies, slots, post)


async def _fan_out(
    bodies: list[bytes], slots: int, post: Callable[[int, bytes], Awaitable[object]]
) -> None:
    work = iter(enumerate(bodies))

    async def worker() -> None:
        for n, body in work:
            answer = await post(n, body)
            status = getattr(answer, "status", 200)
            if status != 200:
                raise RuntimeError(f"status {status}")

    async with trio.open_nursery() as nursery:
        for _ in range(slots):
            nursery.start_soon(worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100, help="events per batch")
    parser.add_argument("--slots", type=int, default=4, help="requests at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        bodies = [batch_body(n, args.events) for n in range(args.requests)]
        # Warm both up (imports, first connections) outside the measurement.
        trio.run(with_ingest, url, bodies[:20], args.slots)
        trio.run(with_httpx, url, bodies[:20], args.slots)
        results: dict[str, list[float]] = {"ingest": [], "httpx": []}
        for _ in range(args.rounds):
            for name, run in (("ingest", with_ingest), ("httpx", with_httpx)):
                started, wall = cpu(), time.monotonic()
                trio.run(run, url, bodies, args.slots)
                used = cpu() - started
                results[name].append(used / args.requests * 1e6)
                print(
                    f"{name:6} {used / args.requests * 1e6:8.1f} us CPU/request"
                    f"  {used / (args.requests * args.events) * 1e6:6.2f} us/event"
                    f"  ({time.monotonic() - wall:.2f} s wall)",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait()
    print(f"body {len(bodies[0])} bytes, {args.events} events, {args.slots} at once; medians:")
    for name, figures in results.items():
        median = statistics.median(figures)
        print(f"  {name:6} {median:8.1f} us/request  {median / args.events:6.2f} us/event")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
