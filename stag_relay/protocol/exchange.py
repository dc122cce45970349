"""One POST to STAG on an HTTP/1.1 connection, sans I/O: the request's bytes out, the
answer out of whatever bytes the connection brings back.

The relay sends one kind of request to one URL, so the request is written here: its
head is the same but for two fields, and every field is checked once, as h11 would
check it (:func:`check_field`). The answer is read by httptools (Node.js's llhttp, in
C): status line, headers, a body framed by Content-Length, chunked, or by the end of
the connection, any 1xx before the answer, and whether the connection may be reused.
This is the per-batch cost h11 had, at a small fraction of it (docs/performance.md).

Read as h11 read them, with the same leniencies (bare LF line ends; Content-Length
beside chunked, which wins), except: a header folded over two lines and a repeated
Content-Length are refused, which h11 let pass, and an answer must start ``HTTP/``
(llhttp alone also reads RTSP and ICE). As with h11, only HTTP/1.1 connections are
kept alive.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from typing import Final

import attrs
import httptools

# RFC 9110 5.1 and 5.5, as h11 checks them: a header name is a token; a value has no
# NUL and no whitespace but spaces and tabs between its other bytes. No CR or LF can
# get into the head.
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
# A request target as Destination writes it: a path (and query), percent-encoded.
_ORIGIN_FORM: Final = re.compile(rb"/[\x21-\x7e]*")
# What an answer's status line starts with.
_PROTOCOL: Final = b"HTTP/"
# Statuses whose answers have no body, whatever their headers say (RFC 9110 6.4.1).
_NO_BODY: Final = (204, 304)


class AnswerError(ValueError):
    """The server's bytes are not an HTTP/1.1 answer, or it closed before answering in full."""


class _AfterAnswer(Exception):
    """Raised in a callback to stop httptools at a message after the answer."""


def check_field(name: bytes, value: bytes) -> None:
    """Raise ValueError, naming the header, for a field that cannot go into a request.

    The value is not quoted: it may be a credential (the configuration refuses such
    an API key when it is loaded, without quoting it either)."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not an HTTP token")
    if not _FIELD_VALUE.fullmatch(value):
        raise ValueError(
            f"header {name.decode('latin-1')}: its value cannot be sent: it holds a NUL "
            "or a line break, or starts or ends with whitespace"
        )


@attrs.frozen
class PostHead:
    """The head of every POST to one target, but for its per-request fields."""

    # The request line and the fixed fields, each line ending in CRLF.
    start: bytes

    @classmethod
    def build(cls, target: bytes, fields: Sequence[tuple[bytes, bytes]]) -> PostHead:
        """``fields`` go with every request; raises ValueError for one that cannot."""
        if not _ORIGIN_FORM.fullmatch(target):
            raise ValueError(f"request target {target!r} is not a path of visible ASCII")
        for name, value in fields:
            check_field(name, value)
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
        return cls(b"POST " + target + b" HTTP/1.1\r\n" + lines)

    def request(self, fields: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
        """The whole request: head, ``fields`` (checked), Content-Length, ``body``."""
        lines = [self.start]
        for name, value in fields:
            check_field(name, value)
            lines.append(name + b": " + value + b"\r\n")
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        return b"".join(lines)


@attrs.frozen
class StagAnswer:
    """The server's answer to a POST: status, ``Retry-After``, the start of the body."""

    status: int
    retry_after: str | None = None
    # At most the reader's max_body bytes of it.
    body: bytes = b""
    # From Content-Type; None when it names none, or none Python knows.
    charset: str | None = None
    # Where a redirect points, to say so in the log (redirects are not followed).
    location: str | None = None

    def text(self) -> str:
        """The body as text: its charset, else UTF-8; undecodable bytes replaced."""
        return self.body.decode(self.charset or "utf-8", errors="replace")


class AnswerReader:
    """Reads the answer to one request (after any 1xx) from the connection's bytes.

    :meth:`receive` each read, :meth:`end` when the server closes the connection;
    either gives ``(answer, reusable)`` once the answer is complete. ``reusable``: the
    connection may carry the next request. An answer whose body goes past
    ``max_body`` is given cut there, with the connection not reusable, rather than
    read to its end; a head still incomplete past ``max_head`` bytes is an error.
    """

    def __init__(self, *, max_head: int, max_body: int) -> None:
        self._max_head = max_head
        self._max_body = max_body
        # The parser holds this reader's callbacks: it is dropped as soon as the answer
        # is complete or refused, so the two are not left to the cycle collector.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(
            lenient_optional_cr_before_lf=True, lenient_chunked_length=True
        )
        self._received = 0
        # The answer's first bytes, until there are enough to see it is HTTP's: llhttp
        # also reads RTSP and ICE answers.
        self._start = b""
        self._head_done = False
        self._done = False
        self._status = 0
        self._retry_after: str | None = None
        self._charset: str | None = None
        self._location: str | None = None
        # How the body is framed: its declared length, or chunked, or neither (it
        # ends with the connection).
        self._length: int | None = None
        self._chunked = False
        self._body: list[bytes] = []
        self._kept = 0
        self._cut = False
        self._keep_alive = False

    # -- httptools' callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            # The start of another message in the same read: it must not overwrite
            # the answer (a server that sends one is not reused).
            raise _AfterAnswer

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"retry-after":
            self._retry_after = value.strip(b" \t").decode("latin-1")
        elif name == b"location":
            self._location = value.strip(b" \t").decode("latin-1")
        elif name == b"content-type":
            self._charset = _charset(value)
        elif name == b"content-length":
            # llhttp has checked it is a number, and refuses a second one.
            self._length = int(value)
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # a callback runs only inside receive()
        self._status = parser.get_status_code()
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        room = self._max_body - self._kept
        if len(body) > room:
            self._cut = True
            body = body[:room]
        if body:
            self._body.append(body)
            self._kept += len(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            # An informational answer (100 Continue, 103 Early Hints): the answer follows.
            self._reset()
            return
        parser = self._parser
        assert parser is not None
        self._done = True
        # h11 kept no HTTP/1.0 connection alive, whatever its headers said.
        self._keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"

    # -- feeding ------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray) -> tuple[StagAnswer, bool] | None:
        """What ``data`` completes: the answer and whether the connection is reusable,
        or None while more is needed. Raises :class:`AnswerError`."""
        parser = self._parser
        if parser is None:
            raise AnswerError("the answer is complete or refused already")
        try:
            if not self._head_done:
                self._received += len(data)
                if len(self._start) < len(_PROTOCOL):
                    self._start += data[: len(_PROTOCOL) - len(self._start)]
                    if not _PROTOCOL.startswith(self._start):
                        raise AnswerError(f"not an HTTP/1.1 answer: it starts {self._start!r}")
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._done:
                    return self._answer(), False
                raise AnswerError("the server switched protocols instead of answering") from None
            except httptools.HttpParserError as exc:
                # Bytes after a complete answer (another message, or any after a
                # closing one): the answer stands; the connection is not reused.
                if self._done:
                    return self._answer(), False
                raise AnswerError(f"not an HTTP/1.1 answer: {exc}") from None
            if self._done:
                return self._answer(), self._keep_alive and not self._cut
            if self._cut:
                return self._answer(), False
            if not self._head_done and self._received > self._max_head:
                raise AnswerError(f"the answer's head is too long (over {self._max_head} bytes)")
        except BaseException:
            self._parser = None
            raise
        return None

    def end(self) -> tuple[StagAnswer, bool]:
        """The server closed the connection: the answer if that completes it (a body
        that ends with the connection), else :class:`AnswerError`."""
        self._parser = None
        if self._done:
            return self._answer(), False
        if not self._head_done:
            raise AnswerError("server disconnected without sending an answer")
        if self._length is None and not self._chunked and self._status not in _NO_BODY:
            return self._answer(), False
        expected = "the last chunk" if self._chunked else f"{self._length} bytes"
        raise AnswerError(
            f"server disconnected in the middle of the answer's body: received "
            f"{self._kept} bytes, expected {expected}"
        )

    def _answer(self) -> StagAnswer:
        self._parser = None
        return StagAnswer(
            self._status, self._retry_after, b"".join(self._body), self._charset, self._location
        )

    def _reset(self) -> None:
        self._received = 0
        self._head_done = False
        self._status = 0
        self._retry_after = self._charset = self._location = None
        self._length = None
        self._chunked = False
        self._body = []
        self._kept = 0


def _charset(content_type: bytes) -> str | None:
    for param in content_type.decode("latin-1").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            try:
                name = codecs.lookup(value.strip().strip('"')).name
                # Only a text encoding: base64, zlib and the like are codecs too, and
                # bytes.decode refuses them (not for b"": that it does not look up).
                b"\x00".decode(name, "replace")
            except LookupError:
                return None
            return name
    return None
