"""A WebSocket client over an in-memory stream (or a real socket pair), for the gate's
tests under trio's mock clock.

wsproto driven by hand, so a test decides exactly when (and whether) pings are
answered and what the client reads. The relay's end is the real front door handing
the upgrade to the gate, so the handshake is the one clients get.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Callable
from typing import Any

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Request, TextMessage

from stag_relay.pipeline.front import FrontDoor
from stag_relay.pipeline.gate import Gate

WEBSOCKET_PATH = "/ws/streamkit"

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]


class MemoryClient:
    """Answers pings only when ``answer_pings`` is set; answers the relay's close frame."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.answer_pings = False
        self.pings_seen = 0
        self.closed_with: int | None = None
        self.texts: list[str] = []

    @property
    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.texts]

    async def handshake(self, pipelined: bytes = b"") -> None:
        """Upgrade; ``pipelined`` (raw frames) goes out with the request, unawaited."""
        request = self.ws.send(Request(host="relay", target=WEBSOCKET_PATH))
        await self.stream.send_all(request + pipelined)
        while not any(isinstance(e, AcceptConnection) for e in await self.receive()):
            pass

    async def receive(self) -> list[Event]:
        """Read once from the stream and handle what it brought; [] at its end."""
        data = await self.stream.receive_some()
        self.ws.receive_data(data or None)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, Ping):
                self.pings_seen += 1
                if self.answer_pings:
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.closed_with = event.code
                # The relay may already have hung up; the close is what counts.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, TextMessage):
                self.texts.append(event.data)
        if not data:
            self.closed_with = self.closed_with or 1006
        return events

    async def run(self) -> None:
        """Keep reading until the relay closes the connection."""
        while self.closed_with is None:
            await self.receive()

    async def send(self, *texts: str) -> None:
        for text in texts:
            await self.stream.send_all(self.ws.send(TextMessage(data=text)))


def socket_stream_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A connected pair of real sockets (Unix, in this process): the relay's end is a
    ``trio.SocketStream``, which the gate's poller reads."""
    server_sock, client_sock = trio.socket.socketpair()
    return trio.SocketStream(server_sock), trio.SocketStream(client_sock)


async def open_front(
    nursery: trio.Nursery, gate: Gate, pair: StreamPair = trio.testing.memory_stream_pair
) -> trio.abc.Stream:
    """A front door handing upgrades to ``gate``, serving one connection over ``pair``;
    returns the client's end. Over real sockets the gate's poller runs (started here)
    as long as a connection opened so is served."""
    server_end, client_end = pair()
    front = FrontDoor(
        endpoints={},
        websocket_paths={WEBSOCKET_PATH},
        admit=lambda request: None,
        serve_websocket=gate.serve,
        handshake_timeout=gate.handshake_timeout,
    )
    if type(server_end) is not trio.SocketStream:
        nursery.start_soon(front.handle, server_end)
        return client_end
    polling = _polling.get(gate)
    if polling is None:
        polling = _polling[gate] = _Polling()
        await nursery.start(polling.run, gate)
    polling.served += 1

    async def handle() -> None:
        assert polling is not None
        try:
            await front.handle(server_end)
        finally:
            polling.served -= 1
            if not polling.served:
                polling.scope.cancel()
                del _polling[gate]

    nursery.start_soon(handle)
    return client_end


class _Polling:
    """A gate's poller in a test: stopped once no connection needs it, so that the
    test's nursery can end."""

    def __init__(self) -> None:
        self.served = 0
        self.scope = trio.CancelScope()

    async def run(self, gate: Gate, *, task_status: trio.TaskStatus[None]) -> None:
        with self.scope:
            await gate.poll_sockets(task_status=task_status)


_polling: weakref.WeakKeyDictionary[Gate, _Polling] = weakref.WeakKeyDictionary()


async def connect(
    nursery: trio.Nursery,
    gate: Gate,
    pair: StreamPair = trio.testing.memory_stream_pair,
    *,
    pipelined: bytes = b"",
) -> MemoryClient:
    """Open a connection served by ``gate`` and complete its handshake."""
    client = MemoryClient(await open_front(nursery, gate, pair))
    await client.handshake(pipelined)
    return client
