"""Standard base64 (RFC 4648 section 4), held strictly and decoded fast.

Pure: no I/O. Mesh buffers travel as base64 text, tens of kilobytes each (an SDK
mesh twice over: its buffer inside the base64 of its message), and the relay
decodes each one to check it. CPython's ``binascii`` decodes about 200 KB/ms on
the benchmark's machine: a 41 KB SDK mesh message cost 200 us of the event loop
before its buffer was even looked at. ``pybase64``'s SIMD decoder does the same
in 5 us. For short text (a pose's 140 characters) binascii's plain call is the
cheaper one, so both are used, by length; they accept exactly the same text.
"""

from __future__ import annotations

import binascii
from typing import Final

import pybase64

# Below this many characters binascii's call costs less than pybase64's (0.4 against
# 0.6-0.9 us for a pose's data); at 31 KB pybase64 takes 4.5 us against 180.
_SIMD_FROM: Final = 1024


def decode(text: str) -> bytes | None:
    """The bytes of ``text`` if it is standard base64 with canonical padding, else None.

    Strict: the RFC 4648 alphabet only, no line breaks or spaces, and exactly the
    ``=`` padding the data needs (neither decoder pins that down by itself:
    binascii's strict mode accepts ``"AAAA="``).
    """
    try:
        if len(text) < _SIMD_FROM:
            decoded = binascii.a2b_base64(text, strict_mode=True)
        else:
            decoded = pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return None
    n = len(text)
    padding = (text[-2:] == "==") + (text[-1:] == "=")
    if n % 4 or len(decoded) != n // 4 * 3 - padding:
        return None
    return decoded


def encode(data: bytes) -> str:
    """``data`` as standard base64 text, padded, on one line."""
    if len(data) < _SIMD_FROM:
        return binascii.b2a_base64(data, newline=False).decode("ascii")
    return pybase64.b64encode_as_string(data)
