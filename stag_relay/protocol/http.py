"""HTTP requests and answers as plain values: what the front door hands its endpoints
and the gate, and what they hand back. Pure: h11 turns bytes into these and back."""

from __future__ import annotations

import attrs
import orjson


@attrs.frozen
class HttpRequest:
    method: str
    target: str
    path: str
    query: str
    # Header names lower-cased, values decoded as latin-1 (RFC 9110).
    headers: tuple[tuple[str, str], ...]
    peer: str

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = (self.header("upgrade") or "").lower()
        connection = (self.header("connection") or "").lower()
        return upgrade == "websocket" and "upgrade" in connection


@attrs.frozen
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(
    status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(payload) + b"\n", "application/json", headers)


def error_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    return json_response(status, {"error": message}, headers)
