"""Access control for the front door: the keys in force, re-read on SIGHUP, and the
answers for requests that may not pass.

The policy itself (constant-time key check, origins) is pure, in auth.py; this
module reads the keys file, holds the current keys (swapped whole, so a reload
never leaves a half-read set in force), logs, and counts refusals. It never logs
a key, nor the name of a header that carried one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import structlog

from stag_relay.pipeline.front import Endpoint
from stag_relay.protocol.auth import (
    ApiKeys,
    KeyFormatError,
    OriginPolicy,
    Refusal,
    check_endpoint,
    check_upgrade,
    parse_keys_file,
)
from stag_relay.protocol.http import HttpRequest, HttpResponse, error_response
from stag_relay.service.config import AuthConfig
from stag_relay.service.metrics import RelayMetrics

log = structlog.get_logger("stag_relay.access")


class KeysUnavailable(Exception):
    """The keys file cannot be read or holds a bad line; the message says which, not the key."""


def read_api_keys(auth: AuthConfig) -> ApiKeys:
    """The keys from ``auth.api_keys`` and ``auth.api_keys_file`` together.

    Keys are required as soon as either source is configured, even if the file
    holds none: an empty or truncated keys file must not open the relay.
    """
    keys = list(auth.api_keys)
    if auth.api_keys_file:
        path = auth.api_keys_file
        try:
            keys.extend(parse_keys_file(Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise KeysUnavailable(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeysUnavailable(f"{path} is not UTF-8 text") from None
        except KeyFormatError as exc:
            raise KeysUnavailable(f"{path} {exc}") from None
    return ApiKeys.of(keys, required=bool(auth.api_keys) or bool(auth.api_keys_file))


def refusal_response(refusal: Refusal) -> HttpResponse:
    return error_response(refusal.status, refusal.message, refusal.headers)


class AccessControl:
    """Who may open the WebSocket and read the protected endpoints, right now."""

    def __init__(
        self, auth: AuthConfig, allowed_origins: Sequence[str], metrics: RelayMetrics
    ) -> None:
        self.auth = auth
        self.metrics = metrics
        self.keys = read_api_keys(auth)
        self.origins = OriginPolicy.of(allowed_origins)

    def announce(self) -> None:
        """At start: say, once, whether the relay is open to anyone."""
        if not self.keys.required:
            log.warning(
                "no API keys configured: any client may connect",
                fix="set auth.api_keys or auth.api_keys_file",
            )
        elif not self.keys:
            log.warning("the API keys file holds no key: every client is refused")
        else:
            log.info("API keys required", keys=len(self.keys))

    def reload(self) -> str | None:
        """SIGHUP: re-read the keys file (None: there is none). Open connections are
        not touched; a file that cannot be read leaves the keys in force as they were."""
        if not self.auth.api_keys_file:
            return None
        try:
            keys = read_api_keys(self.auth)
        except KeysUnavailable as exc:
            log.error("API keys not reloaded, keeping the keys in force", problem=str(exc))
            return "API keys not reloaded: keys file unreadable, see the log"
        self.keys = keys
        log.info("API keys reloaded", keys=len(keys))
        if not keys:
            log.warning("the API keys file holds no key: every client is refused")
        return f"API keys reloaded: {len(keys)}"

    def admit(self, request: HttpRequest) -> HttpResponse | None:
        """The answer refusing this WebSocket upgrade, or None to let it pass."""
        refusal = check_upgrade(request.headers, self.keys, self.origins)
        if refusal is None:
            return None
        self.metrics.connections_refused.labels(refusal.reason).inc()
        log.debug("upgrade refused", peer=request.peer, status=refusal.status)
        return refusal_response(refusal)

    def protect(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the keys when auth.protect_endpoints is set."""
        if not self.auth.protect_endpoints:
            return endpoint

        def protected(request: HttpRequest) -> HttpResponse:
            refusal = check_endpoint(request.headers, self.keys)
            if refusal is not None:
                return refusal_response(refusal)
            return endpoint(request)

        return protected
