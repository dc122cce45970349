"""The STAG client's HTTP/1.1 layer against real sockets: the sink, serving each
connection with the test's own handler (tests/support/raw_http.py).

Keep-alive and reconnection, every way an answer can go wrong (truncated, garbage,
oversized, too slow, early), TLS, and URL handling. Tests about time run on trio's
autojumping mock clock, which governs the server too since it runs in the same trio
run; loopback delivers bytes before the clock can jump.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from stag_relay.pipeline.httpclient import (
    KEEPALIVE_EXPIRY,
    MAX_ANSWER_BYTES,
    ConnectError,
    ConnectTimeout,
    Destination,
    IngestClient,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    WriteError,
    WriteTimeout,
    ignored_proxy,
)
from stag_relay.protocol.exchange import StagAnswer
from tests.support.raw_http import Peer, RawServer

HEADERS = [("content-type", "application/json"), ("user-agent", "stag-relay/test")]
# Far longer than anything here takes in real time; on the mock clock, the timeout.
TIMEOUT = 10.0
# 16 MiB: more than loopback socket buffers take while the server does not read.
LARGE_BODY = b"[" + b"0," * (8 << 20) + b"0]"


def client(server: RawServer, *, path: str = "/ingest", **kwargs: object) -> IngestClient:
    return IngestClient(server.url + path, headers=HEADERS, timeout=TIMEOUT, **kwargs)  # type: ignore[arg-type]


async def post(ingest: IngestClient, n: int = 0, body: bytes = b"[]") -> StagAnswer:
    return await ingest.post(body, headers=(("idempotency-key", f"batch-{n}"),))


# --- keep-alive -----------------------------------------------------------------------


async def test_requests_share_one_kept_alive_connection(nursery: trio.Nursery) -> None:
    server = await RawServer().start(nursery)
    async with client(server) as ingest:
        for n in range(3):
            answer = await post(ingest, n, b'{"n":%d}' % n)
            assert answer == StagAnswer(200, None, b'{"status":"ok"}', None)
        assert ingest.idle_connections() == 1
    assert server.connections == 1
    assert [r.body for r in server.requests] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    first = server.requests[0]
    assert first.target == "/ingest"
    assert first.headers == {
        "host": f"127.0.0.1:{server.port}",
        "content-type": "application/json",
        "user-agent": "stag-relay/test",
        "idempotency-key": "batch-0",
        "content-length": "7",
    }
    # Leaving the client closed its connection.
    await server.wait_closed(1)


async def test_a_connection_per_request_at_once_then_reused(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def held(peer: Peer) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.answer()

    server = await RawServer(held).start(nursery)
    async with client(server) as ingest:
        async with trio.open_nursery() as posts:
            for n in range(3):
                posts.start_soon(post, ingest, n)
            await trio.testing.wait_all_tasks_blocked()
            assert server.connections == 3
            release.set()
        assert ingest.idle_connections() == 3
        async with trio.open_nursery() as posts:
            for n in range(3, 6):
                posts.start_soon(post, ingest, n)
    assert server.connections == 3
    assert len(server.requests) == 6


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    async def once(peer: Peer) -> None:
        if await peer.request() is not None:
            await peer.answer(headers=[("connection", "close")])

    server = await RawServer(once).start(nursery)
    async with client(server) as ingest:
        assert (await post(ingest, 1)).status == 200
        assert ingest.idle_connections() == 0
        assert (await post(ingest, 2)).status == 200
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    async def then_hang_up(peer: Peer) -> None:
        # No "Connection: close": the client learns only from the socket.
        if await peer.request() is not None:
            await peer.answer()

    server = await RawServer(then_hang_up).start(nursery)
    async with client(server) as ingest:
        await post(ingest, 1)
        await server.wait_closed(1)
        assert ingest.idle_connections() == 1
        # Not an error: the closed connection is dropped before the request is written.
        assert (await post(ingest, 2)).status == 200
    assert server.connections == 2
    assert len(server.requests) == 2


async def test_an_idle_connection_expires(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await RawServer().start(nursery)
    async with client(server) as ingest:
        await post(ingest, 1)
        await trio.sleep(KEEPALIVE_EXPIRY / 2)
        await post(ingest, 2)
        assert server.connections == 1
        await trio.sleep(KEEPALIVE_EXPIRY * 2)
        await post(ingest, 3)
    assert server.connections == 2


async def test_connections_left_idle_under_light_load_are_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    both_in = trio.Event()

    async def held(peer: Peer) -> None:
        while await peer.request() is not None:
            if len(server.requests) < 2:
                await both_in.wait()
            both_in.set()
            await peer.answer()

    server = await RawServer(held).start(nursery)
    async with client(server) as ingest:
        async with trio.open_nursery() as posts:
            posts.start_soon(post, ingest, 1)
            posts.start_soon(post, ingest, 2)
        assert ingest.idle_connections() == 2
        # One request at a time from now on: one connection does, the other expires.
        for n in range(3, 6):
            await trio.sleep(KEEPALIVE_EXPIRY * 0.6)
            await post(ingest, n)
        await server.wait_closed(1)
        assert ingest.idle_connections() == 1
    assert server.connections == 2


# --- answers ----------------------------------------------------------------------------


async def test_retry_after_and_charset(nursery: trio.Nursery) -> None:
    async def busy(peer: Peer) -> None:
        await peer.request()
        await peer.answer(
            503,
            "trop occupé".encode("latin-1"),
            headers=[("content-type", "text/plain; charset=ISO-8859-1"), ("retry-after", "7")],
        )

    server = await RawServer(busy).start(nursery)
    async with client(server) as ingest:
        answer = await post(ingest)
    assert (answer.status, answer.retry_after, answer.text()) == (503, "7", "trop occupé")


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        ("application/json", b"\xff{}", "\ufffd{}"),
        ("text/plain; charset=no-such-charset", "é".encode(), "é"),
        ('text/plain; charset="utf-8"', "é".encode(), "é"),
    ],
)
async def test_answer_text(
    nursery: trio.Nursery, content_type: str, body: bytes, text: str
) -> None:
    async def refuse(peer: Peer) -> None:
        await peer.request()
        await peer.answer(400, body, headers=[("content-type", content_type)])

    server = await RawServer(refuse).start(nursery)
    async with client(server) as ingest:
        assert (await post(ingest)).text() == text


async def test_informational_answers_are_skipped(nursery: trio.Nursery) -> None:
    async def with_100(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.raw(b"HTTP/1.1 100 Continue\r\n\r\n")
            await peer.answer(201)

    server = await RawServer(with_100).start(nursery)
    async with client(server) as ingest:
        assert (await post(ingest, 1)).status == 201
        assert (await post(ingest, 2)).status == 201
    assert server.connections == 1


async def test_chunked_and_close_delimited_answers(nursery: trio.Nursery) -> None:
    async def varied(peer: Peer) -> None:
        await peer.request()
        chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        await peer.raw(chunked, answered=True)
        await peer.request()
        # HTTP/1.0 without a length: the body ends when the connection does.
        await peer.raw(b"HTTP/1.0 200 OK\r\n\r\nuntil close")

    server = await RawServer(varied).start(nursery)
    async with client(server) as ingest:
        assert (await post(ingest, 1)).body == b"abc"
        assert ingest.idle_connections() == 1
        assert (await post(ingest, 2)).body == b"until close"
        assert ingest.idle_connections() == 0
    assert server.connections == 1


async def test_an_oversized_answer_is_cut_and_its_connection_closed(
    nursery: trio.Nursery,
) -> None:
    async def huge(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.answer(200, b"x" * (MAX_ANSWER_BYTES * 16))

    server = await RawServer(huge).start(nursery)
    async with client(server) as ingest:
        answer = await post(ingest, 1)
        assert (answer.status, answer.body) == (200, b"x" * MAX_ANSWER_BYTES)
        assert ingest.idle_connections() == 0
        await post(ingest, 2)
    assert server.connections == 2


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        # Fewer bytes than Content-Length, then the server closes.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this", "received 9 bytes"),
        (b"SPAM AND EGGS\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        # A head that never ends: cut off, not buffered.
        (b"HTTP/1.1 200 OK\r\nx: " + b"y" * 200_000, "too long"),
        (b"HTTP/1.1 20", "without sending an answer"),
        (b"", "without sending an answer"),
    ],
)
async def test_broken_answers_are_protocol_errors(
    nursery: trio.Nursery, reply: bytes, message: str
) -> None:
    async def broken(peer: Peer) -> None:
        await peer.request()
        await peer.raw(reply)

    server = await RawServer(broken).start(nursery)
    async with client(server) as ingest:
        with pytest.raises(RemoteProtocolError, match=message):
            await post(ingest)
        assert ingest.idle_connections() == 0


async def test_an_answer_given_before_the_body_is_read_still_counts(
    nursery: trio.Nursery,
) -> None:
    """A server may refuse a large body as soon as it sees its length, and close."""

    async def refuse_early(peer: Peer) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await peer.stream.receive_some(1 << 16)
        await peer.raw(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")

    server = await RawServer(refuse_early).start(nursery)
    async with client(server) as ingest:
        answer = await post(ingest, body=LARGE_BODY)
    assert answer.status == 413


async def test_a_write_error_without_an_answer(nursery: trio.Nursery) -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.stream.receive_some(1 << 16)

    server = await RawServer(hang_up).start(nursery)
    async with client(server) as ingest:
        with pytest.raises(WriteError):
            await post(ingest, body=LARGE_BODY)


# --- time ------------------------------------------------------------------------------


async def test_a_slow_answer_times_out(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await trio.sleep_forever()

    server = await RawServer(silent).start(nursery)
    async with client(server) as ingest:
        started = trio.current_time()
        with pytest.raises(ReadTimeout):
            await post(ingest)
        assert trio.current_time() - started == pytest.approx(TIMEOUT)
        assert ingest.idle_connections() == 0


async def test_a_server_that_stops_reading_times_out_the_write(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def stalled(peer: Peer) -> None:
        await trio.sleep_forever()

    server = await RawServer(stalled).start(nursery)
    async with client(server) as ingest:
        with pytest.raises(WriteTimeout):
            await post(ingest, body=LARGE_BODY)


async def test_the_timeout_bounds_each_read_not_the_whole_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """As with httpx: an answer that keeps arriving is not cut off."""

    async def trickle(peer: Peer) -> None:
        await peer.request()
        for piece in (b"HTTP/1.1 200 OK\r\n", b"content-length: 2\r\n\r\n", b"o", b"k"):
            await trio.sleep(TIMEOUT * 0.6)
            await peer.raw(piece)

    server = await RawServer(trickle).start(nursery)
    async with client(server) as ingest:
        assert (await post(ingest)).body == b"ok"


async def test_an_outer_cancellation_closes_the_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await peer.stream.receive_some(1)

    server = await RawServer(silent).start(nursery)
    async with client(server) as ingest:
        with trio.move_on_after(TIMEOUT / 2) as scope:
            await post(ingest)
        assert scope.cancelled_caught
        assert ingest.idle_connections() == 0
    await server.wait_closed(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_connection_refused_is_a_connect_error() -> None:
    ingest = IngestClient(f"http://127.0.0.1:{free_port()}/", headers=(), timeout=TIMEOUT)
    with pytest.raises(ConnectError):
        await post(ingest)


async def test_a_connect_that_hangs_times_out(autojump_clock: trio.testing.MockClock) -> None:
    # A listener that never accepts, its queue full: further SYNs go unanswered.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            ingest = IngestClient(f"http://127.0.0.1:{port}/", headers=(), timeout=TIMEOUT)
            with pytest.raises(ConnectTimeout):
                await post(ingest)
        finally:
            for filler in fillers:
                filler.close()


# --- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def no_cert_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    yield monkeypatch


async def test_https_with_a_given_context(
    nursery: trio.Nursery, ca: trustme.CA, server_tls: ssl.SSLContext
) -> None:
    server = await RawServer(tls=server_tls).start(nursery)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with client(server, tls=trusting) as ingest:
        for n in range(3):
            assert (await post(ingest, n)).status == 200
    assert server.connections == 1


async def test_https_trusts_ssl_cert_file_as_httpx_did(
    nursery: trio.Nursery,
    ca: trustme.CA,
    server_tls: ssl.SSLContext,
    no_cert_env: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = await RawServer(tls=server_tls).start(nursery)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    no_cert_env.setenv("SSL_CERT_FILE", str(bundle))
    async with client(server) as ingest:
        assert (await post(ingest)).status == 200


async def test_https_refuses_an_untrusted_certificate(
    nursery: trio.Nursery, server_tls: ssl.SSLContext, no_cert_env: pytest.MonkeyPatch
) -> None:
    server = await RawServer(tls=server_tls).start(nursery)
    # certifi's bundle does not hold the test CA.
    async with client(server) as ingest:
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(ingest)
    assert server.requests == []


# --- URLs ------------------------------------------------------------------------------


def basic(credentials: bytes) -> bytes:
    return b"Basic " + base64.b64encode(credentials)


@pytest.mark.parametrize(
    ("url", "connect_to", "target", "host_header", "authorization"),
    [
        ("http://stag:8080/ingest", ("stag", 8080), b"/ingest", b"stag:8080", None),
        ("https://STAG.example/", ("stag.example", 443), b"/", b"stag.example", None),
        ("http://stag:80", ("stag", 80), b"/", b"stag", None),
        ("https://stag:8443/a b/ingest", ("stag", 8443), b"/a%20b/ingest", b"stag:8443", None),
        ("http://stag/x?tenant=a b/i", ("stag", 80), b"/x?tenant=a%20b/i", b"stag", None),
        ("http://[::1]:9000/i", ("::1", 9000), b"/i", b"[::1]:9000", None),
        ("http://bü.example/", ("xn--b-eha.example", 80), b"/", b"xn--b-eha.example", None),
        ("http://us%40er:p%3Ass@stag/i", ("stag", 80), b"/i", b"stag", basic(b"us@er:p:ss")),
        ("http://token@stag/i", ("stag", 80), b"/i", b"stag", basic(b"token:")),
    ],
)  # fmt: skip
def test_endpoint_from_url(
    url: str,
    connect_to: tuple[str, int],
    target: bytes,
    host_header: bytes,
    authorization: bytes | None,
) -> None:
    destination = Destination.from_url(url)
    assert (destination.host, destination.port) == connect_to
    assert destination.scheme == url.split(":")[0].lower()
    assert (destination.target, destination.authority, destination.authorization) == (
        target,
        host_header,
        authorization,
    )


@pytest.mark.parametrize("url", ["ftp://stag/", "http:///ingest", "stag:8080"])
def test_endpoint_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        Destination.from_url(url)


async def test_credentials_in_the_url_are_sent_as_basic(nursery: trio.Nursery) -> None:
    server = await RawServer().start(nursery)
    url = f"http://relay:s3cret@127.0.0.1:{server.port}/ingest"
    async with IngestClient(url, headers=(), timeout=TIMEOUT) as ingest:
        await post(ingest)
    [request] = server.requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"relay:s3cret").decode()
    assert request.headers["host"] == f"127.0.0.1:{server.port}"


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http", "https", "all", "no"):
        monkeypatch.delenv(f"{name}_proxy", raising=False)
        monkeypatch.delenv(f"{name.upper()}_PROXY", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "url", "ignored"),
    [
        ({}, "https://stag/i", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://stag/i", "HTTPS_PROXY"),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://stag/i", None),
        ({"http_proxy": "http://proxy:3128"}, "http://stag/i", "HTTP_PROXY"),
        ({"ALL_PROXY": "http://proxy:3128"}, "http://stag/i", "ALL_PROXY"),
        ({"ALL_PROXY": "http://p:1", "NO_PROXY": "example.com"}, "http://stag.example.com/", None),
        ({"ALL_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, "http://example.com/", None),
        ({"ALL_PROXY": "http://p:1", "NO_PROXY": "other.com,*"}, "http://stag/", None),
        ({"ALL_PROXY": "http://p:1", "NO_PROXY": "ample.com"}, "http://example.com/", "ALL_PROXY"),
    ],
)
def test_ignored_proxy(
    no_proxy_env: pytest.MonkeyPatch, env: dict[str, str], url: str, ignored: str | None
) -> None:
    for name, value in env.items():
        no_proxy_env.setenv(name, value)
    assert ignored_proxy(url) == ignored


def test_every_failure_is_a_transport_error() -> None:
    from stag_relay.pipeline import httpclient as ingest

    for name in ("ConnectError", "ConnectTimeout", "WriteError", "WriteTimeout"):
        assert issubclass(getattr(ingest, name), TransportError)
    for name in ("ReadError", "ReadTimeout", "RemoteProtocolError", "LocalProtocolError"):
        assert issubclass(getattr(ingest, name), TransportError)
