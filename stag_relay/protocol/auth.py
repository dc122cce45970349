"""Who may connect: API keys and browser origins, as plain policy.

Pure: no I/O, no trio. ``pipeline/access.py`` reads the keys (configuration, keys file) and
asks this module whether a request head may pass; the front door turns a
:class:`Refusal` into an HTTP answer before any WebSocket byte is sent.

Keys are compared in constant time: each configured key is stored as its
SHA-256 digest, the presented key is hashed once, and every digest is compared
with ``hmac.compare_digest`` without stopping at a match, so neither the length
of a key nor which key matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import urlsplit

import attrs

# A key travels in an HTTP header and, for Bearer, as an RFC 6750 token: printable
# ASCII without spaces keeps it intact through every proxy and SDK.
_KEY_RE: Final = re.compile(r"[\x21-\x7e]+")
# A header carrying more than this is not a key; it is not hashed, only refused.
MAX_KEY_CHARS: Final = 1024
# RFC 9110: the auth scheme is case-insensitive; one or more spaces follow it.
_BEARER_RE: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)\s*")
# What a browser sends for an opaque origin (sandboxed iframe, file://).
NULL_ORIGIN: Final = "null"
_DEFAULT_PORTS: Final = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class KeyFormatError(ValueError):
    """A configured key or a line of the keys file is unusable; the message never shows it."""


def check_key(key: str, where: str) -> str:
    """``key`` if it can be sent in a header; else KeyFormatError naming ``where``, not the key."""
    if not key:
        raise KeyFormatError(f"{where}: empty key")
    if len(key) > MAX_KEY_CHARS:
        raise KeyFormatError(f"{where}: key longer than {MAX_KEY_CHARS} characters")
    if "," in key:
        raise KeyFormatError(f"{where}: a key may not contain a comma (the list separator)")
    if not _KEY_RE.fullmatch(key):
        raise KeyFormatError(f"{where}: a key may hold only printable ASCII without spaces")
    return key


def parse_keys_file(text: str) -> tuple[str, ...]:
    """The keys in a keys file: one per line; blank lines and lines starting with # skipped.

    Surrounding whitespace is stripped. A ``#`` later in a line is part of the key
    (keys are opaque). Raises KeyFormatError naming the line of a bad key.
    """
    keys: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keys.append(check_key(stripped, f"line {number}"))
    return tuple(keys)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("ascii", "surrogateescape")).digest()


@attrs.frozen
class ApiKeys:
    """The keys that open the WebSocket (and, when protected, /status and /metrics).

    ``required`` is False only when no key source is configured at all: then the
    relay is open. A configured but empty keys file keeps it closed to everyone.
    """

    digests: tuple[bytes, ...] = ()
    required: bool = False

    @classmethod
    def of(cls, keys: Iterable[str], *, required: bool | None = None) -> ApiKeys:
        digests = tuple(_digest(key) for key in dict.fromkeys(keys))
        return cls(digests, bool(digests) if required is None else required)

    def __len__(self) -> int:
        return len(self.digests)

    def accepts(self, presented: Sequence[str]) -> bool:
        """True if any presented key is one of ours (always True when keys are not required)."""
        if not self.required:
            return True
        matched = False
        for candidate in presented:
            if len(candidate) > MAX_KEY_CHARS:
                continue
            digest = _digest(candidate)
            for known in self.digests:
                # `|` rather than `or`: every comparison runs, match or not.
                matched = hmac.compare_digest(digest, known) | matched
        return matched


def presented_keys(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Every key a request head offers: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.

    ``headers`` are (lower-cased name, value) pairs.
    """
    keys: list[str] = []
    for name, value in headers:
        if name == "x-api-key":
            keys.append(value.strip())
        elif name == "authorization":
            match = _BEARER_RE.fullmatch(value.strip())
            if match is not None:
                keys.append(match.group(1))
    return keys


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in canonical form (lower case, no default port), or None.

    ``null`` stays ``null``. Anything that is not an origin gives None.
    """
    text = origin.strip()
    if text.lower() == NULL_ORIGIN:
        return NULL_ORIGIN
    try:
        parts = urlsplit(text.rstrip("/"))
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not scheme or not host or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or _DEFAULT_PORTS.get(scheme) == port:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@attrs.frozen
class OriginPolicy:
    """Which browser origins may open the WebSocket; empty ``allowed`` lets any in.

    A request without an ``Origin`` header is not from a browser page (native
    SDKs do not send one) and passes: the origin check protects users' browsers
    from pages that would open the relay in their name, not the relay from clients.
    """

    allowed: frozenset[str] = frozenset()

    @classmethod
    def of(cls, origins: Iterable[str]) -> OriginPolicy:
        normalized = {normalize_origin(origin) for origin in origins}
        return cls(frozenset(origin for origin in normalized if origin is not None))

    def allows(self, origin: str | None) -> bool:
        if not self.allowed or origin is None:
            return True
        return normalize_origin(origin) in self.allowed


@attrs.frozen
class Refusal:
    """Why a request may not pass, as the HTTP answer it gets."""

    status: int
    reason: str  # a relay_connections_refused_total label
    message: str
    headers: tuple[tuple[str, str], ...] = ()


UNAUTHORIZED: Final = Refusal(
    401,
    "unauthorized",
    "an API key is required: send X-API-Key: <key> or Authorization: Bearer <key>",
    (("www-authenticate", 'Bearer realm="stag-relay"'),),
)
FORBIDDEN_ORIGIN: Final = Refusal(403, "origin", "this Origin may not connect")


def check_upgrade(
    headers: Sequence[tuple[str, str]], keys: ApiKeys, origins: OriginPolicy
) -> Refusal | None:
    """None if a WebSocket upgrade with these headers may pass; else why not.

    The key is checked first so that a client without one learns nothing about
    the origin policy.
    """
    if not keys.accepts(presented_keys(headers)):
        return UNAUTHORIZED
    origin_values = [value for name, value in headers if name == "origin"]
    # Several Origin headers: no browser sends that; refuse rather than pick one.
    if len(origin_values) > 1 and origins.allowed:
        return FORBIDDEN_ORIGIN
    if not origins.allows(origin_values[0] if origin_values else None):
        return FORBIDDEN_ORIGIN
    return None


def check_endpoint(headers: Sequence[tuple[str, str]], keys: ApiKeys) -> Refusal | None:
    """None if a protected endpoint (/status, /metrics) may be answered; else UNAUTHORIZED."""
    return None if keys.accepts(presented_keys(headers)) else UNAUTHORIZED
