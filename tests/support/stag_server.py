"""The STAG stand-in for tests that run it beside their own code: the sink in a thread.

``stag-relay sink`` (stag_relay.tools.sink) is the one STAG stand-in; this runs its
server in a daemon thread with its own ``trio.run``, on 127.0.0.1 and an ephemeral
port, so it serves whatever the caller does meanwhile (a Trio test, a relay in a
subprocess). What it answers, and in which order the programmed failures apply, is
the sink's :class:`~stag_relay.tools.sink.Ledger`'s; this adds the calls tests
program it with and blocking waits for what it recorded.

Blocking waits (``wait_for_events`` ...) use a condition variable; from Trio call
them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import trio

from stag_relay.tools.sink import Exchange, Ledger, Reply, Sink, SinkSettings, WireFormat

__all__ = ["DEFAULT_WAIT", "ReceivedRequest", "Reply", "StagServer"]

# How long ``wait_for_*`` waits by default: far beyond anything a passing test needs,
# short enough that a failing one reports instead of hanging CI.
DEFAULT_WAIT = 30.0

# A request as received, and what it was answered (``status`` ``None``: dropped).
ReceivedRequest = Exchange


class StagServer:
    """The stand-in. Use as a context manager, or ``start()`` / ``stop()``.

    After ``stop()`` it can ``start()`` again on the same port (STAG coming back);
    everything recorded is kept.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ingest_path: str = "/ingest",
        wire_format: WireFormat | None = None,
    ):
        """``wire_format``: how it reads bodies (the sink's; unset, the batch format)."""
        self.host = host
        self._cond = threading.Condition()
        self._ledger = Ledger(ingest_path=ingest_path, wire_format=wire_format, keep=True)
        self._sink = Sink(
            SinkSettings(host=host, port=port),
            ledger=self._ledger,
            guard=self._cond,
            on_change=self._cond.notify_all,
        )
        self._port = port
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._failed: list[BaseException] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> StagServer:
        if self._thread is not None:
            raise RuntimeError("the STAG stand-in is already running")
        # A restart binds the port it had.
        self._sink.settings = SinkSettings(host=self.host, port=self._port)
        ready = threading.Event()
        failed = self._failed = []

        def serve() -> None:
            try:
                trio.run(self._serve, ready)
            except BaseException as exc:  # reported by start() or stop(), in the test's thread
                failed.append(exc)
            finally:
                ready.set()

        self._thread = threading.Thread(target=serve, name="stag-stand-in", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            self._thread = None
            raise failed[0]
        assert self._sink.port is not None
        self._port = self._sink.port
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            await nursery.start(self._sink.run)
            ready.set()

    def stop(self) -> None:
        """Stop listening and drop every open connection; held requests are not answered."""
        thread, token, cancel = self._thread, self._token, self._cancel
        if thread is None or token is None or cancel is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(cancel.cancel)
        thread.join()
        self._thread = self._token = self._cancel = None
        if self._failed:
            # The server died under the test: that is the test's failure, not silence.
            raise self._failed[0]

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

    @property
    def ingest_path(self) -> str:
        with self._cond:
            return self._ledger.ingest_path

    # -- programming failures ------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, one each, after any already queued."""
        with self._cond:
            self._ledger.programme.script.extend(replies)

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

    def hold_next(self) -> None:
        """Hold the next request, and every one after it, until ``resume()``: where a
        test must look at the relay between two answers (after the programmed ones
        already queued)."""
        self.script(Reply(hold=True))

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
            self._ledger.fail_for(Reply(status, retry_after, body), seconds)

    def move_ingest_path(self, path: str) -> None:
        """Take batches at ``path`` from now on; the old path gets 404 (STAG redeployed)."""
        with self._cond:
            self._ledger.ingest_path = path

    def require_api_key(self, key: str | None) -> None:
        """Answer 401 to a request without this ``X-API-Key`` (``None``: any is fine)."""
        with self._cond:
            self._ledger.api_key = key

    def reject_all(self, status: int, *, body: bytes | None = None) -> None:
        """Answer ``status`` to every request until ``reset()``."""
        with self._cond:
            self._ledger.programme.reject = Reply(status, body=body)

    def too_large_over(self, max_events: int | None) -> None:
        """Answer 413 to a batch of more than ``max_events`` events (``None``: no limit)."""
        with self._cond:
            self._ledger.programme.max_events = max_events

    def pause(self) -> None:
        """Hold every request (counted in ``in_flight``) until ``resume()``."""
        with self._cond:
            self._ledger.programme.paused = True

    def resume(self) -> None:
        """Answer the held requests, and hold no more (a ``hold_next`` not reached yet
        included)."""
        with self._cond:
            self._ledger.programme.resume()
        self._poke()

    def reset(self) -> None:
        """Forget every programmed failure and pause; keep what was recorded."""
        with self._cond:
            self._ledger.programme.reset()
        self._poke()

    def _poke(self) -> None:
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._sink.poke)

    # -- observations ------------------------------------------------------------------

    def requests(self) -> list[ReceivedRequest]:
        """Every request received, retries and failures included, in order."""
        with self._cond:
            return list(self._ledger.exchanges)

    def batches(self) -> list[dict[str, Any]]:
        """Accepted batch bodies, once per ``Idempotency-Key``, in order."""
        with self._cond:
            return list(self._ledger.accepted)

    def events(self) -> list[dict[str, Any]]:
        """The events of the accepted batches, in order."""
        with self._cond:
            return list(self._ledger.accepted_events)

    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.events()]

    @property
    def duplicates(self) -> int:
        """Accepted requests whose ``Idempotency-Key`` had already been accepted."""
        with self._cond:
            return self._ledger.duplicate_batches

    @property
    def in_flight(self) -> int:
        """Requests being handled right now."""
        with self._cond:
            return self._sink.in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests ever handled at once."""
        with self._cond:
            return self._sink.max_in_flight

    def wait_for_events(self, n: int, timeout: float = DEFAULT_WAIT) -> list[dict[str, Any]]:
        """Block until at least ``n`` events were accepted; raise TimeoutError if not."""
        self._wait(lambda: self._ledger.events >= n, timeout, f"{n} events")
        return self.events()

    def wait_for_requests(self, n: int, timeout: float = DEFAULT_WAIT) -> list[ReceivedRequest]:
        """Block until at least ``n`` requests were answered (or dropped)."""
        self._wait(lambda: len(self._ledger.exchanges) >= n, timeout, f"{n} requests")
        return self.requests()

    def wait_for_in_flight(self, n: int, timeout: float = DEFAULT_WAIT) -> None:
        """Block until at least ``n`` requests are being handled at once."""
        self._wait(lambda: self._sink.in_flight >= n, timeout, f"{n} requests in flight")

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError(f"STAG stand-in: no {what} within {timeout}s")
