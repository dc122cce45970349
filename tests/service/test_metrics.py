"""The relay's metrics: the shortcuts of the hot path count what the plain calls count."""

from __future__ import annotations

import pytest

from stag_relay.service.metrics import PendingObservations, RelayMetrics, unchecked_inc

OK_POSE = {"type": "pose", "status": "ok", "dialect": "streamkit"}


def test_unchecked_inc_counts_what_inc_counts() -> None:
    metrics = RelayMetrics()
    counter = metrics.packet("pose", "ok")
    add = unchecked_inc(counter)
    counter.inc(2)
    add(3)
    add(0)
    assert metrics.totals()("relay_packets_total", OK_POSE) == 5


def test_observe_many_is_observe_repeated() -> None:
    one, many = RelayMetrics(), RelayMetrics()
    for _ in range(4):
        one.processing_duration.observe(0.003)
    many.observe_many(many.processing_duration, 0.003, 4)
    name = "relay_processing_duration_seconds"
    for sample in ("_count", "_sum"):
        assert one.totals()(name + sample) == many.totals()(name + sample) > 0
    # Cumulative buckets: 0 up to the bound below 3 ms, all four from the one above.
    for bound, count in (("0.001", 0), ("0.005", 4), ("+Inf", 4)):
        assert one.totals()(name + "_bucket", {"le": bound}) == count
        assert many.totals()(name + "_bucket", {"le": bound}) == count


def test_pending_observations_write_at_flush_what_observe_many_writes() -> None:
    direct, deferred = RelayMetrics(), RelayMetrics()
    pending = PendingObservations(deferred.processing_duration)
    for amount, count in ((0.003, 4), (2e-5, 1), (0.5, 2), (0.003, 1)):
        direct.observe_many(direct.processing_duration, amount, count)
        pending.observe_many(amount, count)
    name = "relay_processing_duration_seconds"
    assert deferred.totals()(name + "_count") == 0
    pending.flush()
    pending.flush()  # nothing pending: writes nothing more
    bounds = ("1e-05", "2.5e-05", "0.001", "0.005", "0.1", "+Inf")
    for sample, labels in [("_count", None), ("_sum", None)] + [
        ("_bucket", {"le": bound}) for bound in bounds
    ]:
        assert deferred.totals()(name + sample, labels) == pytest.approx(
            direct.totals()(name + sample, labels)
        )
    assert deferred.totals()(name + "_count") == 8
