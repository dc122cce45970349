"""What the delivery tests share: a client that collects its acknowledgements, what STAG
got of one session, what the relay dropped, and the environment of a relay with a spool."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from stag_relay.service.relay import Relay
from tests.support.clients import ClientConnection, connect_relay, pose_packet
from tests.support.stag_server import StagServer


class AckingClient:
    """A `websockets` client on ``/ws/streamkit?ack=1``; a thread collects what it is told."""

    def __init__(self, port: int, session_id: str) -> None:
        self.session_id = session_id
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect_relay(port, "/ws/streamkit?ack=1")
        )
        self.acked: set[int] = set()
        self.ack_frames = 0
        self.errors: list[dict[str, object]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self.ws:
                reply = json.loads(message)
                with self._cond:
                    if reply["type"] == "ack":
                        assert reply["session_id"] == self.session_id
                        self.acked.update(reply["frame_numbers"])
                        self.ack_frames += 1
                    else:
                        self.errors.append(reply)
                    self._cond.notify_all()
        except ConnectionClosed:
            pass

    def send(self, frames: range | list[int]) -> None:
        for frame in frames:
            self.ws.send(pose_packet(self.session_id, frame))

    def wait_acked(self, frames: set[int], timeout: float = 60.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: frames <= self.acked, timeout):
                raise AssertionError(f"never acknowledged: {sorted(frames - self.acked)[:10]}")

    def close(self) -> None:
        self._stack.close()
        self._reader.join(30)


def frames_of(stag: StagServer, session_id: str) -> list[int]:
    return [e["frame_number"] for e in stag.events() if e["session_id"] == session_id]


def dropped(relay: Relay, reason: str) -> float | None:
    return relay.metrics.registry.get_sample_value("relay_events_dropped_total", {"reason": reason})


def relay_env(stag: StagServer, spool: Path, **extra: str) -> dict[str, str]:
    return {
        "RELAY_SERVER_HOST": "127.0.0.1",
        "RELAY_SERVER_PORT": "0",
        "RELAY_STAG_URL": stag.url,
        "RELAY_BATCH_MAX_SIZE": "20",
        "RELAY_DELIVERY_SPOOL_PATH": str(spool),
        **extra,
    }
