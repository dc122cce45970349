"""The gate's tests run over in-memory streams (each connection reads its own) and
over real sockets (connections follow the gate's poller): the same behaviour both ways."""

from __future__ import annotations

import pytest
import trio.testing

from tests.support.memory_ws import StreamPair, socket_stream_pair


@pytest.fixture(
    params=[trio.testing.memory_stream_pair, socket_stream_pair], ids=["memory", "socket"]
)
def pair(request: pytest.FixtureRequest) -> StreamPair:
    stream_pair: StreamPair = request.param
    return stream_pair
