"""Per-connection limits that protect the other clients, as plain policy fed the clock.

Pure: no I/O, no trio. Every method takes ``now`` (seconds on any monotonic
clock; the gate passes ``trio.current_time()``, so tests drive it with values or
trio's MockClock).

- :class:`PacketRate`: ``websocket.max_packets_per_second`` as a token bucket, and
  the verdict to close a connection that stays far over it for long.
- :class:`InvalidStreak`: ``websocket.max_invalid_packets`` in a row closes.
- :class:`ReplyBudget`: error replies are themselves rate limited; the ones not
  sent are counted and reported in the next one that is.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

# A connection may send this many seconds' worth of its rate at once: a client that
# was briefly descheduled (mobile radio, GC pause) catches up without being limited.
BURST_SECONDS: Final = 1.0
# "Far over the limit": more than this many times the limit offered in a window, so
# that at least (FAR_OVER_FACTOR - 1) x limit packets of it were refused. A 60 Hz
# client under the default 240/s never comes near; a client bug or a flood does.
FAR_OVER_FACTOR: Final = 4.0
# Offered load is judged per window of this length.
WINDOW_SECONDS: Final = 1.0
# "For long": this many consecutive far-over windows. Longer than any burst a real
# client produces after a reconnect or a stall, short enough that a flood costs us
# seconds, not minutes.
FAR_OVER_WINDOWS: Final = 5
# Error replies per second per connection, sustained: enough for a client developer
# to see what is wrong, too few for a flood of refused packets (rate_limited) to turn
# the relay into an amplifier.
ERROR_REPLIES_PER_SECOND: Final = 10.0
# Error replies a connection may get at once: as many as the default
# websocket.max_invalid_packets, so a client (an acknowledging one in particular)
# that sends a burst of bad packets gets every answer before its streak closes it.
ERROR_REPLY_BURST: Final = 100.0


class Verdict(enum.Enum):
    ACCEPT = "accept"
    # Over the limit: refuse this packet (counted, error reply), keep the connection.
    LIMIT = "limit"
    # Far over the limit for long: close the connection with 1008.
    CLOSE = "close"


@attrs.define
class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up; starts full.

    While ``paused`` (the relay is not reading the client, see PacketRate.pause),
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
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

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
class PacketRate:
    """``limit`` packets a second per connection, and when to give up on a connection.

    A window is "far over" once more than ``(FAR_OVER_FACTOR - 1) * limit *
    WINDOW_SECONDS`` of its packets were refused; FAR_OVER_WINDOWS such windows
    in a row give the verdict CLOSE.
    """

    limit: int
    bucket: TokenBucket = attrs.field(init=False)
    window: int | None = attrs.field(default=None, init=False)
    refused_in_window: int = attrs.field(default=0, init=False)
    # Index of the last window found far over, and how many in a row up to it.
    far_window: int | None = attrs.field(default=None, init=False)
    far_windows: int = attrs.field(default=0, init=False)
    refused: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.limit <= 0:
            raise ValueError("limit must be positive")
        self.bucket = TokenBucket(rate=self.limit, capacity=self.limit * BURST_SECONDS)

    @property
    def far_threshold(self) -> float:
        return (FAR_OVER_FACTOR - 1.0) * self.limit * WINDOW_SECONDS

    def check(self, now: float) -> Verdict:
        """The verdict for one packet arriving at ``now``."""
        if self.bucket.take(now):
            return Verdict.ACCEPT
        self.refused += 1
        window = int(now // WINDOW_SECONDS)
        if window != self.window:
            self.window = window
            self.refused_in_window = 0
        self.refused_in_window += 1
        if self.refused_in_window > self.far_threshold and self.far_window != window:
            # This window just became far over; it extends the run only if the
            # previous window was far over too.
            consecutive = self.far_window is not None and window == self.far_window + 1
            self.far_windows = self.far_windows + 1 if consecutive else 1
            self.far_window = window
        if self.far_window == window and self.far_windows >= FAR_OVER_WINDOWS:
            return Verdict.CLOSE
        return Verdict.LIMIT

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


@attrs.define
class ReplyBudget:
    """How many error replies a connection gets; the rest are suppressed and counted."""

    bucket: TokenBucket = attrs.field(
        factory=lambda: TokenBucket(rate=ERROR_REPLIES_PER_SECOND, capacity=ERROR_REPLY_BURST)
    )
    # Suppressed since the last reply that was sent; that reply's successor reports it.
    suppressed: int = 0

    def take(self, now: float) -> int | None:
        """None: suppress this reply. Else send it, reporting this many suppressed before it."""
        if not self.bucket.take(now):
            self.suppressed += 1
            return None
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed
