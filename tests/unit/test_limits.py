"""Per-connection limits as pure policy, driven by explicit clock values (limits.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.limits import (
    BURST_SECONDS,
    ERROR_REPLIES_PER_SECOND,
    ERROR_REPLY_BURST,
    FAR_OVER_FACTOR,
    FAR_OVER_WINDOWS,
    InvalidStreak,
    PacketRate,
    ReplyBudget,
    TokenBucket,
    Verdict,
)


def offer(rate: PacketRate, count: int, now: float) -> list[Verdict]:
    return [rate.check(now) for _ in range(count)]


# --- token bucket -------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=10)
    assert sum(bucket.take(0.0) for _ in range(20)) == 10
    assert sum(bucket.take(0.5) for _ in range(20)) == 5
    # A long idle spell saves up no more than the capacity.
    assert sum(bucket.take(100.0) for _ in range(50)) == 10


def test_time_running_backwards_gives_nothing() -> None:
    bucket = TokenBucket(rate=10, capacity=10)
    assert sum(bucket.take(5.0) for _ in range(10)) == 10
    assert not bucket.take(4.0)
    assert not bucket.take(5.0)


def test_paused_time_accrues_beyond_the_capacity() -> None:
    bucket = TokenBucket(rate=10, capacity=10)
    assert sum(bucket.take(0.0) for _ in range(10)) == 10
    bucket.pause(0.0)
    bucket.resume(3.0)
    # The client sent for 3 s while we did not read: 30 packets are its due.
    assert sum(bucket.take(3.0) for _ in range(100)) == 30


@settings(max_examples=200)
@given(
    rate=st.integers(1, 1000),
    steps=st.lists(
        st.tuples(st.floats(0, 2, allow_nan=False), st.integers(0, 3000), st.booleans()),
        max_size=40,
    ),
)
def test_bucket_never_grants_more_than_rate_times_time_plus_capacity(
    rate: int, steps: list[tuple[float, int, bool]]
) -> None:
    bucket = TokenBucket(rate=rate, capacity=rate * BURST_SECONDS)
    now, granted = 0.0, 0
    for advance, attempts, stall in steps:
        if stall:
            bucket.pause(now)
        now += advance
        if stall:
            bucket.resume(now)
        granted += sum(bucket.take(now) for _ in range(attempts))
    assert granted <= rate * now + rate * BURST_SECONDS + 1e-6


# --- packet rate --------------------------------------------------------------------


def test_excess_is_limited_then_the_rate_is_allowed_again() -> None:
    rate = PacketRate(limit=240)
    verdicts = offer(rate, 300, now=10.0)
    assert verdicts.count(Verdict.ACCEPT) == 240
    assert verdicts.count(Verdict.LIMIT) == 60
    assert rate.refused == 60
    assert offer(rate, 240, now=11.0).count(Verdict.ACCEPT) == 240


def test_a_steady_client_at_its_limit_is_never_limited() -> None:
    rate = PacketRate(limit=60)
    for frame in range(60 * 30):
        assert rate.check(frame / 60) is Verdict.ACCEPT


def test_far_over_the_limit_for_long_closes() -> None:
    limit = 10
    rate = PacketRate(limit=limit)
    per_window = int(limit * FAR_OVER_FACTOR) + 1
    verdicts: list[Verdict] = []
    for second in range(FAR_OVER_WINDOWS):
        verdicts = offer(rate, per_window, now=100.0 + second + 0.5)
        if second < FAR_OVER_WINDOWS - 1:
            assert Verdict.CLOSE not in verdicts, second
    assert verdicts[-1] is Verdict.CLOSE


def test_over_but_not_far_over_never_closes() -> None:
    limit = 10
    rate = PacketRate(limit=limit)
    # Just under FAR_OVER_FACTOR times the limit, for a long time.
    per_window = int(limit * FAR_OVER_FACTOR) - 1
    for second in range(10 * FAR_OVER_WINDOWS):
        assert Verdict.CLOSE not in offer(rate, per_window, now=second + 0.5)


def test_a_quiet_window_breaks_the_run() -> None:
    limit = 10
    rate = PacketRate(limit=limit)
    per_window = int(limit * FAR_OVER_FACTOR) + 1
    seconds = [*range(FAR_OVER_WINDOWS - 1), FAR_OVER_WINDOWS, *range(FAR_OVER_WINDOWS + 1, 20)]
    closed_at = None
    for second in seconds:
        if Verdict.CLOSE in offer(rate, per_window, now=second + 0.5):
            closed_at = second
            break
    # The gap at FAR_OVER_WINDOWS - 1 restarts the count at FAR_OVER_WINDOWS.
    assert closed_at == 2 * FAR_OVER_WINDOWS - 1


def test_backpressure_is_not_held_against_the_client() -> None:
    rate = PacketRate(limit=60)
    assert offer(rate, 60, now=0.0).count(Verdict.ACCEPT) == 60
    # The relay stopped reading for 10 s (STAG slow, channel full); the client kept
    # sending at 60 Hz, and its 600 packets arrive at once when reading resumes.
    rate.pause(0.0)
    rate.resume(10.0)
    assert offer(rate, 600, now=10.0).count(Verdict.ACCEPT) == 600


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PacketRate(limit=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=1)


# --- invalid streak -----------------------------------------------------------------


def test_invalid_streak_closes_at_the_limit_and_a_valid_packet_resets_it() -> None:
    streak = InvalidStreak(limit=3)
    assert [streak.invalid(), streak.invalid()] == [False, False]
    streak.valid()
    assert [streak.invalid(), streak.invalid(), streak.invalid()] == [False, False, True]


# --- error reply budget -------------------------------------------------------------


def test_error_replies_are_rate_limited_and_report_what_was_suppressed() -> None:
    budget = ReplyBudget()
    burst = int(ERROR_REPLY_BURST)
    sent = [budget.take(0.0) for _ in range(burst + 25)]
    assert sent[:burst] == [0] * burst
    assert sent[burst:] == [None] * 25
    # The next reply that goes out says how many did not.
    per_second = int(ERROR_REPLIES_PER_SECOND)
    sent = [budget.take(1.0) for _ in range(per_second + 1)]
    assert sent == [25] + [0] * (per_second - 1) + [None]
