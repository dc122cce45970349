"""One connection's logic, fed bytes and the clock: protocol/connection.py, and the
close handshake and heartbeat state of protocol/websocket.py."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stag_relay.protocol import websocket
from stag_relay.protocol.connection import (
    INVALID_PACKETS,
    TOO_MANY_SESSIONS,
    ConnectionCore,
    Dialect,
    MeshHandoff,
    Read,
    Reply,
)
from stag_relay.protocol.events import Event
from stag_relay.protocol.limits import BURST_SECONDS
from stag_relay.protocol.packets import Packet, PacketError, parse_packet
from stag_relay.protocol.sessions import Sessions
from stag_relay.protocol.websocket import Beat, Binary, Close, Violation
from tests.support.frames import BINARY, CLOSE, PING, PONG, TEXT, client_frame

NOW = 100.0
RECEIVED_AT_MS = 1_700_000_000_000
INTERVAL = 30.0


def pose(session_id: str, frame_number: int, **extra: Any) -> bytes:
    packet: dict[str, Any] = {
        "session_id": session_id,
        "frame_number": frame_number,
        "timestamp": 1_700_000_000_000 + frame_number,
        "type": "pose",
        "data": {"pose": {"x": 1.0, "y": 2.0, "z": 3.0, "rotation": [0.0, 0.0, 0.0, 1.0]}},
    }
    packet.update(extra)
    return json.dumps(packet).encode()


def mesh(session_id: str, frame_number: int, anchor_id: str = "anchor-1") -> bytes:
    return json.dumps(
        {
            "session_id": session_id,
            "frame_number": frame_number,
            "timestamp": 1_700_000_000_000 + frame_number,
            "type": "mesh",
            "data": {"mesh": {"vertices": "AAAA", "faces": "", "anchor_id": anchor_id}},
        }
    ).encode()


def text(*messages: bytes) -> bytes:
    return b"".join(client_frame(TEXT, message) for message in messages)


class Acks:
    """Where events came from, as the delivery stage sees it: only carried on events here."""

    def acknowledge(self, session_id: str, frame_numbers: list[int]) -> None:
        pass

    def forget(self, count: int) -> None:
        pass


def make_core(
    sessions: Sessions | None = None,
    *,
    acks: bool = False,
    max_packets_per_second: int = 1000,
    max_invalid_packets: int = 100,
    max_message_size: int = 1 << 20,
    dialect: Dialect | None = None,
) -> ConnectionCore:
    return ConnectionCore(
        sessions=sessions if sessions is not None else Sessions(ttl=300.0, max_sessions=100),
        max_message_size=max_message_size,
        max_packets_per_second=max_packets_per_second,
        max_invalid_packets=max_invalid_packets,
        heartbeat_interval=INTERVAL,
        dialect=dialect,
        origin=Acks() if acks else None,
    )


def feed(core: ConnectionCore, data: bytes, now: float = NOW) -> Read:
    return core.receive(data, now, RECEIVED_AT_MS)


def server_frame(frame: bytes) -> tuple[int, bytes]:
    """Opcode and payload of one unmasked frame, as the relay writes them."""
    length = frame[1] & 0x7F
    offset = 2
    if length == 126:
        length = int.from_bytes(frame[2:4], "big")
        offset = 4
    elif length == 127:
        length = int.from_bytes(frame[2:10], "big")
        offset = 10
    return frame[0] & 0x0F, frame[offset : offset + length]


def written(core: ConnectionCore, now: float = NOW) -> list[tuple[int, bytes]]:
    frames = []
    while (frame := core.outbox.pop(now)) is not None:
        frames.append(server_frame(frame))
    return frames


def replies(core: ConnectionCore, now: float = NOW) -> list[Any]:
    return [orjson.loads(payload) for opcode, payload in written(core, now) if opcode == TEXT]


def frame_numbers(read: Read) -> list[int]:
    return [
        (step.event if isinstance(step, MeshHandoff) else step).frame_number for step in read.steps
    ]


# -- packets, sessions, duplicates --------------------------------------------------


def test_the_first_packet_binds_the_session_and_every_packet_becomes_an_event() -> None:
    sessions = Sessions(ttl=300.0, max_sessions=100)
    core = make_core(sessions)
    read = feed(core, text(pose("s", 1), pose("s", 2)))
    assert core.session_id == "s"
    assert "s" in sessions
    assert (read.packets, read.accepted, read.ending) == (2, 2, None)
    assert frame_numbers(read) == [1, 2]
    assert all(type(step) is Event and step.received_at == RECEIVED_AT_MS for step in read.steps)
    assert written(core) == []


def test_a_packet_of_another_session_is_refused_with_a_reply_and_the_binding_stays() -> None:
    core = make_core()
    feed(core, text(pose("s", 1)))
    read = feed(core, text(pose("other", 2), pose("s", 3)))
    assert core.session_id == "s"
    assert frame_numbers(read) == [3]
    assert read.invalid == {"pose": 1}
    assert read.wrote
    [reply] = replies(core)
    assert reply["code"] == "invalid_packet"
    assert reply["frame_number"] == 2
    assert reply["message"].startswith("$.session_id: this connection belongs to session 's'")


def test_events_and_meshes_come_out_in_the_order_their_packets_came() -> None:
    core = make_core()
    read = feed(core, text(pose("s", 1), mesh("s", 2), pose("s", 3), mesh("s", 4, "anchor-2")))
    assert frame_numbers(read) == [1, 2, 3, 4]
    assert [type(step) for step in read.steps] == [Event, MeshHandoff, Event, MeshHandoff]
    assert read.meshes == 2
    handoff = read.steps[1]
    assert isinstance(handoff, MeshHandoff)
    assert handoff.mesh.anchor_id == "anchor-1"
    assert handoff.event.type == "mesh"


def test_duplicates_are_counted_by_type_and_send_nothing_without_acks() -> None:
    core = make_core()
    feed(core, text(pose("s", 5), mesh("s", 5)))
    read = feed(core, text(pose("s", 4), pose("s", 5), mesh("s", 5), pose("s", 6)))
    assert read.duplicates == {"pose": 2, "mesh": 1}
    assert frame_numbers(read) == [6]
    assert not read.wrote
    assert written(core) == []


def test_duplicates_are_acknowledged_with_the_next_acknowledgement() -> None:
    core = make_core(acks=True)
    read = feed(core, text(pose("s", 1), pose("s", 2)))
    assert all(isinstance(step, Event) and step.origin is core.origin for step in read.steps)
    # A resend while 1 and 2 are in the pipeline waits for their acknowledgement.
    read = feed(core, text(pose("s", 1)))
    assert read.duplicates == {"pose": 1}
    assert written(core) == []
    assert core.acknowledge("s", [1, 2])
    assert replies(core) == [{"type": "ack", "session_id": "s", "frame_numbers": [1, 2, 1]}]


def test_acknowledgements_not_yet_written_merge_into_one() -> None:
    core = make_core(acks=True)
    feed(core, text(pose("s", 1), pose("s", 2), pose("s", 3)))
    core.acknowledge("s", [1])
    core.acknowledge("s", [2, 3])
    assert replies(core) == [{"type": "ack", "session_id": "s", "frame_numbers": [1, 2, 3]}]


def test_a_duplicate_with_nothing_in_the_pipeline_is_acknowledged_at_once() -> None:
    core = make_core(acks=True)
    feed(core, text(pose("s", 1)))
    core.acknowledge("s", [1])
    written(core)
    read = feed(core, text(pose("s", 1)))
    assert read.wrote
    assert replies(core) == [{"type": "ack", "session_id": "s", "frame_numbers": [1]}]


def test_events_stag_refused_release_the_duplicates_waiting_for_them() -> None:
    core = make_core(acks=True)
    feed(core, text(pose("s", 1), pose("s", 2)))
    feed(core, text(pose("s", 2)))
    assert not core.forget(1)
    assert core.forget(1)
    assert replies(core) == [{"type": "ack", "session_id": "s", "frame_numbers": [2]}]


# -- limits ----------------------------------------------------------------------------


def test_an_invalid_streak_ends_the_connection_and_what_came_before_is_kept() -> None:
    core = make_core(max_invalid_packets=3)
    read = feed(core, text(b"{", b"[]", pose("s", 1), b"{", b"{", b"{", pose("s", 2)))
    assert read.ending == INVALID_PACKETS
    assert read.ending.code == websocket.CLOSE_POLICY_VIOLATION
    assert read.ending.policy == "invalid_packets"
    # The valid packet broke the first streak; the packet after the third is not judged.
    assert frame_numbers(read) == [1]
    assert read.invalid == {"unknown": 5}
    assert read.packets == 6
    # The packet that ends the streak gets no reply: the close frame will say it.
    assert len(replies(core)) == 4
    # The core queues no close frame: the gate hands over what was read first.
    assert not core.outbox.closing


def test_at_the_session_limit_a_new_session_is_refused_with_1013() -> None:
    sessions = Sessions(ttl=300.0, max_sessions=1)
    holder = make_core(sessions)
    feed(holder, text(pose("held", 1)))
    core = make_core(sessions)
    read = feed(core, text(pose("new", 1), pose("new", 2)))
    assert read.ending == TOO_MANY_SESSIONS
    assert read.ending.code == websocket.CLOSE_TRY_AGAIN_LATER
    assert read.steps == []
    assert read.invalid == {"unknown": 1}
    assert core.session_id is None
    [reply] = replies(core)
    assert reply["message"] == "the relay holds too many sessions; retry later"


def test_error_replies_over_the_reply_rate_are_counted_as_suppressed() -> None:
    core = make_core(max_invalid_packets=10_000)
    read = feed(core, text(*[b"{"] * 200))
    assert read.invalid == {"unknown": 200}
    assert read.suppressed == 200 - len(replies(core))
    assert read.suppressed > 0


def test_the_throttle_says_when_the_connection_may_read_again() -> None:
    limit = 10
    core = make_core(max_packets_per_second=limit)
    burst = int(limit * BURST_SECONDS)
    # Reading again needs a whole token: a burst less one packet leaves one.
    feed(core, text(*[pose("s", n) for n in range(1, burst)]))
    assert core.read_again_at <= NOW
    feed(core, text(pose("s", burst)))
    assert core.read_again_at == pytest.approx(NOW + 1 / limit)
    feed(core, text(*[pose("s", n) for n in range(burst + 1, burst + 11)]))
    assert core.read_again_at == pytest.approx(NOW + 11 / limit)


def test_a_wait_that_is_ours_is_not_charged_to_the_client() -> None:
    limit = 10
    core = make_core(max_packets_per_second=limit)
    burst = int(limit * BURST_SECONDS)
    # A read with a mesh is charged once it is handed over: a wait for a busy mesh
    # lane meanwhile (3 s) earns the client 30 tokens first.
    packets = [pose("s", n) for n in range(1, burst + 10)] + [mesh("s", burst + 10)]
    read = feed(core, text(*packets))
    assert read.meshes == 1
    core.wait_begins(NOW)
    core.wait_ends(NOW + 3.0)
    core.handed_over()
    assert core.read_again_at <= NOW
    # The throttle's own wait is the client's: nothing is credited for it.
    other = make_core(max_packets_per_second=limit)
    feed(other, text(*packets))
    other.handed_over()
    other.wait_begins(NOW, throttled=True)
    other.wait_ends(NOW + 3.0, throttled=True)
    assert other.read_again_at == pytest.approx(NOW + 1.1)


def test_a_message_over_the_size_limit_ends_the_connection_with_1009() -> None:
    core = make_core(max_message_size=1000)
    read = feed(core, text(pose("s", 1)) + client_frame(TEXT, b"x" * 1001))
    assert frame_numbers(read) == [1]
    assert read.ending == Violation(websocket.CLOSE_TOO_BIG, "message over 1000 bytes")


# -- ping, pong and the close handshake -----------------------------------------------


def test_a_ping_is_answered_with_a_pong_carrying_its_payload() -> None:
    core = make_core()
    read = feed(core, client_frame(PING, b"hello"))
    assert read.wrote
    assert written(core) == [(websocket.OP_PONG, b"hello")]


def test_a_pong_proves_the_peer_alive_and_the_heartbeat_pings_on() -> None:
    core = make_core()
    core.state.start(0.0)
    assert core.beat(INTERVAL - 1) is Beat.WAIT
    assert core.beat(INTERVAL) is Beat.PING
    feed(core, client_frame(PONG, b""), now=INTERVAL + 1)
    assert core.state.pong
    assert core.beat(2 * INTERVAL) is Beat.PING
    assert core.wake_at(2 * INTERVAL) == 3 * INTERVAL


def test_no_pong_within_an_interval_queues_the_close_frame_1011() -> None:
    core = make_core()
    core.state.start(0.0)
    assert core.beat(INTERVAL) is Beat.PING
    assert core.beat(2 * INTERVAL) is Beat.TIMEOUT
    assert core.state.closing
    assert written(core) == [(websocket.OP_CLOSE, b"\x03\xf3ping timeout")]
    # Once the close frame is queued the heartbeat is silent, and data is not read.
    assert core.beat(10 * INTERVAL) is Beat.WAIT
    assert core.wake_at(10 * INTERVAL) == float("inf")
    assert feed(core, text(pose("s", 1))).steps == []


def test_a_ping_sent_while_the_reader_waited_on_us_is_not_held_against_the_peer() -> None:
    core = make_core()
    core.state.start(0.0)
    core.wait_begins(INTERVAL - 1)
    assert core.beat(INTERVAL) is Beat.PING
    core.wait_ends(INTERVAL + 1)
    # The pong may have sat unread during the wait: ping again rather than close.
    assert core.beat(2 * INTERVAL) is Beat.PING
    # A ping no wait overlaps is judged.
    assert core.beat(3 * INTERVAL) is Beat.TIMEOUT


def test_a_wait_overlapping_a_ping_excuses_it() -> None:
    core = make_core()
    core.state.start(0.0)
    assert core.beat(INTERVAL) is Beat.PING
    core.wait_begins(INTERVAL + 1, throttled=True)
    core.wait_ends(INTERVAL + 2, throttled=True)
    assert core.beat(2 * INTERVAL) is Beat.PING


def test_the_peers_close_frame_ends_the_read_and_is_remembered() -> None:
    core = make_core()
    read = feed(core, text(pose("s", 1)) + client_frame(CLOSE, b"\x03\xe8bye") + text(pose("s", 2)))
    assert frame_numbers(read) == [1]
    assert read.ending == Close(1000, "bye")
    assert core.state.peer_close == Close(1000, "bye")
    assert core.frames.closed


def test_our_close_frame_goes_last_and_then_only_the_peers_close_frame_is_read() -> None:
    core = make_core(acks=True)
    feed(core, text(pose("s", 1)) + client_frame(PING, b"p"))
    core.acknowledge("s", [1])
    assert core.close(websocket.CLOSE_POLICY_VIOLATION, "too many invalid packets")
    assert not core.close(websocket.CLOSE_GOING_AWAY)
    assert core.state.close_code == websocket.CLOSE_POLICY_VIOLATION
    frames = written(core)
    assert [opcode for opcode, _ in frames] == [websocket.OP_PONG, TEXT, websocket.OP_CLOSE]
    assert frames[-1][1] == b"\x03\xf0too many invalid packets"
    assert core.outbox.done
    core.sent_close()
    assert core.state.close_sent
    assert not core.receive_closing(text(pose("s", 2)) + client_frame(PING, b""))
    assert core.receive_closing(client_frame(CLOSE, b"\x03\xe8"))
    assert core.state.peer_close == Close(1000, "")


def test_a_drain_keeps_reading_after_our_close_frame() -> None:
    core = make_core()
    assert core.close(websocket.CLOSE_GOING_AWAY, "relay shutting down", keep_reading=True)
    read = feed(core, text(pose("s", 1), pose("s", 2)) + client_frame(CLOSE, b""))
    assert frame_numbers(read) == [1, 2]
    assert read.ending == Close(websocket.CLOSE_NO_STATUS, "")


# -- any split of the stream ----------------------------------------------------------


def _stream() -> list[bytes]:
    return [
        client_frame(TEXT, pose("s", 1)),
        client_frame(PING, b"a"),
        client_frame(TEXT, mesh("s", 2)),
        client_frame(TEXT, b"not json"),
        client_frame(TEXT, pose("s", 2)),
        client_frame(TEXT, pose("s", 1)),
        client_frame(BINARY, pose("s", 3)),
        client_frame(TEXT, pose("s", 4)[:20], fin=False),
        client_frame(0x0, pose("s", 4)[20:]),
        client_frame(PONG, b""),
        client_frame(TEXT, pose("other", 5)),
        client_frame(CLOSE, b"\x03\xe8"),
    ]


def _judge(chunks: list[bytes]) -> tuple[list[object], list[object], dict[str, int]]:
    core = make_core(acks=True)
    steps: list[object] = []
    tallies = {"packets": 0, "accepted": 0, "invalid": 0, "duplicates": 0}
    endings = []
    for chunk in chunks:
        read = feed(core, chunk)
        steps += [
            (type(step).__name__, (step.event if isinstance(step, MeshHandoff) else step).event_id)
            for step in read.steps
        ]
        tallies["packets"] += read.packets
        tallies["accepted"] += read.accepted
        tallies["invalid"] += sum(read.invalid.values())
        tallies["duplicates"] += sum(read.duplicates.values())
        if read.ending is not None:
            endings.append(read.ending)
    return (
        steps + endings,
        [server_frame(f) for f in iter(lambda: core.outbox.pop(NOW), None)],
        tallies,
    )


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_the_byte_stream_gives_the_same_events_replies_and_tallies(
    data: st.DataObject,
) -> None:
    stream = b"".join(_stream())
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _judge(chunks) == _judge([stream])


def test_the_whole_stream_in_one_read() -> None:
    outcome, frames, tallies = _judge([b"".join(_stream())])
    assert [kind for kind, *_ in outcome[:-1]] == [
        "Event",
        "MeshHandoff",
        "Event",
        "Event",
        "Event",
    ]
    assert outcome[-1] == Close(1000, "")
    assert tallies == {"packets": 8, "accepted": 5, "invalid": 2, "duplicates": 1}
    assert [opcode for opcode, _ in frames] == [websocket.OP_PONG, TEXT, TEXT]


# -- the dialect seam -----------------------------------------------------------------


class BinaryJson:
    """A dialect unlike the seed one: binary messages only, its own ping, its own replies,
    the session fixed at the upgrade."""

    name = "binary-json"
    mark_binary = True
    acknowledges = False

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def decode(self, message: bytes | Binary) -> Packet | Reply:
        if not isinstance(message, Binary):
            raise PacketError("text messages are not spoken here")
        obj = orjson.loads(message.payload)
        if obj.get("type") == "ping":
            return Reply(websocket.encode_frame(websocket.OP_BINARY, b'{"type":"pong"}'))
        obj["session_id"] = self.session_id
        return parse_packet(orjson.dumps(obj))

    def error_frame(
        self, code: str, message: str, frame_number: int | None, suppressed: int
    ) -> bytes:
        return websocket.encode_frame(websocket.OP_BINARY, orjson.dumps({"error": message}))

    def ack_frame(self, session_id: str, frame_numbers: list[int]) -> bytes:
        return websocket.encode_frame(websocket.OP_BINARY, orjson.dumps({"acked": frame_numbers}))


def test_a_dialect_decodes_messages_and_words_the_replies() -> None:
    core = make_core(dialect=BinaryJson("from-the-url"), acks=True)
    packet = orjson.loads(pose("ignored", 1))
    del packet["session_id"]
    read = feed(
        core,
        client_frame(BINARY, orjson.dumps(packet))
        + client_frame(BINARY, b'{"type": "ping"}')
        + client_frame(TEXT, pose("s", 2)),
    )
    assert core.session_id == "from-the-url"
    assert frame_numbers(read) == [1]
    assert read.packets == 3
    assert read.invalid == {"unknown": 1}
    core.acknowledge("from-the-url", [1])
    assert written(core) == [
        (websocket.OP_BINARY, b'{"type":"pong"}'),
        (websocket.OP_BINARY, b'{"error":"text messages are not spoken here"}'),
        (websocket.OP_BINARY, b'{"acked":[1]}'),
    ]
