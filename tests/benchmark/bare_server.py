"""The ceiling: a bare trio-websocket server that receives every message and discards it.

What this stack (Trio, trio-websocket, wsproto, CPython) can take on this machine
before any relay work is done; the benchmark runs the same client against it and
against the relay in the same run. It uses the relay's receive settings (a 64 KiB
receive buffer, a queue of 4 messages) so the difference is the relay's work,
not a library setting.

    python tests/benchmark/bare_server.py [--port 0]

Prints ``listening <port>`` on stdout once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Final

import trio
import trio_websocket

# The relay's values (stag_relay/pipeline/gate.py), copied rather than imported: the
# ceiling must stay bare trio-websocket even if the relay's gate changes.
RECEIVE_BYTES: Final = 64 * 1024
MESSAGE_QUEUE_SIZE: Final = 4
# Far above any benchmark message; the relay's default websocket.max_message_size.
MAX_MESSAGE_SIZE: Final = 8 * 1024 * 1024


async def discard(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed:
        pass


async def serve(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound = listeners[0].socket.getsockname()[1]
            server = trio_websocket.WebSocketServer(
                discard,
                listeners,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=MAX_MESSAGE_SIZE,
                receive_buffer_size=RECEIVE_BYTES,
            )
            nursery.start_soon(server.run)
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
