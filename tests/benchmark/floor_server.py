"""The floor: a bare Trio server that completes the relay's WebSocket handshake and then
reads and discards bytes.

What one connection costs on Trio with nothing done per message: a ``receive_some``
per read and nothing else, no frame parsing, no library. The paced workload sets the
relay's CPU per event beside this server's CPU per message, measured with the same
client in the same repeat. The 101 answer is the relay's own
(``stag_relay.protocol.websocket.switching_protocols``) and reads are as large as the
relay's (64 KiB).

To let the client finish its close handshake at once, a read that starts with a
masked close frame (0x88) is answered with a close frame and the connection closed;
the paced client sends its close alone, after its last packet. Anything else is
discarded unread.

    python tests/benchmark/floor_server.py [--port 0]

Prints ``listening <port>`` on stdout once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import sys
from typing import Final

import trio

from stag_relay.protocol.websocket import close_frame, switching_protocols

# The relay's read size (stag_relay/pipeline/gate.py RECEIVE_BYTES), copied so the
# floor stays put if the gate changes.
RECEIVE_BYTES: Final = 64 * 1024
# An upgrade request head longer than this is not the load generator's.
MAX_HEAD: Final = 16 * 1024
CLOSE_OPCODE_BYTE: Final = 0x88
_CLOSE: Final = close_frame(1000)


def _websocket_key(head: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return value.strip().decode("latin-1")
    return None


async def discard(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data or len(head) > MAX_HEAD:
                return
            head += data
        key = _websocket_key(head.partition(b"\r\n\r\n")[0])
        if key is None:
            return
        await stream.send_all(switching_protocols(key))
        receive_some = stream.receive_some
        while True:
            data = await receive_some(RECEIVE_BYTES)
            if not data:
                return
            if data[0] == CLOSE_OPCODE_BYTE:
                await stream.send_all(_CLOSE)
                return


async def serve(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            nursery.start_soon(functools.partial(trio.serve_listeners, discard, listeners))
            print(f"listening {bound}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(serve, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
