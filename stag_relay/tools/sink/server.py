"""The STAG stand-in's HTTP server: Trio and h11 around the :class:`~.ledger.Ledger`.

Each connection is handed to a handler that speaks through a :class:`Peer` (h11 on
the server side, or raw bytes). The sink's own handler answers from the ledger; a
test passes its own to misbehave at the byte level (truncated or garbage answers,
early answers, slow trickles) in its own Trio run, under its clock.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import h11
import trio

from stag_relay import __version__
from stag_relay.tools.sink.ledger import (
    MAX_BODY_BYTES,
    WIRE_FORMATS,
    FailurePlan,
    Ledger,
    Request,
)

DEFAULT_HOST: Final = "127.0.0.1"
# The relay's default stag.url is http://localhost:8080: a sink started with no
# options is where a relay started with no options delivers.
DEFAULT_PORT: Final = 8080
# Request heads are a few hundred bytes; anything near this is not a relay.
_MAX_HEAD_BYTES: Final = 64 * 1024
_RECEIVE_BYTES: Final = 256 * 1024
_SERVER: Final = f"stag-relay-sink/{__version__}"


class Peer:
    """One accepted connection, with h11 on the server side."""

    def __init__(self, stream: trio.abc.Stream, sink: Sink) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self._sink = sink
        self._method = b""

    async def request(self, *, max_body: int = MAX_BODY_BYTES) -> Request | None:
        """The next request, whole; ``None`` once the client closed the connection or
        broke HTTP. A body over ``max_body`` bytes is read and not kept (``too_large``)."""
        head: h11.Request | None = None
        body = bytearray()
        too_large = False
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    data = b""
                self.http.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                if too_large or len(body) + len(event.data) > max_body:
                    too_large = True
                    body.clear()
                else:
                    body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self._method = head.method
                request = Request(
                    head.method.decode("latin-1"),
                    head.target.decode("latin-1"),
                    {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers},
                    bytes(body),
                    too_large,
                )
                self._sink._received(request)
                return request
            else:
                return None

    async def answer(
        self,
        status: int = 200,
        body: bytes = b'{"status":"ok"}',
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer the request read last, with a Content-Length; ready for the next one
        unless ``must_close``."""
        fields = [("content-type", "application/json"), *headers]
        fields.append(("content-length", str(len(body))))
        data = self.http.send(h11.Response(status_code=status, headers=fields)) or b""
        if self._method != b"HEAD":
            data += self.http.send(h11.Data(data=body)) or b""
        data += self.http.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()

    @property
    def must_close(self) -> bool:
        """The last answer ended the connection (the client asked, or HTTP/1.0)."""
        return self.http.our_state is h11.MUST_CLOSE

    async def raw(self, data: bytes, *, answered: bool = False) -> None:
        """Send ``data`` as it is; ``answered``: it completes the answer, read the next request.

        h11 did not see the raw answer, so it starts afresh (the client sends nothing
        before it has read an answer, so h11 holds no bytes to lose).
        """
        await self.stream.send_all(data)
        if answered:
            self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)

    async def close(self) -> None:
        await self.stream.aclose()


Handler = Callable[[Peer], Awaitable[None]]


@attrs.frozen
class SinkSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # None: the wire format's (/ingest for batches, /api/v1/ingest for spatial events).
    ingest_path: str | None = None
    # How bodies are read and answered: "batch" or "spatial-event" (WIRE_FORMATS).
    wire_format: str = "batch"
    failures: tuple[FailurePlan, ...] = ()
    # When set, a batch without this X-API-Key gets 401, as STAG would answer.
    api_key: str | None = None
    # Added before every answer: STAG's own processing time.
    delay: float = 0.0
    # A batch of more events than this gets 413, as STAG answers one over its limit.
    max_events: int | None = None
    # Serve HTTPS with this context.
    tls: ssl.SSLContext | None = None


class Sink:
    """The HTTP server: ``await nursery.start(sink.run)`` gives the bound port.

    ``ledger``: the bookkeeping to answer from (by default one made from ``settings``,
    whose ``ingest_path``, ``api_key``, ``failures`` and ``max_events`` are then the
    ledger's).
    ``handler``: what serves each connection instead of the ledger.
    ``guard`` and ``on_change``: for a ledger shared with another thread, a lock held
    while the server touches the ledger or its own counters, and what to call (lock
    held) after it changed them. ``keep_requests``: keep every request read in
    ``received``.
    """

    def __init__(
        self,
        settings: SinkSettings,
        *,
        ledger: Ledger | None = None,
        handler: Handler | None = None,
        guard: contextlib.AbstractContextManager[object] | None = None,
        on_change: Callable[[], object] | None = None,
        keep_requests: bool = False,
    ) -> None:
        self.settings = settings
        if ledger is None:
            ledger = Ledger(
                failures=settings.failures,
                ingest_path=settings.ingest_path,
                api_key=settings.api_key,
                wire_format=WIRE_FORMATS[settings.wire_format](),
            )
            ledger.programme.max_events = settings.max_events
        self.ledger = ledger
        self.handler: Handler = handler if handler is not None else self.serve_ledger
        self._guard = guard if guard is not None else contextlib.nullcontext()
        self._on_change = on_change if on_change is not None else _nothing
        self.received: list[Request] | None = [] if keep_requests else None
        self.port: int | None = None
        # Connections accepted, and those whose handler returned and were closed.
        self.connections = 0
        self.closed = 0
        # Requests being answered from the ledger right now, and the most ever at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self._closing = trio.Event()
        self._wakeup = trio.Event()

    @property
    def url(self) -> str:
        """The base URL for the relay's ``stag.url``."""
        scheme = "https" if self.settings.tls is not None else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. It may run again afterwards (on the same port: STAG
        back); what was recorded is kept."""
        self._closing = trio.Event()
        self._wakeup = trio.Event()
        tcp = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        self.port = tcp[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp)
        if self.settings.tls is not None:
            listeners = [
                trio.SSLListener(listener, self.settings.tls, https_compatible=True)
                for listener in tcp
            ]
        task_status.started(self.port)
        await trio.serve_listeners(self.serve_connection, listeners)

    def poke(self) -> None:
        """Look at the ledger again: call after resuming its programme from outside a
        request (from another thread: through ``TrioToken.run_sync_soon``)."""
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def wait_closed(self, count: int) -> None:
        """Until the server has closed ``count`` connections."""
        while self.closed < count:
            await self._closing.wait()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection with the handler, and close it."""
        self.connections += 1
        try:
            await self.handler(Peer(stream, self))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            # The client hung up on an answer still being written.
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self.closed += 1
            self._closing.set()
            self._closing = trio.Event()

    def _received(self, request: Request) -> None:
        if self.received is not None:
            self.received.append(request)

    async def serve_ledger(self, peer: Peer) -> None:
        """Answer every request on ``peer`` from the ledger until the client closes."""
        while (request := await peer.request()) is not None:
            with self._guard:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.ledger.programme.arrive()
                self._on_change()
            try:
                await self._unpaused()
                with self._guard:
                    answer = self.ledger.answer(request, time.time())
                    self._on_change()
                delay = answer.delay + self.settings.delay
                if delay:
                    await trio.sleep(delay)
                if answer.close:
                    return
                headers = [("server", _SERVER), *answer.headers]
                await peer.answer(answer.status, answer.body, headers)
            finally:
                with self._guard:
                    self.in_flight -= 1
                    self._on_change()
            if peer.must_close:
                return

    async def _unpaused(self) -> None:
        while True:
            wakeup = self._wakeup
            with self._guard:
                if not self.ledger.programme.paused:
                    return
            await wakeup.wait()


def _nothing() -> None:
    pass
