"""The front door over real sockets: /health, /status, /metrics, and what it refuses."""

from __future__ import annotations

import json

import trio
from prometheus_client.parser import text_string_to_metric_families

from stag_relay.service.relay import Relay
from tests.support.clients import stream_poses
from tests.support.relays import http_get
from tests.support.stag_server import StagServer
from tests.support.waiting import wait_until


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(http_get, port, path)


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the relay closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


async def test_health_is_ok_with_json(relay: Relay) -> None:
    status, headers, body = await get(relay.ports[0], "/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["status"] == "ok"


async def test_status_reports_pipeline_state(relay: Relay, stag: StagServer) -> None:
    status, _, body = await get(relay.ports[0], "/status")
    assert status == 200
    doc = json.loads(body)
    for key in ("version", "uptime_seconds", "connections", "sessions", "channel", "batch"):
        assert key in doc
    assert doc["channel"] == {"depth": 0, "capacity": 1024}
    assert doc["batch"]["max_size"] == 5
    assert doc["stag"]["url"] == stag.url
    for key in ("reachable", "last_success", "last_failure", "consecutive_failures"):
        assert key in doc["stag"]
    assert doc["events"]["dropped"] == {"rejected": 0, "shutdown": 0, "spool_full": 0}
    assert doc["spool"] is None
    assert doc["packets"]["pose"]["ok"] == 0


async def test_status_never_shows_stag_credentials(nursery: trio.Nursery, stag: StagServer) -> None:
    from tests.support.relays import make_config

    url = stag.url.replace("http://", "http://user:s3cret@")
    relay = Relay(make_config(url))
    await nursery.start(relay.run)
    _, _, body = await get(relay.ports[0], "/status")
    assert b"s3cret" not in body


async def test_metrics_parse_and_negotiate(relay: Relay) -> None:
    status, headers, body = await get(relay.ports[0], "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    for name in (
        "relay_packets",
        "relay_connections_active",
        "relay_connections",
        "relay_batch_size",
        "relay_processing_duration_seconds",
        "relay_stag_requests",
        "relay_stag_request_duration_seconds",
        "relay_events_sent",
        "relay_events_dropped",
        "relay_channel_events",
        "relay_build_info",
    ):
        assert name in names, name
    openmetrics = await exchange(
        relay.ports[0],
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert b"content-type: application/openmetrics-text" in openmetrics.lower()
    assert openmetrics.rstrip().endswith(b"# EOF")


async def test_unknown_path_is_404(relay: Relay) -> None:
    status, _, body = await get(relay.ports[0], "/nope")
    assert status == 404
    assert "/nope" in json.loads(body)["error"]


async def test_wrong_method_is_405(relay: Relay) -> None:
    response = await exchange(
        relay.ports[0],
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert status_line(response) == "HTTP/1.1 405 Method Not Allowed"
    assert b"allow: GET, HEAD" in response


async def test_malformed_request_is_400(relay: Relay) -> None:
    response = await exchange(relay.ports[0], b"THIS IS NOT HTTP\r\n\r\n")
    assert status_line(response).startswith("HTTP/1.1 400")


async def test_oversized_head_is_refused(relay: Relay) -> None:
    response = await exchange(
        relay.ports[0], b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    )
    assert status_line(response).startswith("HTTP/1.1 431")


async def test_upgrade_on_another_path_is_404(relay: Relay) -> None:
    response = await exchange(
        relay.ports[0],
        b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert status_line(response).startswith("HTTP/1.1 404")


async def test_websocket_path_without_upgrade_is_426(relay: Relay) -> None:
    status, headers, _ = await get(relay.ports[0], "/ws/streamkit")
    assert status == 426
    assert headers["upgrade"] == "websocket"


async def test_keep_alive_serves_several_requests(relay: Relay) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    response = await exchange(
        relay.ports[0],
        request + request + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 200") == 3


async def test_incomplete_head_is_closed_after_handshake_timeout(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    from tests.support.relays import make_config

    relay = Relay(make_config(stag.url, server={"handshake_timeout": 0.2}))
    await nursery.start(relay.run)
    # Half a request head, never finished: the relay must close, not wait forever.
    response = await exchange(relay.ports[0], b"GET /health HTTP/1.1\r\nHost:")
    assert response == b""
    status, _, _ = await get(relay.ports[0], "/health")
    assert status == 200


async def test_health_turns_503_while_draining(relay: Relay, stag: StagServer) -> None:
    # STAG holds the one request, so draining lasts until we let it go (without one,
    # the relay would finish its shutdown, and close this connection, at once).
    stag.pause()
    try:
        await trio.to_thread.run_sync(stream_poses, relay.ports[0], "held", 1)
        await trio.to_thread.run_sync(stag.wait_for_in_flight, 1)
        stream = await trio.open_tcp_stream("127.0.0.1", relay.ports[0])
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await stream.receive_some(65536)
            assert status_line(first) == "HTTP/1.1 200 OK"
            relay.shut_down()
            await wait_until(lambda: relay.draining)
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await stream.receive_some(65536)
            assert status_line(second) == "HTTP/1.1 503 Service Unavailable"
            assert json.loads(second.split(b"\r\n\r\n", 1)[1]) == {"status": "draining"}
    finally:
        stag.resume()
