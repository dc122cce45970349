"""Client WebSocket frames built by hand, byte by byte as RFC 6455 5.2 draws them: the
frames no well-behaved client library would send (non-minimal lengths, bad masks)."""

from __future__ import annotations

TEXT, BINARY, CLOSE, PING, PONG, CONT = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = b"\x11\x22\x33\x44",
    rsv: int = 0,
    length_bytes: int | None = None,
) -> bytes:
    """A client frame as RFC 6455 5.2 draws it; ``length_bytes`` forces the length
    encoding (0, 2 or 8 extra bytes) to build non-minimal ones."""
    n = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    mask_bit = 0x80 if mask is not None else 0
    if length_bytes == 0:
        head = bytes((first, mask_bit | n))
    elif length_bytes == 2:
        head = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
