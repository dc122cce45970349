"""Load generator: N WebSocket connections streaming StreamKit packets to a relay.

``stag-relay loadgen`` opens its connections, then streams pose packets on each at
a rate per connection (``--rate``, staggered so that the connections do not all
send in the same instant) or as fast as the relay takes them (``--rate 0``), for a
count (``--count``) or a duration (``--duration``); ``--mesh-triangles`` adds
meshes beside the poses. It counts what the relay answers: error replies,
acknowledgements (``?ack=1``), and connections the relay closed.

Two dialects: ``streamkit`` (the default) sends the relay's own packets (text JSON
with frame numbers, Draco meshes) to ``/ws/streamkit``; ``sdk`` sends what the
StreamKit iOS SDK sends to ``/api/v1/ws?session_id=<UUID>``: binary frames holding a
``WSMessage`` whose ``data`` is the base64 of the inner JSON (``anchor_update`` with
an Apple reference-date timestamp, ``mesh_update`` with the SDK's gzip-compressed
vertex buffer), ``Authorization: Bearer`` for the key, and no acknowledgements.

It is built to cost the relay's machine as little as possible, since it usually
shares it: asyncio transports (a write is one ``send`` call), the WebSocket
handshake and everything received go through the ``websockets`` library's
sans-I/O protocol, and outgoing data frames are encoded here: a fraction of what
the ``websockets`` asyncio client or trio-websocket spend per packet
(docs/performance.md). The frames are standard (masked with a fresh random key, one
message per frame, no extensions).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import random
import resource
import ssl
import struct
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import attrs
import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from stag_relay import __version__
from stag_relay.service.config import duration_argument

try:  # websockets' C masking, ~20x the pure-Python fallback on a pose packet
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the extension
    from websockets.utils import apply_mask

DEFAULT_URL: Final = "ws://127.0.0.1:8081/ws/streamkit"
DIALECTS: Final = ("streamkit", "sdk")
# Where the SDK connects: it replaces whatever path its server URL had with this one.
SDK_PATH: Final = "/api/v1/ws"
# The SDK's pose timestamps count seconds from 2001-01-01T00:00:00Z (Foundation's
# reference date), not from 1970.
APPLE_EPOCH_OFFSET: Final = 978_307_200.0
# The one anchor the SDK streams poses for: the camera.
SDK_CAMERA_ANCHOR: Final = "camera"
# A typical AR pose rate (ARKit and ARCore deliver camera frames at 60 Hz).
DEFAULT_RATE: Final = 60.0
DEFAULT_DURATION: Final = 10.0
# Frames built and written per write in flood mode: one syscall carries ~10 KiB
# of pose packets, and a connection yields to the others after each chunk.
FLOOD_CHUNK: Final = 64
# Handshakes in progress at once: enough to open 5,000 connections in seconds,
# few enough not to overflow the relay's listen backlog with SYNs.
DEFAULT_CONNECT_CONCURRENCY: Final = 200
# Error messages kept for the summary; the rest are only counted.
_ERROR_SAMPLES: Final = 5
# The relay's replies are small JSON objects; this bounds what a broken peer can
# make us buffer.
_MAX_INCOMING: Final = 1024 * 1024
_OPCODE_TEXT: Final = 0x1
_OPCODE_BINARY: Final = 0x2
_USER_AGENT: Final = f"stag-relay-loadgen/{__version__}"


# --- what goes on the wire -------------------------------------------------------


def encode_masked_frame(payload: bytes, mask: bytes, opcode: int = _OPCODE_TEXT) -> bytes:
    """One final, masked client frame (RFC 6455 section 5.2) carrying ``payload``."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


def pose_template(session_id: str) -> bytes:
    """A pose packet with ``%d`` for its frame number and its timestamp (milliseconds)."""
    session = orjson.dumps(session_id).replace(b"%", b"%%")
    return (
        b'{"session_id":' + session + b',"frame_number":%d,"timestamp":%d,"type":"pose",'
        b'"data":{"pose":{"x":0.5,"y":1.5,"z":-2.0,"rotation":[0.0,0.0,0.0,1.0]}}}'
    )


def mesh_template(session_id: str, anchor_id: str, vertices: str) -> bytes:
    """A mesh packet (faces inside ``vertices``) with ``%d`` for frame number and timestamp."""
    session = orjson.dumps(session_id).replace(b"%", b"%%")
    anchor = orjson.dumps(anchor_id).replace(b"%", b"%%")
    return (
        b'{"session_id":' + session + b',"frame_number":%d,"timestamp":%d,"type":"mesh",'
        b'"data":{"mesh":{"anchor_id":'
        + anchor
        + b',"vertices":"'
        + vertices.encode("ascii")
        + b'","faces":""}}}'
    )


def sdk_message(kind: str, session_id: str, inner: dict[str, Any], now_ms: int) -> bytes:
    """A ``WSMessage`` as the SDK's ``JSONEncoder`` writes it: camelCase keys and
    ``data`` the base64 of the inner JSON (Swift encodes ``Data`` so)."""
    data = base64.b64encode(orjson.dumps(inner)).decode("ascii")
    return orjson.dumps({"type": kind, "sessionId": session_id, "data": data, "timestamp": now_ms})


def sdk_anchor_update(session_id: str, at: float, now: float) -> bytes:
    """The SDK's ``anchor_update`` for the camera pose taken at ``at`` (Unix seconds),
    sent at ``now``."""
    inner = {
        "id": SDK_CAMERA_ANCHOR,
        "pose": {
            "position": [0.5, 1.5, -2.0],
            "rotation": [0.0, 0.0, 0.0, 1.0],
            "timestamp": at - APPLE_EPOCH_OFFSET,
        },
    }
    return sdk_message("anchor_update", session_id, inner, int(now * 1000))


def sdk_mesh_buffer(points: Any, faces: Any) -> bytes:
    """The SDK's full-mesh vertex buffer: ``u32 vertexCount, u32 indexCount``, the
    vertices as float32 x, y, z and the indices as u32, little-endian, compressed with
    DEFLATE in a gzip container (what the SDK's ``Data.gzipped`` writes)."""
    import numpy as np

    vertices = np.ascontiguousarray(points, dtype="<f4").reshape(-1, 3)
    indices = np.ascontiguousarray(faces, dtype="<u4").reshape(-1)
    raw = struct.pack("<II", len(vertices), len(indices)) + vertices.tobytes() + indices.tobytes()
    packer = zlib.compressobj(5, zlib.DEFLATED, 31)
    return packer.compress(raw) + packer.flush()


def sdk_mesh_update(
    session_id: str, mesh_id: str, anchor_id: str, vertices: str, now: float
) -> bytes:
    """The SDK's ``mesh_update`` of a full mesh (``vertices``: base64 of its buffer)."""
    inner = {
        "id": mesh_id,
        "anchorId": anchor_id,
        "vertices": vertices,
        "faces": "",
        "compressionLevel": 5,
        "isDelta": False,
    }
    return sdk_message("mesh_update", session_id, inner, int(now * 1000))


# Growth of the scanned surface between two mesh updates of one anchor: what an
# AR scan does (a few percent per update), so that a relay sending diffs has
# mostly unchanged triangles to recognise.
MESH_GROWTH_STEPS: Final = 10
_MESH_FIRST_SHARE: Final = 0.73
_MESH_STEP_SHARE: Final = 0.03


def mesh_scan(triangles: int, *, seed: int = 7, dialect: str = "streamkit") -> list[str]:
    """Base64 buffers of one anchor's mesh growing over ``MESH_GROWTH_STEPS`` updates
    to about ``triangles`` triangles: Draco for ``streamkit``, the SDK's gzip buffer
    for ``sdk``.

    A height field on a jittered grid (coordinates not on a regular lattice); each
    update adds rows of triangles and keeps the earlier ones exactly (they decode to
    the same coordinates). Draco-encoded with DracoPy's defaults, as a client would.
    """
    import base64

    import DracoPy
    import numpy as np

    if triangles < 2:
        raise ValueError(f"a mesh needs at least 2 triangles, got {triangles}")
    rng = np.random.default_rng(seed)
    cols = max(1, round(math.sqrt(triangles / 2)))
    rows = max(1, round(triangles / (2 * cols)))
    ys, xs = np.mgrid[0 : rows + 1, 0 : cols + 1]
    points = np.stack(
        [
            xs * 0.05 + rng.normal(0.0, 0.01, xs.shape),
            ys * 0.05 + rng.normal(0.0, 0.01, xs.shape),
            rng.normal(0.0, 0.02, xs.shape),
        ],
        axis=-1,
    ).astype(np.float32)
    scans = []
    for step in range(MESH_GROWTH_STEPS):
        share = min(1.0, _MESH_FIRST_SHARE + _MESH_STEP_SHARE * (step + 1))
        r = max(1, round(rows * share))
        index = np.arange((r + 1) * (cols + 1)).reshape(r + 1, cols + 1)
        a, b = index[:-1, :-1].ravel(), index[:-1, 1:].ravel()
        c, d = index[1:, :-1].ravel(), index[1:, 1:].ravel()
        faces = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
        # Every point, whether the faces use it yet or not: Draco quantises positions
        # on a grid over their bounding box, so a box that grew would move every
        # coordinate a little and no triangle would match the previous update's.
        if dialect == "sdk":
            buffer = sdk_mesh_buffer(points.reshape(-1, 3), faces)
        else:
            buffer = DracoPy.encode(points.reshape(-1, 3), faces.astype(np.uint32))
        scans.append(base64.b64encode(buffer).decode("ascii"))
    return scans


# --- settings and results -------------------------------------------------------


@attrs.frozen
class LoadSettings:
    """What to send. ``rate`` 0 means as fast as the relay takes it.

    Streaming stops at ``count`` pose packets per connection or after ``duration``
    seconds, whichever comes first; at least one of them must be set.
    """

    url: str = DEFAULT_URL
    dialect: str = "streamkit"
    connections: int = 10
    rate: float = DEFAULT_RATE
    count: int | None = None
    duration: float | None = DEFAULT_DURATION
    api_key: str | None = None
    ack: bool = False
    mesh_triangles: int = 0
    mesh_rate: float = 1.0
    # "" picks a random one: a rerun must not look like a resend of the last run's
    # frames to a relay that still holds those sessions.
    session_prefix: str = ""
    connect_concurrency: int = DEFAULT_CONNECT_CONCURRENCY
    connect_timeout: float = 30.0
    close_timeout: float = 30.0
    # With ``ack``: after streaming, how long to wait for every packet sent to be
    # acknowledged or refused before closing.
    ack_timeout: float = 30.0
    verify_tls: bool = True

    def __attrs_post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ValueError("rate must be a finite number >= 0")
        if self.count is None and self.duration is None:
            raise ValueError("set a count, a duration, or both")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")
        if self.mesh_triangles and not self.mesh_rate > 0:
            raise ValueError("mesh rate must be > 0")
        if urlsplit(self.url).scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {self.url!r}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")
        if self.dialect == "sdk" and self.ack:
            raise ValueError(
                "the SDK dialect has no acknowledgements: use --ack with --dialect streamkit"
            )


@attrs.frozen
class LoadSummary:
    """What a run sent and what came back. Times are Unix seconds (``*_at``) or seconds."""

    url: str
    connections: int
    connected: int
    connect_failures: int
    connect_errors: tuple[str, ...]
    rate: float
    pose_sent: int
    mesh_sent: int
    # Characters of base64 mesh data sent (vertices + faces), to compare with what
    # reaches STAG.
    mesh_chars: int
    bytes_sent: int
    errors: int
    error_samples: tuple[str, ...]
    ack_frames: int
    acked_frames: int
    # With ``ack``: packets neither acknowledged nor refused when the wait ended.
    unanswered: int
    other_replies: int
    # Close codes of connections the relay closed before we did (1006: no close frame).
    server_closes: dict[int, int]
    connect_seconds: float
    started_at: float
    sending_seconds: float
    closing_seconds: float
    # Paced mode: the furthest a packet went out behind its schedule (the client could
    # not keep up, or the relay pushed back).
    max_lag_ms: float
    # Paced mode: writes while the relay was not reading (TCP buffers full).
    backpressured_writes: int
    # CPU this process spent (user + system) from the first handshake to the last close.
    client_cpu_seconds: float

    @property
    def sent(self) -> int:
        return self.pose_sent + self.mesh_sent

    @property
    def send_rate(self) -> float:
        """Packets per second written. In a flood most of them then wait in TCP
        buffers: see ``read_rate``."""
        return self.sent / self.sending_seconds if self.sending_seconds > 0 else 0.0

    @property
    def read_rate(self) -> float:
        """Packets per second until the server had read them all: a close handshake
        completes only once the server has read what came before the close frame."""
        total = self.sending_seconds + self.closing_seconds
        return self.sent / total if total > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Every connection opened, nothing was refused, none was closed on us."""
        return not (self.connect_failures or self.errors or self.server_closes or self.unanswered)

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["server_closes"] = {str(k): v for k, v in self.server_closes.items()}
        data["sent"] = self.sent
        data["send_rate"] = round(self.send_rate, 1)
        data["read_rate"] = round(self.read_rate, 1)
        data["ok"] = self.ok
        return data


@attrs.frozen
class Progress:
    """A snapshot while running, for a live display."""

    elapsed: float
    phase: str
    connected: int
    sent: int
    errors: int
    ack_frames: int
    server_closes: int


# --- one connection -----------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One WebSocket: the handshake and what arrives through ``websockets``' sans-I/O
    protocol; data frames are written by the generator with ``encode_masked_frame``."""

    def __init__(self, gen: LoadGenerator, protocol: ClientProtocol, index: int) -> None:
        self.gen = gen
        self.ws = protocol
        self.index = index
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._writable: asyncio.Future[None] | None = None
        self.frame = 0
        # The SDK dialect: the time of the last pose sent (Unix seconds).
        self.pose_time = 0.0
        self.pose_sent = 0
        # Packets sent (pose and mesh), and of those acknowledged or refused.
        self.sent = 0
        self.answered = 0
        self.closing = False
        self.closed = False
        self._abort_scheduled = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        request = self.ws.connect()
        request.headers["User-Agent"] = _USER_AGENT
        settings = self.gen.settings
        if settings.api_key and settings.dialect == "sdk":
            request.headers["Authorization"] = f"Bearer {settings.api_key}"
        elif settings.api_key:
            request.headers["X-API-Key"] = settings.api_key
        self.ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Response):
                if ws.handshake_exc is not None:
                    self._fail_open(ws.handshake_exc)
                elif not self.opened.done():
                    self.opened.set_result(None)
            elif not isinstance(event, Frame):
                continue
            elif event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY:
                self.gen.on_reply(bytes(event.data), self)
            elif event.opcode is Opcode.CLOSE and not self.closing:
                code = ws.close_rcvd.code if ws.close_rcvd is not None else 1005
                self.gen.on_server_close(code)
                self.closed = True
        self._flush()
        if ws.close_expected() and self.transport is not None and not self._abort_scheduled:
            # The close handshake is done (or the opening one failed): the server
            # closes TCP first (RFC 6455 section 7.1.1), but do not wait forever.
            self._abort_scheduled = True
            asyncio.get_running_loop().call_later(
                self.gen.settings.close_timeout, self.transport.abort
            )

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self._fail_open(exc or ConnectionError("connection closed during the handshake"))
        if not self.closing and not self.closed:
            self.gen.on_server_close(1006)
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_writer()
        self.gen.on_connection_lost()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # used by the generator

    @property
    def paused(self) -> bool:
        return self._writable is not None

    async def writable(self) -> None:
        """Return once the transport takes more data (or the connection is gone)."""
        if self._writable is not None:
            await self._writable

    def write(self, data: bytes | bytearray) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def close(self) -> None:
        if self.transport is None or self.closed:
            return
        self.closing = True
        self.ws.send_close(1000)
        self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), self.gen.settings.close_timeout)
        except TimeoutError:
            self.transport.abort()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    def _fail_open(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# --- the generator -------------------------------------------------------------------


class LoadGenerator:
    """Runs one load: ``await LoadGenerator(settings).run()`` in an asyncio loop."""

    def __init__(self, settings: LoadSettings, *, mesh_scans: Sequence[str] | None = None) -> None:
        self.settings = settings
        self._sdk = settings.dialect == "sdk"
        if self._sdk and not settings.session_prefix:
            # What the SDK uses: a fresh upper-case UUID per streaming session.
            self.session_ids = [str(uuid.uuid4()).upper() for _ in range(settings.connections)]
        else:
            prefix = settings.session_prefix or f"loadgen-{random.getrandbits(32):08x}"
            self.session_ids = [f"{prefix}-{i}" for i in range(settings.connections)]
        self._templates = [pose_template(s) for s in self.session_ids]
        self._mesh_scans: Sequence[str] = (
            mesh_scans
            if mesh_scans is not None
            else (
                mesh_scan(settings.mesh_triangles, dialect=settings.dialect)
                if settings.mesh_triangles
                else ()
            )
        )
        self._conns: list[_Connection] = []
        self._random = random.Random()
        self._phase = "connecting"
        self._t0 = time.perf_counter()
        self._started_at = 0.0
        self._connected = 0
        self._connect_errors: list[str] = []
        self._pose_sent = 0
        self._mesh_sent = 0
        self._mesh_chars = 0
        self._bytes_sent = 0
        self._errors = 0
        self._error_samples: list[str] = []
        self._ack_frames = 0
        self._acked = 0
        self._other = 0
        self._server_closes: Counter[int] = Counter()
        self._max_lag = 0.0
        self._backpressured = 0
        self._stop = False
        self._stopped = asyncio.Event()
        self._awaiting_answers = False
        self._answers_in = asyncio.Event()

    # callbacks from connections

    def on_reply(self, data: bytes, conn: _Connection | None = None) -> None:
        """Count one frame from the relay (on ``conn``, when known)."""
        try:
            reply = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._other += 1
            return
        kind = reply.get("type") if isinstance(reply, dict) else None
        if self._sdk and kind == "error":
            # The SDK dialect's error: ``data`` is the base64 of {"code", "message"}.
            with contextlib.suppress(ValueError, TypeError):
                reply = {**reply, **orjson.loads(base64.b64decode(reply.get("data", "")))}
        answered = 0
        if kind == "error":
            self._errors += 1
            if len(self._error_samples) < _ERROR_SAMPLES:
                self._error_samples.append(str(reply.get("message", reply))[:200])
            # A refusal naming its frame settles that packet; one without cannot be
            # matched to a packet (not JSON at all: never sent by this generator).
            answered = 1 if "frame_number" in reply else 0
        elif kind == "ack":
            self._ack_frames += 1
            numbers = reply.get("frame_numbers")
            answered = len(numbers) if isinstance(numbers, list) else 0
            self._acked += answered
        else:
            self._other += 1
        if conn is not None and answered:
            conn.answered += answered
            if self._awaiting_answers and self._all_answered():
                self._answers_in.set()

    def on_connection_lost(self) -> None:
        # A lost connection's packets can no longer be answered: stop waiting for them.
        if self._awaiting_answers and self._all_answered():
            self._answers_in.set()

    def on_server_close(self, code: int) -> None:
        self._server_closes[code] += 1

    def progress(self) -> Progress:
        return Progress(
            elapsed=time.perf_counter() - self._t0,
            phase=self._phase,
            connected=sum(1 for c in self._conns if not c.closed),
            sent=self._pose_sent + self._mesh_sent,
            errors=self._errors,
            ack_frames=self._ack_frames,
            server_closes=sum(self._server_closes.values()),
        )

    def stop(self) -> None:
        """End streaming early (Ctrl-C): connections still close cleanly."""
        self._stop = True
        self._stopped.set()

    async def run(self, on_connected: Callable[[], None] | None = None) -> LoadSummary:
        """Connect, stream, close; ``on_connected`` is called once every handshake is done."""
        settings = self.settings
        self._t0 = time.perf_counter()
        cpu = time.process_time()
        await self._connect_all()
        connect_seconds = time.perf_counter() - self._t0
        if on_connected is not None:
            on_connected()
        self._phase = "streaming"
        self._started_at = time.time()
        start = time.perf_counter()
        live = [c for c in self._conns if not c.closed]
        if live and settings.count == 0:
            # Open and quiet (idle-connection measurements): hold them for the duration.
            with contextlib.suppress(TimeoutError):
                hold = self._deadline(start) - start
                await asyncio.wait_for(self._stopped.wait(), None if hold == math.inf else hold)
        elif live:
            tasks = []
            if settings.rate > 0:
                tasks.append(self._paced(live))
            else:
                tasks.extend(self._flood(c, start) for c in live)
            if self._mesh_scans:
                tasks.append(self._mesh(live, start))
            await asyncio.gather(*tasks)
        sending_seconds = time.perf_counter() - start
        if settings.ack:
            self._phase = "awaiting acks"
            await self._wait_for_answers()
        self._phase = "closing"
        closing = time.perf_counter()
        await asyncio.gather(*(c.close() for c in self._conns))
        self._phase = "done"
        return LoadSummary(
            url=settings.url,
            connections=settings.connections,
            connected=self._connected,
            connect_failures=settings.connections - self._connected,
            connect_errors=tuple(self._connect_errors[:_ERROR_SAMPLES]),
            rate=settings.rate,
            pose_sent=self._pose_sent,
            mesh_sent=self._mesh_sent,
            mesh_chars=self._mesh_chars,
            bytes_sent=self._bytes_sent,
            errors=self._errors,
            error_samples=tuple(self._error_samples),
            ack_frames=self._ack_frames,
            acked_frames=self._acked,
            unanswered=sum(c.sent - c.answered for c in self._conns if c.sent > c.answered)
            if settings.ack
            else 0,
            other_replies=self._other,
            server_closes=dict(sorted(self._server_closes.items())),
            connect_seconds=connect_seconds,
            started_at=self._started_at,
            sending_seconds=sending_seconds,
            closing_seconds=time.perf_counter() - closing,
            max_lag_ms=self._max_lag * 1000,
            backpressured_writes=self._backpressured,
            client_cpu_seconds=time.process_time() - cpu,
        )

    # connecting

    async def _connect_all(self) -> None:
        settings = self.settings
        parts = urlsplit(settings.url)
        query = "&".join(q for q in (parts.query, "ack=1" if settings.ack else "") if q)
        url = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
        uri = parse_uri(url)

        def uri_of(index: int) -> Any:
            if not self._sdk:
                return uri
            # Like the SDK: its own path, and the session in the query.
            session = self.session_ids[index]
            return parse_uri(
                urlunsplit((parts.scheme, parts.netloc, SDK_PATH, f"session_id={session}", ""))
            )

        context: ssl.SSLContext | None = None
        if uri.secure:
            context = ssl.create_default_context()
            if not settings.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(settings.connect_concurrency)

        async def open_one(index: int) -> None:
            async with gate:
                conn = _Connection(
                    self, ClientProtocol(uri_of(index), max_size=_MAX_INCOMING), index
                )
                try:
                    async with asyncio.timeout(settings.connect_timeout):
                        await loop.create_connection(
                            lambda: conn,
                            uri.host,
                            uri.port,
                            ssl=context,
                            server_hostname=uri.host if context is not None else None,
                        )
                        await conn.opened
                except Exception as exc:  # refused, timed out, or a handshake the relay refused
                    self._connect_errors.append(f"{type(exc).__name__}: {exc}")
                    conn.closed = conn.closing = True
                    if conn.transport is not None:
                        conn.transport.abort()
                    return
                self._conns.append(conn)
                self._connected += 1

        await asyncio.gather(*(open_one(i) for i in range(settings.connections)))
        # Keep the connections in index order: pacing staggers them by position.
        self._conns.sort(key=lambda c: c.index)

    # streaming

    def _deadline(self, start: float) -> float:
        duration = self.settings.duration
        return math.inf if duration is None else start + duration

    def _pose_frames(self, conn: _Connection, k: int) -> bytes:
        randbytes = self._random.randbytes
        frames = []
        frame = conn.frame
        if self._sdk:
            session, now = self.session_ids[conn.index], time.time()
            for _ in range(k):
                frame += 1
                # The relay tells an SDK pose from a resend by its timestamp (whole
                # milliseconds): a flood's poses, many a millisecond, are spread 1 ms apart.
                conn.pose_time = max(now, conn.pose_time + 0.001)
                message = sdk_anchor_update(session, conn.pose_time, now)
                frames.append(encode_masked_frame(message, randbytes(4), _OPCODE_BINARY))
            conn.frame = frame
            return b"".join(frames)
        template = self._templates[conn.index]
        now_ms = time.time_ns() // 1_000_000
        for _ in range(k):
            frame += 1
            frames.append(encode_masked_frame(template % (frame, now_ms), randbytes(4)))
        conn.frame = frame
        return b"".join(frames)

    async def _flood(self, conn: _Connection, start: float) -> None:
        count = self.settings.count
        remaining = math.inf if count is None else count
        deadline = self._deadline(start)
        while remaining > 0 and not conn.closed and not self._stop:
            if time.perf_counter() >= deadline:
                break
            k = int(min(FLOOD_CHUNK, remaining))
            data = self._pose_frames(conn, k)
            conn.write(data)
            conn.pose_sent += k
            conn.sent += k
            self._pose_sent += k
            self._bytes_sent += len(data)
            remaining -= k
            if conn.paused:
                await conn.writable()
            else:
                # The socket took it all: let the other connections (and the
                # replies) have the loop too.
                await asyncio.sleep(0)

    async def _paced(self, conns: list[_Connection]) -> None:
        """Every connection sends at ``rate``, connection i offset by i/n of a period."""
        settings = self.settings
        n = len(conns)
        slots_per_second = settings.rate * n
        total = math.inf if settings.count is None else settings.count * n
        start = time.perf_counter()
        deadline = self._deadline(start)
        slot = 0
        while slot < total and not self._stop:
            now = time.perf_counter()
            if now >= deadline:
                break
            due = min(total, math.floor((now - start) * slots_per_second) + 1)
            if due > slot:
                self._max_lag = max(self._max_lag, now - (start + slot / slots_per_second))
            while slot < due:
                conn = conns[slot % n]
                slot += 1
                if conn.closed:
                    continue
                if conn.paused:
                    self._backpressured += 1
                data = self._pose_frames(conn, 1)
                conn.write(data)
                conn.pose_sent += 1
                conn.sent += 1
                self._pose_sent += 1
                self._bytes_sent += len(data)
            if slot >= total:
                break
            await asyncio.sleep(max(0.0, start + slot / slots_per_second - time.perf_counter()))

    async def _mesh(self, conns: list[_Connection], start: float) -> None:
        """Each connection sends a growing mesh at ``mesh_rate``, staggered like poses;
        after the last growth step the scan starts over on a new anchor."""
        settings = self.settings
        n = len(conns)
        slots_per_second = settings.mesh_rate * n
        deadline = self._deadline(start)
        scans = self._mesh_scans
        slot = 0
        while not self._stop and time.perf_counter() < deadline:
            if all(c.closed or self._pose_done(c) for c in conns):
                break
            conn = conns[slot % n]
            update = slot // n
            if not conn.closed and not self._pose_done(conn):
                anchor = f"anchor-{conn.index}-{update // len(scans)}"
                vertices = scans[update % len(scans)]
                session = self.session_ids[conn.index]
                conn.frame += 1
                if self._sdk:
                    # The SDK gives every update a fresh mesh id (isDelta false: full).
                    mesh_id = str(uuid.uuid4()).upper()
                    payload = sdk_mesh_update(session, mesh_id, anchor, vertices, time.time())
                    opcode = _OPCODE_BINARY
                else:
                    template = mesh_template(session, anchor, vertices)
                    payload = template % (conn.frame, time.time_ns() // 1_000_000)
                    opcode = _OPCODE_TEXT
                data = encode_masked_frame(payload, self._random.randbytes(4), opcode)
                conn.write(data)
                conn.sent += 1
                self._mesh_sent += 1
                self._mesh_chars += len(vertices)
                self._bytes_sent += len(data)
            slot += 1
            await asyncio.sleep(max(0.0, start + slot / slots_per_second - time.perf_counter()))

    def _all_answered(self) -> bool:
        return all(c.answered >= c.sent or c.closed for c in self._conns)

    async def _wait_for_answers(self) -> None:
        """Until every packet sent on an open connection was acknowledged or refused
        (or ``ack_timeout`` passed): acks arrive once the relay has delivered."""
        self._awaiting_answers = True
        if self._all_answered():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.ack_timeout):
                stop = asyncio.ensure_future(self._stopped.wait())
                answers = asyncio.ensure_future(self._answers_in.wait())
                try:
                    await asyncio.wait((stop, answers), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
                    answers.cancel()

    def _pose_done(self, conn: _Connection) -> bool:
        count = self.settings.count
        return count is not None and conn.pose_sent >= count


# --- command line ---------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        help=f"the relay's WebSocket URL (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="streamkit",
        help="streamkit: the relay's packets on /ws/streamkit (default); sdk: what the "
        f"StreamKit iOS SDK sends, on {SDK_PATH}?session_id=<UUID> (the URL's path is "
        "replaced, as the SDK does)",
    )
    parser.add_argument(
        "-c", "--connections", type=int, default=10, help="WebSocket connections (default 10)"
    )
    parser.add_argument(
        "-r",
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"pose packets per second per connection; 0: as fast as possible "
        f"(default {DEFAULT_RATE:g})",
    )
    parser.add_argument("-n", "--count", type=int, help="pose packets per connection, then stop")
    parser.add_argument(
        "-d",
        "--duration",
        type=duration_argument,
        help=f"stop after this long (100ms, 10s, 5m); default {DEFAULT_DURATION:g}s when "
        "--count is not given",
    )
    parser.add_argument(
        "--api-key",
        help="sent as the X-API-Key header of every handshake (Authorization: Bearer with "
        "--dialect sdk)",
    )
    parser.add_argument(
        "--ack",
        action="store_true",
        help="connect with ?ack=1, count the acknowledgements, and before closing wait "
        "until every packet sent was acknowledged or refused",
    )
    parser.add_argument(
        "--ack-timeout",
        type=duration_argument,
        default=30.0,
        help="longest wait for the acknowledgements (default 30s)",
    )
    parser.add_argument(
        "--mesh-triangles",
        type=int,
        default=0,
        metavar="N",
        help="also send a growing Draco mesh of up to N triangles per connection",
    )
    parser.add_argument(
        "--mesh-rate",
        type=float,
        default=1.0,
        metavar="HZ",
        help="mesh packets per second per connection (default 1)",
    )
    parser.add_argument(
        "--session-prefix",
        default="",
        help="session ids are PREFIX-0, PREFIX-1, ... (default: loadgen-<random>)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=DEFAULT_CONNECT_CONCURRENCY,
        help=f"handshakes in progress at once (default {DEFAULT_CONNECT_CONCURRENCY})",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="wss://: do not verify the certificate"
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "rich", "jsonl", "none"],
        default="auto",
        help="live progress: a rich line on a terminal (auto), JSON lines on stdout, or none",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write the summary as JSON to PATH ('-': stdout)"
    )


def settings_from_args(args: argparse.Namespace) -> LoadSettings:
    duration = args.duration
    if duration is None and args.count is None:
        duration = DEFAULT_DURATION
    return LoadSettings(
        url=args.url,
        dialect=args.dialect,
        connections=args.connections,
        rate=args.rate,
        count=args.count,
        duration=duration,
        api_key=args.api_key,
        ack=args.ack,
        ack_timeout=args.ack_timeout,
        mesh_triangles=args.mesh_triangles,
        mesh_rate=args.mesh_rate,
        session_prefix=args.session_prefix,
        connect_concurrency=args.connect_concurrency,
        verify_tls=not args.insecure,
    )


def raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit towards ``needed`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every connection opened and nothing was refused, else 1."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"stag-relay loadgen: {exc}", file=sys.stderr)
        return 2
    # Sockets, plus what the interpreter already holds.
    raise_fd_limit(settings.connections + 64)
    mode = args.progress
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() and args.json != "-" else "none"
    try:
        summary = asyncio.run(_run_with_progress(settings, mode))
    except KeyboardInterrupt:
        return 130
    if args.json == "-":
        print(json.dumps(summary.to_json(), indent=2))
    else:
        if args.json:
            with open(args.json, "w") as out:
                json.dump(summary.to_json(), out, indent=2)
        print_summary(summary, sys.stdout)
    return 0 if summary.ok and summary.connected else 1


async def _run_with_progress(settings: LoadSettings, mode: str) -> LoadSummary:
    import signal

    gen = LoadGenerator(settings)
    loop = asyncio.get_running_loop()
    # Ctrl-C ends streaming; the connections still close cleanly and the summary prints.
    loop.add_signal_handler(signal.SIGINT, gen.stop)
    loop.add_signal_handler(signal.SIGTERM, gen.stop)
    if mode == "jsonl":

        def connected() -> None:
            _emit(
                {"event": "connected", "connections": gen.progress().connected, "at": time.time()}
            )

        reporter = asyncio.create_task(_report_jsonl(gen))
        try:
            summary = await gen.run(on_connected=connected)
        finally:
            reporter.cancel()
        _emit({"event": "done", **summary.to_json()})
        return summary
    if mode == "rich":
        from rich.live import Live

        with Live(_progress_line(gen.progress(), None), auto_refresh=False, transient=True) as live:
            reporter = asyncio.create_task(_report_rich(gen, live))
            try:
                return await gen.run()
            finally:
                reporter.cancel()
    return await gen.run()


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _report_jsonl(gen: LoadGenerator) -> None:
    last = gen.progress()
    while True:
        await asyncio.sleep(1.0)
        now = gen.progress()
        dt = now.elapsed - last.elapsed
        _emit(
            {
                "event": "progress",
                **attrs.asdict(now),
                "rate": round((now.sent - last.sent) / dt, 1) if dt > 0 else 0.0,
            }
        )
        last = now


async def _report_rich(gen: LoadGenerator, live: Any) -> None:
    # Rates over the last second or so, from a short history of snapshots.
    history = [gen.progress()]
    while True:
        await asyncio.sleep(0.25)
        history.append(gen.progress())
        del history[:-5]
        live.update(_progress_line(history[-1], history[0]), refresh=True)


def _progress_line(now: Progress, then: Progress | None) -> str:
    rate = 0.0
    if then is not None and now.elapsed > then.elapsed:
        rate = (now.sent - then.sent) / (now.elapsed - then.elapsed)
    return (
        f"loadgen {now.phase:<10} {now.elapsed:6.1f}s  connections {now.connected:>5}  "
        f"sent {now.sent:>10,} ({rate:>9,.0f}/s)  acks {now.ack_frames:>7,}  "
        f"errors {now.errors:>5,}  closed by relay {now.server_closes:>4,}"
    )


def print_summary(summary: LoadSummary, out: TextIO) -> None:
    lines = [
        f"loadgen: {summary.url}",
        f"  connections  {summary.connected}/{summary.connections} opened in "
        f"{summary.connect_seconds:.2f}s",
        f"  sent         {summary.pose_sent:,} pose + {summary.mesh_sent:,} mesh packets, "
        f"{summary.bytes_sent / 1e6:,.1f} MB, written in {summary.sending_seconds:.2f}s, all "
        f"read by the server after {summary.sending_seconds + summary.closing_seconds:.2f}s "
        f"({summary.read_rate:,.0f}/s)",
        f"  replies      {summary.errors:,} errors, {summary.ack_frames:,} acks "
        f"({summary.acked_frames:,} frames), {summary.other_replies:,} other"
        + (f", {summary.unanswered:,} packets unanswered" if summary.unanswered else ""),
    ]
    if summary.rate > 0:
        lines.append(
            f"  pacing       {summary.rate:g}/s per connection, at most "
            f"{summary.max_lag_ms:.1f} ms behind schedule, "
            f"{summary.backpressured_writes:,} writes under backpressure"
        )
    if summary.server_closes:
        codes = ", ".join(f"{code}: {n}" for code, n in summary.server_closes.items())
        lines.append(f"  closed by relay  {codes}")
    for error in summary.connect_errors:
        lines.append(f"  connect error: {error}")
    for error in summary.error_samples:
        lines.append(f"  error reply: {error}")
    out.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stag-relay loadgen", description=(__doc__ or "").strip().splitlines()[0]
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
