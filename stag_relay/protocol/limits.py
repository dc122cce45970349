"""Per-connection limits that protect the other clients, as plain policy fed the clock.

Pure: no I/O, no trio. Every method takes ``now`` (seconds on any monotonic
clock; the gate passes ``trio.current_time()``, so tests drive it with values or
trio's MockClock).

- :class:`ReadThrottle`: ``websocket.max_packets_per_second`` as a token bucket that
  decides when a connection may read again; nothing is ever refused for its rate.
- :class:`InvalidStreak`: ``websocket.max_invalid_packets`` in a row closes.
- :func:`reply_budget`: error replies are themselves rate limited (outbox.py counts
  and reports the ones not sent).
"""

from __future__ import annotations

from typing import Final

import attrs

# A connection may send this many seconds' worth of its rate at once before it is
# slowed down: a client that was briefly descheduled (mobile radio, GC pause) catches
# up at full speed.
BURST_SECONDS: Final = 2.0
# Error replies per second per connection, sustained: enough for a client developer
# to see what is wrong, too few for a flood of bad packets to turn the relay into an
# amplifier.
ERROR_REPLIES_PER_SECOND: Final = 10.0
# Error replies a connection may get at once: as many as the default
# websocket.max_invalid_packets, so a client (an acknowledging one in particular)
# that sends a burst of bad packets gets every answer before its streak closes it.
ERROR_REPLY_BURST: Final = 100.0
# A token, give or take float rounding: refilling until ``ready_at`` must give one.
_WHOLE: Final = 1.0 - 1e-9


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up; starts full.

    While ``paused`` (the relay is not reading the client, see ReadThrottle.pause),
    tokens accrue without the cap: the client's packets from that time arrive
    together afterwards, and that bunching is ours, not theirs.
    """

    rate: float
    capacity: float
    tokens: float = attrs.field(init=False)
    updated: float | None = attrs.field(default=None, init=False)
    paused_at: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.rate <= 0 or self.capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated and self.tokens < self.capacity:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        if self.updated is None or now > self.updated:
            self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens >= _WHOLE:
            self.tokens -= 1.0
            return True
        return False

    def spend(self, count: int, now: float) -> float:
        """Take ``count`` tokens, going into debt if there are not that many; return
        :meth:`ready_at`."""
        # _refill and _ready_at, written out: this runs once per socket read.
        updated = self.updated
        tokens = self.tokens
        if updated is None or now > updated:
            if updated is not None and tokens < self.capacity:
                tokens = min(self.capacity, tokens + (now - updated) * self.rate)
            self.updated = now
        tokens -= count
        self.tokens = tokens
        if tokens >= _WHOLE or self.paused_at is not None:
            return now
        return now + (1.0 - tokens) / self.rate

    def ready_at(self, now: float) -> float:
        """When there is a token again: ``now`` if there is one already."""
        self._refill(now)
        return self._ready_at(now)

    def _ready_at(self, now: float) -> float:
        if self.tokens >= _WHOLE or self.paused_at is not None:
            return now
        return now + (1.0 - self.tokens) / self.rate

    def pause(self, now: float) -> None:
        self._refill(now)
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is None:
            return
        if now > self.paused_at:
            self.tokens += (now - self.paused_at) * self.rate
        self.paused_at = None
        self.updated = max(now, self.updated or now)


@attrs.define
class ReadThrottle:
    """``limit`` packets a second per connection, enforced by reading less often.

    The gate spends one token per packet it read and, while the bucket is in debt,
    waits before its next read: TCP then slows the client down, as backpressure does,
    and no packet is refused for its rate. A read may bring more packets than there
    are tokens (they are all judged); the debt is paid by waiting.
    """

    limit: int
    bucket: TokenBucket = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.limit <= 0:
            raise ValueError("limit must be positive")
        self.bucket = TokenBucket(rate=self.limit, capacity=self.limit * BURST_SECONDS)

    def read(self, packets: int, now: float) -> float:
        """``packets`` were read at ``now``: when the connection may read again."""
        return self.bucket.spend(packets, now)

    def pause(self, now: float) -> None:
        """The relay stopped reading this client (backpressure): not the client's doing."""
        self.bucket.pause(now)

    def resume(self, now: float) -> None:
        self.bucket.resume(now)


@attrs.define
class InvalidStreak:
    """Invalid packets in a row; ``limit`` of them close the connection."""

    limit: int
    streak: int = 0

    def invalid(self) -> bool:
        """Count one invalid packet; True when the connection must be closed."""
        self.streak += 1
        return self.streak >= self.limit

    def valid(self) -> None:
        self.streak = 0


def reply_budget() -> TokenBucket:
    """A connection's error replies: ERROR_REPLY_BURST at once, then the sustained rate."""
    return TokenBucket(rate=ERROR_REPLIES_PER_SECOND, capacity=ERROR_REPLY_BURST)
