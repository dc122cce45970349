"""A STAG stand-in: a real HTTP server that records the batches it is sent and fails on demand.

A stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive, on 127.0.0.1 and an
ephemeral port, in daemon threads, so it serves whatever the caller does meanwhile (a
Trio test, a relay in a subprocess, ``stag-relay sink``). Like STAG it answers
``POST <ingest_path>`` with a JSON batch and deduplicates on ``Idempotency-Key``.

Failures are programmed, and chosen in this order for each request:

0. a path other than ``ingest_path`` gets 404 and, with ``require_api_key``, a missing
   or wrong ``X-API-Key`` gets 401, as STAG answers a misconfigured relay (both can
   change while it runs: ``move_ingest_path``, a key rotated);
1. ``fail_next`` / ``drop_next`` / ``script``: one reply each, in order;
2. ``fail_for``: every request answered with a status until a moment passes;
3. ``reject_all``: every request answered with a status until ``reset``;
4. ``too_large_over``: 413 for a batch of more than N events;
5. otherwise 200 (400 for a body that is not a JSON batch).

``pause`` holds every request until ``resume``. Blocking waits (``wait_for_events``
...) use a condition variable; from Trio call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any

import attrs

# How long ``wait_for_*`` waits by default: far beyond anything a passing test needs,
# short enough that a failing one reports instead of hanging CI.
DEFAULT_WAIT = 30.0


@attrs.frozen
class Reply:
    """One programmed answer. ``close`` drops the connection without answering."""

    status: int = 200
    retry_after: str | None = None
    body: bytes | None = None
    delay: float = 0.0
    close: bool = False


@attrs.frozen
class ReceivedRequest:
    """A request as received, and what it was answered (``None``: connection dropped)."""

    method: str
    path: str
    # Header names lower-cased.
    headers: Mapping[str, str]
    body: bytes
    # The parsed body; ``None`` when it was not JSON.
    json: Any
    status: int | None

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")


class StagServer:
    """The stand-in. Use as a context manager, or ``start()`` / ``stop()``.

    After ``stop()`` it can ``start()`` again on the same port (STAG coming back);
    everything recorded is kept.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, ingest_path: str = "/ingest"):
        self.host = host
        self._port = port
        self.ingest_path = ingest_path
        self._cond = threading.Condition()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._script: deque[Reply] = deque()
        self._fail_until = 0.0
        self._fail_reply = Reply()
        self._api_key: str | None = None
        self._reject_reply: Reply | None = None
        self._max_events: int | None = None
        self._paused = False
        self._stopping = False
        self._requests: list[ReceivedRequest] = []
        self._batches: list[dict[str, Any]] = []
        self._accepted_keys: set[str] = set()
        self._event_count = 0
        self._duplicates = 0
        self._in_flight = 0
        self._max_in_flight = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> StagServer:
        if self._httpd is not None:
            raise RuntimeError("the STAG stand-in is already running")
        httpd = _HTTPServer((self.host, self._port), _Handler)
        httpd.stag = self
        self._port = httpd.server_address[1]
        with self._cond:
            self._stopping = False
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            # How long stop() may wait for the loop to notice; the default 0.5 s would
            # dominate a test suite that starts a stand-in per test.
            kwargs={"poll_interval": 0.02},
            name=f"stag-stand-in:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection; held requests are not answered."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            connections = list(self._connections)
        httpd.shutdown()
        httpd.server_close()
        thread.join()
        for conn in connections:
            # Wakes handler threads blocked reading a kept-alive connection.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd = self._thread = None

    def __enter__(self) -> StagServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL, as ``stag.url`` (without the ingest path)."""
        return f"http://{self.host}:{self._port}"

    # -- programming failures ------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, one each, after any already queued."""
        with self._cond:
            self._script.extend(replies)

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: str | None = None,
        body: bytes | None = None,
        delay: float = 0.0,
    ) -> None:
        self.script(*[Reply(status, retry_after, body, delay)] * times)

    def drop_next(self, *, times: int = 1, delay: float = 0.0) -> None:
        """Close the connection without answering the next ``times`` requests."""
        self.script(*[Reply(close=True, delay=delay)] * times)

    def fail_for(
        self,
        status: int,
        seconds: float,
        *,
        retry_after: str | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer ``status`` to every request for the next ``seconds`` (real time)."""
        with self._cond:
            self._fail_reply = Reply(status, retry_after, body)
            self._fail_until = time.monotonic() + seconds

    def move_ingest_path(self, path: str) -> None:
        """Take batches at ``path`` from now on; the old path gets 404 (STAG redeployed)."""
        with self._cond:
            self.ingest_path = path

    def require_api_key(self, key: str | None) -> None:
        """Answer 401 to a request without this ``X-API-Key`` (``None``: any is fine)."""
        with self._cond:
            self._api_key = key

    def reject_all(self, status: int, *, body: bytes | None = None) -> None:
        """Answer ``status`` to every request until ``reset()``."""
        with self._cond:
            self._reject_reply = Reply(status, body=body)

    def too_large_over(self, max_events: int | None) -> None:
        """Answer 413 to a batch of more than ``max_events`` events (``None``: no limit)."""
        with self._cond:
            self._max_events = max_events

    def pause(self) -> None:
        """Hold every request (counted in ``in_flight``) until ``resume()``."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def reset(self) -> None:
        """Forget every programmed failure and pause; keep what was recorded."""
        with self._cond:
            self._script.clear()
            self._fail_until = 0.0
            self._reject_reply = None
            self._max_events = None
            self._paused = False
            self._cond.notify_all()

    # -- observations ------------------------------------------------------------------

    def requests(self) -> list[ReceivedRequest]:
        """Every request received, retries and failures included, in order."""
        with self._cond:
            return list(self._requests)

    def batches(self) -> list[dict[str, Any]]:
        """Accepted batch bodies, once per ``Idempotency-Key``, in order."""
        with self._cond:
            return list(self._batches)

    def events(self) -> list[dict[str, Any]]:
        """The events of the accepted batches, in order."""
        with self._cond:
            return [e for b in self._batches for e in b["events"]]

    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.events()]

    @property
    def duplicates(self) -> int:
        """Accepted requests whose ``Idempotency-Key`` had already been accepted."""
        with self._cond:
            return self._duplicates

    @property
    def in_flight(self) -> int:
        """Requests being handled right now."""
        with self._cond:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests ever handled at once."""
        with self._cond:
            return self._max_in_flight

    def wait_for_events(self, n: int, timeout: float = DEFAULT_WAIT) -> list[dict[str, Any]]:
        """Block until at least ``n`` events were accepted; raise TimeoutError if not."""
        self._wait(lambda: self._event_count >= n, timeout, f"{n} events")
        return self.events()

    def wait_for_requests(self, n: int, timeout: float = DEFAULT_WAIT) -> list[ReceivedRequest]:
        """Block until at least ``n`` requests were answered (or dropped)."""
        self._wait(lambda: len(self._requests) >= n, timeout, f"{n} requests")
        return self.requests()

    def wait_for_in_flight(self, n: int, timeout: float = DEFAULT_WAIT) -> None:
        """Block until at least ``n`` requests are being handled at once."""
        self._wait(lambda: self._in_flight >= n, timeout, f"{n} requests in flight")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"STAG stand-in: no {what} within {timeout}s")

    # -- called from handler threads ---------------------------------------------------

    @contextlib.contextmanager
    def _handling(self) -> Iterator[None]:
        with self._cond:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _hold(self) -> bool:
        """Wait while paused; False when the server is stopping instead."""
        with self._cond:
            self._cond.wait_for(lambda: not self._paused or self._stopping)
            return not self._stopping

    def _choose(self, path: str, api_key: str | None, parsed: Any) -> Reply:
        with self._cond:
            if path.split("?", 1)[0] != self.ingest_path:
                return Reply(404, body=b'{"error":"not found"}')
            if self._api_key is not None and api_key != self._api_key:
                return Reply(401, body=b'{"error":"invalid or missing API key"}')
            if self._script:
                return self._script.popleft()
            if time.monotonic() < self._fail_until:
                return self._fail_reply
            if self._reject_reply is not None:
                return self._reject_reply
            if not _is_batch(parsed):
                return Reply(400, body=b'{"error":"body is not a JSON batch"}')
            if self._max_events is not None and len(parsed["events"]) > self._max_events:
                return Reply(413, body=b'{"error":"batch too large"}')
            return Reply(200)

    def _record(self, request: ReceivedRequest) -> None:
        # Before the answer goes out, so a client that saw 200 finds its batch recorded.
        with self._cond:
            self._requests.append(request)
            accepted = request.status is not None and 200 <= request.status < 300
            if accepted and _is_batch(request.json):
                key = request.idempotency_key or request.json["batch_id"]
                if key in self._accepted_keys:
                    self._duplicates += 1
                else:
                    self._accepted_keys.add(key)
                    self._batches.append(request.json)
                    self._event_count += len(request.json["events"])
            self._cond.notify_all()

    def _opened(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.add(conn)

    def _closed(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)


def _is_batch(parsed: Any) -> bool:
    return (
        isinstance(parsed, dict)
        and isinstance(parsed.get("batch_id"), str)
        and isinstance(parsed.get("events"), list)
    )


class _HTTPServer(http.server.ThreadingHTTPServer):
    stag: StagServer
    # Tests restart the stand-in on the port it had; TIME_WAIT must not prevent that.
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (it timed out, or the relay stopped) is part of the tests;
        # a traceback on stderr for it would only be noise. Anything else is a bug here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms a response).
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.stag._opened(self.connection)

    def finish(self) -> None:
        self.server.stag._closed(self.connection)
        super().finish()

    def do_POST(self) -> None:
        stag = self.server.stag
        with stag._handling():
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(411, b'{"error":"Content-Length required"}')
                return
            body = self.rfile.read(int(length))
            if not stag._hold():
                self.close_connection = True
                return
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = None
            reply = stag._choose(self.path, self.headers.get("X-API-Key"), parsed)
            if reply.delay:
                time.sleep(reply.delay)
            headers = {k.lower(): v for k, v in self.headers.items()}
            stag._record(
                ReceivedRequest(
                    "POST",
                    self.path,
                    headers,
                    body,
                    parsed,
                    None if reply.close else reply.status,
                )
            )
            if reply.close:
                self.close_connection = True
                return
            if reply.body is not None:
                answer = reply.body
            elif 200 <= reply.status < 300 and _is_batch(parsed):
                answer = json.dumps({"status": "ok", "accepted": len(parsed["events"])}).encode()
            elif 200 <= reply.status < 300:
                answer = b'{"status":"ok"}'
            else:
                answer = json.dumps({"error": f"programmed failure {reply.status}"}).encode()
            self._answer(reply.status, answer, retry_after=reply.retry_after)

    def do_GET(self) -> None:
        self._answer(405, b'{"error":"use POST"}', allow="POST")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def _answer(
        self, status: int, body: bytes, *, retry_after: str | None = None, allow: str | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request on stderr would bury test output.
        pass
