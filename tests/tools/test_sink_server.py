"""The STAG stand-in's connection handling, over in-memory streams and the mock clock."""

from __future__ import annotations

import orjson
import trio
import trio.testing

from stag_relay.tools.sink import Ledger, Peer, Reply, Sink, SinkSettings


def batch(batch_id: str, n: int = 1) -> bytes:
    events = [{"event_id": f"{batch_id}-{i}", "type": "pose", "timestamp": 1} for i in range(n)]
    return orjson.dumps({"batch_id": batch_id, "events": events})


def post(body: bytes, *, path: str = "/ingest", close: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: stag\r\ncontent-length: {len(body)}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def read_answer(stream: trio.abc.ReceiveStream) -> bytes:
    """Bytes up to the end of one Content-Length answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_the_ledger_answers_a_kept_alive_connection() -> None:
    sink = Sink(SinkSettings(), keep_requests=True)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.serve_connection, server)
        await client.send_all(post(batch("a", 2)))
        first = await read_answer(client)
        assert status_of(first) == 200
        assert b"server: stag-relay-sink/" in first
        assert first.endswith(b'{"status":"ok","accepted":2}')
        await client.send_all(post(b"{}", path="/elsewhere"))
        assert status_of(await read_answer(client)) == 404
        await client.send_all(post(batch("b"), close=True))
        assert status_of(await read_answer(client)) == 200
    # The client asked to close: the handler returned without waiting for more.
    assert sink.ledger.events == 3
    assert sink.received is not None
    assert [r.target for r in sink.received] == ["/ingest", "/elsewhere", "/ingest"]


async def test_a_paused_ledger_holds_the_request_until_poked() -> None:
    sink = Sink(SinkSettings())
    sink.ledger.programme.paused = True
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.serve_connection, server)
        await client.send_all(post(batch("a"), close=True))
        await trio.testing.wait_all_tasks_blocked()
        assert (sink.in_flight, sink.ledger.requests) == (1, 0)
        sink.poke()  # still paused: it goes on waiting
        await trio.testing.wait_all_tasks_blocked()
        assert sink.in_flight == 1
        sink.ledger.programme.paused = False
        sink.poke()
        assert status_of(await read_answer(client)) == 200
    assert (sink.in_flight, sink.max_in_flight, sink.ledger.events) == (0, 1, 1)


async def test_a_programmed_delay_and_drop_run_on_the_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger(keep=True)
    ledger.programme.script.append(Reply(close=True, delay=30.0))
    sink = Sink(SinkSettings(), ledger=ledger)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.serve_connection, server)
        await client.send_all(post(batch("a")))
        await trio.sleep(29.0)
        assert sink.in_flight == 1
        # Hung up on, unanswered.
        assert await client.receive_some(65536) == b""
    assert [e.status for e in ledger.exchanges] == [None]
    assert ledger.events == 0


async def test_a_body_over_the_limit_is_read_and_not_kept() -> None:
    client, server = trio.testing.memory_stream_pair()
    peer = Peer(server, Sink(SinkSettings()))
    await client.send_all(post(b"x" * 100) + post(b"y" * 10))
    big = await peer.request(max_body=50)
    assert big is not None
    assert (big.too_large, big.body) == (True, b"")
    await peer.answer(413, b"{}")
    small = await peer.request(max_body=50)
    assert small is not None
    assert (small.too_large, small.body) == (False, b"y" * 10)


async def test_a_client_that_breaks_http_ends_the_peer() -> None:
    client, server = trio.testing.memory_stream_pair()
    peer = Peer(server, Sink(SinkSettings()))
    await client.send_all(b"NOT HTTP AT ALL\r\n\r\n")
    assert await peer.request() is None


async def test_a_head_answer_has_no_body() -> None:
    sink = Sink(SinkSettings())
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.serve_connection, server)
        await client.send_all(b"HEAD /ingest HTTP/1.1\r\nhost: stag\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := await client.receive_some(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 405 ")
    assert data.endswith(b"\r\n\r\n")


async def test_a_scripted_hold_waits_for_the_request_that_finds_it() -> None:
    sink = Sink(SinkSettings())
    sink.ledger.programme.script.extend([Reply(503), Reply(hold=True)])
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.serve_connection, server)
        await client.send_all(post(batch("a")))
        assert status_of(await read_answer(client)) == 503
        await client.send_all(post(batch("a"), close=True))
        await trio.testing.wait_all_tasks_blocked()
        assert (sink.in_flight, sink.ledger.programme.paused) == (1, True)
        sink.ledger.programme.resume()
        sink.poke()
        assert status_of(await read_answer(client)) == 200
