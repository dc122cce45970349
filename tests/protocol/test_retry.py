"""The retry policy: which answers are retried, how long to wait, Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.protocol.retry import (
    MAX_RETRY_AFTER,
    MISCONFIGURED_STATUSES,
    Decision,
    RetryPolicy,
    Verdict,
    backoff_delay,
    classify_status,
    misconfiguration_hint,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def http_date(seconds_from_now: float) -> str:
    return format_datetime(
        datetime.fromtimestamp(NOW, tz=UTC) + timedelta(seconds=seconds_from_now), usegmt=True
    )


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (201, Verdict.DELIVERED),
        (202, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (299, Verdict.DELIVERED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        # Unexpected 5xx are the server's problem: retried, never dropped.
        (501, Verdict.RETRY),
        (505, Verdict.RETRY),
        (507, Verdict.RETRY),
        (599, Verdict.RETRY),
        (413, Verdict.SPLIT),
        # The URL or the credentials are wrong, not the batch: kept and retried.
        (401, Verdict.MISCONFIGURED),
        (403, Verdict.MISCONFIGURED),
        (404, Verdict.MISCONFIGURED),
        (405, Verdict.MISCONFIGURED),
        (407, Verdict.MISCONFIGURED),
        # 4xx that judge the batch: final.
        (400, Verdict.REJECT),
        (402, Verdict.REJECT),
        (406, Verdict.REJECT),
        (409, Verdict.REJECT),
        (410, Verdict.REJECT),
        (415, Verdict.REJECT),
        (422, Verdict.REJECT),
        (499, Verdict.REJECT),
        # Redirects are not followed with a POST body: stag.url is wrong, the batch is kept.
        (300, Verdict.MISCONFIGURED),
        (301, Verdict.MISCONFIGURED),
        (302, Verdict.MISCONFIGURED),
        (303, Verdict.MISCONFIGURED),
        (307, Verdict.MISCONFIGURED),
        (308, Verdict.MISCONFIGURED),
        (309, Verdict.REJECT),
        (100, Verdict.REJECT),
        (600, Verdict.REJECT),
        (0, Verdict.REJECT),
    ],
)
def test_classify_status(status: int, verdict: Verdict) -> None:
    assert classify_status(status) is verdict


@given(st.integers(min_value=0, max_value=10_000))
def test_every_status_has_exactly_one_verdict(status: int) -> None:
    verdict = classify_status(status)
    assert (verdict is Verdict.DELIVERED) == (200 <= status < 300)
    assert (verdict is Verdict.SPLIT) == (status == 413)
    assert (verdict is Verdict.MISCONFIGURED) == (
        status in {401, 403, 404, 405, 407} or 300 <= status <= 308
    )


@given(st.integers(min_value=100, max_value=599))
def test_only_an_answer_that_judges_the_batch_loses_it(status: int) -> None:
    # The table by class. Final (the events are dropped, counted): the 4xx that say the
    # batch is wrong. Everything else is kept, redirects too (they say stag.url is wrong).
    kept_4xx = {401, 403, 404, 405, 407, 408, 413, 429}
    verdict = classify_status(status)
    if 200 <= status < 300:
        assert verdict is Verdict.DELIVERED
    elif 500 <= status < 600:
        assert verdict is Verdict.RETRY
    elif 300 <= status <= 308:
        assert verdict is Verdict.MISCONFIGURED
    elif 400 <= status < 500 and status in kept_4xx:
        assert verdict in {Verdict.RETRY, Verdict.MISCONFIGURED, Verdict.SPLIT}
    else:
        assert verdict is Verdict.REJECT


@pytest.mark.parametrize("status", [301, 308, 401, 403, 404, 405, 407])
def test_configuration_answers_name_the_setting_to_fix(status: int) -> None:
    hint = misconfiguration_hint(status)
    assert hint is not None
    setting = "stag.api_key" if status in {401, 403} else "stag.url"
    assert setting in hint


@given(st.integers(min_value=0, max_value=1_000))
def test_a_hint_exactly_for_the_configuration_answers(status: int) -> None:
    has_hint = misconfiguration_hint(status) is not None
    assert has_hint == (status in MISCONFIGURED_STATUSES)
    assert has_hint == (classify_status(status) is Verdict.MISCONFIGURED)


@settings(max_examples=200)
@given(
    attempt=st.integers(min_value=0, max_value=5_000),
    initial=st.floats(min_value=0.0, max_value=10.0),
    maximum=st.floats(min_value=0.0, max_value=600.0),
    seed=st.integers(),
)
def test_backoff_is_within_full_jitter_bounds(
    attempt: int, initial: float, maximum: float, seed: int
) -> None:
    delay = backoff_delay(attempt, initial=initial, maximum=maximum, rng=random.Random(seed))
    assert 0.0 <= delay <= min(maximum, initial * 2.0 ** min(attempt, 64))
    assert delay <= maximum


def test_backoff_ceiling_doubles_until_the_maximum() -> None:
    # An rng that always picks the top of the range shows the ceiling itself.
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    ceilings = [backoff_delay(n, initial=0.1, maximum=1.0, rng=Top()) for n in range(6)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_uses_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(3, initial=0.1, maximum=10.0, rng=rng) for _ in range(1000)]
    assert min(delays) < 0.1
    assert max(delays) > 0.7
    assert all(0.0 <= d <= 0.8 for d in delays)


def test_backoff_rejects_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, initial=0.1, maximum=1.0, rng=random.Random())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("5", 5.0),
        (" 12 ", 12.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("59", 59.0),
        ("3600", MAX_RETRY_AFTER),
        ("99999999999999999999999", MAX_RETRY_AFTER),
        ("", None),
        ("soon", None),
        ("5s", None),
        ("nan", None),
        ("inf", None),
        ("1e3", None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_http_date() -> None:
    assert parse_retry_after(http_date(30), now=NOW) == pytest.approx(30.0)
    # A date in the past: retry now.
    assert parse_retry_after(http_date(-30), now=NOW) == 0.0
    # Far future (a skewed clock): capped.
    assert parse_retry_after(http_date(10 * 86400), now=NOW) == MAX_RETRY_AFTER
    # The obsolete RFC 850 and asctime forms HTTP still allows.
    assert parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now=784111777.0 - 5) == 5.0
    assert parse_retry_after("Sun Nov  6 08:49:37 1994", now=784111777.0 - 5) == 5.0


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    delay = parse_retry_after(value, now=NOW)
    assert delay is None or 0.0 <= delay <= MAX_RETRY_AFTER


def policy(seed: int = 0) -> RetryPolicy:
    return RetryPolicy(initial=0.1, maximum=10.0, rng=random.Random(seed))


def test_policy_final_answers_carry_no_delay() -> None:
    p = policy()
    for status, verdict in [(200, Verdict.DELIVERED), (400, Verdict.REJECT), (413, Verdict.SPLIT)]:
        decision = p.after_status(status, attempt=3, retry_after="30", now=NOW)
        assert decision == Decision(verdict, 0.0)


@pytest.mark.parametrize("status", [429, 503])
def test_policy_waits_at_least_what_retry_after_says(status: int) -> None:
    for attempt in range(20):
        decision = policy(attempt).after_status(status, attempt=attempt, retry_after="30", now=NOW)
        assert decision.verdict is Verdict.RETRY
        # Longer than retry_max (10s) too: the server asked.
        assert decision.delay >= 30.0
        decision = policy(attempt).after_status(
            status, attempt=attempt, retry_after=http_date(20), now=NOW
        )
        assert decision.delay >= 20.0


def test_policy_never_waits_longer_than_the_cap_for_retry_after() -> None:
    decision = policy().after_status(503, attempt=0, retry_after="86400", now=NOW)
    assert decision.delay == MAX_RETRY_AFTER


@pytest.mark.parametrize("status", [401, 403, 404, 405, 407])
def test_policy_retries_configuration_answers_like_an_outage(status: int) -> None:
    # The same backoff as for an outage, up to stag.retry_max (10 s here), for ever.
    for attempt in range(40):
        got = policy(attempt).after_status(status, attempt=attempt, retry_after="30", now=NOW)
        outage = policy(attempt).after_error(attempt=attempt)
        assert got == Decision(Verdict.MISCONFIGURED, outage.delay)
        assert got.delay <= 10.0


@pytest.mark.parametrize("status", [408, 500, 502, 504])
def test_policy_ignores_retry_after_on_other_statuses(status: int) -> None:
    decision = policy().after_status(status, attempt=0, retry_after="30", now=NOW)
    assert decision.verdict is Verdict.RETRY
    assert decision.delay <= 0.1


def test_policy_a_short_or_garbled_retry_after_keeps_the_backoff() -> None:
    # attempt 10: backoff ceiling is retry_max; the same seed draws the same delay.
    expected = backoff_delay(10, initial=0.1, maximum=10.0, rng=random.Random(3))
    for value in ("0", "garbage", None):
        decision = policy(3).after_status(503, attempt=10, retry_after=value, now=NOW)
        assert decision == Decision(Verdict.RETRY, expected)


@given(attempt=st.integers(min_value=0, max_value=200), seed=st.integers())
def test_policy_after_error_retries_within_backoff_bounds(attempt: int, seed: int) -> None:
    decision = policy(seed).after_error(attempt=attempt)
    assert decision.verdict is Verdict.RETRY
    assert 0.0 <= decision.delay <= min(10.0, 0.1 * 2.0**attempt)
