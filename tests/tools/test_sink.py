"""The STAG stand-in's bookkeeping: latency histogram, failure schedule, the ledger and
its programme of misbehaviour, wire formats."""

from __future__ import annotations

import argparse
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.protocol.events import Anchor, AnchorPose, Batch, Event
from stag_relay.protocol.spatial_event import Delivered, check_answer, encode_batch
from stag_relay.tools.sink import (
    Delivery,
    FailurePlan,
    LatencyHistogram,
    Ledger,
    Reply,
    Request,
    Sink,
    SpatialEventFormat,
    configure_parser,
    settings_from_args,
)


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


# --- routing and the programme -------------------------------------------------------


def post(body: bytes, key: str | None = None, path: str = "/ingest", **headers: str) -> Request:
    fields = {name.replace("_", "-"): value for name, value in headers.items()}
    if key is not None:
        fields["idempotency-key"] = key
    return Request("POST", path, fields, body)


def statuses(ledger: Ledger) -> list[int | None]:
    return [exchange.status for exchange in ledger.exchanges]


def test_requests_stag_does_not_take_are_refused_before_the_programme() -> None:
    ledger = Ledger(api_key="secret", keep=True, clock=Clock())
    ledger.programme.script.append(Reply(503))
    body = batch("b", pose(1, 1))
    assert ledger.answer(post(body, path="/v2/ingest")).status == 404
    refused = ledger.answer(Request("GET", "/ingest", {}, b""))
    assert (refused.status, refused.headers) == (405, (("allow", "POST"),))
    assert ledger.answer(Request("POST", "/ingest", {}, b"", too_large=True)).status == 413
    assert ledger.answer(post(body, "b")).status == 401
    # The scripted reply is still there for the first request STAG would take.
    assert ledger.answer(post(body, "b", x_api_key="secret")).status == 503
    assert ledger.answer(post(body, "b", x_api_key="secret")).status == 200
    assert statuses(ledger) == [404, 405, 413, 401, 503, 200]
    assert [r["batch_id"] for r in ledger.accepted] == ["b"]


def test_the_stand_ins_own_endpoints_are_not_recorded() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    assert orjson.loads(ledger.answer(Request("GET", "/health", {}, b"")).body) == {"status": "ok"}
    stats = ledger.answer(Request("GET", "/stats?pretty", {}, b""))
    assert orjson.loads(stats.body)["requests"] == 0
    assert ledger.exchanges == []


def test_a_moved_ingest_path_and_a_rotated_key_apply_from_the_next_request() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    body = batch("b", pose(1, 1))
    ledger.ingest_path = "/v2/ingest"
    ledger.api_key = "rotated"
    assert ledger.answer(post(body, "b")).status == 404
    assert ledger.answer(post(body, "b", path="/v2/ingest")).status == 401
    assert ledger.answer(post(body, "b", path="/v2/ingest", x_api_key="rotated")).status == 200
    assert ledger.events == 1


def test_a_dropped_request_is_recorded_without_a_status_and_not_accepted() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    ledger.programme.script.append(Reply(close=True, delay=2.0))
    body = batch("b", pose(1, 1))
    dropped = ledger.answer(post(body, "b"))
    assert (dropped.close, dropped.delay) == (True, 2.0)
    assert ledger.answer(post(body, "b")).status == 200
    assert statuses(ledger) == [None, 200]
    assert (ledger.events, ledger.duplicate_batches, ledger.failed_requests) == (1, 0, 1)


def test_programmed_replies_carry_their_body_and_retry_after() -> None:
    ledger = Ledger(clock=Clock())
    ledger.programme.script.extend([Reply(429, retry_after="3"), Reply(503, body=b"busy")])
    first = ledger.answer(post(batch("b", pose(1, 1)), "b"))
    assert (first.status, first.headers) == (429, (("retry-after", "3"),))
    assert orjson.loads(first.body) == {"error": "programmed failure 429"}
    assert ledger.answer(post(batch("b", pose(1, 1)), "b")).body == b"busy"


def test_a_programmed_success_records_the_batch_and_answers_its_body() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    ledger.programme.script.extend([Reply(202, body=b"{}"), Reply(200)])
    assert ledger.answer(post(batch("b", pose(1, 1)), "b")).status == 202
    assert ledger.events == 1
    # Not a batch: answered as programmed, nothing recorded.
    assert ledger.answer(post(b"[]", "c")).status == 200
    assert (ledger.events, ledger.bad_requests) == (1, 0)


def test_the_failure_window_ends_on_the_ledgers_clock() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    ledger.fail_for(Reply(503, retry_after="1"), 5.0)
    body = batch("b", pose(1, 1))
    assert ledger.answer(post(body, "b"), arrival=clock.now + 4.9).status == 503
    assert ledger.answer(post(body, "b"), arrival=clock.now + 5.0).status == 200


def test_reject_all_lasts_until_reset_and_reset_keeps_the_record() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    ledger.programme.reject = Reply(500)
    ledger.programme.max_events = 0
    ledger.programme.paused = True
    assert [ledger.answer(post(batch(k, pose(1, 1)), k)).status for k in "ab"] == [500, 500]
    ledger.programme.reset()
    assert ledger.programme.paused is False
    assert ledger.answer(post(batch("a", pose(1, 1)), "a")).status == 200
    assert (len(ledger.exchanges), ledger.failed_requests) == (3, 2)


def test_a_batch_over_the_event_limit_gets_413_and_a_smaller_one_passes() -> None:
    ledger = Ledger(clock=Clock())
    ledger.programme.max_events = 2
    three = batch("b", pose(1, 1), pose(2, 2), pose(3, 3))
    assert ledger.answer(post(three, "b")).status == 413
    assert ledger.answer(post(batch("b1", pose(1, 1), pose(2, 2)), "b1")).status == 200
    # Not a batch is a 400 before it is too large.
    assert ledger.answer(post(b"{}", "x")).status == 400


replies = st.one_of(
    st.builds(Reply, status=st.sampled_from([400, 401, 404, 413, 429, 500, 502, 503])),
    st.builds(Reply, close=st.just(True)),
)


@settings(max_examples=50)
@given(script=st.lists(replies, max_size=8), retries=st.integers(min_value=0, max_value=3))
def test_scripted_replies_come_one_a_request_in_order_then_the_batch_is_taken(
    script: list[Reply], retries: int
) -> None:
    ledger = Ledger(keep=True, clock=Clock())
    ledger.programme.script.extend(script)
    body = batch("b", pose(1, 1), pose(2, 2))
    for _ in range(len(script) + 1 + retries):
        ledger.answer(post(body, "b"))
    expected = [None if r.close else r.status for r in script] + [200] * (1 + retries)
    assert statuses(ledger) == expected
    assert (ledger.events, ledger.batches, ledger.duplicate_batches) == (2, 1, retries)
    assert ledger.accepted == [orjson.loads(body)]
    assert ledger.failed_requests == len(script)


@settings(max_examples=50)
@given(
    deliveries=st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(min_value=0, max_value=4)), max_size=20
    )
)
def test_each_key_is_taken_once(deliveries: list[tuple[str, int]]) -> None:
    ledger = Ledger(keep=True, clock=Clock())
    first: dict[str, int] = {}
    for key, n in deliveries:
        events = [{**pose(1, 1), "event_id": f"{key}{i}"} for i in range(n)]
        ledger.answer(post(batch(f"batch-{key}-{n}", *events), key))
        first.setdefault(key, n)
    assert ledger.events == sum(first.values())
    assert (ledger.batches, ledger.duplicate_batches) == (len(first), len(deliveries) - len(first))
    assert [e["event_id"] for e in ledger.accepted_events] == [
        f"{key}{i}" for key, n in first.items() for i in range(n)
    ]


@given(body=st.binary(max_size=64))
def test_any_body_gets_an_answer_and_only_a_batch_is_recorded(body: bytes) -> None:
    ledger = Ledger(clock=Clock())
    answer = ledger.answer(post(body))
    assert answer.status in (200, 400)
    assert ledger.events == 0 or answer.status == 200


def test_a_request_knows_its_path_key_and_json() -> None:
    request = Request("POST", "/ingest?x=1", {"idempotency-key": "k"}, b'{"a": 1}')
    assert (request.path, request.idempotency_key, request.json) == ("/ingest", "k", {"a": 1})
    assert Request("POST", "/", {}, b"{").json is None


# --- wire formats --------------------------------------------------------------------


class OneEventFormat:
    """Another STAG wire format, as a test would add one: one event a POST."""

    name = "one-event"
    default_path = "/api/v1/ingest"

    def parse(self, body: bytes) -> Delivery | str:
        event: Any = orjson.loads(body)
        if type(event) is not dict or type(event.get("event_id")) is not str:
            return "an event needs event_id"
        return Delivery(event["event_id"], [event], event)

    def accepted(self, delivery: Delivery, duplicate: bool) -> object:
        return {"ok": True}


def test_another_wire_format_is_one_class() -> None:
    ledger = Ledger(wire_format=OneEventFormat(), keep=True, clock=Clock())
    assert ledger.ingest_path == "/api/v1/ingest"
    event = orjson.dumps({**pose(1, 1), "event_id": "e1"})
    assert ledger.answer(post(event, path="/api/v1/ingest")).status == 200
    assert ledger.answer(post(event, path="/api/v1/ingest")).status == 200
    assert ledger.answer(post(b"{}", path="/api/v1/ingest")).status == 400
    assert (ledger.events, ledger.duplicate_batches, ledger.bad_requests) == (1, 1, 1)
    assert ledger.events_by_type == {"pose": 1}


# --- command line --------------------------------------------------------------------


def sink_for(*argv: str) -> Sink:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return Sink(settings_from_args(parser.parse_args(argv)))


def test_the_command_line_programs_the_ledger() -> None:
    sink = sink_for(
        "--port", "0", "--ingest-path", "/v2", "--fail", "503", "--for", "10s",
        "--api-key", "k", "--max-events", "5",
    )  # fmt: skip
    ledger = sink.ledger
    assert (ledger.ingest_path, ledger.api_key, ledger.programme.max_events) == ("/v2", "k", 5)
    assert ledger.failures == (FailurePlan(503, duration=10.0),)
    assert sink_for().ledger.programme.max_events is None


def test_a_failure_window_without_a_status_is_refused() -> None:
    with pytest.raises(ValueError, match="--fail"):
        sink_for("--for", "10s")


def test_a_hold_pauses_from_the_request_that_finds_it() -> None:
    ledger = Ledger(keep=True, clock=Clock())
    programme = ledger.programme
    programme.script.extend([Reply(503), Reply(hold=True), Reply(502)])
    programme.arrive()
    assert ledger.answer(post(batch("b", pose(1, 1)), "b")).status == 503
    programme.arrive()
    assert programme.paused
    programme.resume()
    # Held, then answered from what comes after the hold.
    assert ledger.answer(post(batch("b", pose(1, 1)), "b")).status == 502
    assert statuses(ledger) == [503, 502]


def test_resuming_before_a_hold_is_reached_cancels_it() -> None:
    programme = Ledger(clock=Clock()).programme
    programme.script.extend([Reply(hold=True), Reply(hold=True)])
    programme.resume()
    programme.arrive()
    assert (programme.paused, list(programme.script)) == (False, [])


# --- the spatial-event format: the public STAGs' ingest API --------------------------


def spatial_event(**changes: object) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": "s",
        "event_id": "e-1",
        "timestamp": 1_700_000_000_000,
        "anchors": [
            {
                "id": "a",
                "session_id": "s",
                "pose": {"x": 0.0, "y": 1.0, "z": 2.0, "rotation": [0.0, 0.0, 0.0, 1.0]},
                "timestamp": 1_700_000_000_000,
            }
        ],
        "meshes": [
            {
                "id": "m",
                "anchor_id": "a",
                "vertices": "QUJD",
                "faces": "",
                "is_delta": False,
                "compression_level": 5,
                "timestamp": 1_700_000_000_001,
            }
        ],
    }
    body.update(changes)
    return body


def test_a_spatial_event_is_answered_as_tabularxr_stag_does_and_counted_per_item() -> None:
    ledger = Ledger(wire_format=SpatialEventFormat(), keep=True, clock=Clock())
    assert ledger.ingest_path == "/api/v1/ingest"
    body = orjson.dumps(spatial_event())
    answer = ledger.answer(post(body, "e-1", path="/api/v1/ingest"))
    assert answer.status == 200
    assert orjson.loads(answer.body) == {"success": True, "event_id": "e-1", "processed": 2}
    # A retry (same Idempotency-Key) is answered alike and not recorded twice.
    again = ledger.answer(post(body, "e-1", path="/api/v1/ingest"))
    assert orjson.loads(again.body)["processed"] == 2
    summary = ledger.summary()
    assert (summary["batches"], summary["events"]) == (1, 2)
    assert summary["events_by_type"] == {"pose": 1, "mesh": 1}
    assert summary["mesh_chars"] == len("QUJD")
    assert ledger.accepted == [spatial_event()]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"session_id": ""}, "session_id"),
        ({"event_id": None}, "event_id"),
        ({"timestamp": 0}, "timestamp"),
        ({"timestamp": 1.5}, "timestamp"),
        ({"anchors": [{"id": "a", "session_id": "s"}]}, "anchors[0].timestamp"),
        ({"anchors": [{"session_id": "s", "timestamp": 1}]}, "anchors[0].id"),
        ({"meshes": [{"id": "m", "timestamp": 1}]}, "meshes[0].anchor_id"),
        (
            {"meshes": [{"id": "m", "anchor_id": "a", "timestamp": 1, "compression_level": 10}]},
            "meshes[0].compression_level",
        ),
    ],
)
def test_what_the_stags_bindings_refuse_gets_400_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    ledger = Ledger(wire_format=SpatialEventFormat(), keep=True, clock=Clock())
    answer = ledger.answer(post(orjson.dumps(spatial_event(**changes)), path="/api/v1/ingest"))
    assert answer.status == 400
    assert field in orjson.loads(answer.body)["error"]
    assert ledger.accepted == []


@given(
    st.lists(
        st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.integers(1, 10**6)),
        min_size=1,
        max_size=20,
    )
)
def test_every_request_the_relay_encodes_passes_the_stags_bindings(
    poses: list[tuple[str, int]],
) -> None:
    events = tuple(
        Event(
            f"id-{n}",
            session,
            n,
            1_700_000_000_000 + stamp,
            1_700_000_000_000 + stamp,
            "pose",
            (
                Anchor(
                    "anchor",
                    AnchorPose(0.0, 1.0, 2.0, (0.0, 0.0, 0.0, 1.0)),
                    1_700_000_000_000 + stamp,
                ),
            ),
            (),
        )
        for n, (session, stamp) in enumerate(poses)
    )
    fmt = SpatialEventFormat()
    requests = encode_batch(Batch("batch-1", events))
    assert {r.session_id for r in requests} == {session for session, _ in poses}
    for request in requests:
        parsed = fmt.parse(request.body)
        assert isinstance(parsed, Delivery), parsed
        answer = fmt.accepted(parsed, duplicate=False)
        assert check_answer(request, orjson.dumps(answer)) == Delivered()
    assert sum(r.anchors for r in requests) == len(poses)


def test_the_command_line_picks_the_format_and_its_path() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    settings = settings_from_args(parser.parse_args(["--format", "spatial-event"]))
    sink = Sink(settings)
    assert isinstance(sink.ledger.wire_format, SpatialEventFormat)
    assert sink.ledger.ingest_path == "/api/v1/ingest"
    moved = settings_from_args(
        parser.parse_args(["--format", "spatial-event", "--ingest-path", "/x"])
    )
    assert Sink(moved).ledger.ingest_path == "/x"
    assert Sink(settings_from_args(parser.parse_args([]))).ledger.ingest_path == "/ingest"
