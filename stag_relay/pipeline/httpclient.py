"""POSTs to STAG's ingest URL: HTTP/1.1 over trio streams, connections kept alive.

One origin and one kind of request, so none of a general client's machinery (pools
per origin, redirects, cookies, content decoding) is paid for on every batch: a
request is one exchange (:mod:`stag_relay.protocol.exchange`: the request's bytes,
the answer read by httptools) on a connection taken from a list of idle ones, or on
a new one. The sender runs at most ``stag.max_in_flight`` requests at once, so that
many connections stay open and each is reused until the server closes it.

What it does as httpx (a general client) would, so the relay behaves as operators expect:

- TLS verified against ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` when set, else
  certifi's CA bundle; ALPN ``http/1.1``; no ``close_notify`` needed (HTTPS practice).
- ``stag.timeout`` bounds each step on its own: connecting (and the TLS handshake),
  writing the request, and each read of the answer. A large body being written or
  an answer still arriving is not cut off for the time the whole request took.
- A user name and password in the URL are sent as HTTP Basic credentials.
- After a failed write the answer is still read: a server may refuse a large body
  (413) and close before reading all of it, and that answer decides.
- An idle connection the server has closed, or that has been idle longer than
  ``KEEPALIVE_EXPIRY``, is not reused.
- Every failure without an answer is a :class:`TransportError`, named like httpx's
  (``ConnectError``, ``ReadTimeout``, ...), names operators know from other clients' logs.

Not honoured: proxies from ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``. The relay talks
to STAG directly; :func:`ignored_proxy` names a variable that httpx would have used,
for a warning.
"""

from __future__ import annotations

import base64
import os
import select
import ssl
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Final
from urllib.parse import quote, unquote, urlsplit

import attrs
import certifi
import trio

from stag_relay.protocol.exchange import AnswerError, AnswerReader, PostHead, StagAnswer

# An answer's body beyond this is not kept, and the connection is closed instead of
# read to the end. STAG answers a few dozen bytes of JSON and a proxy's error page is
# a few KiB; what the relay uses of it is a 200-character preview for the log. With
# the bounds on the head and on a read below, a server cannot make the relay hold
# more than ~150 KiB for one request.
MAX_ANSWER_BYTES: Final = 64 * 1024
# An answer's head (status line and headers) still incomplete past this many bytes is
# a protocol error (h11's default, which the relay used before); a complete head in
# one read may be up to a read's size. Real heads are a few hundred bytes.
MAX_ANSWER_HEAD_BYTES: Final = 16 * 1024
# A connection idle this long is closed rather than reused: servers drop idle
# connections after their own keep-alive timeout (5 s in Node.js, 60-75 s in nginx),
# and a request sent just as they do fails for nothing. httpx's default.
KEEPALIVE_EXPIRY: Final = 5.0
# Bytes asked of the socket per read: an answer fits in one read.
_READ_SIZE: Final = 64 * 1024
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# quote()'s safe characters for a path and a query: RFC 3986 pchar plus "/" and "?",
# and "%" so a path already percent-encoded is sent as it is (httpx does the same).
_SAFE_PATH: Final = "/%:@!$&'()*+,;=-._~"
_SAFE_QUERY: Final = _SAFE_PATH + "?"


class TransportError(Exception):
    """No answer came: the request may or may not have reached STAG."""


class ConnectError(TransportError):
    """Connecting failed: name resolution, refusal, reset, or the TLS handshake."""


class ConnectTimeout(TransportError):
    """Connecting (or the TLS handshake) took longer than the timeout."""


class WriteError(TransportError):
    """The connection broke while the request was being written, and no answer came."""


class WriteTimeout(TransportError):
    """Writing the request took longer than the timeout."""


class ReadError(TransportError):
    """The connection broke while the answer was being read."""


class ReadTimeout(TransportError):
    """A read of the answer took longer than the timeout."""


class RemoteProtocolError(TransportError):
    """The server's bytes are not an HTTP/1.1 answer, or it closed before answering in full."""


class LocalProtocolError(TransportError):
    """The request cannot be sent as HTTP (a header value with a line break, say)."""


@attrs.frozen
class Destination:
    """Where the POSTs go, from a URL: what to connect to and what to send."""

    scheme: str
    # ASCII (IDNA for an international name), without brackets for IPv6.
    host: str
    port: int
    # The request target: path and query, percent-encoded.
    target: bytes
    # The Host header: the host and any port not the scheme's default.
    authority: bytes
    # Basic credentials from the URL's user name and password, else None.
    authorization: bytes | None

    @classmethod
    def from_url(cls, url: str) -> Destination:
        """Parse ``http://`` or ``https://`` ``[user[:password]@]host[:port][/path][?query]``."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
        host = parts.hostname
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        port = parts.port or _DEFAULT_PORTS[scheme]
        shown = f"[{host}]" if ":" in host else host
        if port != _DEFAULT_PORTS[scheme]:
            shown = f"{shown}:{port}"
        target = quote(parts.path or "/", safe=_SAFE_PATH)
        if parts.query:
            target += "?" + quote(parts.query, safe=_SAFE_QUERY)
        authorization = None
        if parts.username is not None or parts.password is not None:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
            authorization = b"Basic " + base64.b64encode(pair.encode())
        return cls(scheme, host, port, target.encode(), shown.encode(), authorization)


def default_tls() -> ssl.SSLContext:
    """The client TLS context httpx builds by default, so https:// verifies as it does there."""
    if os.environ.get("SSL_CERT_FILE"):
        context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    elif os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    else:
        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


def ignored_proxy(url: str) -> str | None:
    """The proxy variable httpx would have sent ``url``'s requests through, if any.

    For a warning: ``NO_PROXY`` is matched as httpx matched it for host names (``*``,
    the name, or a domain it is in); an IP range in it is not understood.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    proxies = urllib.request.getproxies_environment()
    variable = scheme if scheme in proxies else "all" if "all" in proxies else None
    if variable is None:
        return None
    host = (parts.hostname or "").lower()
    for entry in proxies.get("no", "").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    return f"{variable.upper()}_PROXY"


@attrs.define
class _Step:
    """What a timeout of the request's cancel scope interrupted."""

    timeout: type[TransportError] = ConnectTimeout


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    # Watches the socket for the "did the server close it while idle" check, outside
    # trio (no task switch). poll, not select: select cannot watch a descriptor
    # numbered 1024 or above, and a relay with thousands of clients has those.
    poller: select.poll
    idle_since: float = 0.0

    def readable(self) -> bool:
        """Whether the server sent anything (EOF, most likely) since the last answer."""
        return bool(self.poller.poll(0))


class IngestClient:
    """POSTs bodies to one URL, each on an idle kept-alive connection or a new one.

    Use as an async context manager; leaving it closes the idle connections. It opens
    as many connections as requests run at once, and keeps them all.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Sequence[tuple[str, str]],
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``headers`` go with every request, after Host and any Authorization.

        ``tls`` is used for an https:// URL; ``None``: :func:`default_tls`.
        """
        self.destination = Destination.from_url(url)
        self._timeout = timeout
        self._tls: ssl.SSLContext | None = None
        if self.destination.scheme == "https":
            self._tls = tls if tls is not None else default_tls()
        fixed = [(b"host", self.destination.authority)]
        if self.destination.authorization is not None:
            fixed.append((b"authorization", self.destination.authorization))
        fixed.extend((name.encode(), value.encode()) for name, value in headers)
        # A configured header that cannot be sent fails each request, as an answer
        # that never comes would: the sender logs it and retries, and nothing is lost.
        self._head: PostHead | None = None
        self._head_problem = ""
        try:
            self._head = PostHead.build(self.destination.target, fixed)
        except ValueError as exc:
            self._head_problem = str(exc)
        # Most recently used last: reusing it first keeps the others to expire alone.
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> IngestClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the idle connections (a request running still closes its own)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    def idle_connections(self) -> int:
        """Connections kept open for the next requests."""
        return len(self._idle)

    async def post(self, body: bytes, *, headers: Sequence[tuple[str, str]] = ()) -> StagAnswer:
        """POST ``body`` with the fixed headers and ``headers``; STAG's answer.

        Raises :class:`TransportError` when no complete answer came.
        """
        if self._head is None:
            raise LocalProtocolError(self._head_problem)
        connection = self._take_idle()
        # One cancel scope for the whole request, its deadline moved before each step:
        # a scope per step would cost more than the step's own Python code.
        step = _Step()
        with trio.CancelScope() as scope:
            try:
                if connection is None:
                    connection = await self._connect(scope, step)
                answer, reusable = await self._exchange(connection, body, headers, scope, step)
            except BaseException:
                if connection is not None:
                    await trio.aclose_forcefully(connection.stream)
                raise
        if scope.cancelled_caught or connection is None:
            # Our deadline: an outer cancellation is not caught here and propagates.
            raise step.timeout(f"no progress within {self._timeout:g}s")
        if reusable:
            connection.idle_since = trio.current_time()
            self._idle.append(connection)
        else:
            await trio.aclose_forcefully(connection.stream)
        return answer

    def _take_idle(self) -> _Connection | None:
        # Closing a socket needs no await: this keeps post() free of a checkpoint it
        # does not need.
        idle = self._idle
        expired = trio.current_time() - KEEPALIVE_EXPIRY
        # The least recently used first: under light load they are never taken, and
        # would otherwise hold their sockets (in CLOSE_WAIT once the server gives up).
        while idle and idle[0].idle_since < expired:
            _close_now(idle.pop(0).stream)
        while idle:
            connection = idle.pop()
            if not connection.readable():
                return connection
            # Closed by the server, or sending something unasked.
            _close_now(connection.stream)
        return None

    async def _connect(self, scope: trio.CancelScope, step: _Step) -> _Connection:
        destination = self.destination
        step.timeout = ConnectTimeout
        scope.deadline = trio.current_time() + self._timeout
        try:
            tcp = await trio.open_tcp_stream(destination.host, destination.port)
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        poller = select.poll()
        poller.register(tcp.socket.fileno(), select.POLLIN)
        stream: trio.abc.Stream = tcp
        if self._tls is not None:
            tls = trio.SSLStream(
                tcp, self._tls, server_hostname=destination.host, https_compatible=True
            )
            # The handshake is a step of its own, as in httpx.
            scope.deadline = trio.current_time() + self._timeout
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(tcp)
                raise ConnectError(_reason(exc)) from exc
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            stream = tls
        return _Connection(stream, poller)

    async def _exchange(
        self,
        connection: _Connection,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        scope: trio.CancelScope,
        step: _Step,
    ) -> tuple[StagAnswer, bool]:
        """Write the request and read the answer; the answer, and whether to reuse."""
        assert self._head is not None  # post() checked
        try:
            # Head and body in one buffer: one system call for the cost of copying a
            # few dozen KiB.
            request = self._head.request([(k.encode(), v.encode()) for k, v in headers], body)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from exc
        step.timeout = WriteTimeout
        scope.deadline = trio.current_time() + self._timeout
        failed_write: WriteError | None = None
        try:
            await connection.stream.send_all(request)
        except (trio.BrokenResourceError, OSError) as exc:
            # Read the answer anyway: a server that refuses the body may answer and
            # close before reading all of it (httpx does the same).
            failed_write = WriteError(_reason(exc))
        step.timeout = ReadTimeout
        try:
            answer, reusable = await self._read_answer(connection, scope)
        except TransportError as exc:
            if failed_write is not None:
                raise failed_write from exc
            raise
        return answer, reusable and failed_write is None

    async def _read_answer(
        self, connection: _Connection, scope: trio.CancelScope
    ) -> tuple[StagAnswer, bool]:
        stream = connection.stream
        timeout = self._timeout
        reader = AnswerReader(max_head=MAX_ANSWER_HEAD_BYTES, max_body=MAX_ANSWER_BYTES)
        while True:
            scope.deadline = trio.current_time() + timeout
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                raise ReadError(_reason(exc)) from exc
            try:
                if not data:
                    return reader.end()
                answer = reader.receive(data)
            except AnswerError as exc:
                raise RemoteProtocolError(str(exc)) from exc
            if answer is not None:
                return answer


def _close_now(stream: trio.abc.Stream) -> None:
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    assert isinstance(transport, trio.SocketStream)
    transport.socket.close()


def _reason(exc: BaseException) -> str:
    # trio wraps the OSError (reset, broken pipe) or SSLError that says what happened.
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return str(cause) or type(cause).__name__
