"""The STAG stand-in with a test's own connection handler, in the test's own trio run.

Tests of the STAG client need answers the sink's ledger does not give: truncated or
garbage answers, early answers, slow trickles, TLS, connection counts, under the
test's mock clock. The sink (stag_relay.tools.sink) hands each connection to a
handler; here a test supplies it, speaking through a :class:`Peer` (h11, server
side) or writing raw bytes.
"""

from __future__ import annotations

import ssl

import trio

from stag_relay.tools.sink import Handler, Peer, Request, Sink, SinkSettings

__all__ = ["Handler", "Peer", "RawServer", "Received", "serve_all"]

# A request as the server read it; header names lower-cased.
Received = Request


async def serve_all(peer: Peer) -> None:
    """Answer 200 to every request until the client closes."""
    while await peer.request() is not None:
        await peer.answer()


class RawServer:
    """Listens on 127.0.0.1 (TLS with ``tls``) and runs ``handler`` per connection."""

    def __init__(self, handler: Handler = serve_all, *, tls: ssl.SSLContext | None = None):
        self.sink = Sink(SinkSettings(port=0, tls=tls), handler=handler, keep_requests=True)

    @property
    def requests(self) -> list[Received]:
        assert self.sink.received is not None
        return self.sink.received

    @property
    def connections(self) -> int:
        return self.sink.connections

    @property
    def closed(self) -> int:
        """Connections whose handler returned, closed by the server."""
        return self.sink.closed

    @property
    def port(self) -> int:
        assert self.sink.port is not None
        return self.sink.port

    @property
    def url(self) -> str:
        return self.sink.url

    async def start(self, nursery: trio.Nursery) -> RawServer:
        await nursery.start(self.sink.run)
        return self

    async def wait_closed(self, count: int) -> None:
        """Until the server has closed ``count`` connections."""
        await self.sink.wait_closed(count)
