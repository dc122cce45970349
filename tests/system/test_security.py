"""Who may connect and what hostile clients get, over real sockets.

Keys (each header form, protected endpoints, reload on SIGHUP without dropping a
connection), origins, TLS (wss:// and https:// on one port, with trustme
certificates), connection and head limits, packet rate, invalid streak, message
size and compression, a client that never reads, and secrets kept out of the logs.
Where time matters the relay runs on trio's mock clock.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from stag_relay.service.config import ConfigError, load_config
from stag_relay.service.relay import Relay
from tests.support.clients import connect_relay, pose_packet
from tests.support.hostile import SOCKET_TIMEOUT, RawWebSocket, Rejected, read_until_closed
from tests.support.relays import RelayProcess, http_get, make_config
from tests.support.stag_server import StagServer
from tests.support.waiting import poll_until, wait_until

KEYS = ("k-one-0123456789", "k-two-0123456789")
# Packets a client that never reads may send before the test calls the relay stuck:
# far more acknowledgements than socket buffers and the reply queue can hold.
MAX_FLOOD = 200_000


async def start(nursery: trio.Nursery, stag: StagServer, **sections: Any) -> Relay:
    relay = Relay(make_config(stag.url, **sections))
    await nursery.start(relay.run)
    return relay


def sample(relay: Relay, name: str, **labels: str) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


def upgrade(port: int, headers: list[tuple[str, str]]) -> int:
    """The status a WebSocket upgrade with ``headers`` gets (101 when accepted)."""
    try:
        client = RawWebSocket(port, headers=headers)
    except Rejected as refused:
        if refused.status == 401:
            assert refused.headers["www-authenticate"].startswith("Bearer")
        return refused.status
    client.close()
    return 101


def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        if error.code == 401:
            assert error.headers["www-authenticate"].startswith("Bearer")
        return error.code


def send_poses(port: int, session: str, count: int, **kwargs: Any) -> None:
    with connect_relay(port, **kwargs) as ws:
        for frame in range(1, count + 1):
            ws.send(pose_packet(session, frame))


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: function(*args, **kwargs))


# --- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 401),
        ([("X-API-Key", "wrong")], 401),
        ([("X-API-Key", KEYS[0][:-1])], 401),
        ([("Authorization", f"Basic {KEYS[0]}")], 401),
        ([("Authorization", f"Bearer {KEYS[0]}x")], 401),
        ([("X-API-Key", KEYS[0])], 101),
        ([("X-API-Key", KEYS[1])], 101),
        ([("Authorization", f"Bearer {KEYS[0]}")], 101),
        ([("Authorization", f"bearer {KEYS[1]}")], 101),
    ],
)
async def test_upgrade_needs_a_key_in_either_header(
    nursery: trio.Nursery, stag: StagServer, headers: list[tuple[str, str]], status: int
) -> None:
    relay = await start(nursery, stag, auth={"api_keys": KEYS})
    assert await in_thread(upgrade, relay.ports[0], headers) == status
    refused = sample(relay, "relay_connections_refused_total", reason="unauthorized")
    assert refused == (1 if status == 401 else 0)
    assert sample(relay, "relay_connections_total") == (1 if status == 101 else 0)


async def test_a_client_with_a_key_streams_end_to_end(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, auth={"api_keys": KEYS})
    port = relay.ports[0]
    await in_thread(send_poses, port, "keyed", 5, additional_headers={"X-API-Key": KEYS[0]})
    bearer = {"Authorization": f"Bearer {KEYS[1]}"}
    await in_thread(send_poses, port, "bearer", 5, additional_headers=bearer)
    events = await in_thread(stag.wait_for_events, 10)
    assert sorted({e["session_id"] for e in events}) == ["bearer", "keyed"]
    with pytest.raises(InvalidStatus) as refused:
        await in_thread(send_poses, port, "keyless", 1)
    assert refused.value.response.status_code == 401


async def test_protected_endpoints_need_a_key_but_health_never_does(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, auth={"api_keys": KEYS, "protect_endpoints": True})
    port = relay.ports[0]
    for path in ("/status", "/metrics"):
        assert await in_thread(get, port, path) == 401
        assert await in_thread(get, port, path, {"X-API-Key": "wrong"}) == 401
        assert await in_thread(get, port, path, {"X-API-Key": KEYS[0]}) == 200
        assert await in_thread(get, port, path, {"Authorization": f"Bearer {KEYS[1]}"}) == 200
    assert await in_thread(get, port, "/health") == 200


async def test_endpoints_stay_open_unless_protected(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, auth={"api_keys": KEYS})
    for path in ("/health", "/status", "/metrics"):
        assert await in_thread(get, relay.ports[0], path) == 200


async def test_browser_origins_outside_the_list_get_403(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, websocket={"allowed_origins": ("https://app.example.com",)})
    port = relay.ports[0]
    assert await in_thread(upgrade, port, [("Origin", "https://app.example.com")]) == 101
    assert await in_thread(upgrade, port, [("Origin", "https://APP.example.com:443")]) == 101
    assert await in_thread(upgrade, port, [("Origin", "https://evil.example.com")]) == 403
    assert await in_thread(upgrade, port, [("Origin", "null")]) == 403
    # Native clients send no Origin at all.
    assert await in_thread(upgrade, port, []) == 101
    assert sample(relay, "relay_connections_refused_total", reason="origin") == 2


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(f"# staging\n{KEYS[0]}\n", encoding="utf-8")
    return path


def test_keys_file_reload_on_sighup_keeps_open_connections(
    stag: StagServer, keys_file: Path
) -> None:
    marker = f"body-marker-{uuid.uuid4().hex}"
    relay = RelayProcess(
        {
            "RELAY_SERVER_HOST": "127.0.0.1",
            "RELAY_SERVER_PORT": "0",
            "RELAY_STAG_URL": stag.url,
            "RELAY_BATCH_MAX_SIZE": "1",
            "RELAY_AUTH_API_KEYS_FILE": str(keys_file),
            "RELAY_AUTH_API_KEYS": KEYS[1],
            # Debug level: even then, no key and no packet body reaches the log.
            "RELAY_LOG_LEVEL": "debug",
        }
    )
    try:
        port = relay.port()
        first = {"X-API-Key": KEYS[0]}
        with connect_relay(port, additional_headers=first) as ws:
            ws.send(pose_packet("before-reload", 1, marker=marker))
            ws.send("not json " + marker)
            stag.wait_for_events(1)
            # The file now holds another key: KEYS[0] is revoked for new connections.
            replacement = "k-three-0123456789"
            keys_file.write_text(f"{replacement}\n# {KEYS[0]} revoked\n", encoding="utf-8")
            relay.proc.send_signal(signal.SIGHUP)
            relay.wait_for_log("API keys reloaded")
            assert upgrade(port, [("X-API-Key", KEYS[0])]) == 401
            assert upgrade(port, [("X-API-Key", replacement)]) == 101
            # Keys from the configuration itself still work alongside the file's.
            assert upgrade(port, [("Authorization", f"Bearer {KEYS[1]}")]) == 101
            # The connection opened with the revoked key was not dropped.
            ws.send(pose_packet("before-reload", 2))
            events = stag.wait_for_events(2)
        assert [e["frame_number"] for e in events] == [1, 2]
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()
    log = "".join(relay.raw)
    assert "API keys required" in log
    for secret in (KEYS[0], KEYS[1], replacement, marker):
        assert secret not in log


def test_an_open_relay_says_so_once_at_start(stag: StagServer) -> None:
    relay = RelayProcess(
        {"RELAY_SERVER_HOST": "127.0.0.1", "RELAY_SERVER_PORT": "0", "RELAY_STAG_URL": stag.url}
    )
    try:
        relay.wait_for_log("no API keys configured: any client may connect")
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.wait() == 0
    finally:
        relay.kill()
    warnings = [line for line in relay.lines if line.get("event", "").startswith("no API keys")]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


def test_check_config_masks_every_api_key() -> None:
    env = {"RELAY_AUTH_API_KEYS": ",".join(KEYS), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "stag_relay", "--check-config", "--config", "/dev/null"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "api_keys:\n  - '***'\n  - '***'\n" in result.stdout
    for key in KEYS:
        assert key not in result.stdout + result.stderr


# --- TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certificate(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    # The whole chain, as a deployment would give it.
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return str(cert), str(key)


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_wss_and_https_on_one_port(
    nursery: trio.Nursery,
    stag: StagServer,
    certificate: tuple[str, str],
    client_tls: ssl.SSLContext,
) -> None:
    cert, key = certificate
    relay = await start(
        nursery, stag, server={"tls_cert": cert, "tls_key": key}, auth={"api_keys": KEYS}
    )
    port = relay.ports[0]

    def https_get(path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"https://localhost:{port}{path}")
        with urllib.request.urlopen(request, context=client_tls, timeout=SOCKET_TIMEOUT) as answer:
            return int(answer.status), answer.read()

    status, body = await in_thread(https_get, "/health")
    assert (status, json.loads(body)["status"]) == (200, "ok")

    def stream_wss() -> str | None:
        uri = f"wss://127.0.0.1:{port}/ws/streamkit"
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        with connect(uri, ssl=client_tls, additional_headers=headers, open_timeout=30) as ws:
            for frame in (1, 2, 3):
                ws.send(pose_packet("over-tls", frame))
            ws.send("not json")
            return json.loads(ws.recv(timeout=SOCKET_TIMEOUT))["code"]

    assert await in_thread(stream_wss) == "invalid_packet"
    events = await in_thread(stag.wait_for_events, 3)
    assert [e["frame_number"] for e in events] == [1, 2, 3]

    # Plain HTTP on the TLS port gets no HTTP answer, and the relay carries on.
    def plain_http() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            return read_until_closed(sock)

    assert not (await in_thread(plain_http)).startswith(b"HTTP/")
    assert (await in_thread(https_get, "/health"))[0] == 200


async def test_tls_handshake_counts_against_handshake_timeout(
    autojump_clock: trio.testing.MockClock, stag: StagServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    async with trio.open_nursery() as nursery:
        relay = await start(
            nursery, stag, server={"tls_cert": cert, "tls_key": key, "handshake_timeout": 10.0}
        )
        stream = await trio.open_tcp_stream("127.0.0.1", relay.ports[0])
        started = trio.current_time()
        # Connected, but no ClientHello ever comes: the relay hangs up on time.
        assert await stream.receive_some() == b""
        assert 10.0 <= trio.current_time() - started < 11.0
        await stream.aclose()
        relay.shut_down()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAY_SERVER_TLS_CERT": "/nonexistent.pem"}, "RELAY_SERVER_TLS_CERT: cannot read"),
        ({"RELAY_SERVER_TLS_KEY": "/nonexistent.pem"}, "RELAY_SERVER_TLS_KEY: cannot read"),
    ],
)
def test_unreadable_tls_files_are_configuration_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ=env, search_default_paths=False)


def test_tls_files_must_be_a_matching_pair(
    ca: trustme.CA, certificate: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = certificate
    with pytest.raises(ConfigError, match=r"RELAY_SERVER_TLS_CERT: set server\.tls_key as well"):
        load_config(environ={"RELAY_SERVER_TLS_CERT": cert}, search_default_paths=False)
    other = tmp_path / "other-key.pem"
    ca.issue_cert("other.example").private_key_pem.write_to_path(str(other))
    with pytest.raises(ConfigError, match=r"server\.tls_key: cannot load the certificate and key"):
        load_config(
            environ={"RELAY_SERVER_TLS_CERT": cert, "RELAY_SERVER_TLS_KEY": str(other)},
            search_default_paths=False,
        )
    with pytest.raises(ConfigError, match="not a PEM certificate chain"):
        load_config(
            environ={"RELAY_SERVER_TLS_CERT": key, "RELAY_SERVER_TLS_KEY": key},
            search_default_paths=False,
        )


# --- connection and head limits -------------------------------------------------------


async def test_beyond_max_connections_the_upgrade_gets_503(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, server={"max_connections": 2})
    port = relay.ports[0]
    first = await in_thread(RawWebSocket, port)
    second = await in_thread(RawWebSocket, port)
    with pytest.raises(Rejected) as full:
        await in_thread(RawWebSocket, port)
    assert full.value.status == 503
    assert int(full.value.headers["retry-after"]) > 0
    assert sample(relay, "relay_connections_refused_total", reason="capacity") == 1
    # Plain HTTP requests do not count against the limit.
    assert (await in_thread(http_get, port, "/health"))[0] == 200
    first.close()
    await wait_until(lambda: len(relay.gate.connections) == 1)
    await wait_until(lambda: relay._websockets == 1)
    third = await in_thread(RawWebSocket, port)
    third.close()
    second.close()


async def exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(SOCKET_TIMEOUT):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


async def test_an_upgrade_head_over_16_kib_is_refused(relay: Relay) -> None:
    head = (
        b"GET /ws/streamkit HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 1000) for n in range(17))
    answer = await exchange(relay.ports[0], head + padding + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert sample(relay, "relay_connections_total") == 0


async def test_a_head_dripped_byte_by_byte_is_cut_off_at_handshake_timeout(
    autojump_clock: trio.testing.MockClock, stag: StagServer
) -> None:
    async with trio.open_nursery() as nursery:
        relay = await start(nursery, stag, server={"handshake_timeout": 10.0})
        head = b"GET /ws/streamkit HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" * 10
        stream = await trio.open_tcp_stream("127.0.0.1", relay.ports[0])
        started = trio.current_time()
        sent = 0
        # Slow loris: one byte a second, each read resetting nothing.
        with pytest.raises(trio.BrokenResourceError):
            for byte in head:
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(1.0)
        assert sent < len(head)
        assert trio.current_time() - started <= 12.0
        await stream.aclose()
        relay.shut_down()


# --- per-connection limits ------------------------------------------------------------


async def test_max_invalid_packets_in_a_row_closes_with_1008(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag, websocket={"max_invalid_packets": 5})

    def stream() -> tuple[list[str], int | None]:
        replies: list[str] = []
        with connect_relay(relay.ports[0]) as ws:
            for _ in range(5):
                ws.send("{}")
            try:
                while True:
                    replies.append(json.loads(ws.recv(timeout=SOCKET_TIMEOUT))["code"])
            except ConnectionClosed as closed:
                return replies, closed.rcvd.code if closed.rcvd else None

    replies, code = await in_thread(stream)
    assert (replies, code) == (["invalid_packet"] * 4, 1008)
    assert sample(relay, "relay_policy_closes_total", reason="invalid_packets") == 1


async def test_message_size_is_enforced_on_whole_and_fragmented_messages(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    limit = 1024
    relay = await start(nursery, stag, websocket={"max_message_size": limit})
    port = relay.ports[0]

    def padded(frame: int, size: int) -> str:
        packet = pose_packet("sized", frame, timestamp=1, pad="")
        return pose_packet("sized", frame, timestamp=1, pad="p" * (size - len(packet)))

    def send(*messages: Any) -> int | None:
        with connect_relay(port) as ws:
            # The relay may close before the last fragment of an oversized message is
            # out: its close code is the answer either way.
            try:
                for message in messages:
                    ws.send(message)
                ws.recv(timeout=SOCKET_TIMEOUT)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    def send_and_close(message: str) -> None:
        with connect_relay(port) as ws:
            ws.send(message)

    exactly = padded(1, limit)
    assert len(exactly) == limit
    await in_thread(send_and_close, exactly)
    await in_thread(stag.wait_for_events, 1)
    assert await in_thread(send, padded(2, limit + 1)) == 1009
    # Fragments of 500 bytes: none is over the limit, the message they make is.
    big = padded(3, 1500)
    assert await in_thread(send, [big[i : i + 500] for i in range(0, 1500, 500)]) == 1009
    assert (
        sample(
            relay, "relay_packets_total", type="unknown", status="too_large", dialect="streamkit"
        )
        == 2
    )


async def test_compression_is_declined_so_the_size_limit_is_the_decoded_size(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    relay = await start(nursery, stag)
    port = relay.ports[0]

    def negotiated() -> tuple[str | None, list[Any]]:
        # websockets offers permessage-deflate by default.
        with connect_relay(port, compression="deflate") as ws:
            assert ws.request is not None and ws.response is not None
            assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
            return ws.response.headers.get("Sec-WebSocket-Extensions"), ws.protocol.extensions

    assert await in_thread(negotiated) == (None, [])

    # A client that compresses anyway (RSV1 set, nothing negotiated) is cut off.
    def compressed_anyway() -> tuple[int | None, bytes]:
        client = RawWebSocket(port)
        # FIN + RSV1 + text, masked with a zero key, 5 bytes of "deflate" data.
        client.send_raw(b"\xc1\x85\x00\x00\x00\x00" + b"\xf2H\xcd\xc9\xc9")
        code, _, unparsed = client.read_until_closed()
        return code, unparsed

    assert (await in_thread(compressed_anyway))[1] == b""
    await in_thread(send_poses, port, "after", 3)
    assert len(await in_thread(stag.wait_for_events, 3)) == 3


async def test_a_client_that_never_reads_is_dropped_and_blocks_nobody(
    nursery: trio.Nursery, stag: StagServer
) -> None:
    # Its acknowledgements fill its socket; once the socket has taken nothing for the
    # send timeout, the relay gives up on it (and only then: what waits merges).
    relay = await start(nursery, stag, batch={"max_size": 1})
    port = relay.ports[0]
    stalled = await in_thread(
        lambda: RawWebSocket(port, target="/ws/streamkit?ack=1", receive_buffer=4096)
    )

    def flood() -> int:
        # Valid packets, each acknowledged once STAG has it; none of the
        # acknowledgements is ever read, so they pile up in the socket and the queue
        # until the relay drops this client, and the next send fails.
        sent = 0
        try:
            while sent < MAX_FLOOD:
                sent += 1
                stalled.send_text(pose_packet("never-reads", sent))
                if sent % 500 == 0:
                    # The relay reads as fast as STAG accepts; let it catch up.
                    stag.wait_for_events(sent - 100)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            # Dropped while we waited: what it had not read yet will never reach STAG.
            pass
        return sent

    flooding = trio.Event()
    flooded: list[int] = []

    async def run_flood() -> None:
        flooded.append(await in_thread(flood))
        flooding.set()

    nursery.start_soon(run_flood)
    # Meanwhile a well-behaved client's packets all get through.
    await in_thread(send_poses, port, "well-behaved", 200)
    await flooding.wait()
    assert flooded[0] < MAX_FLOOD, "the relay never dropped the client that does not read"
    print(f"\nslow reader: dropped after {flooded[0]} packets sent, none of their acks read")
    assert sample(relay, "relay_policy_closes_total", reason="slow_reader") == 1

    # All of them, in whatever order the relay's reads interleaved them with the flood's
    # (the flood's events count at STAG too, so a total of 200 proves nothing).
    def well_behaved() -> list[int]:
        return sorted(e["frame_number"] for e in stag.events() if e["session_id"] == "well-behaved")

    await in_thread(poll_until, lambda: len(well_behaved()) >= 200)
    assert well_behaved() == list(range(1, 201))
    await relay.gate.wait_idle()
    stalled.close()


async def test_sighup_loads_a_renewed_certificate_and_keeps_a_broken_one_out(
    nursery: trio.Nursery, stag: StagServer, certificate: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = certificate
    relay = await start(nursery, stag, server={"tls_cert": cert, "tls_key": key})
    port = relay.ports[0]

    def health(trusting: trustme.CA) -> int:
        context = ssl.create_default_context()
        trusting.configure_trust(context)
        request = urllib.request.Request(f"https://localhost:{port}/health")
        with urllib.request.urlopen(request, context=context, timeout=SOCKET_TIMEOUT) as answer:
            return int(answer.status)

    # Renewed in place (as certbot or cert-manager do) by another CA.
    renewed_by = trustme.CA()
    issued = renewed_by.issue_cert("localhost", "127.0.0.1")
    issued.private_key_pem.write_to_path(key)
    await trio.Path(cert).write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    assert relay.reload_tls() == "TLS certificate reloaded"
    assert await in_thread(health, renewed_by) == 200

    # A half-written renewal (a key that does not match) is refused; the last good pair stays.
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(key)
    assert relay.reload_tls() == "TLS certificate not reloaded, see the log"
    assert await in_thread(health, renewed_by) == 200
