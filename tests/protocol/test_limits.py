"""Per-connection limits as pure policy, driven by explicit clock values (limits.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.protocol.limits import BURST_SECONDS, InvalidStreak, ReadThrottle, TokenBucket

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


@settings(max_examples=200)
@given(
    rate=st.integers(1, 1000),
    steps=st.lists(
        st.tuples(st.floats(-1, 2, allow_nan=False), st.integers(0, 3000), st.booleans()),
        max_size=40,
    ),
)
def test_spend_is_a_refill_then_a_debit(rate: int, steps: list[tuple[float, int, bool]]) -> None:
    """spend writes out what ready_at does around a debit of the tokens."""
    bucket = TokenBucket(rate=rate, capacity=rate * BURST_SECONDS)
    oracle = TokenBucket(rate=rate, capacity=rate * BURST_SECONDS)
    now = 0.0
    for advance, count, stall in steps:
        if stall:
            bucket.pause(now)
            oracle.pause(now)
        # Time may run backwards (a negative advance): the bucket must not refill then.
        now += advance
        if stall:
            bucket.resume(now)
            oracle.resume(now)
        oracle.ready_at(now)
        oracle.tokens -= count
        assert bucket.spend(count, now) == oracle.ready_at(now)
        assert (bucket.tokens, bucket.updated) == (oracle.tokens, oracle.updated)


# --- read throttle ------------------------------------------------------------------


def test_a_read_within_the_burst_may_be_followed_at_once() -> None:
    throttle = ReadThrottle(limit=240)
    assert throttle.read(int(240 * BURST_SECONDS) - 1, now=10.0) == 10.0


def test_a_read_over_the_burst_waits_until_the_debt_is_paid() -> None:
    throttle = ReadThrottle(limit=100)
    # 500 packets in one read: 200 from the burst, 300 of debt, and one more token.
    assert throttle.read(500, now=0.0) == pytest.approx(3.01)
    # Reading earlier anyway (the drain does) only deepens the debt.
    assert throttle.read(100, now=3.01) == pytest.approx(4.01)


def test_a_steady_client_at_its_limit_is_never_slowed() -> None:
    throttle = ReadThrottle(limit=60)
    for frame in range(60 * 30):
        now = frame / 60
        assert throttle.read(1, now) == now


def test_backpressure_is_not_held_against_the_client() -> None:
    throttle = ReadThrottle(limit=60)
    assert throttle.read(60, now=0.0) == 0.0
    # The relay stopped reading for 10 s (STAG slow, channel full); the client kept
    # sending at 60 Hz, and its 600 packets arrive at once when reading resumes.
    throttle.pause(0.0)
    throttle.resume(10.0)
    assert throttle.read(600, now=10.0) == 10.0


@settings(max_examples=200)
@given(
    limit=st.integers(1, 1000),
    reads=st.lists(st.tuples(st.floats(0, 3, allow_nan=False), st.integers(1, 3000)), max_size=40),
)
def test_reading_when_allowed_never_exceeds_the_rate_plus_one_read(
    limit: int, reads: list[tuple[float, int]]
) -> None:
    """A reader that waits as told reads at most limit x time + the burst + its last read."""
    throttle = ReadThrottle(limit=limit)
    now = allowed = 0.0
    total = last = 0
    for delay, packets in reads:
        now = max(now + delay, allowed)
        allowed = throttle.read(packets, now)
        total += packets
        last = packets
        assert allowed >= now
    assert total <= limit * now + limit * BURST_SECONDS + last + 1e-6


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReadThrottle(limit=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=1)


# --- invalid streak -----------------------------------------------------------------


def test_invalid_streak_closes_at_the_limit_and_a_valid_packet_resets_it() -> None:
    streak = InvalidStreak(limit=3)
    assert [streak.invalid(), streak.invalid()] == [False, False]
    streak.valid()
    assert [streak.invalid(), streak.invalid(), streak.invalid()] == [False, False, True]
