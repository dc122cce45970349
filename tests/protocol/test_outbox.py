"""What a connection owes its client, fed values: outbox.py."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.protocol import websocket
from stag_relay.protocol.limits import ERROR_REPLIES_PER_SECOND, ERROR_REPLY_BURST
from stag_relay.protocol.outbox import MAX_PONGS, MAX_REPLIES, Outbox


def decode(frame: bytes) -> Any:
    """The JSON of a short unmasked text frame, as the relay writes them."""
    assert frame[0] == 0x80 | websocket.OP_TEXT
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        length = int.from_bytes(frame[2:4], "big")
        offset = 4
    elif length == 127:
        length = int.from_bytes(frame[2:10], "big")
        offset = 10
    return orjson.loads(frame[offset : offset + length])


def pop_all(outbox: Outbox, now: float) -> list[bytes]:
    frames = []
    while (frame := outbox.pop(now)) is not None:
        frames.append(frame)
    return frames


def test_replies_beyond_the_bound_are_suppressed_and_reported_by_the_next_one_sent() -> None:
    outbox = Outbox()
    queued = [outbox.error(0.0, "invalid_packet", f"bad {n}", n) for n in range(MAX_REPLIES + 10)]
    assert queued == [True] * MAX_REPLIES + [False] * 10
    replies = [decode(frame) for frame in pop_all(outbox, 0.0)]
    assert len(replies) == MAX_REPLIES
    assert replies[0]["suppressed"] == 10
    assert replies[0]["frame_number"] == 0
    assert all("suppressed" not in reply for reply in replies[1:])


def test_replies_over_the_rate_are_suppressed_and_a_summary_follows_when_it_allows() -> None:
    outbox = Outbox(max_replies=10_000)
    burst = int(ERROR_REPLY_BURST)
    assert sum(outbox.error(0.0, "invalid_packet", "bad") for _ in range(burst)) == burst
    assert len(pop_all(outbox, 0.0)) == burst
    assert sum(outbox.error(0.0, "invalid_packet", "bad") for _ in range(7)) == 0
    # Nothing else will carry the count: a summary is due once a token returns.
    due = outbox.summary_due(0.0)
    assert due == 1.0 / ERROR_REPLIES_PER_SECOND
    assert outbox.pop(0.0) is None
    (summary,) = [decode(frame) for frame in pop_all(outbox, due)]
    assert summary["code"] == "replies_suppressed"
    assert summary["suppressed"] == 7
    assert outbox.summary_due(due) is None


def test_acknowledgements_merge_into_one_frame() -> None:
    outbox = Outbox()
    for n in range(1000):
        outbox.ack("s", [n])
    (ack,) = [decode(frame) for frame in pop_all(outbox, 0.0)]
    assert ack == {"type": "ack", "session_id": "s", "frame_numbers": list(range(1000))}
    outbox.ack("s", [1000, 1001])
    assert [decode(frame)["frame_numbers"] for frame in pop_all(outbox, 0.0)] == [[1000, 1001]]


def test_pings_are_answered_first_and_only_the_latest_beyond_the_bound() -> None:
    outbox = Outbox()
    outbox.error(0.0, "invalid_packet", "bad")
    for n in range(MAX_PONGS + 3):
        outbox.ping(b"%d" % n)
    frames = pop_all(outbox, 0.0)
    assert frames[:MAX_PONGS] == [websocket.pong_frame(b"%d" % n) for n in range(3, MAX_PONGS + 3)]
    assert decode(frames[MAX_PONGS])["type"] == "error"
    assert len(frames) == MAX_PONGS + 1


def test_the_close_frame_goes_last_and_nothing_follows_it() -> None:
    outbox = Outbox()
    outbox.error(0.0, "invalid_packet", "bad")
    assert outbox.queue_close(websocket.close_frame(1001, "bye"))
    assert not outbox.queue_close(websocket.close_frame(1000))
    # An ack that comes before the close frame is written still goes before it.
    outbox.ack("s", [7])
    outbox.ping(b"late")
    assert outbox.error(0.0, "invalid_packet", "moot")
    frames = pop_all(outbox, 0.0)
    assert [decode(frame)["type"] for frame in frames[:2]] == ["error", "ack"]
    assert frames[2:] == [websocket.close_frame(1001, "bye")]
    assert outbox.done
    outbox.ack("s", [8])
    assert outbox.pop(10.0) is None


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(st.floats(0, 0.5, allow_nan=False), st.integers(0, 150), st.integers(0, 80)),
        max_size=30,
    )
)
def test_every_error_is_sent_or_counted_in_a_reply_that_is(
    steps: list[tuple[float, int, int]],
) -> None:
    """Whatever the client reads and whenever, replies + reported suppressions = errors."""
    outbox = Outbox()
    now = 0.0
    errors = answered = 0
    for advance, count, reads in steps:
        now += advance
        for _ in range(count):
            outbox.error(now, "invalid_packet", "bad")
        errors += count
        for _ in range(reads):
            frame = outbox.pop(now)
            if frame is None:
                break
            reply = decode(frame)
            answered += (reply["code"] == "invalid_packet") + reply.get("suppressed", 0)
        assert len(outbox.replies) <= MAX_REPLIES
    # The client reads everything from now on, as the writer lets it.
    while (due := outbox.summary_due(now)) is not None or outbox.replies:
        now = max(now, due or now)
        for frame in pop_all(outbox, now):
            reply = decode(frame)
            answered += (reply["code"] == "invalid_packet") + reply.get("suppressed", 0)
    assert answered == errors
