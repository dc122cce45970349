"""The WebSocket frame reader and writer (stag_relay.protocol.websocket), against frames built here.

The client frames below are built by hand, masked with a plain XOR, not with the
module's own helpers, so that the reader is checked against RFC 6455 rather than
against itself; what the relay sends is parsed back with wsproto.
"""

from __future__ import annotations

import base64
import itertools
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado import speedups
from wsproto.frame_protocol import FrameProtocol, Opcode

from stag_relay.protocol import websocket
from stag_relay.protocol.websocket import (
    Binary,
    Close,
    FrameReader,
    Ping,
    Pong,
    Received,
    Violation,
    accept_key,
    apply_mask,
    close_frame,
    encode_frame,
    handshake_problem,
    ping_frame,
    pong_frame,
    switching_protocols,
    text_frame,
    xor_in_python,
)
from tests.support.frames import BINARY, CLOSE, CONT, PING, PONG, TEXT, client_frame

LIMIT = 4096


def feed(reader: FrameReader, data: bytes, cuts: list[int] | None = None) -> list[Received]:
    """Feed ``data`` split at ``cuts`` (positions), as separate reads."""
    points = sorted({c for c in (cuts or []) if 0 < c < len(data)})
    out: list[Received] = []
    start = 0
    for point in [*points, len(data)]:
        out.extend(reader.receive(data[start:point]))
        start = point
    return out


def only(data: bytes, limit: int = LIMIT) -> list[Received]:
    return FrameReader(limit).receive(data)


# -- messages, fragments, control frames, across any split ------------------------------

masks = st.one_of(st.just(b"\x00\x00\x00\x00"), st.binary(min_size=4, max_size=4))
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
messages = st.one_of(
    texts.map(lambda t: (TEXT, t.encode())),
    st.binary(max_size=300).map(lambda b: (BINARY, b)),
    # Long enough for the 2-byte and 8-byte length encodings.
    st.sampled_from([126, 65535, 65536, 70000]).map(lambda n: (BINARY, os.urandom(n))),
)


@st.composite
def conversations(draw: st.DrawFn, mark_binary: bool = False) -> tuple[bytes, list[Received]]:
    """Frames for a few messages, some fragmented with pings and pongs between the
    fragments, and what the reader (marking binary messages or not) must make of them."""
    wire = b""
    expected: list[Received] = []
    for opcode, payload in draw(st.lists(messages, max_size=6)):
        pieces = draw(st.integers(1, 4))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=pieces - 1)))
        bounds = [0, *cuts, len(payload)]
        parts = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            wire += client_frame(opcode if index == 0 else CONT, part, fin=last, mask=draw(masks))
            if last:
                binary = mark_binary and opcode == BINARY
                expected.append(Binary(payload) if binary else payload)
            if draw(st.booleans()):
                control = draw(st.binary(max_size=125))
                kind = draw(st.sampled_from([PING, PONG]))
                wire += client_frame(kind, control, mask=draw(masks))
                expected.append(Ping(control) if kind == PING else Pong(control))
    return wire, expected


@settings(max_examples=150, deadline=None)
@given(conversations(), st.lists(st.integers(0, 300_000), max_size=12))
def test_every_message_comes_out_whole_and_in_order_however_the_reads_split(
    conversation: tuple[bytes, list[Received]], cuts: list[int]
) -> None:
    wire, expected = conversation
    reader = FrameReader(1 << 20)
    assert feed(reader, wire, cuts) == expected
    assert not reader.closed


@settings(max_examples=50, deadline=None)
@given(conversations())
def test_byte_by_byte_is_the_same_as_all_at_once(
    conversation: tuple[bytes, list[Received]],
) -> None:
    wire, expected = conversation
    if len(wire) > 3000:
        wire = wire[:3000]
        expected = FrameReader(1 << 20).receive(wire)
    reader = FrameReader(1 << 20)
    assert feed(reader, wire, list(range(len(wire)))) == expected


def test_data_messages_come_out_as_bytes() -> None:
    [text, binary] = only(client_frame(TEXT, b'{"a": 1}') + client_frame(BINARY, b"\xff\x00"))
    assert type(text) is bytes and type(binary) is bytes


@settings(max_examples=100, deadline=None)
@given(conversations(mark_binary=True), st.lists(st.integers(0, 300_000), max_size=12))
def test_a_reader_that_marks_binary_tells_binary_from_text_however_the_reads_split(
    conversation: tuple[bytes, list[Received]], cuts: list[int]
) -> None:
    wire, expected = conversation
    assert feed(FrameReader(1 << 20, mark_binary=True), wire, cuts) == expected


def test_a_marked_fragmented_message_keeps_its_first_frames_opcode() -> None:
    wire = (
        client_frame(BINARY, b"\xff", fin=False)
        + client_frame(CONT, b"\x00")
        + client_frame(TEXT, b"ab", fin=False)
        + client_frame(CONT, b"c")
    )
    assert FrameReader(LIMIT, mark_binary=True).receive(wire) == [Binary(b"\xff\x00"), b"abc"]


# -- what a client may not send ---------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(client_frame(TEXT, b"hi", mask=None), 1002, id="unmasked"),
        pytest.param(client_frame(TEXT, b"hi", rsv=4), 1002, id="rsv1-compressed"),
        pytest.param(client_frame(TEXT, b"hi", rsv=2), 1002, id="rsv2"),
        pytest.param(client_frame(TEXT, b"hi", rsv=1), 1002, id="rsv3"),
        *(
            pytest.param(client_frame(op, b""), 1002, id=f"opcode-{op}")
            for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
        ),
        pytest.param(client_frame(PING, b"x" * 126), 1002, id="long-ping"),
        pytest.param(client_frame(CLOSE, b"\x03\xe8" + b"x" * 124), 1002, id="long-close"),
        pytest.param(client_frame(PING, b"x", fin=False), 1002, id="fragmented-ping"),
        pytest.param(client_frame(CONT, b"x"), 1002, id="continuation-of-nothing"),
        pytest.param(
            client_frame(TEXT, b"a", fin=False) + client_frame(TEXT, b"b"),
            1002,
            id="message-inside-a-message",
        ),
        pytest.param(
            client_frame(TEXT, b"x" * 100, length_bytes=2), 1002, id="length-16-not-minimal"
        ),
        pytest.param(
            client_frame(BINARY, b"x" * 1000, length_bytes=8), 1002, id="length-64-not-minimal"
        ),
        pytest.param(
            bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + b"\0\0\0\0",
            1002,
            id="length-high-bit",
        ),
        pytest.param(client_frame(TEXT, b"\xff"), 1007, id="invalid-utf8"),
        pytest.param(client_frame(TEXT, b"\xed\xa0\x80"), 1007, id="surrogate"),
        pytest.param(client_frame(TEXT, b"\xc3"), 1007, id="truncated-utf8"),
        pytest.param(
            client_frame(TEXT, b"ok \xc3", fin=False) + client_frame(CONT, b"("),
            1007,
            id="invalid-utf8-fragmented",
        ),
        pytest.param(client_frame(TEXT, b"x" * (LIMIT + 1)), 1009, id="too-big"),
        pytest.param(
            client_frame(TEXT, b"x" * 3000, fin=False) + client_frame(CONT, b"x" * 3000),
            1009,
            id="too-big-fragmented",
        ),
        pytest.param(client_frame(CLOSE, b"\x03"), 1002, id="close-one-byte"),
        pytest.param(client_frame(CLOSE, b"\x03\xe8\xff"), 1007, id="close-reason-not-utf8"),
    ],
)
def test_violations_get_their_close_code(wire: bytes, code: int) -> None:
    # A valid message first: what came before a violation still counts.
    items = only(client_frame(TEXT, b"before") + wire + client_frame(TEXT, b"after"))
    assert items[0] == b"before"
    assert isinstance(items[1], Violation)
    assert items[1].code == code
    assert len(items) == 2


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 65535), st.binary(max_size=20))
def test_close_codes(code: int, reason: bytes) -> None:
    items = only(client_frame(CLOSE, code.to_bytes(2, "big") + reason))
    allowed = 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
    try:
        text: str | None = reason.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if not allowed:
        assert items == [Violation(1002, "close code not allowed")]
    elif text is None:
        assert items == [Violation(1007, "close reason is not UTF-8")]
    else:
        assert items == [Close(code, text)]


def test_a_close_without_a_code_is_1005_and_nothing_is_read_after_it() -> None:
    reader = FrameReader(LIMIT)
    assert reader.receive(client_frame(CLOSE, b"") + client_frame(TEXT, b"late")) == [
        Close(1005, "")
    ]
    assert reader.closed
    assert reader.receive(client_frame(TEXT, b"later")) == []


def test_exactly_the_limit_is_allowed_whole_and_fragmented() -> None:
    payload = b"x" * LIMIT
    assert only(client_frame(BINARY, payload)) == [payload]
    half = LIMIT // 2
    wire = client_frame(TEXT, payload[:half], fin=False) + client_frame(CONT, payload[half:])
    assert only(wire) == [payload]


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    # Only the header has arrived: the reader does not wait for (or buffer) the payload.
    header = client_frame(BINARY, b"x" * 70_000)[:14]
    [violation] = FrameReader(LIMIT).receive(header)
    assert violation == Violation(1009, f"message over {LIMIT} bytes")


def test_utf8_split_between_fragments_is_valid() -> None:
    text = "é€😀".encode()
    wire = b"".join(
        client_frame(TEXT if i == 0 else CONT, text[i : i + 1], fin=i == len(text) - 1)
        for i in range(len(text))
    )
    assert only(wire) == [text]


def test_binary_is_not_checked_for_utf8() -> None:
    assert only(client_frame(BINARY, b"\xff\xfe")) == [b"\xff\xfe"]


# -- closing: only the peer's close frame still matters ----------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["text", "big", "ping", "unmasked", "fragment"]), max_size=5),
    st.lists(st.integers(0, 200_000), max_size=8),
)
def test_closing_skips_everything_up_to_the_peers_close(kinds: list[str], cuts: list[int]) -> None:
    frames = {
        "text": client_frame(TEXT, b"skipped"),
        # Far over the limit: skipped without being buffered.
        "big": client_frame(BINARY, b"x" * 100_000),
        "ping": client_frame(PING, b"p"),
        "unmasked": client_frame(TEXT, b"u", mask=None),
        "fragment": client_frame(TEXT, b"f", fin=False),
    }
    wire = b"".join(frames[k] for k in kinds) + client_frame(CLOSE, b"\x03\xe8bye")
    reader = FrameReader(LIMIT)
    reader.closing()
    points = sorted({c for c in cuts if 0 < c < len(wire)})
    out: list[Received] = []
    start = 0
    for point in [*points, len(wire)]:
        out.extend(reader.receive(wire[start:point]))
        start = point
        assert len(reader._buffer) <= 200  # never a payload's worth
    assert out == [Close(1000, "bye")]
    assert reader.closed


def test_after_a_violation_the_peers_close_is_recognised() -> None:
    reader = FrameReader(LIMIT)
    wire = client_frame(TEXT, b"x" * (LIMIT + 10)) + client_frame(CLOSE, b"\x03\xea")
    items = reader.receive(wire[:20])
    assert items == [Violation(1009, f"message over {LIMIT} bytes")]
    assert not reader.closed
    assert reader.receive(wire[20:]) == [Close(1002, "")]
    assert reader.closed


# -- what the relay sends ----------------------------------------------------------------


def parse_server_frames(data: bytes) -> list[tuple[Opcode, Any]]:
    """Frames as wsproto's client side reads them (it refuses masked server frames)."""
    protocol = FrameProtocol(client=True, extensions=[])
    protocol.receive_bytes(data)
    return [(frame.opcode, frame.payload) for frame in protocol.received_frames()]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 100_000])
def test_text_frames_of_every_length_encoding(size: int) -> None:
    payload = b"a" * size
    assert parse_server_frames(text_frame(payload)) == [(Opcode.TEXT, "a" * size)]


def test_ping_pong_and_close_frames() -> None:
    frames = ping_frame(b"") + pong_frame(b"pp") + close_frame(1001, "relay shutting down")
    assert parse_server_frames(frames) == [
        (Opcode.PING, b""),
        (Opcode.PONG, b"pp"),
        (Opcode.CLOSE, (1001, "relay shutting down")),
    ]


def test_close_without_a_code() -> None:
    assert close_frame(None) == close_frame(1005) == encode_frame(CLOSE, b"")


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_close_reasons_are_cut_to_fit_and_stay_utf8(reason: str) -> None:
    frame = close_frame(1008, reason)
    assert len(frame) <= 2 + 125
    [(opcode, (code, decoded))] = parse_server_frames(frame)
    assert (opcode, code) == (Opcode.CLOSE, 1008)
    assert reason.startswith(decoded)


# -- the opening handshake ---------------------------------------------------------------


def test_accept_key_matches_rfc_6455() -> None:
    # The example of RFC 6455, section 1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    response = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==")
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"Extensions" not in response and b"Protocol:" not in response
    assert response.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("version", "key", "status"),
    [
        ("13", base64.b64encode(b"0123456789abcdef").decode(), None),
        (None, base64.b64encode(b"0123456789abcdef").decode(), 426),
        ("8", base64.b64encode(b"0123456789abcdef").decode(), 426),
        ("13", None, 400),
        ("13", "", 400),
        ("13", "not base64!", 400),
        ("13", base64.b64encode(b"short").decode(), 400),
    ],
)
def test_handshake_problems(version: str | None, key: str | None, status: int | None) -> None:
    problem = handshake_problem(version, key)
    assert (problem.status if problem else None) == status
    if status == 426:
        assert problem is not None
        assert ("sec-websocket-version", "13") in problem.headers


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_apply_mask_xors_each_byte_with_the_key_repeated(data: bytes, mask: bytes) -> None:
    expected = bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))
    assert apply_mask(data, mask) == expected
    assert apply_mask(memoryview(data), memoryview(mask)) == expected
    assert apply_mask(bytearray(data), bytearray(mask)) == expected
    # Masking twice gives the data back (RFC 6455 5.3: the same operation both ways).
    assert apply_mask(expected, mask) == data
    # Where tornado's C function is missing.
    assert xor_in_python(mask, data) == expected


def test_unmasking_runs_in_c() -> None:
    # tornado's wheels carry the C function on every platform CI runs on.
    assert websocket._xor is speedups.websocket_mask
