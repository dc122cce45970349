"""One POST and its answer, as values: the request h11 would write, and answers read as
h11 reads them, however the connection splits them.

h11, which the STAG client was built on before, is the oracle: for any answer a
server may send (informational answers first, a body framed by Content-Length,
chunks or the end of the connection, kept alive or not), :class:`AnswerReader` must
give the status, headers and body h11 gives, and agree on whether the connection
can carry the next request.
"""

from __future__ import annotations

import itertools
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stag_relay.protocol.exchange import (
    AnswerError,
    AnswerReader,
    PostHead,
    StagAnswer,
    check_field,
)

MAX_HEAD = 16 * 1024
TARGET = b"/api/v1/ingest?relay=1"
FIXED = [(b"host", b"stag.example:8080"), (b"content-type", b"application/json")]


def read(chunks: list[bytes], *, max_body: int = 1 << 20) -> tuple[StagAnswer, bool]:
    """Feed ``chunks`` as reads, then the end of the connection if still needed."""
    reader = AnswerReader(max_head=MAX_HEAD, max_body=max_body)
    for chunk in chunks:
        got = reader.receive(chunk)
        if got is not None:
            return got
    return reader.end()


def h11_read(chunks: list[bytes], *, max_body: int = 1 << 20) -> tuple[StagAnswer, bool]:
    """The same answer as h11 reads it (after a POST with a body sent in full)."""
    http = h11.Connection(h11.CLIENT)
    http.send(
        h11.Request(method=b"POST", target=TARGET, headers=[*FIXED, (b"content-length", b"2")])
    )
    http.send(h11.Data(data=b"[]"))
    http.send(h11.EndOfMessage())
    status = 0
    headers: dict[bytes, bytes] = {}
    body = b""
    pending = list(chunks)
    closed = False
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            closed = not pending
            http.receive_data(pending.pop(0) if pending else b"")
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                break
        elif isinstance(event, h11.EndOfMessage):
            break
    charset = None
    content_type = headers.get(b"content-type", b"")
    if b"charset=" in content_type:
        charset = content_type.split(b"charset=")[1].decode().strip()
    answer = StagAnswer(
        status,
        headers[b"retry-after"].decode() if b"retry-after" in headers else None,
        body[:max_body],
        charset,
        headers[b"location"].decode() if b"location" in headers else None,
    )
    # A body that ended with the connection leaves h11 DONE too, but nothing can follow.
    reusable = http.our_state is h11.DONE and http.their_state is h11.DONE and not closed
    return answer, reusable and len(body) <= max_body


@st.composite
def answers(draw: Any) -> bytes:
    """An answer's bytes: the body framed by its length, chunks, or the connection's end."""
    out = b""
    for _ in range(draw(st.integers(0, 2))):
        out += b"HTTP/1.1 %d Info\r\n\r\n" % draw(st.sampled_from([100, 102, 103]))
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    status = draw(st.sampled_from([200, 201, 202, 204, 400, 404, 413, 429, 500, 503]))
    fields: list[bytes] = []
    if draw(st.booleans()):
        fields.append(b"Retry-After: %d" % draw(st.integers(0, 3600)))
    if draw(st.booleans()):
        fields.append(b"location: https://elsewhere.example/ingest")
    if draw(st.booleans()):
        fields.append(b"Content-Type: application/json; charset=utf-8")
    if version == b"1.1" and draw(st.booleans()):
        fields.append(b"Connection: close")
    body = draw(st.binary(max_size=300)) if status != 204 else b""
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if status == 204:
        framing = "length"
    if framing == "chunked" and version == b"1.1":
        fields.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 100), max_size=5))
        chunks, rest = [], body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        if rest:
            chunks.append(b"%x\r\n%s\r\n" % (len(rest), rest))
        payload = b"".join(chunks) + b"0\r\n\r\n"
    elif framing == "close" and status != 204:
        payload = body
    else:
        if status != 204:
            fields.append(b"Content-Length: %d" % len(body))
        payload = body
    head = b"HTTP/%s %d Whatever\r\n" % (version, status) + b"".join(f + b"\r\n" for f in fields)
    return out + head + b"\r\n" + payload


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(answers(), st.lists(st.integers(0, 2000), max_size=8), st.sampled_from([1 << 20, 0, 5, 64]))
def test_answers_read_as_h11_reads_them_however_they_are_split(
    data: bytes, cuts: list[int], max_body: int
) -> None:
    chunks = split(data, cuts)
    assert read(chunks, max_body=max_body) == h11_read(chunks, max_body=max_body)


@given(answers())
def test_byte_by_byte_is_the_same_as_all_at_once(data: bytes) -> None:
    assert read([data[i : i + 1] for i in range(len(data))]) == read([data])


def test_a_kept_alive_answer_is_complete_without_the_end_of_the_connection() -> None:
    reader = AnswerReader(max_head=MAX_HEAD, max_body=100)
    got = reader.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert got == (StagAnswer(200, body=b"ok"), True)


def test_a_body_over_the_limit_is_cut_without_waiting_for_the_rest() -> None:
    reader = AnswerReader(max_head=MAX_HEAD, max_body=4)
    got = reader.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nabcdef")
    assert got == (StagAnswer(200, body=b"abcd"), False)


@pytest.mark.parametrize(
    "after",
    [
        b"HTTP/1.1 503 Busy\r\ncontent-length: 3\r\n\r\nbad",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 20",
        b"JUNK",
    ],
)
def test_a_message_after_the_answer_in_the_same_read_does_not_replace_it(after: bytes) -> None:
    reader = AnswerReader(max_head=MAX_HEAD, max_body=100)
    got = reader.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + after)
    assert got == (StagAnswer(200, body=b"ok"), False)


@pytest.mark.parametrize(
    ("data", "answer", "reusable"),
    [
        # Bare LF line ends, as h11 reads them.
        (b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok", StagAnswer(200, body=b"ok"), True),
        # Content-Length beside chunked: chunked wins.
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            StagAnswer(200, body=b"ok"),
            True,
        ),
        # HTTP/1.0 is never kept alive, as h11 never kept it.
        (
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            StagAnswer(200, body=b"ok"),
            False,
        ),
        # Whitespace around a header's value is not part of it.
        (
            b"HTTP/1.1 503 Busy\r\nretry-after:  5 \r\ncontent-length: 0\r\n\r\n",
            StagAnswer(503, retry_after="5"),
            True,
        ),
    ],
)
def test_answers_h11_read_are_read_alike(data: bytes, answer: StagAnswer, reusable: bool) -> None:
    assert read([data]) == (answer, reusable)
    assert h11_read([data]) == (answer, reusable)


def test_a_charset_that_is_no_text_encoding_is_no_charset() -> None:
    data = b"HTTP/1.1 400 Bad\r\ncontent-type: text/plain; charset=base64\r\n\r\nno"
    answer, _ = read([data])
    assert answer.charset is None
    assert answer.text() == "no"


def test_the_reader_lets_go_of_its_parser_once_it_has_the_answer() -> None:
    reader = AnswerReader(max_head=MAX_HEAD, max_body=100)
    assert reader.receive(b"HTTP/1.1 204 No Content\r\n\r\n") is not None
    # The parser holds the reader's callbacks: kept, the two would be a cycle.
    assert reader._parser is None
    with pytest.raises(AnswerError, match="already"):
        reader.receive(b"HTTP/1.1 200 OK\r\n\r\n")


def test_bytes_after_a_closing_answer_leave_the_answer_but_not_the_connection() -> None:
    reader = AnswerReader(max_head=MAX_HEAD, max_body=100)
    got = reader.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\nJUNK")
    assert got == (StagAnswer(200), False)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([b"SPAM AND EGGS\r\n\r\n"], "not an HTTP/1.1 answer: it starts b'SPAM '"),
        ([b"RTSP/1.0 200 OK\r\n\r\n"], "not an HTTP/1.1 answer"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"], "Content-Length"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"], "chunk size"),
        ([b"HTTP/1.1 200 OK\r\nx: " + b"y" * (MAX_HEAD + 1)], "too long"),
        ([b"HTTP/1.1 20"], "without sending an answer"),
        ([], "without sending an answer"),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"], "received 9 bytes"),
        ([b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"], "last chunk"),
        (
            [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"],
            "switched",
        ),
    ],
)
def test_broken_answers_say_what_is_wrong(chunks: list[bytes], message: str) -> None:
    with pytest.raises(AnswerError, match=message):
        read(chunks)


def test_the_request_is_what_h11_would_send() -> None:
    head = PostHead.build(TARGET, FIXED)
    request = head.request([(b"idempotency-key", b"batch-1")], b"[1,2]")
    server = h11.Connection(h11.SERVER)
    server.receive_data(request)
    got = server.next_event()
    assert isinstance(got, h11.Request)
    assert (got.method, got.target) == (b"POST", TARGET)
    assert list(got.headers) == [
        *FIXED,
        (b"idempotency-key", b"batch-1"),
        (b"content-length", b"5"),
    ]
    data = server.next_event()
    assert isinstance(data, h11.Data) and data.data == b"[1,2]"
    assert isinstance(server.next_event(), h11.EndOfMessage)


# Header names and values drawn from what matters: separators, whitespace, controls.
_FIELD_BYTES = st.binary(max_size=12) | st.text("ab \t:\r\n\x00\x7f\xe9-", max_size=8).map(
    lambda text: text.encode("latin-1")
)


@given(_FIELD_BYTES, _FIELD_BYTES)
def test_a_field_is_refused_exactly_when_h11_refuses_it(name: bytes, value: bytes) -> None:
    try:
        h11.Request(method=b"POST", target=TARGET, headers=[(b"host", b"x"), (name, value)])
    except h11.LocalProtocolError:
        h11_refuses = True
    else:
        h11_refuses = False
    try:
        check_field(name, value)
    except ValueError:
        refused = True
    else:
        refused = False
    # h11 also checks the fields that frame the body (they are ours) and that a request
    # has one Host (ours, from the URL).
    if name.lower() not in (b"content-length", b"transfer-encoding", b"host"):
        assert refused == h11_refuses


def test_a_refused_field_is_named_and_its_value_not_quoted() -> None:
    with pytest.raises(ValueError, match="x-api-key") as caught:
        check_field(b"x-api-key", b"secret\r\nx-evil: 1")
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match="token"):
        PostHead.build(TARGET, [(b"bad name", b"x")])
