"""Fuzzing a real relay over real sockets: hostile packets, raw bytes before the
handshake, raw bytes and malformed frames after it.

The relay must answer or close cleanly every time, account for every packet, and
keep serving a well-behaved client connected throughout: after the run, each of
its packets must have reached STAG.

At least 10^4 fuzzed packets run in CI. Set STAG_RELAY_FUZZ_PACKETS to run more
(e.g. 1000000); each test prints what it ran and how long it took.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stag_relay.service.metrics import PACKET_STATUSES, PACKET_TYPES
from stag_relay.service.relay import Relay
from tests.support.clients import ClientConnection, connect_relay, pose_packet
from tests.support.hostile import (
    SOCKET_TIMEOUT,
    RawWebSocket,
    compact_messages,
    hostile_messages,
    raw_after_handshake,
    raw_prefixes,
    read_until_closed,
)
from tests.support.relays import make_config
from tests.support.stag_server import StagServer

FUZZ_PACKETS = int(os.environ.get("STAG_RELAY_FUZZ_PACKETS", "10000"))
# Per example (one connection): up to 3 messages with fresh values (hostile_messages,
# ~2 ms each to generate) and 30-50 from the edge pools (compact_messages, ~0.5 ms
# each), so that 10^4 packets take seconds and many share a connection.
FRESH_PER_EXAMPLE = 3
COMPACT_PER_EXAMPLE = (30, 50)
# Raw-bytes examples per test; grows with STAG_RELAY_FUZZ_PACKETS.
RAW_EXAMPLES = max(150, FUZZ_PACKETS // 50)
_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] ")

FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class WellBehaved:
    """A client that stays connected through the fuzzing and sends one valid pose
    after every fuzzed example; at the end every one of them must be at STAG."""

    def __init__(self, port: int) -> None:
        self.session = f"well-behaved-{uuid.uuid4().hex}"
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(connect_relay(port))
        self.sent = 0

    def send_one(self) -> None:
        self.sent += 1
        self.ws.send(pose_packet(self.session, self.sent))

    def close(self) -> None:
        self._stack.close()


async def start_relay(nursery: trio.Nursery, stag: StagServer) -> Relay:
    # Limits out of the way so that every fuzzed packet reaches the parser.
    relay = Relay(
        make_config(stag.url, batch={"max_size": 100}, websocket={"max_invalid_packets": 10**9})
    )
    await nursery.start(relay.run)
    return relay


def packets_counted(relay: Relay) -> int:
    sample = relay.metrics.registry.get_sample_value
    return int(
        sum(
            sample("relay_packets_total", {"type": t, "status": s, "dialect": "streamkit"}) or 0
            for t in PACKET_TYPES
            for s in PACKET_STATUSES
        )
    )


async def finish(relay: Relay, stag: StagServer, good: WellBehaved) -> None:
    """Close the well-behaved client; every one of its packets must reach STAG."""
    await trio.to_thread.run_sync(good.close)
    with trio.fail_after(SOCKET_TIMEOUT):
        await relay.gate.wait_idle()
    ok = (
        relay.metrics.registry.get_sample_value(
            "relay_packets_total", {"type": "pose", "status": "ok", "dialect": "streamkit"}
        )
        or 0
    )
    ok += (
        relay.metrics.registry.get_sample_value(
            "relay_packets_total", {"type": "mesh", "status": "ok", "dialect": "streamkit"}
        )
        or 0
    )
    events = await trio.to_thread.run_sync(stag.wait_for_events, int(ok))
    mine = sorted(e["frame_number"] for e in events if e["session_id"] == good.session)
    assert mine == list(range(1, good.sent + 1))
    # No connection met a bug in the relay (each would be logged and counted).
    assert relay.metrics.registry.get_sample_value("relay_connection_errors_total") == 0


async def run_in_thread(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    await trio.to_thread.run_sync(run)
    return time.perf_counter() - started


async def test_fuzzed_packets_are_each_accounted_for_and_others_keep_being_served(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag)
    port = relay.ports[0]
    good = await trio.to_thread.run_sync(WellBehaved, port)
    sent = {"fresh": 0, "compact": 0, "connections": 0}

    @settings(FUZZ_SETTINGS, max_examples=300)
    @given(
        st.lists(hostile_messages(), max_size=FRESH_PER_EXAMPLE),
        st.lists(
            compact_messages(), min_size=COMPACT_PER_EXAMPLE[0], max_size=COMPACT_PER_EXAMPLE[1]
        ),
    )
    def one_connection(fresh: list[str | bytes], compact: list[str | bytes]) -> None:
        # Unbounded receive queue: this client reads none of its replies.
        with connect_relay(port, max_queue=None) as ws:
            for message in fresh + compact:
                ws.send(message)
        # The relay never closed the connection on us: it echoed our normal close.
        assert ws.close_code == 1000
        sent["fresh"] += len(fresh)
        sent["compact"] += len(compact)
        sent["connections"] += 1
        good.send_one()

    def run() -> None:
        while sent["fresh"] + sent["compact"] < FUZZ_PACKETS:
            one_connection()

    elapsed = await run_in_thread(run)
    await finish(relay, stag, good)
    # Every packet was read, judged and counted exactly once, whatever it was.
    total = sent["fresh"] + sent["compact"]
    assert packets_counted(relay) == total + good.sent
    print(
        f"\nfuzz: {total} hostile packets ({sent['fresh']} fresh, {sent['compact']} compact)"
        f" on {sent['connections']} connections in {elapsed:.1f}s;"
        f" {good.sent} well-behaved packets all delivered"
    )


async def test_raw_bytes_before_the_handshake_get_an_answer_or_a_close(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag)
    port = relay.ports[0]
    good = await trio.to_thread.run_sync(WellBehaved, port)

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(raw_prefixes)
    def one_connection(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the relay hung up first (a head over 16 KiB)
            answer = read_until_closed(sock)
        # Nothing, or an HTTP answer with a proper status line.
        assert answer == b"" or _STATUS_LINE.match(answer), answer[:200]
        good.send_one()

    elapsed = await run_in_thread(one_connection)
    await finish(relay, stag, good)
    print(f"\nfuzz: {RAW_EXAMPLES} raw-byte connections before the handshake in {elapsed:.1f}s")


async def test_raw_bytes_after_the_handshake_end_in_a_clean_close(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start_relay(nursery, stag)
    port = relay.ports[0]
    good = await trio.to_thread.run_sync(WellBehaved, port)
    codes: set[int | None] = set()

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(raw_after_handshake)
    def one_connection(data: bytes) -> None:
        client = RawWebSocket(port)
        try:
            client.send_raw(data)
            client.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        code, _messages, unparsed = client.read_until_closed()
        # Whatever we sent, the relay only ever sent well-formed frames back, and it
        # ended the connection (read_until_closed returns on EOF, not on a timeout).
        assert unparsed == b""
        codes.add(code)
        good.send_one()

    elapsed = await run_in_thread(one_connection)
    await finish(relay, stag, good)
    print(
        f"\nfuzz: {RAW_EXAMPLES} raw-frame connections after the handshake in {elapsed:.1f}s;"
        f" close codes seen: {sorted(codes, key=str)}"
    )
