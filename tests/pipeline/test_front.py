"""A bug met on one connection ends that connection only, and its log names no client data."""

from __future__ import annotations

import trio
import trio.testing

from stag_relay.pipeline.front import FrontDoor, error_sites
from stag_relay.protocol.http import HttpRequest, HttpResponse

CLIENT_DATA = "client-secret-payload"


def failing_endpoint(request: HttpRequest) -> HttpResponse:
    try:
        int(CLIENT_DATA)
    except ValueError as exc:
        raise KeyError(CLIENT_DATA) from exc
    raise AssertionError("unreachable")


async def refuse_upgrades(stream: trio.abc.Stream, request: HttpRequest) -> None:
    raise AssertionError("no upgrade in this test")


async def test_an_error_on_one_connection_is_reported_and_the_stream_closed() -> None:
    failures: list[tuple[str, Exception]] = []
    door = FrontDoor(
        endpoints={"/boom": failing_endpoint},
        websocket_paths={"/ws/streamkit"},
        admit=lambda request: None,
        serve_websocket=refuse_upgrades,
        handshake_timeout=10.0,
        on_error=lambda peer, error: failures.append((peer, error)),
    )
    server, client = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    # Returns instead of raising: the relay's other connections are not cancelled.
    await door.handle(server)
    ((peer, error),) = failures
    assert peer == "unknown"
    assert isinstance(error, KeyError)
    # The server side was closed, so the client sees the end of the stream.
    assert await client.receive_some() == b""
    sites = error_sites(error)
    assert [site.split(" ")[0] for site in sites] == ["ValueError", "KeyError"]
    assert all("failing_endpoint" in site for site in sites)
    assert CLIENT_DATA not in " ".join(sites)


def test_error_sites_walk_exception_groups() -> None:
    try:
        raise ExceptionGroup("group", [ValueError(CLIENT_DATA), TypeError(CLIENT_DATA)])
    except ExceptionGroup as group:
        sites = error_sites(group)
    assert [site.split(" ")[0] for site in sites] == ["ExceptionGroup", "ValueError", "TypeError"]
    assert CLIENT_DATA not in " ".join(sites)
