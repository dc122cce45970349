"""The STAG stand-in's bookkeeping: latency histogram, failure schedule, the ledger."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.tools.sink import FailurePlan, LatencyHistogram, Ledger


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


latencies = st.lists(
    st.floats(min_value=-50.0, max_value=1e7, allow_nan=False), min_size=1, max_size=300
)


@settings(max_examples=100)
@given(values=latencies, q=st.sampled_from([1.0, 50.0, 90.0, 99.0, 99.9, 100.0]))
def test_percentiles_are_within_one_percent_of_the_exact_ones(
    values: list[float], q: float
) -> None:
    histogram = LatencyHistogram()
    for v in values:
        histogram.add(v)
    exact = exact_percentile(values, q)
    estimate = histogram.percentile(q)
    assert estimate is not None
    # Below 0.01 ms (and negative: clock skew) everything is one bucket.
    if exact < 0.01:
        assert estimate <= 0.01
    else:
        assert abs(estimate - exact) <= 0.01 * exact
    assert histogram.count == len(values)
    assert histogram.max == max(values)


@given(a=latencies, b=latencies)
@settings(max_examples=30)
def test_merged_histograms_equal_one_fed_everything(a: list[float], b: list[float]) -> None:
    left, right, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for v in a:
        left.add(v)
        both.add(v)
    for v in b:
        right.add(v)
        both.add(v)
    left.merge(right)
    assert left.to_json() == both.to_json()


def test_an_empty_histogram_has_no_percentiles() -> None:
    assert LatencyHistogram().to_json() == {
        "count": 0,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "mean": None,
    }


def test_a_failure_window_after_a_delay() -> None:
    plan = FailurePlan(503, after=5.0, duration=10.0)
    assert [plan.active(t) for t in (0.0, 4.9, 5.0, 14.9, 15.0, 100.0)] == [
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    assert plan.remaining(6.0) == pytest.approx(9.0)
    assert plan.remaining(20.0) is None


def test_a_failure_window_that_repeats() -> None:
    plan = FailurePlan(502, duration=2.0, every=10.0)
    assert [plan.active(t) for t in (0.0, 1.9, 2.0, 9.9, 10.0, 11.9, 12.0)] == [
        True,
        True,
        False,
        False,
        True,
        True,
        False,
    ]


def test_a_failure_without_an_end_lasts() -> None:
    plan = FailurePlan(500, after=1.0)
    assert not plan.active(0.5)
    assert plan.active(1e9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 200},
        {"status": 503, "duration": 5.0, "every": 5.0},
        {"status": 503, "every": 5.0},
    ],
)
def test_failure_plans_that_make_no_sense_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailurePlan(**kwargs)  # type: ignore[arg-type]


def batch(batch_id: str, *events: dict[str, object]) -> bytes:
    return orjson.dumps({"batch_id": batch_id, "count": len(events), "events": list(events)})


def pose(timestamp: int, received_at: int) -> dict[str, object]:
    return {"type": "pose", "timestamp": timestamp, "received_at": received_at}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_batches_are_recorded_once_per_idempotency_key() -> None:
    ledger = Ledger(clock=Clock())
    body = batch("b1", pose(1_000_000, 1_000_002), pose(1_000_001, 1_000_003))
    answer = ledger.receive(body, "key-1", arrival=1000.005)
    assert answer.status == 200
    assert orjson.loads(answer.body) == {"status": "ok", "accepted": 2}
    again = ledger.receive(body, "key-1", arrival=1000.006)
    assert again.status == 200
    assert orjson.loads(again.body)["accepted"] == 0
    summary = ledger.summary()
    assert (summary["events"], summary["batches"], summary["duplicate_batches"]) == (2, 1, 1)
    assert summary["requests"] == 2
    # 1000.005 s is 1,000,005 ms: 5 and 4 ms after the timestamps, 3 and 2 after received_at.
    assert summary["latency_ms"]["max"] == pytest.approx(5.0)
    assert summary["relay_latency_ms"]["max"] == pytest.approx(3.0)
    assert summary["latency_ms_by_type"]["pose"]["count"] == 2
    assert summary["batch_size"] == {"min": 2, "mean": 2.0, "max": 2}


def test_without_a_key_the_batch_id_is_the_key() -> None:
    ledger = Ledger(clock=Clock())
    ledger.receive(batch("same", pose(1, 1)), None, arrival=1000.0)
    ledger.receive(batch("same", pose(1, 1)), None, arrival=1000.0)
    ledger.receive(batch("other", pose(1, 1)), None, arrival=1000.0)
    assert (ledger.events, ledger.duplicate_batches) == (2, 1)


def test_keys_are_forgotten_oldest_first_beyond_the_bound() -> None:
    ledger = Ledger(max_keys=2, clock=Clock())
    for key in ("a", "b", "c", "a"):
        ledger.receive(batch(key, pose(1, 1)), key, arrival=1000.0)
    assert (ledger.batches, ledger.duplicate_batches) == (4, 0)
    ledger.receive(batch("c", pose(1, 1)), "c", arrival=1000.0)
    assert ledger.duplicate_batches == 1


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"events": []}', b'{"batch_id": "x", "events": [1]}'],
)
def test_what_is_not_a_batch_gets_400_and_is_not_recorded(body: bytes) -> None:
    ledger = Ledger(clock=Clock())
    assert ledger.receive(body, "k", arrival=1000.0).status == 400
    assert (ledger.bad_requests, ledger.batches) == (1, 0)


def test_scheduled_failures_are_answered_and_not_recorded() -> None:
    clock = Clock()
    ledger = Ledger(failures=[FailurePlan(503, duration=10.0, retry_after="2")], clock=clock)
    answer = ledger.receive(batch("b", pose(1, 1)), "b", arrival=clock.now + 1)
    assert answer.status == 503
    assert ("retry-after", "2") in answer.headers
    assert ledger.summary()["failing"] == 503
    # The same batch retried after the window is taken, once.
    assert ledger.receive(batch("b", pose(1, 1)), "b", arrival=clock.now + 10).status == 200
    clock.now += 10
    summary = ledger.summary()
    assert (summary["failed_requests"], summary["events"], summary["failing"]) == (1, 1, None)


def test_mesh_characters_are_counted_full_or_delta() -> None:
    ledger = Ledger(clock=Clock())
    full = {
        "type": "mesh",
        "timestamp": 1,
        "meshes": [
            {"anchor_id": "a", "is_delta": False, "vertices_delta": "AAAA", "faces_delta": ""}
        ],
    }
    delta = {
        "type": "mesh",
        "timestamp": 1,
        "meshes": [
            {"anchor_id": "a", "is_delta": True, "removed_faces": "AAAA", "added": "BBBBBBBB"}
        ],
    }
    ledger.receive(batch("m", full, delta), "m", arrival=1000.0)
    assert ledger.mesh_chars == 16
    assert ledger.events_by_type == {"mesh": 2}
