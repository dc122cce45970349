"""delivery's pure parts: how often drop_oldest says what it dropped."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from stag_relay.pipeline.delivery import DropLog


def test_the_first_drop_is_said_at_once_then_at_most_one_line_per_interval() -> None:
    drops = DropLog(interval=10.0)
    assert drops.dropped(1, 5, now=100.0) == (1, 5)
    assert drops.dropped(1, 5, now=101.0) is None
    assert drops.dropped(2, 9, now=109.9) is None
    # The next line has everything dropped since the last one.
    assert drops.dropped(1, 5, now=110.0) == (4, 19)
    assert drops.dropped(1, 1, now=125.0) == (1, 1)


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 500), st.floats(0, 30)), max_size=60))
def test_the_lines_add_up_to_every_drop_but_the_unsaid_rest(
    drops: list[tuple[int, int, float]],
) -> None:
    log = DropLog(interval=10.0)
    now, said, times = 0.0, [0, 0], []
    for batches, events, gap in drops:
        now += gap
        due = log.dropped(batches, events, now)
        if due is not None:
            said[0] += due[0]
            said[1] += due[1]
            times.append(now)
    assert said[0] + log.batches == sum(b for b, _, _ in drops)
    assert said[1] + log.events == sum(e for _, e, _ in drops)
    assert all(later - earlier >= 10.0 for earlier, later in itertools.pairwise(times))
