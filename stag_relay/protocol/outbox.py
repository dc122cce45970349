"""What the relay owes one client, waiting for the connection's writer: pure, no trio.

Nothing here can overflow, so nothing here can be a reason to close a client that
reads. Error replies wait up to a bound; one that finds no room, or comes over the
reply rate, is counted and the next reply sent says how many were suppressed (if no
reply follows, a summary says it once the rate allows). Acknowledgements merge into
one pending ack whose frame numbers accumulate, and pongs keep the latest MAX_PONGS
(RFC 6455 5.5.3 allows answering only the most recent ping), so what waits for a slow
reader is bounded by what it is owed, not by how often we had something to say. The close
frame goes last, after the replies and acknowledgements queued before it.

What the replies look like on the wire is the client dialect's (:class:`ReplyShapes`);
the outbox decides only what is owed and in which order.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final, Protocol

import attrs
import orjson

from stag_relay.protocol import websocket
from stag_relay.protocol.limits import TokenBucket, reply_budget

# Error replies waiting for the writer. A reply a client has not taken while this
# many wait behind it is suppressed (and counted), never a reason to close.
MAX_REPLIES: Final = 64
# Pongs waiting: every ping of a burst is answered (as the Autobahn suite checks),
# and a client pinging faster than it reads gets answers to its latest ones.
MAX_PONGS: Final = 16


class ReplyShapes(Protocol):
    """How a client dialect words what the relay tells its client."""

    def error_frame(
        self, code: str, message: str, frame_number: int | None, suppressed: int
    ) -> bytes:
        """An error reply; ``suppressed`` replies were not sent since the last one (0: none)."""
        ...

    def ack_frame(self, session_id: str, frame_numbers: list[int]) -> bytes:
        """An acknowledgement: these frames of ``session_id`` are durable."""
        ...


class JsonReplies:
    """The seed dialect's replies: JSON text messages."""

    def error_frame(
        self, code: str, message: str, frame_number: int | None, suppressed: int
    ) -> bytes:
        reply: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if frame_number is not None:
            reply["frame_number"] = frame_number
        if suppressed:
            reply["suppressed"] = suppressed
        return websocket.text_frame(orjson.dumps(reply))

    def ack_frame(self, session_id: str, frame_numbers: list[int]) -> bytes:
        message = {"type": "ack", "session_id": session_id, "frame_numbers": frame_numbers}
        return websocket.text_frame(orjson.dumps(message))


@attrs.frozen
class _Error:
    """An error reply, worded only when written: it may have to report suppressions."""

    code: str
    message: str
    frame_number: int | None


@attrs.define
class Outbox:
    max_replies: int = MAX_REPLIES
    budget: TokenBucket = attrs.Factory(reply_budget)
    shapes: ReplyShapes = attrs.Factory(JsonReplies)
    # Error replies not sent since the last one that was: the next one reports them.
    suppressed: int = 0
    # Error replies, and a dialect's own answers (ready frames), in order.
    replies: deque[_Error | bytes] = attrs.Factory(deque)
    # The pending acknowledgement: its session and the frame numbers it will carry.
    ack_session: str | None = None
    ack_frames: list[int] = attrs.Factory(list)
    pongs: deque[bytes] = attrs.Factory(lambda: deque(maxlen=MAX_PONGS))
    # The close frame, once queued: nothing is queued after it.
    close: bytes | None = None
    # The close frame has been taken by the writer: the outbox is done.
    done: bool = False

    @property
    def closing(self) -> bool:
        return self.close is not None

    def error(self, now: float, code: str, message: str, frame_number: int | None = None) -> bool:
        """Queue an error reply; False if it was suppressed (counted, reported later).
        After the close frame a reply is moot: not queued, not suppressed."""
        if self.closing:
            return True
        return self._queue(now, _Error(code, message, frame_number))

    def reply(self, now: float, frame: bytes) -> bool:
        """Queue a dialect's own answer to a message (its application-level pong, say),
        bounded and rate limited as error replies are, for the same reason."""
        if self.closing:
            return True
        return self._queue(now, frame)

    def _queue(self, now: float, reply: _Error | bytes) -> bool:
        if len(self.replies) >= self.max_replies or not self.budget.take(now):
            self.suppressed += 1
            return False
        self.replies.append(reply)
        return True

    def ack(self, session_id: str, frame_numbers: list[int]) -> None:
        """Add to the pending acknowledgement."""
        if self.done:
            return
        self.ack_session = session_id
        self.ack_frames.extend(frame_numbers)

    def ping(self, payload: bytes) -> None:
        """The client pinged: answer it (the oldest unanswered pong goes past MAX_PONGS)."""
        if not self.closing:
            self.pongs.append(payload)

    def queue_close(self, frame: bytes) -> bool:
        """Queue the close frame; False if one is queued already."""
        if self.closing:
            return False
        self.close = frame
        return True

    def summary_due(self, now: float) -> float | None:
        """When a summary of suppressed replies is due, if nothing else will carry it."""
        if not self.suppressed or self.replies or self.closing:
            return None
        return self.budget.ready_at(now)

    def pop(self, now: float) -> bytes | None:
        """The next frame to write, or None if there is nothing to write now."""
        if self.done:
            return None
        if self.pongs:
            return websocket.pong_frame(self.pongs.popleft())
        if self.replies:
            reply = self.replies.popleft()
            if isinstance(reply, bytes):
                return reply
            return self._with_suppressed(reply)
        if self.ack_frames and self.ack_session is not None:
            frame_numbers, self.ack_frames = self.ack_frames, []
            return self.shapes.ack_frame(self.ack_session, frame_numbers)
        if self.close is not None:
            self.done = True
            return self.close
        if self.suppressed and self.budget.take(now):
            # Nothing followed the suppressed replies: say how many there were.
            count = self.suppressed
            return self._with_suppressed(
                _Error(
                    "replies_suppressed",
                    f"{count} error replies were not sent: more than "
                    "the relay answers per second, or more than were waiting for you",
                    None,
                )
            )
        return None

    def _with_suppressed(self, reply: _Error) -> bytes:
        suppressed, self.suppressed = self.suppressed, 0
        return self.shapes.error_frame(reply.code, reply.message, reply.frame_number, suppressed)
