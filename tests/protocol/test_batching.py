"""Batching: the policy with explicit times, and the Trio task under a mock clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.batching import BatchPolicy
from tests.support.batches import event, ids, make_policy

# -- BatchPolicy -------------------------------------------------------------------------


def test_policy_cuts_when_full() -> None:
    policy = make_policy(max_size=3)
    assert policy.add(event(0), now=10.0) is None
    assert policy.add(event(1), now=10.01) is None
    assert policy.pending == 2
    batch = policy.add(event(2), now=10.02)
    assert batch is not None
    assert batch.batch_id == "b0"
    assert ids(batch) == ["e0", "e1", "e2"]
    assert policy.pending == 0
    assert policy.deadline is None
    assert ids(policy.add(event(3), now=10.03) or policy.flush()) == ["e3"]
    assert policy.flush() is None


def test_extend_fills_the_open_batch_and_refuses_more_than_fits() -> None:
    policy = make_policy(max_size=4, timeout=0.1)
    assert policy.extend([], now=1.0) is None
    assert policy.deadline is None
    assert policy.extend([event(0), event(1)], now=1.0) is None
    assert policy.deadline == pytest.approx(1.1)
    with pytest.raises(ValueError, match="3 events do not fit in the open batch"):
        policy.extend([event(2), event(3), event(4)], now=1.05)
    assert policy.pending == 2
    assert ids(policy.extend([event(2), event(3)], now=1.05)) == ["e0", "e1", "e2", "e3"]
    assert policy.pending == 0
    assert policy.deadline is None


@given(
    st.integers(1, 6),
    st.lists(st.tuples(st.integers(1, 6), st.floats(0, 1)), max_size=20),
)
def test_extend_cuts_what_adding_one_at_a_time_cuts(
    max_size: int, arrivals: list[tuple[int, float]]
) -> None:
    one, many = make_policy(max_size=max_size), make_policy(max_size=max_size)
    cut_one: list[list[str]] = []
    cut_many: list[list[str]] = []
    n = 0
    now = 0.0
    for count, step in arrivals:
        now += step
        arrived = [event(n + i) for i in range(min(count, max_size - many.pending))]
        n += len(arrived)
        for e in arrived:
            if (batch := one.add(e, now)) is not None:
                cut_one.append(ids(batch))
        if (batch := many.extend(arrived, now)) is not None:
            cut_many.append(ids(batch))
        assert one.deadline == many.deadline
    assert cut_many == cut_one
    assert many.pending == one.pending
    if one.pending:
        assert ids(many.flush()) == ids(one.flush())


def test_policy_deadline_counts_from_the_first_event() -> None:
    policy = make_policy(max_size=10, timeout=0.1)
    assert policy.deadline is None
    policy.add(event(0), now=5.0)
    assert policy.deadline == pytest.approx(5.1)
    # Later events do not push it back.
    policy.add(event(1), now=5.09)
    assert policy.deadline == pytest.approx(5.1)
    assert policy.due(5.099) is None
    assert ids(policy.due(5.1)) == ["e0", "e1"]
    assert policy.deadline is None
    assert policy.due(100.0) is None
    # The next batch's clock starts with its own first event.
    policy.add(event(2), now=7.0)
    assert policy.deadline == pytest.approx(7.1)


def test_policy_flush_cuts_whatever_is_open() -> None:
    policy = make_policy(max_size=10)
    assert policy.flush() is None
    policy.add(event(0), now=0.0)
    assert ids(policy.flush()) == ["e0"]
    assert policy.flush() is None
    assert policy.pending == 0


def test_policy_batch_ids_are_fresh_per_batch() -> None:
    policy = BatchPolicy(max_size=1, timeout=1.0)
    batch_ids = set()
    for n in range(100):
        batch = policy.add(event(n), now=0.0)
        assert batch is not None
        batch_ids.add(batch.batch_id)
    assert len(batch_ids) == 100
    assert all(len(b) == 32 and int(b, 16) >= 0 for b in batch_ids)


def test_policy_with_max_size_one_never_holds_an_event() -> None:
    policy = make_policy(max_size=1)
    assert ids(policy.add(event(0), now=0.0)) == ["e0"]
    assert policy.pending == 0
    assert policy.deadline is None


@pytest.mark.parametrize(("max_size", "timeout"), [(0, 0.1), (-1, 0.1), (5, -0.1)])
def test_policy_rejects_nonsense(max_size: int, timeout: float) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_size=max_size, timeout=timeout)


@given(
    max_size=st.integers(min_value=1, max_value=10),
    steps=st.lists(st.one_of(st.just("flush"), st.floats(min_value=0.0, max_value=0.3))),
)
def test_policy_never_exceeds_max_size_never_cuts_empty_and_loses_nothing(
    max_size: int, steps: list[str | float]
) -> None:
    policy = make_policy(max_size=max_size, timeout=0.1)
    now = 0.0
    added: list[str] = []
    cut: list[str] = []
    for n, step in enumerate(steps):
        if step == "flush":
            batch = policy.flush()
        else:
            assert isinstance(step, float)
            now += step
            batch = policy.due(now)
            if batch is not None:
                cut += ids(batch)
            added.append(f"e{n}")
            batch = policy.add(event(n), now)
        if batch is not None:
            assert 1 <= len(batch) <= max_size
            cut += ids(batch)
        assert policy.pending <= max_size - 1
    final = policy.flush()
    if final is not None:
        cut += ids(final)
    assert cut == added
