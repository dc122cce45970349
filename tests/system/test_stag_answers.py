"""STAG's answer classes end to end: a relay with default settings (only STAG's URL set),
a `websockets` client streaming poses, and a STAG stand-in whose path or API key changes
under it for a few seconds, as with a wrong `stag.ingest_path`, a STAG redeployed behind
its proxy, or a rotated key."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from tests.support.clients import connect_relay, pose_packet
from tests.support.relays import RelayProcess, http_get
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until

EVENTS = 10_000
# The frame after which STAG starts refusing: well into the stream.
BREAK_AT = 3_000
# How long STAG refuses, at least.
EPISODE = 5.0
CONFIG_LOG = (
    "STAG answers that the relay's configuration is wrong;"
    " holding batches and retrying until it is fixed"
)
CLEARED_LOG = "STAG accepts the relay's requests again: configuration error cleared"


def status(port: int) -> dict[str, Any]:
    code, _, body = http_get(port, "/status")
    assert code == 200
    document: dict[str, Any] = orjson.loads(body)
    return document


def metric(port: int, name: str, labels: str) -> float:
    """One sample from /metrics, as the relay exposes it; 0 when absent."""
    code, _, body = http_get(port, "/metrics")
    assert code == 200
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


# How STAG breaks and is mended, what it then answers, and the setting the relay's
# log must point to.
Episode = tuple[Callable[[StagServer], None], Callable[[StagServer], None], int, bytes, str]
EPISODES: dict[str, Episode] = {
    # STAG moved to another path (or its proxy has no route to it while it is
    # redeployed): the relay's stag.ingest_path is wrong meanwhile.
    "404 wrong path": (
        lambda stag: stag.move_ingest_path("/v2/ingest"),
        lambda stag: stag.move_ingest_path("/ingest"),
        404,
        b'{"error":"no such endpoint: /ingest"}',
        "stag.ingest_path",
    ),
    # STAG now wants a key the relay does not send: stag.api_key is wrong meanwhile.
    "401 wrong key": (
        lambda stag: stag.require_api_key("rotated"),
        lambda stag: stag.require_api_key(None),
        401,
        b'{"error":"missing or wrong X-API-Key"}',
        "stag.api_key",
    ),
}


@pytest.mark.parametrize("name", list(EPISODES))
def test_stag_refusing_the_configuration_mid_stream_loses_nothing(
    stag: StagServer, name: str
) -> None:
    break_stag, mend_stag, code, answer, setting = EPISODES[name]
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
        }
    )
    try:
        port = relay.port()
        broken = threading.Event()
        streamed: list[int] = []

        def stream() -> None:
            with connect_relay(port) as ws:
                for frame in range(1, EVENTS + 1):
                    if frame == BREAK_AT:
                        break_stag(stag)
                        broken.set()
                    ws.send(pose_packet("steady", frame))
                    streamed.append(frame)

        client = threading.Thread(target=stream, daemon=True)
        client.start()
        assert broken.wait(60), "the client never reached the frame that breaks STAG"
        started = time.monotonic()

        # Meanwhile: /status and the metric say what is wrong.
        poll_until(lambda: status(port)["stag"]["state"] == "misconfigured")
        during = status(port)
        assert during["stag"]["last_status"] == code
        assert during["stag"]["reachable"] is False
        assert metric(port, "relay_stag_misconfigured", f'status="{code}"') == 1
        assert metric(port, "relay_stag_requests_total", 'outcome="misconfigured"') > 0
        assert len(stag.events()) < EVENTS

        time.sleep(max(0.0, started + EPISODE - time.monotonic()))  # the episode's length
        still = status(port)["stag"]
        assert (still["state"], still["last_status"]) == ("misconfigured", code)
        mend_stag(stag)

        stag.wait_for_events(EVENTS, timeout=120)
        client.join(60)
        assert not client.is_alive()
        relay.wait_for_log(CLEARED_LOG)
        after = status(port)
        assert metric(port, "relay_stag_misconfigured", f'status="{code}"') == 0
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()

    # Nothing lost, nothing twice.
    assert streamed == list(range(1, EVENTS + 1))
    frames = [e["frame_number"] for e in stag.events()]
    assert sorted(frames) == list(range(1, EVENTS + 1))
    assert after["stag"]["state"] == "reachable"
    assert after["stag"]["last_status"] == 200
    assert after["events"]["dropped"] == {"rejected": 0, "shutdown": 0, "spool_full": 0}
    assert code in {r.status for r in stag.requests()}

    # One error line for the episode, with what an operator needs; one when it clears.
    errors = [line for line in relay.lines if line.get("level") == "error"]
    assert [line["event"] for line in errors] == [CONFIG_LOG]
    [error] = errors
    assert error["url"] == f"{stag.url}/ingest"
    assert error["status"] == code
    assert error["answer"] == answer.decode()
    assert setting in error["fix"]
    assert [line["event"] for line in relay.lines].count(CLEARED_LOG) == 1
    assert not [line for line in relay.lines if line.get("event") == "STAG rejected a batch"]
