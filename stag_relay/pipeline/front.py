"""The front door: one port, plain HTTP endpoints and the WebSocket upgrade.

Every connection starts here: h11 reads the request head; an upgrade on the
WebSocket path whose handshake headers are sound (``websocket.handshake_problem``)
and that ``admit`` lets in is handed to the gate, which answers the 101 and speaks
WebSocket from there; everything else is answered here through h11.
"""

from __future__ import annotations

import http
import traceback
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Final

import h11
import structlog
import trio

from stag_relay import __version__
from stag_relay.protocol.http import HttpRequest, HttpResponse, error_response
from stag_relay.protocol.websocket import handshake_problem

# A request head larger than this is an attack or a bug, not a client (431).
MAX_REQUEST_HEAD_BYTES: Final = 16 * 1024
# Plenty for a request head in one read; the socket gives us what it has.
_RECEIVE_BYTES: Final = 16 * 1024
# A plain request body (nobody should send one) is read and discarded up to this.
_MAX_DISCARD_BYTES: Final = 64 * 1024
# How long an erring client gets to read our error answer before we hang up.
_LINGER_SECONDS: Final = 2.0
_SERVER_HEADER: Final = f"stag-relay/{__version__}"

log = structlog.get_logger("stag_relay.front")


Endpoint = Callable[[HttpRequest], HttpResponse]
Admit = Callable[[HttpRequest], HttpResponse | None]
ServeWebSocket = Callable[[trio.abc.Stream, HttpRequest], Awaitable[None]]
OnError = Callable[[str, Exception], None]


def error_sites(exc: BaseException) -> list[str]:
    """Where an error came from, as "Type at file:line in function", innermost last,
    through exception groups and chained exceptions.

    Without the exceptions' messages: those may quote what a client sent (a packet
    error echoes part of a value), and client data never goes into the log.
    """
    sites: list[str] = []
    seen: set[int] = set()

    def walk(error: BaseException) -> None:
        if id(error) in seen:
            return
        seen.add(id(error))
        chained = error.__cause__ or error.__context__
        if chained is not None:
            walk(chained)
        frames = traceback.extract_tb(error.__traceback__)
        site = type(error).__name__
        if frames:
            site += f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}"
        sites.append(site)
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)

    walk(exc)
    return sites


class ReplayStream(trio.abc.Stream):
    """A stream that yields ``prefix`` before what the wrapped stream receives.

    h11 may have read past the upgrade request's head (a client that sends its
    first frames without waiting for the 101): those bytes are the prefix.
    """

    def __init__(self, prefix: bytes, stream: trio.abc.Stream) -> None:
        self._prefix = prefix
        self.stream = stream

    def detach(self) -> tuple[bytes, trio.abc.Stream]:
        """The prefix not yet received and the wrapped stream, for a reader that
        takes the prefix itself and then reads the stream without this layer."""
        prefix, self._prefix = self._prefix, b""
        return prefix, self.stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def peer_name(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "unknown"
    try:
        address = socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class FrontDoor:
    """Answers plain HTTP on ``endpoints`` and hands WebSocket upgrades of
    ``websocket_paths`` (one per client dialect) to ``serve_websocket``.

    ``admit`` may refuse an upgrade with a response (draining, limits, auth)
    before any WebSocket byte is sent; ``serve_websocket`` then owns the stream.
    """

    def __init__(
        self,
        *,
        endpoints: Mapping[str, Endpoint],
        websocket_paths: Collection[str],
        admit: Admit,
        serve_websocket: ServeWebSocket,
        handshake_timeout: float,
        max_head_bytes: int = MAX_REQUEST_HEAD_BYTES,
        on_error: OnError | None = None,
    ) -> None:
        self._on_error = on_error
        self._endpoints = endpoints
        self._websocket_paths = frozenset(websocket_paths)
        self._admit = admit
        self._serve_websocket = serve_websocket
        self._handshake_timeout = handshake_timeout
        self._max_head_bytes = max_head_bytes

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection until it closes, is upgraded or misbehaves.

        With TLS (``stream`` is a trio.SSLStream) the handshake runs inside the first
        read, so it counts against handshake_timeout like the request head.
        """
        peer = peer_name(stream)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head_bytes)
        try:
            await self._handle(stream, conn, peer)
        except Exception as exc:
            # A bug met on one connection ends that connection, not the relay and
            # its thousands of other clients; on_error makes it loud (log, metric).
            if self._on_error is None:
                raise
            self._on_error(peer, exc)
        finally:
            # Close now rather than when the stream is garbage: a connection cut off
            # (a client that does not read its replies) must see its end at once.
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.abc.Stream, conn: h11.Connection, peer: str) -> None:
        try:
            while True:
                upgrade: HttpRequest | None = None
                # Each request head, the first and every keep-alive one, must arrive in time.
                with trio.move_on_after(self._handshake_timeout) as deadline:
                    request = await self._read_request(stream, conn, peer)
                    if request is None:
                        return
                    if request.path in self._websocket_paths and request.is_websocket_upgrade:
                        refusal = self._admit(request)
                        if request.method != "GET":
                            refusal = error_response(405, "use GET", (("allow", "GET"),))
                        elif refusal is None:
                            # No checkpoint from admit to the hand-off (see Relay._serve_websocket).
                            problem = handshake_problem(
                                request.header("sec-websocket-version"),
                                request.header("sec-websocket-key"),
                            )
                            if problem is not None:
                                refusal = error_response(
                                    problem.status, problem.message, problem.headers
                                )
                        if refusal is not None:
                            await self._send(stream, conn, request, refusal, close=True)
                            return
                        upgrade = request
                    elif not await self._answer(stream, conn, request):
                        return
                if deadline.cancelled_caught:
                    return
                if upgrade is not None:
                    replay = ReplayStream(bytes(conn.trailing_data[0]), stream)
                    await self._serve_websocket(replay, upgrade)
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            message = f"malformed request: {exc}"
            await self._try_send(stream, conn, error_response(exc.error_status_hint, message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection, peer: str
    ) -> HttpRequest | None:
        # Read no more than the head limit before h11 has the whole head, so an
        # oversized head fails here however the client splits it across packets.
        budget = self._max_head_bytes + 1
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if budget <= 0:
                    raise h11.RemoteProtocolError("request head too large", 431)
                data = await stream.receive_some(min(_RECEIVE_BYTES, budget))
                budget -= len(data)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                return _to_request(event, peer)
            # ConnectionClosed between requests, or anything else: we are done.
            return None

    async def _answer(
        self, stream: trio.abc.Stream, conn: h11.Connection, request: HttpRequest
    ) -> bool:
        """Answer a plain request; True when the connection may serve another."""
        response = self._route(request)
        # A body nobody asked for: read a little of it so keep-alive stays in step,
        # or close the connection when there is more.
        # A refused upgrade leaves the client expecting a WebSocket: end the connection.
        keep_alive = await self._discard_body(stream, conn) and not request.is_websocket_upgrade
        await self._send(stream, conn, request, response, close=not keep_alive)
        return keep_alive and conn.our_state is h11.DONE and conn.their_state is h11.DONE

    def _route(self, request: HttpRequest) -> HttpResponse:
        if request.path in self._websocket_paths:
            return error_response(
                426, "this endpoint speaks WebSocket only", (("upgrade", "websocket"),)
            )
        endpoint = self._endpoints.get(request.path)
        if endpoint is None or request.is_websocket_upgrade:
            return error_response(404, f"no such endpoint: {request.path}")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, f"{request.path} answers GET", (("allow", "GET, HEAD"),))
        return endpoint(request)

    async def _discard_body(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        discarded = 0
        while True:
            event = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if event is h11.PAUSED:
                return False
            if event is h11.NEED_DATA:
                if discarded > _MAX_DISCARD_BYTES:
                    return False
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_BYTES)))
                continue
            if isinstance(event, h11.Data):
                discarded += len(event.data)
                continue
            return False

    async def _send(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        request: HttpRequest,
        response: HttpResponse,
        *,
        close: bool,
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("server", _SERVER_HEADER),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        reason = http.HTTPStatus(response.status).phrase.encode()
        data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if request.method != "HEAD":
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _try_send(
        self, stream: trio.abc.Stream, conn: h11.Connection, response: HttpResponse
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        request = HttpRequest("GET", "", "", "", (), "")
        try:
            with trio.move_on_after(_LINGER_SECONDS):
                await self._send(stream, conn, request, response, close=True)
                # Closing with unread input makes the kernel send a reset, which can
                # destroy the error answer before the client reads it: stop writing,
                # then read and discard what the client is still sending.
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                discarded = 0
                while discarded < _MAX_DISCARD_BYTES * 4:
                    data = await stream.receive_some(_RECEIVE_BYTES)
                    if not data:
                        break
                    discarded += len(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _to_request(event: h11.Request, peer: str) -> HttpRequest:
    target = event.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in event.headers.raw_items()
    )
    return HttpRequest(event.method.decode("latin-1"), target, path, query, headers, peer)
