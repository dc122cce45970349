"""What to do after each attempt to deliver a batch to STAG: the retry policy.

Pure: no I/O, no trio. The sender reports what happened (an HTTP status and its
``Retry-After``, or a transport error) and gets back a verdict and, for a retry,
how long to wait. Losing events is worse than retrying too long, so anything that
might be transient is retried, and so is anything that says the configuration (a
URL, a key) is wrong, since the batch goes through once that is fixed; only answers
that say the batch itself is wrong are final.
"""

from __future__ import annotations

import email.utils
import enum
import math
import random
import re
from collections.abc import Mapping
from datetime import UTC
from typing import Final

import attrs


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    # Retried like RETRY, but the answer says the relay's configuration (or STAG's) is
    # wrong, not that STAG is down: someone has to fix it, so it is reported as such.
    MISCONFIGURED = "misconfigured"
    REJECT = "reject"
    SPLIT = "split"


# Transient statuses: STAG (or a proxy before it) is overloaded,
# restarting, or timed out, and the same request may succeed later.
RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
# Answers that blame the request's address or credentials, not the batch: the same batch
# goes through once stag.url / stag.ingest_path / stag.api_key (or STAG behind its proxy,
# mid-redeploy) is right again, so it is kept and retried, never dropped. With the fix to
# suggest for each.
MISCONFIGURED_STATUSES: Final[Mapping[int, str]] = {
    404: (
        "nothing takes batches at this URL: check stag.url and stag.ingest_path"
        " (or STAG is being redeployed behind its proxy)"
    ),
    405: "this URL does not take POST: check stag.url and stag.ingest_path",
    401: (
        "STAG did not accept the relay's credentials: check stag.api_key"
        " (sent as X-API-Key) and any user:password in stag.url"
    ),
    403: (
        "STAG refused the relay's credentials for this path: check stag.api_key"
        " and that it may post to stag.ingest_path"
    ),
    407: (
        "a proxy between the relay and STAG wants credentials, and the relay sends"
        " none to proxies: point stag.url at STAG, or let the proxy admit the relay"
    ),
    # A redirect (http:// to https://, a moved host or path) is not followed with a POST
    # body: where it points is what stag.url should say. Every 3xx, 300-308, is one.
    **dict.fromkeys(
        range(300, 309),
        "STAG's URL redirects (see location), and the relay does not follow redirects"
        " with a batch: set stag.url and stag.ingest_path to where it points",
    ),
}
# Only these carry a Retry-After worth obeying for us (RFC 9110 §10.2.3 also allows it on
# 3xx, which says where to go, not when).
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
# A Retry-After longer than this is treated as this long. A far-future HTTP date (a skewed
# clock, a bug) must not park a batch for hours while the relay looks healthy; retrying a
# minute later costs STAG one request per in-flight batch and it can ask again.
MAX_RETRY_AFTER: Final = 60.0
# 2**attempt overflows a float past ~1024; the cap is reached long before 2**64 anyway.
_MAX_EXPONENT: Final = 64
# RFC 9110 delay-seconds is 1*DIGIT; a sign or a fraction is tolerated because the
# meaning is unambiguous and rejecting it would make us ignore the server's wish.
_DELAY_SECONDS: Final = re.compile(r"[+-]?\d+(?:\.\d+)?")


def classify_status(status: int) -> Verdict:
    """The verdict for a batch STAG answered with ``status``."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 413:
        return Verdict.SPLIT
    if status in RETRY_STATUSES:
        return Verdict.RETRY
    if status in MISCONFIGURED_STATUSES:
        return Verdict.MISCONFIGURED
    if 500 <= status < 600:
        # 501, 505, 507, ...: the server's fault, not the batch's. It may be fixed by a
        # deploy; dropping the events would be silent loss, retrying shows up in
        # /status and the metrics while the channel fills.
        return Verdict.RETRY
    # Other 4xx (400, 422, ...): they judge the batch, which will stay wrong. 1xx never
    # reaches us, and anything outside 100..599 is not HTTP.
    return Verdict.REJECT


def misconfiguration_hint(status: int) -> str | None:
    """The likely fix for a status that says the configuration is wrong; else ``None``."""
    return MISCONFIGURED_STATUSES.get(status)


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Exponential with full jitter: uniform in ``[0, min(maximum, initial * 2**attempt)]``,
    so relays that failed together do not retry together.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    ceiling = min(maximum, initial * 2.0 ** min(attempt, _MAX_EXPONENT))
    return rng.uniform(0.0, max(ceiling, 0.0))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, relative to unix time ``now``.

    Accepts delay-seconds or an HTTP date. ``None`` for a missing or unreadable value;
    a negative delay or a past date gives 0; at most ``MAX_RETRY_AFTER``.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        delay = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                # "-0000" means UTC with unknown local zone (RFC 5322); HTTP dates are GMT.
                when = when.replace(tzinfo=UTC)
            delay = when.timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(delay):
        return None
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


@attrs.frozen
class Decision:
    """What to do next with a batch: ``delay`` seconds of waiting, used only for RETRY."""

    verdict: Verdict
    delay: float = 0.0


@attrs.frozen
class RetryPolicy:
    """Backoff and ``Retry-After`` combined into one decision per attempt.

    ``attempt`` counts the failed attempts of one batch before this one (0 after the
    first failure). Answers that say the configuration is wrong are retried with the
    same backoff as an outage. A ``Retry-After`` on 429/503 is a floor: we wait at least that long
    (up to ``MAX_RETRY_AFTER``), even when it exceeds ``maximum``, because the server
    asked; our own backoff stays within ``maximum``.
    """

    initial: float
    maximum: float
    rng: random.Random = attrs.field(factory=random.Random, eq=False)

    def after_status(
        self, status: int, *, attempt: int, retry_after: str | None, now: float
    ) -> Decision:
        verdict = classify_status(status)
        if verdict is not Verdict.RETRY and verdict is not Verdict.MISCONFIGURED:
            return Decision(verdict)
        delay = self._backoff(attempt)
        if status in RETRY_AFTER_STATUSES:
            asked = parse_retry_after(retry_after, now=now)
            if asked is not None:
                delay = max(delay, asked)
        return Decision(verdict, delay)

    def after_error(self, *, attempt: int) -> Decision:
        """After a connection error or timeout: always retry."""
        return Decision(Verdict.RETRY, self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, initial=self.initial, maximum=self.maximum, rng=self.rng)
