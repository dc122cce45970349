"""The server side of WebSocket (RFC 6455) as the gate needs it, sans I/O.

Pure: no I/O, no trio. :class:`FrameReader` turns the bytes of one socket read
into every complete message and control frame they hold, in one loop; the
``*_frame`` functions encode what the relay sends; :func:`handshake_problem` and
:func:`switching_protocols` are the opening handshake (the front door has parsed
the request head with h11 already).

Why not a library: the gate reads tens of thousands of small messages a second,
and the reader is most of the cost of a message. wsproto (pure-Python unmasking,
an object per frame and per message) costs several times more per message, and
``websockets``' sans-I/O protocol about twice as much even with its C unmasking
(``websockets`` is a dependency of the developer tools only). The unmasking is
tornado's C function (:func:`apply_mask`). The figures are in docs/performance.md.

What it enforces, each with the close code the connection must get
(:class:`Violation`): client frames masked (1002), no reserved bits as no
extension is ever negotiated (1002), known opcodes (1002), control frames at
most 125 bytes and never fragmented (1002), continuation frames only inside a
fragmented message and no new message inside one (1002), minimal length
encodings (1002), ``max_message_size`` on whole and fragmented messages, judged
from frame headers so an oversized payload is never buffered (1009), text that is
UTF-8 (1007; checked only when not ASCII), close frames well formed (1002, 1007).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import math
from collections.abc import Callable
from typing import Final

import attrs
import msgspec

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
# Not a code on the wire: what a close frame without a code means (RFC 6455 7.1.5).
CLOSE_NO_STATUS: Final = 1005
CLOSE_INVALID_DATA: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013

# The one version of the protocol there is (RFC 6455 4.1).
WEBSOCKET_VERSION: Final = "13"
_ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A control frame's payload may hold 125 bytes; a close frame's reason is what is
# left after its 2-byte code.
_MAX_CONTROL_PAYLOAD: Final = 125
_MAX_CLOSE_REASON: Final = _MAX_CONTROL_PAYLOAD - 2
# A masked frame's header: 2 bytes, the extended length (0, 2 or 8), the 4-byte key.
_MASK_BYTES: Final = 4


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated (RFC 6455 5.3): masking and unmasking."""
    return _xor(
        mask if type(mask) is bytes else bytes(mask),
        data if type(data) is bytes else bytes(data),
    )


def xor_in_python(mask: bytes, data: bytes) -> bytes:
    """:func:`apply_mask` where tornado's C function is missing: one XOR of two big
    integers, so the loops run in C all the same, at several times its cost."""
    size = len(data)
    key = (mask * (size // _MASK_BYTES + 1))[:size]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


_xor: Callable[[bytes, bytes], bytes]
try:
    # Every byte a client sends is unmasked: in C it costs a fraction of the Python
    # above (docs/performance.md). Only this module of tornado is imported: the
    # package's __init__ loads none of the framework.
    from tornado.speedups import websocket_mask as _xor
except ImportError:  # tornado built from source without a compiler
    _xor = xor_in_python


@attrs.frozen(slots=True)
class Ping:
    """The peer's ping: answer with a pong carrying the same payload."""

    payload: bytes


@attrs.frozen(slots=True)
class Pong:
    """The peer's pong (an answer to our ping, or unsolicited: both prove it alive)."""

    payload: bytes


# A msgspec struct: built in C, for the SDK's every message (an attrs frozen class
# sets its field through object.__setattr__). It holds bytes only, hence gc=False.
class Binary(msgspec.Struct, frozen=True, gc=False):
    """A binary message, from a reader asked to tell them from text (``mark_binary``)."""

    payload: bytes


@attrs.frozen(slots=True)
class Close:
    """The peer's close frame; ``code`` is 1005 when the frame carried none."""

    code: int
    reason: str


@attrs.frozen(slots=True)
class Violation:
    """The peer broke the protocol: close the connection with ``code``."""

    code: int
    reason: str


# What a read yields, in order: complete data messages as bytes (text already
# checked to be UTF-8; the gate parses text and binary messages alike), binary ones
# as Binary instead when the reader was asked to mark them, and frames.
Received = bytes | Binary | Ping | Pong | Close | Violation


def _close_code_allowed(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4 and the IANA registry): not 1004-1006
    (reserved, or only ever local), not 1015 (local), nothing unassigned below 3000."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameReader:
    """Frames from a client, parsed from a stream of reads of any size.

    ``receive`` returns what one read completed. After a :class:`Close` or a
    :class:`Violation`, or once :meth:`closing` is called (we sent a close frame),
    nothing but the peer's :class:`Close` comes out any more: data is skipped
    without being buffered, whatever its size, until that close frame arrives.

    With ``mark_binary``, binary messages come out as :class:`Binary`, for a peer
    that must answer in kind (the conformance suite's echo endpoint).
    """

    __slots__ = (
        "_binary",
        "_buffer",
        "_closing",
        "_done",
        "_max_size",
        "_opcode",
        "_parts",
        "_size",
        "_skip",
        "_wanted",
    )

    def __init__(self, max_message_size: int, *, mark_binary: bool = False) -> None:
        self._max_size = max_message_size
        self._binary = mark_binary
        # Bytes of an incomplete frame, kept until the rest of it arrives, and how
        # many the buffer must hold before that frame is complete (0: not known yet).
        self._buffer = bytearray()
        self._wanted = 0
        # A fragmented message in progress: its opcode (0 when none), parts and size.
        self._opcode = 0
        self._parts: list[bytes] = []
        self._size = 0
        # Closing: only the peer's close frame matters; _skip is payload still to drop.
        self._closing = False
        self._skip = 0
        # The peer's close frame has come: the stream has nothing more for us.
        self._done = False

    @property
    def closed(self) -> bool:
        """The peer's close frame has been received."""
        return self._done

    def closing(self) -> None:
        """We sent a close frame: from now on only the peer's close frame comes out."""
        self._closing = True
        self._parts = []
        self._opcode = 0

    def receive(self, data: bytes | bytearray) -> list[Received]:
        """Everything ``data`` completes, in order; the rest waits for the next read."""
        if self._done or not data:
            return []
        if self._closing:
            return self._skim(data)
        buffer = self._buffer
        view: bytes | bytearray
        if buffer:
            buffer += data
            if len(buffer) < self._wanted:
                # A large frame arriving read by read: nothing to look at until it is whole.
                return []
            # One copy per read instead of one per frame: the C unmasking takes bytes.
            view = bytes(buffer)
            buffer.clear()
        else:
            view = data
        self._wanted = 0
        out: list[Received] = []
        pos = 0
        end = len(view)
        while end - pos >= 2:
            first = view[pos]
            second = view[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            # What can be judged from the first two bytes, before waiting for more.
            if first & 0x70:
                return self._fail(out, CLOSE_PROTOCOL_ERROR, "reserved bits set", view, pos)
            if not second & 0x80:
                return self._fail(
                    out, CLOSE_PROTOCOL_ERROR, "client frames must be masked", view, pos
                )
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    return self._fail(out, CLOSE_PROTOCOL_ERROR, "unknown opcode", view, pos)
                if length > _MAX_CONTROL_PAYLOAD:
                    return self._fail(
                        out, CLOSE_PROTOCOL_ERROR, "control frame too long", view, pos
                    )
                if not first & 0x80:
                    return self._fail(
                        out, CLOSE_PROTOCOL_ERROR, "fragmented control frame", view, pos
                    )
            elif opcode == OP_CONTINUATION:
                if not self._opcode:
                    return self._fail(
                        out, CLOSE_PROTOCOL_ERROR, "continuation of nothing", view, pos
                    )
            elif opcode > OP_BINARY:
                return self._fail(out, CLOSE_PROTOCOL_ERROR, "unknown opcode", view, pos)
            elif self._opcode:
                return self._fail(out, CLOSE_PROTOCOL_ERROR, "message inside a message", view, pos)
            if length < 126:
                start = pos + 2 + _MASK_BYTES
            elif length == 126:
                if end - pos < 4:
                    break
                length = (view[pos + 2] << 8) | view[pos + 3]
                if length < 126:
                    return self._fail(out, CLOSE_PROTOCOL_ERROR, "length not minimal", view, pos)
                start = pos + 4 + _MASK_BYTES
            else:
                if end - pos < 10:
                    break
                length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                if length < 65536 or length >> 63:
                    return self._fail(out, CLOSE_PROTOCOL_ERROR, "length not minimal", view, pos)
                start = pos + 10 + _MASK_BYTES
            if opcode < OP_CLOSE and (self._size if opcode == 0 else 0) + length > self._max_size:
                message = f"message over {self._max_size} bytes"
                return self._fail(out, CLOSE_TOO_BIG, message, view, pos)
            stop = start + length
            if stop > end:
                self._wanted = stop - pos
                break
            payload = apply_mask(view[start:stop], view[start - _MASK_BYTES : start])
            pos = stop
            if opcode == OP_TEXT and first & 0x80:
                if not payload.isascii() and not _is_utf8(payload):
                    return self._fail(out, CLOSE_INVALID_DATA, "text is not UTF-8", view, pos)
                out.append(payload)
            elif opcode == OP_BINARY and first & 0x80:
                out.append(Binary(payload) if self._binary else payload)
            elif opcode < OP_CLOSE:
                if opcode:
                    self._opcode = opcode
                    self._parts = [payload]
                    self._size = length
                else:
                    self._parts.append(payload)
                    self._size += length
                if first & 0x80:
                    message_bytes = b"".join(self._parts)
                    text = self._opcode == OP_TEXT
                    self._opcode = 0
                    self._parts = []
                    self._size = 0
                    if text and not message_bytes.isascii() and not _is_utf8(message_bytes):
                        return self._fail(out, CLOSE_INVALID_DATA, "text is not UTF-8", view, pos)
                    out.append(message_bytes if text or not self._binary else Binary(message_bytes))
            elif opcode == OP_PING:
                out.append(Ping(payload))
            elif opcode == OP_PONG:
                out.append(Pong(payload))
            else:
                out.append(_parse_close(payload))
                self._done = True
                self._buffer = bytearray()
                return out
        if pos < end:
            buffer += memoryview(view)[pos:]
        return out

    def _fail(
        self, out: list[Received], code: int, reason: str, view: bytes | bytearray, pos: int
    ) -> list[Received]:
        """End the read with a violation; what follows is only skimmed for a close frame."""
        out.append(Violation(code, reason))
        rest = bytes(view[pos:])
        self._buffer = bytearray()
        self.closing()
        # The offending frame's header is intact (every check above reads only valid
        # length fields), so skimming restarts at it and drops it like any other frame.
        self._skim(rest)
        return out

    def _skim(self, data: bytes | bytearray) -> list[Received]:
        """Closing: drop every frame but the peer's close frame, buffering no payload."""
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return []
            data = data[self._skip :]
            self._skip = 0
        buffer = self._buffer
        buffer += data
        pos = 0
        end = len(buffer)
        while end - pos >= 2:
            opcode = buffer[pos] & 0x0F
            length = buffer[pos + 1] & 0x7F
            masked = _MASK_BYTES if buffer[pos + 1] & 0x80 else 0
            if length == 126:
                if end - pos < 4:
                    break
                length = (buffer[pos + 2] << 8) | buffer[pos + 3]
                start = pos + 4 + masked
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10 + masked
            else:
                start = pos + 2 + masked
            stop = start + length
            if opcode == OP_CLOSE and length <= _MAX_CONTROL_PAYLOAD:
                if stop > end:
                    break
                payload = bytes(buffer[start:stop])
                if masked:
                    payload = apply_mask(payload, buffer[start - _MASK_BYTES : start])
                close = _parse_close(payload)
                self._done = True
                self._buffer = bytearray()
                # A malformed close frame still ends the handshake we are waiting for.
                return [close if isinstance(close, Close) else Close(CLOSE_NO_STATUS, "")]
            if stop > end:
                if start > end:
                    break
                self._skip = stop - end
                pos = end
                break
            pos = stop
        del buffer[:pos]
        return []


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _parse_close(payload: bytes) -> Close | Violation:
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        return Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not _close_code_allowed(code):
        return Violation(CLOSE_PROTOCOL_ERROR, "close code not allowed")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return Violation(CLOSE_INVALID_DATA, "close reason is not UTF-8")
    return Close(code, reason)


# -- what the relay sends (server frames are never masked) -------------------------


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
    return header + payload


def text_frame(text: bytes) -> bytes:
    """A text message of ``text``, which must be UTF-8 (orjson's output is)."""
    return encode_frame(OP_TEXT, text)


def binary_frame(payload: bytes) -> bytes:
    """A binary message of ``payload``."""
    return encode_frame(OP_BINARY, payload)


def ping_frame(payload: bytes = b"") -> bytes:
    return encode_frame(OP_PING, payload)


def pong_frame(payload: bytes) -> bytes:
    return encode_frame(OP_PONG, payload)


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame; ``code`` None (or 1005, "no code") sends none. The reason is cut
    to fit a control frame, never inside a character."""
    if code is None or code == CLOSE_NO_STATUS:
        return encode_frame(OP_CLOSE, b"")
    encoded = reason.encode("utf-8")[:_MAX_CLOSE_REASON]
    encoded = encoded.decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + encoded)


# -- the opening handshake ---------------------------------------------------------


@attrs.frozen
class HandshakeProblem:
    """Why an upgrade request cannot be accepted, as the HTTP answer to give."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def handshake_problem(version: str | None, key: str | None) -> HandshakeProblem | None:
    """What is wrong with an upgrade request's WebSocket headers, or None.

    The front door has checked method, path, ``Upgrade`` and ``Connection``.
    """
    if version is None or version.strip() != WEBSOCKET_VERSION:
        # RFC 6455 4.4: say which version we speak.
        return HandshakeProblem(
            426,
            f"unsupported WebSocket version (this server speaks {WEBSOCKET_VERSION})",
            (("sec-websocket-version", WEBSOCKET_VERSION),),
        )
    if key is None or not _valid_key(key.strip()):
        return HandshakeProblem(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    digest = hashlib.sha1(key.strip().encode("latin-1") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def switching_protocols(key: str) -> bytes:
    """The 101 answer: no subprotocol and no extension, so compression stays declined
    and ``max_message_size`` limits what we hold, not what was sent."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        "\r\n"
    ).encode("ascii")


# -- the connection's state: close handshake and heartbeat --------------------------


class Beat(enum.Enum):
    """What the heartbeat asks of the writer when it is due."""

    # Nothing yet: the next beat is not due, or our close frame is queued.
    WAIT = enum.auto()
    # Send a ping.
    PING = enum.auto()
    # The peer answered no ping within an interval: our close frame (1011) is queued.
    TIMEOUT = enum.auto()


@attrs.define
class WebSocketState:
    """One connection's close handshake and heartbeat, fed the clock.

    The heartbeat pings every ``interval`` and gives up on a peer that answered none
    of its pings within one, unless we were the ones not reading: a pong can sit
    unread while the reader waits (a full queue, a busy mesh lane, the read
    throttle), so a ping sent while it waits, or overlapped by a wait, is never held
    against the peer.
    """

    interval: float
    # When the next ping is due; set by start().
    next_beat: float = math.inf
    # A ping is out, and a pong came since it went.
    ping_out: bool = False
    pong: bool = False
    # The reader is waiting on us; every such wait counts once in ``stalls``.
    blocked: bool = False
    stalls: int = 0
    # ``stalls`` when the last ping went, -1 if it went while the reader waited.
    stalls_at_ping: int = 0
    # Our close frame's code once it is queued (None: not queued), and whether the
    # writer has sent it; the peer's close frame once it came.
    close_code: int | None = None
    close_sent: bool = False
    peer_close: Close | None = None

    @property
    def closing(self) -> bool:
        """Our close frame is queued (or sent): no more pings."""
        return self.close_code is not None

    def start(self, now: float) -> None:
        self.next_beat = now + self.interval

    def received_pong(self) -> None:
        self.pong = True

    def block(self) -> None:
        """The reader waits on us (not on the peer) from now on."""
        self.blocked = True
        self.stalls += 1

    def unblock(self) -> None:
        self.blocked = False

    def beat(self, now: float) -> Beat:
        """The heartbeat at ``now``: ping, give up on the peer, or nothing yet."""
        if now < self.next_beat or self.closing:
            return Beat.WAIT
        self.next_beat = now + self.interval
        if (
            self.ping_out
            and not self.pong
            and not self.blocked
            and self.stalls == self.stalls_at_ping
        ):
            self.queue_close(CLOSE_INTERNAL_ERROR)
            return Beat.TIMEOUT
        # A ping unanswered while we were not reading is not the peer's fault: its
        # pong may be sitting unread. Ping again.
        self.pong = False
        self.ping_out = True
        # A ping sent while the reader waits cannot have its pong read until the
        # wait ends: it is judged only if no wait overlaps it.
        self.stalls_at_ping = self.stalls if not self.blocked else -1
        return Beat.PING

    def queue_close(self, code: int) -> bool:
        """Our close frame with ``code`` is queued; False if one was already."""
        if self.closing:
            return False
        self.close_code = code
        return True

    def sent_close(self) -> None:
        self.close_sent = True

    def received_close(self, close: Close) -> None:
        self.peer_close = close
