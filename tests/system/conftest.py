from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from stag_relay.service.relay import Relay
from tests.support.relays import make_config
from tests.support.stag_server import StagServer


@pytest.fixture
def stag() -> Iterator[StagServer]:
    with StagServer() as server:
        yield server


@pytest.fixture
async def relay(nursery: trio.Nursery, stag: StagServer) -> AsyncIterator[Relay]:
    """A relay in this process on 127.0.0.1 (port 0), delivering to the ``stag`` stand-in."""
    relay = Relay(make_config(stag.url))
    await nursery.start(relay.run)
    yield relay
