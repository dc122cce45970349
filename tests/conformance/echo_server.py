"""An echo endpoint on the relay's own WebSocket code, for the Autobahn TestSuite (test only).

The suite judges a server by what it echoes, so this one sends every message back,
text as text and binary as binary. Everything the suite exercises is the relay's
production code: the front door (``front.FrontDoor``: h11, the upgrade checks,
``websocket.handshake_problem``, the replay of bytes sent before the 101), the 101
(``websocket.switching_protocols``), the frame reader (``websocket.FrameReader``: masking,
fragments, control frames, UTF-8, close frames, violations) and the encoders. What
the gate does around them is done here the gate's way: a ping is answered with a pong
of its payload, the peer's close frame with a close frame of its code, a violation
with a close frame of the violation's code, after which only the peer's close frame
is waited for (``SEND_TIMEOUT``); after our close frame, a FIN.

Every ping gets its own pong, at once, rather than going through the gate's outbox
(``outbox.Outbox``): that answers only the latest of the pings it has not answered
yet, as RFC 6455 5.5.3 allows, which the suite counts as a failure all the same
(cases 2.10 and 2.11: "not required by the Spec .. but we check for this behaviour
anyway"). The outbox orders the relay's replies, which an echo has none of.

    python tests/conformance/echo_server.py [--port 0]

Prints ``listening <port>`` on stdout once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from functools import partial
from typing import Final

import trio

from stag_relay.pipeline.front import FrontDoor, HttpRequest, ReplayStream
from stag_relay.protocol import websocket
from stag_relay.protocol.websocket import Binary, Close, FrameReader, Ping, Pong, Violation

PATH: Final = "/echo"
# The suite's largest messages (cases 9.1.6 and 9.2.6) are 16 MiB; the relay's own
# limit (websocket.max_message_size, 8 MiB by default) is a policy, not the protocol.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
# The gate's read size and close wait (stag_relay/pipeline/gate.py), copied rather than
# imported so this stays independent of the gate's internals.
RECEIVE_BYTES: Final = 64 * 1024
SEND_TIMEOUT: Final = 10.0
HANDSHAKE_TIMEOUT: Final = 10.0


async def echo(stream: trio.abc.Stream, request: HttpRequest) -> None:
    """The WebSocket side, once the front door has accepted the upgrade ``request``."""
    prefix = b""
    if isinstance(stream, ReplayStream):
        prefix, stream = stream.detach()
    await stream.send_all(websocket.switching_protocols(request.header("sec-websocket-key") or ""))
    frames = FrameReader(MAX_MESSAGE_SIZE, mark_binary=True)
    data: bytes | bytearray = prefix
    while True:
        ending: Close | Violation | None = None
        out: list[bytes] = []
        for item in frames.receive(data):
            if type(item) is bytes:
                out.append(websocket.text_frame(item))
            elif type(item) is Binary:
                out.append(websocket.encode_frame(websocket.OP_BINARY, item.payload))
            elif type(item) is Ping:
                out.append(websocket.pong_frame(item.payload))
            elif type(item) is Pong:
                continue
            else:
                assert isinstance(item, Close | Violation)
                ending = item
                break
        if out:
            await stream.send_all(b"".join(out))
        if ending is not None:
            break
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return
    # Like the gate: answer the peer's close with its code, or fail the connection
    # with the violation's code and reason.
    if isinstance(ending, Close):
        await stream.send_all(websocket.close_frame(ending.code))
    else:
        await stream.send_all(websocket.close_frame(ending.code, ending.reason))
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    if isinstance(ending, Violation):
        with trio.move_on_after(SEND_TIMEOUT):
            while not frames.closed:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    break
                frames.receive(data)
    # The front door closes the socket once this returns.


def front_door() -> FrontDoor:
    return FrontDoor(
        endpoints={},
        websocket_paths={PATH},
        admit=lambda request: None,
        serve_websocket=echo,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )


async def serve(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            nursery.start_soon(partial(trio.serve_listeners, front_door().handle, listeners))
            print(f"listening {bound}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
