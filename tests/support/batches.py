"""Events and batch policies for tests: numbered events, policies with predictable batch ids."""

from __future__ import annotations

import itertools

from stag_relay.protocol.batching import BatchPolicy
from stag_relay.protocol.events import Anchor, AnchorPose, Batch, Event


def event(n: int) -> Event:
    return Event(
        event_id=f"e{n}",
        session_id="session-1",
        frame_number=n,
        timestamp=1_634_567_890_000 + n,
        received_at=1_634_567_890_001 + n,
        type="pose",
        anchors=(),
        meshes=(),
    )


def pose_event(session: str, n: int, anchor: str) -> Event:
    """Session ``session``'s pose number ``n``, at ``anchor``."""
    return Event(
        f"pose-{session}-{n}",
        session,
        n,
        1_700_000_000_000 + n,
        1_700_000_000_100 + n,
        "pose",
        (Anchor(anchor, AnchorPose(0.5, 1.0, -2.0, (0.0, 0.0, 0.0, 1.0)), 1_700_000_000_000 + n),),
        (),
    )


def make_policy(max_size: int = 3, timeout: float = 0.1) -> BatchPolicy:
    ids = itertools.count()
    return BatchPolicy(max_size=max_size, timeout=timeout, new_batch_id=lambda: f"b{next(ids)}")


def ids(batch: Batch | None) -> list[str]:
    assert batch is not None
    return [e.event_id for e in batch.events]
