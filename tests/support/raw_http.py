"""A scriptable HTTP/1.1 server on trio, for the answers the STAG stand-in cannot give.

The stand-in (stag_server.py) is a well-behaved server that fails on demand with
statuses and dropped connections. Tests of the STAG client also need a server that
misbehaves at the byte level (truncated or garbage answers, early answers, slow
trickles, TLS) and that counts connections, in the test's own trio run so a mock
clock governs it too. Each connection is handed to a test-supplied handler, which
speaks through a :class:`Peer` (h11, server side) or writes raw bytes.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable, Sequence

import attrs
import h11
import trio


@attrs.frozen
class Received:
    """A request as the server read it; header names lower-cased."""

    target: str
    headers: dict[str, str]
    body: bytes


class Peer:
    """One accepted connection, with h11 on the server side."""

    def __init__(self, stream: trio.abc.Stream, server: RawServer) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.SERVER)
        self._server = server

    async def request(self) -> Received | None:
        """The next request, whole; ``None`` once the client closed the connection."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    data = b""
                self.http.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                received = Received(
                    request.target.decode(),
                    {k.decode(): v.decode() for k, v in request.headers},
                    bytes(body),
                )
                self._server.requests.append(received)
                return received
            else:
                return None

    async def answer(
        self,
        status: int = 200,
        body: bytes = b'{"status":"ok"}',
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer the request read last, with a Content-Length; ready for the next one."""
        fields = [("content-type", "application/json"), *headers]
        fields.append(("content-length", str(len(body))))
        data = self.http.send(h11.Response(status_code=status, headers=fields))
        assert data is not None
        data += self.http.send(h11.Data(data=body)) or b""
        data += self.http.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()

    async def raw(self, data: bytes, *, answered: bool = False) -> None:
        """Send ``data`` as it is; ``answered``: it completes the answer, read the next request.

        h11 did not see the raw answer, so it starts afresh (the client sends nothing
        before it has read an answer, so h11 holds no bytes to lose).
        """
        await self.stream.send_all(data)
        if answered:
            self.http = h11.Connection(h11.SERVER)

    async def close(self) -> None:
        await self.stream.aclose()


Handler = Callable[[Peer], Awaitable[None]]


async def serve_all(peer: Peer) -> None:
    """Answer 200 to every request until the client closes."""
    while await peer.request() is not None:
        await peer.answer()


class RawServer:
    """Listens on 127.0.0.1 (TLS with ``tls``) and runs ``handler`` per connection."""

    def __init__(self, handler: Handler = serve_all, *, tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.requests: list[Received] = []
        # Connections whose handler returned, closed by the server.
        self.closed = 0
        self._closing = trio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> RawServer:
        serve: Callable[..., Awaitable[object]]
        if self.tls is None:
            serve = functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        else:
            serve = functools.partial(
                trio.serve_ssl_over_tcp,
                self._handle,
                0,
                self.tls,
                host="127.0.0.1",
                https_compatible=True,
            )
        [listener] = await nursery.start(serve)
        if isinstance(listener, trio.SSLListener):
            listener = listener.transport_listener
        self.port = listener.socket.getsockname()[1]
        return self

    async def wait_closed(self, count: int) -> None:
        """Until the server has closed ``count`` connections."""
        while self.closed < count:
            await self._closing.wait()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        peer = Peer(stream, self)
        try:
            await self.handler(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client hung up on a handler still writing: part of some tests.
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self.closed += 1
            self._closing.set()
            self._closing = trio.Event()
