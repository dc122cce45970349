"""StreamKit clients for the tests, built on the `websockets` library.

Deliberately another implementation than the relay's own frame reader
(stag_relay/protocol/websocket.py), so that the two ends do not share their bugs. The
sync client runs in a thread (``trio.to_thread.run_sync``) so trio tests can drive it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.support.meshes import draco_grid

__all__ = ["ClientConnection", "connect_relay", "mesh_packet", "pose_packet", "stream_poses"]


def pose_packet(
    session_id: str,
    frame_number: int,
    *,
    timestamp: int | None = None,
    x: float = 1.0,
    rotation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0),
    **extra: Any,
) -> str:
    packet: dict[str, Any] = {
        "session_id": session_id,
        "frame_number": frame_number,
        "timestamp": timestamp if timestamp is not None else time.time_ns() // 1_000_000,
        "type": "pose",
        "data": {"pose": {"x": x, "y": 2.0, "z": 3.0, "rotation": list(rotation)}},
    }
    packet.update(extra)
    return json.dumps(packet)


def mesh_packet(
    session_id: str,
    frame_number: int,
    *,
    anchor_id: str = "anchor-1",
    vertices: str | None = None,
    faces: str = "",
    timestamp: int | None = None,
) -> str:
    if vertices is None:
        vertices = draco_grid()
    return json.dumps(
        {
            "session_id": session_id,
            "frame_number": frame_number,
            "timestamp": timestamp if timestamp is not None else time.time_ns() // 1_000_000,
            "type": "mesh",
            "data": {"mesh": {"vertices": vertices, "faces": faces, "anchor_id": anchor_id}},
        }
    )


def connect_relay(port: int, path: str = "/ws/streamkit", **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", 30)
    kwargs.setdefault("close_timeout", 30)
    return connect(f"ws://127.0.0.1:{port}{path}", **kwargs)


def frames(session_id: str, count: int, start: int = 1) -> Iterator[str]:
    for n in range(start, start + count):
        yield pose_packet(session_id, n)


def stream_poses(port: int, session_id: str, count: int) -> int:
    """Send ``count`` pose packets as fast as possible, then close normally."""
    with connect_relay(port) as ws:
        for message in frames(session_id, count):
            ws.send(message)
    return count
