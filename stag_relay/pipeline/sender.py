"""The STAG client: delivers batches over HTTP, retrying until each is delivered or rejected.

One :class:`~stag_relay.pipeline.httpclient.IngestClient` for the whole run (a kept-alive
connection per slot), and at most ``stag.max_in_flight`` batches in flight. A batch
is only taken from the channel when a slot is free, so while STAG is slow or down the
batcher waits, the event channel fills and the connection tasks stop reading their
sockets: backpressure instead of loss. STAG being down is normal and only logged when
the state changes. STAG saying the relay's URL or credentials are wrong (404, 405, 401,
403, 407) is handled the same way, but logged as an error, once per episode, with the
likely fix: the batches wait until someone fixes the configuration.

With ``stag.format: spatial-event`` a batch goes as one request per session
(:mod:`stag_relay.protocol.ingest`), sent in turn within the batch's slot, each with
its own retries and answer classes. The batch is delivered when every request is; a
request refused (a 4xx about it, or a 200 whose body contradicts it) counts its own
events as rejected and, once the batch's other requests have ended, makes the whole
batch a refusal (a dead letter with a spool, never acknowledged). Events delivered
plus events rejected is always the batch's size.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from stag_relay.pipeline.httpclient import IngestClient, TransportError, ignored_proxy
from stag_relay.protocol.events import WireBatch
from stag_relay.protocol.exchange import StagAnswer
from stag_relay.protocol.ingest import IngestRequest, requests_for
from stag_relay.protocol.retry import (
    MISCONFIGURED_STATUSES,
    Decision,
    RetryPolicy,
    Verdict,
    misconfiguration_hint,
)
from stag_relay.protocol.spatial_event import Contradicted, SpatialEventError
from stag_relay.service.config import StagConfig, format_ingest_path, redact_url
from stag_relay.service.metrics import RelayMetrics

logger = structlog.get_logger("stag_relay.stag")

# Enough of STAG's answer to see why it refused a batch, without logging a whole page.
_ANSWER_PREVIEW = 200
# relay_stag_requests_total{outcome} for a request STAG answered.
_OUTCOMES: Final = {
    Verdict.DELIVERED: "success",
    Verdict.RETRY: "retry",
    Verdict.MISCONFIGURED: "misconfigured",
    Verdict.REJECT: "rejected",
    Verdict.SPLIT: "too_large",
}


def _ignore_delivered() -> None:
    pass


def _ignore_rejected(status: int, answer: str) -> None:
    pass


@attrs.define(eq=False)
class Shipment:
    """A batch handed to the sender, and whom to tell how its delivery ended.

    ``on_rejected`` gets STAG's status and the start of its answer; for a batch split
    on 413 or sent as several requests it is called once, for the first request STAG
    refused, after every request ended. Status 0: the batch could not be expressed in
    ``stag.format`` and was not sent.
    """

    wire: WireBatch
    on_delivered: Callable[[], None] = _ignore_delivered
    on_rejected: Callable[[int, str], None] = _ignore_rejected
    # Set by the slot that took it, which counts its events from then on
    # (held_events); until then whoever handed it over counts them.
    taken: bool = attrs.field(default=False, init=False)


class StagSender:
    """Delivers batches from a channel to ``POST {stag.url}{stag.ingest_path}``."""

    def __init__(
        self,
        config: StagConfig,
        metrics: RelayMetrics,
        *,
        relay_id: str,
        version: str,
        tls: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``tls`` verifies an https:// STAG; ``None``: ``httpclient.default_tls()``."""
        if config.max_in_flight < 1:
            raise ValueError(f"stag.max_in_flight must be >= 1, got {config.max_in_flight}")
        self._config = config
        self._metrics = metrics
        self._relay_id = relay_id
        self._tls = tls
        self._url = config.url.rstrip("/") + (
            config.ingest_path or format_ingest_path(config.format)
        )
        # spatial-event: a batch goes as one request per session, each a SpatialEvent.
        self._per_session = config.format == "spatial-event"
        self._rejection = (
            "STAG rejected a spatial event" if self._per_session else "STAG rejected a batch"
        )
        # For logs: credentials in the URL's userinfo must not reach them.
        self._url_for_logs = redact_url(self._url)
        self._headers = [
            ("content-type", "application/json"),
            ("user-agent", f"stag-relay/{version}"),
        ]
        if config.api_key:
            self._headers.append(("x-api-key", config.api_key))
        self._policy = RetryPolicy(
            initial=config.retry_initial,
            maximum=config.retry_max,
            rng=rng if rng is not None else random.Random(),
        )
        self._held = 0
        self._reachable: bool | None = None
        # While STAG says the configuration is wrong: since when (wall clock, for the
        # log; trio's clock, to order answers), and the statuses already logged in this
        # episode (another one has another fix). When the last episode ended (trio).
        self._misconfigured_since: float | None = None
        self._misconfigured_at = 0.0
        self._misconfigured_logged: set[int] = set()
        self._configured_at = -math.inf
        self._last_status: int | None = None
        self._last_success: float | None = None
        self._last_failure: float | None = None
        self._consecutive_failures = 0
        self._events_sent = 0
        self._batches_sent = 0

    def held_events(self) -> int:
        """Events in batches taken from the channel but not yet delivered or rejected."""
        return self._held

    def state(self) -> str:
        """``unknown`` before the first attempt, then ``reachable``, ``unreachable`` or
        ``misconfigured`` (STAG answers that the URL or the credentials are wrong)."""
        if self._misconfigured_since is not None:
            return "misconfigured"
        if self._reachable is None:
            return "unknown"
        return "reachable" if self._reachable else "unreachable"

    def status(self) -> dict[str, object]:
        """A snapshot for ``/status``. ``reachable`` is ``None`` before the first attempt;
        ``last_status`` is the last HTTP status STAG answered (``None``: none yet)."""
        return {
            "state": self.state(),
            "last_status": self._last_status,
            "reachable": self._reachable,
            "last_success": self._last_success,
            "last_failure": self._last_failure,
            "consecutive_failures": self._consecutive_failures,
            "events_sent": self._events_sent,
            "batches_sent": self._batches_sent,
        }

    async def run(self, batches: trio.MemoryReceiveChannel[Shipment]) -> None:
        """Deliver every batch from ``batches``; return once it is closed and drained."""
        proxy = ignored_proxy(self._url)
        if proxy is not None:
            logger.warning(
                "proxy variable ignored: the relay connects to STAG directly",
                variable=proxy,
                url=self._url_for_logs,
            )
        # A request per slot at most, so the client keeps a connection per slot.
        async with IngestClient(
            self._url, headers=self._headers, timeout=self._config.timeout, tls=self._tls
        ) as client:
            with batches:
                async with trio.open_nursery() as nursery:
                    for _ in range(self._config.max_in_flight):
                        nursery.start_soon(self._slot, client, batches)

    async def _slot(
        self, client: IngestClient, shipments: trio.MemoryReceiveChannel[Shipment]
    ) -> None:
        """One of ``stag.max_in_flight`` slots: takes a batch only when it is free.

        While every slot is busy the batch stays with the batcher, which is what makes
        backpressure flow back. A slot that waits is handed the next batch directly,
        with no task between the batcher and the request.
        """
        async for shipment in shipments:
            self._held += shipment.wire.count
            shipment.taken = True
            refusal = await self._deliver(client, shipment.wire)
            if refusal is None:
                shipment.on_delivered()
            else:
                shipment.on_rejected(*refusal)

    async def _deliver(self, client: IngestClient, batch: WireBatch) -> tuple[int, str] | None:
        """Send ``batch`` as the requests its format makes of it, until STAG has taken
        or refused each.

        Returns ``None`` when STAG took all of it, else its first refusal (a status of
        0: the relay could not express the batch in this format, nothing was sent).
        """
        try:
            requests = requests_for(self._config.format, batch)
        except SpatialEventError as exc:
            return self._unsendable(batch, exc)
        # In turn, within this batch's slot: stag.max_in_flight stays the number of
        # requests STAG has at once (and of connections the client keeps), whatever the
        # number of sessions in a batch. A refusal of one request does not stop the
        # others: each session's events are counted delivered or rejected on their own.
        refusals = [await self._send(client, request) for request in requests]
        refusal = next((r for r in refusals if r is not None), None)
        if refusal is None and self._per_session:
            self._batch_delivered(batch.count)
        return refusal

    async def _send(self, client: IngestClient, request: IngestRequest) -> tuple[int, str] | None:
        """Send ``request`` until STAG takes or refuses it; retries send the same key.

        Returns ``None`` when STAG took all of it, else its first refusal.
        """
        attempt = 0
        while True:
            decision, answer, contradiction = await self._attempt(client, request, attempt)
            if decision.verdict is Verdict.DELIVERED:
                self._delivered(request)
                return None
            if decision.verdict is Verdict.SPLIT:
                if request.count < 2:
                    assert answer is not None
                    return self._rejected(request, answer, "event too large for STAG")
                # In turn within this slot, so a split never exceeds max_in_flight.
                refusals = [await self._send(client, half) for half in request.split()]
                return next((r for r in refusals if r is not None), None)
            if decision.verdict is Verdict.REJECT:
                assert answer is not None
                if contradiction is not None:
                    return self._rejected(
                        request,
                        answer,
                        "STAG answered 200 but contradicts the request",
                        reason=contradiction,
                    )
                return self._rejected(request, answer, self._rejection)
            # RETRY or MISCONFIGURED: the request stays here, and with it its slot.
            attempt += 1
            await trio.sleep(decision.delay)

    async def _attempt(
        self, client: IngestClient, request: IngestRequest, attempt: int
    ) -> tuple[Decision, StagAnswer | None, str | None]:
        """One request; its decision, with the answer when there was one, and why a 2xx
        was not a delivery (then the decision is REJECT)."""
        body = request.body(self._relay_id, int(time.time() * 1000))
        started = trio.current_time()
        try:
            answer = await client.post(body, headers=(("idempotency-key", request.key),))
        except TransportError as exc:
            # Refused, reset, timed out, or not HTTP: the Idempotency-Key makes sending
            # again safe even if STAG did take it.
            self._metrics.stag_request_duration.observe(trio.current_time() - started)
            self._metrics.stag_requests.labels("error").inc()
            self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return self._policy.after_error(attempt=attempt), None, None
        self._metrics.stag_request_duration.observe(trio.current_time() - started)
        decision = self._policy.after_status(
            answer.status, attempt=attempt, retry_after=answer.retry_after, now=time.time()
        )
        contradiction = None
        if decision.verdict is Verdict.DELIVERED:
            judged = request.judge(answer.body)
            if isinstance(judged, Contradicted):
                contradiction = judged.reason
                decision = Decision(Verdict.REJECT)
        self._metrics.stag_requests.labels(_OUTCOMES[decision.verdict]).inc()
        if decision.verdict is Verdict.RETRY:
            self._last_status = answer.status
            self._failed(f"HTTP {answer.status}")
        elif decision.verdict is Verdict.MISCONFIGURED:
            self._misconfigured(answer, started)
        else:
            # STAG answered for this request (even a refusal): it is up, and the URL and
            # credentials are right.
            self._answered(answer.status, started)
        return decision, answer, contradiction

    def _delivered(self, request: IngestRequest) -> None:
        size = request.count
        self._metrics.events_sent.inc(size)
        self._events_sent += size
        self._last_success = time.time()
        self._held -= size
        if not self._per_session:
            # A batch, or a half of one STAG asked to split.
            self._batch_delivered(size)

    def _batch_delivered(self, size: int) -> None:
        self._metrics.batches_sent.inc()
        self._metrics.batch_size.observe(size)
        self._batches_sent += 1

    def _rejected(
        self,
        request: IngestRequest,
        answer: StagAnswer,
        message: str,
        *,
        reason: str | None = None,
    ) -> tuple[int, str]:
        size = request.count
        self._metrics.events_dropped.labels("rejected").inc(size)
        self._held -= size
        preview = answer.text()[:_ANSWER_PREVIEW]
        fields: dict[str, object] = {"reason": reason} if reason is not None else {}
        logger.warning(
            message,
            status=answer.status,
            **request.log_fields(),
            events=size,
            answer=preview,
            **fields,
        )
        return answer.status, preview

    def _unsendable(self, batch: WireBatch, exc: SpatialEventError) -> tuple[int, str]:
        """A batch the configured format cannot express: rejected without a request."""
        size = batch.count
        self._metrics.events_dropped.labels("rejected").inc(size)
        self._held -= size
        logger.error(
            "a batch the spatial-event format cannot carry: rejected, not sent",
            batch_id=batch.batch_id,
            events=size,
            reason=str(exc),
            fix=(
                "it was spooled while stag.format was batch (mesh deltas): deliver it to a"
                " STAG that takes the batch format (stag.format: batch), or leave it as a"
                " dead letter"
            ),
        )
        return 0, f"not sent: {exc}"[:_ANSWER_PREVIEW]

    def _answered(self, status: int, sent: float) -> None:
        if self._misconfigured_since is not None and sent < self._misconfigured_at:
            # Sent before the first refusal, answered after it: says nothing about
            # whether the configuration has been fixed since (nor, in /status, is it
            # the answer that counts).
            return
        self._last_status = status
        if self._misconfigured_since is not None:
            # One line for the end of the episode; it also says STAG is reachable.
            logger.info(
                "STAG accepts the relay's requests again: configuration error cleared",
                url=self._url_for_logs,
                status=status,
                misconfigured_seconds=round(time.time() - self._misconfigured_since, 3),
                after_failures=self._consecutive_failures,
            )
            self._misconfigured_since = None
            self._misconfigured_logged.clear()
            self._configured_at = trio.current_time()
            self._show_misconfigured(None)
        elif self._reachable is not True:
            logger.info(
                "STAG reachable",
                url=self._url_for_logs,
                after_failures=self._consecutive_failures,
            )
        self._reachable = True
        self._consecutive_failures = 0

    def _failed(self, reason: str) -> None:
        self._consecutive_failures += 1
        self._last_failure = time.time()
        if self._reachable is not False:
            logger.warning(
                "STAG unreachable, retrying until it answers",
                url=self._url_for_logs,
                reason=reason,
            )
        self._reachable = False

    def _misconfigured(self, answer: StagAnswer, sent: float) -> None:
        """STAG answered that the URL or the credentials are wrong: retried like an
        outage, but someone must act, so it is an error, logged once per episode (and
        once more for each other such status in it, as its fix differs).

        Only an answer that shows the URL and credentials work (2xx, 413, a 4xx about the
        batch) ends the episode; errors and 5xx meanwhile say nothing about them. Batches
        are in flight side by side, so answers to requests sent before the episode's
        start or end do not flip it back and forth."""
        status = answer.status
        self._consecutive_failures += 1
        self._last_failure = time.time()
        if self._misconfigured_since is None and sent < self._configured_at:
            return
        self._last_status = status
        if self._misconfigured_since is None:
            self._misconfigured_since = self._last_failure
            self._misconfigured_at = trio.current_time()
        self._reachable = False
        self._show_misconfigured(status)
        if status not in self._misconfigured_logged:
            self._misconfigured_logged.add(status)
            where = {} if answer.location is None else {"location": answer.location}
            logger.error(
                "STAG answers that the relay's configuration is wrong;"
                " holding batches and retrying until it is fixed",
                url=self._url_for_logs,
                status=status,
                answer=answer.text()[:_ANSWER_PREVIEW],
                fix=misconfiguration_hint(status),
                **where,
            )

    def _show_misconfigured(self, status: int | None) -> None:
        for code in MISCONFIGURED_STATUSES:
            self._metrics.stag_misconfigured.labels(str(code)).set(1 if code == status else 0)
